"""CSV formula neutralisation (issue 7): no exported cell can start a spreadsheet formula."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.domain.csv_safe import FORMULA_PREFIXES, neutralise, neutralise_row


@pytest.mark.parametrize(
    "cell",
    ['=HYPERLINK("http://evil","x")', "+1+1", "-2+3", "@SUM(A1)", "\t=1", "\r=1"],
)
def test_formula_prefixes_are_quoted(cell):
    assert neutralise(cell) == "'" + cell


def test_plain_text_numbers_and_empty_pass_through():
    assert neutralise("lena") == "lena"
    assert neutralise("") == ""
    assert neutralise(None) is None
    assert neutralise(-5) == -5
    assert neutralise(2.5) == 2.5
    assert neutralise_row(["a", "=b", 3]) == ["a", "'=b", 3]


@given(st.text())
def test_no_cell_starts_a_formula_and_the_original_is_recoverable(text):
    out = neutralise(text)
    assert not out.startswith(FORMULA_PREFIXES)
    assert out == text or (out == "'" + text and text.startswith(FORMULA_PREFIXES))
