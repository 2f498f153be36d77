"""CSV cells that a spreadsheet cannot execute (OWASP "CSV injection").

A cell that starts with `=`, `+`, `-`, `@`, a tab or a carriage return is read by Excel,
LibreOffice and Google Sheets as a formula (`=HYPERLINK(...)`, `@SUM(...)`). Every CSV the product
writes (audit export, queue export) passes each cell through `neutralise`, which prefixes such a
cell with a single quote: the spreadsheet shows the text, and the original is recoverable by
dropping that one leading quote. Numbers are written as numbers, so a negative number stays one.
"""

from __future__ import annotations

FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")


def neutralise(value: object) -> object:
    """The cell as a spreadsheet should see it: text that cannot start a formula."""
    if value is None or isinstance(value, bool | int | float):
        return value
    text = str(value)
    if text.startswith(FORMULA_PREFIXES):
        return "'" + text
    return text


def neutralise_row(row: list | tuple) -> list:
    return [neutralise(cell) for cell in row]
