"""seed.hl7_corpus: reproducible for a seed, every quirk present, and each quirk's label true of the
bytes — checked by detectors written here from the bytes alone, not from the generator's notes."""

from __future__ import annotations

import random
import re
import unicodedata
from collections import defaultdict

import ftfy
import hl7
import pytest

from seed import hl7_corpus as h

CODECS = {"8859/1": "latin-1", "WINDOWS-1252": "cp1252"}
ESCAPE = re.compile(r"\\(F|S|T|R|E|H|N|\.br|X(?:[0-9A-Fa-f]{2})+|Z[^\\\r\n|^~&]*)\\")


def _msh(raw: bytes) -> list[bytes]:
    return raw.split(b"\r", 1)[0].split(b"\n", 1)[0].split(b"|")


def _text(raw: bytes) -> str:
    """Decoded the way a careful receiver would, mojibake undone."""
    fields = _msh(raw)
    declared = fields[17].decode() if len(fields) > 17 else ""
    if declared in CODECS:
        return raw.decode(CODECS[declared])
    try:
        return ftfy.fix_encoding(raw.decode("utf-8"))
    except UnicodeDecodeError:
        return raw.decode("cp1252")


def _field(text: str, segment: str, number: int) -> str | None:
    for line in re.split(r"\r\n|\r|\n", text):
        parts = line.split("|")
        if parts[0] == segment:
            return parts[number] if len(parts) > number else ""
    return None


def _names(text: str) -> list[str]:
    return (_field(text, "PID", 5) or "").split("~")


VIETNAMESE = set("ăâđêôơưĂÂĐÊÔƠƯ") | {chr(c) for c in range(0x1EA0, 0x1EFA)} - {"\u1ecc", "\u1ecd"}


def _script(names: list[str], word: str) -> bool:
    return any(word in unicodedata.name(ch, "") for n in names[1:] for ch in n if ch.isalpha())


DETECTORS = {
    "diacritics": lambda raw, t: any(ch.isalpha() and not ch.isascii() for ch in _names(t)[0]),
    "vietnamese_family_first": lambda raw, t: bool(set(_names(t)[0]) & VIETNAMESE),
    "greek_name": lambda raw, t: _script(_names(t), "GREEK"),
    "cyrillic_name": lambda raw, t: _script(_names(t), "CYRILLIC"),
    "arabic_name": lambda raw, t: _script(_names(t), "ARABIC"),
    "cjk_name": lambda raw, t: _script(_names(t), "CJK"),
    "latin1_declared": lambda raw, t: len(_msh(raw)) > 17 and _msh(raw)[17] == b"8859/1",
    "cp1252_declared": lambda raw, t: len(_msh(raw)) > 17 and _msh(raw)[17] == b"WINDOWS-1252",
    "latin1_undeclared": lambda raw, t: (
        len(_msh(raw)) <= 17 and not _utf8(raw) and not re.search(rb"[\x80-\x9f]", raw)
    ),
    "cp1252_undeclared": lambda raw, t: len(_msh(raw)) <= 17 and not _utf8(raw) and bool(re.search(rb"[\x80-\x9f]", raw)),
    "double_encoded_utf8": lambda raw, t: _utf8(raw) and ftfy.fix_encoding(raw.decode()) != raw.decode(),
    "date_yyyymmdd": lambda raw, t: re.fullmatch(rb"\d{8}", _msh(raw)[6]) is not None,
    "date_yyyymmddhhmm": lambda raw, t: re.fullmatch(rb"\d{12}", _msh(raw)[6]) is not None,
    "date_offset": lambda raw, t: re.fullmatch(rb"\d{14}[+-]\d{4}", _msh(raw)[6]) is not None,
    "dg1_icd9": lambda raw, t: "^I9C" in t and "^I10" not in t,
    "icd9_icd10_mix": lambda raw, t: "^I9C" in t and "^I10" in t,
    "z_segment": lambda raw, t: re.search(r"(^|[\r\n])Z[A-Z0-9]{2}\|", t) is not None,
    "empty_pid3": lambda raw, t: _field(t, "PID", 3) == "",
    "empty_pid5": lambda raw, t: _field(t, "PID", 5) == "",
    "overlong_field": lambda raw, t: any(len(f) > 400 for f in re.split(r"[|\r\n]", t)),
    "bad_escape": lambda raw, t: any(
        ESCAPE.sub("", part).count("\\") for line in re.split(r"\r\n|\r|\n", t)[1:] for part in line.split("|")
    ),
    "crlf_terminators": lambda raw, t: b"\r\n" in raw,
    "truncated": lambda raw, t: not raw.endswith((b"\r", b"\n")),
}  # fmt: skip


def _utf8(raw: bytes) -> bool:
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.fixture(scope="module")
def messages():
    return h.generate()


def test_same_seed_same_bytes_and_another_seed_other_bytes():
    first, again = h.generate(seed=11, size=40), h.generate(seed=11, size=40)
    assert [m.raw for m in first] == [m.raw for m in again]
    assert [m.quirks for m in first] == [m.quirks for m in again]
    other = h.generate(seed=12, size=40)
    assert [m.raw for m in other] != [m.raw for m in first]


def test_every_quirk_occurs_in_the_default_corpus(messages):
    counts = h.quirk_counts(messages)
    assert (
        set(counts) == set(h.QUIRKS) == set(h.CHOSEN_QUIRKS) | set(h.NAME_QUIRKS) | {"near_duplicate_patient"}
    )
    assert all(n >= 1 for n in counts.values()), counts
    assert len(messages) == h.DEFAULT_SIZE and {m.message_type for m in messages} == set(h.MESSAGE_TYPES)


@pytest.mark.parametrize("quirk", [q for q in h.QUIRKS if q != "near_duplicate_patient"])
def test_each_quirk_label_is_true_of_exactly_the_messages_that_carry_it(messages, quirk):
    detected = {m.name for m in messages if DETECTORS[quirk](m.raw, _text(m.raw))}
    labelled = {m.name for m in messages if quirk in m.quirks}
    assert detected == labelled
    assert h.quirk_counts(messages)[quirk] == len(detected)


def test_near_duplicates_share_name_and_birth_date_under_another_mrn(messages):
    mrns = defaultdict(set)
    for m in messages:
        text = _text(m.raw)
        if _field(text, "PID", 3) and _field(text, "PID", 5):
            key = (_names(text)[0], _field(text, "PID", 7))
            mrns[key, "near_duplicate_patient" in m.quirks].add(_field(text, "PID", 3).split("^")[0])
    duplicated = [key for (key, dup) in mrns if dup]
    assert len(duplicated) == h.quirk_counts(messages)["near_duplicate_patient"] == h.NEAR_DUPLICATE_PAIRS
    for key in duplicated:
        assert mrns[key, False] and not (mrns[key, True] & mrns[key, False])  # same person, other MRN
    assert all(len(found) == 1 for (key, dup), found in mrns.items() if not dup)  # otherwise one MRN


def test_well_formed_messages_parse_with_python_hl7_and_carry_their_type(messages):
    clean = [m for m in messages if not {"truncated", "crlf_terminators"} & set(m.quirks)]
    assert len(clean) > len(messages) / 2
    for m in clean:
        parsed = hl7.parse(_text(m.raw))
        assert str(parsed.segment("MSH")[9]).startswith(m.message_type)
        assert str(parsed.segment("MSH")[12]) == "2.5.1"


def test_builder_refuses_quirks_that_cannot_go_together():
    rng = random.Random(1)
    with pytest.raises(ValueError):
        h.build_message("ORU^R01", rng, quirks=("dg1_icd9",))
    with pytest.raises(ValueError):
        h.build_message("ADT^A01", rng, quirks=("latin1_declared", "cp1252_declared"))
    with pytest.raises(ValueError):
        h.build_message("ADT^A01", rng, quirks=("empty_pid5", "double_encoded_utf8"))
    with pytest.raises(ValueError):
        h.build_message("ADT^A01", rng, quirks=("latin1_declared",), patient=h.PATIENTS[-1])  # Arabic


def test_published_samples_are_cited_and_verbatim():
    assert len(h.PUBLISHED_SAMPLES) >= 3
    for sample in h.PUBLISHED_SAMPLES:
        assert sample.published and "(" in sample.source  # repository, path, commit and license
        assert sample.raw.isascii()
    by_name = {s.name: s for s in h.PUBLISHED_SAMPLES}
    assert by_name["python-hl7-sample-hl7"].raw.startswith(b"MSH|^~\\&|GHH LAB|ELAB-3|GHH OE|BLDG4|")
    assert by_name["python-hl7-vinah-batch"].raw.startswith(b"FHS|")
    assert h.full_corpus(size=40)[-len(h.PUBLISHED_SAMPLES) :] == list(h.PUBLISHED_SAMPLES)
