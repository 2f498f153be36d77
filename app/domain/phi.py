"""PHI: the one rule that decides what each role may see, and the redactor that applies it
(issue 7; docs/SECURITY.md "PHI").

* `PHI_RULE` — which roles see patient identifiers and which may open a full payload.
* `phi_identifiers(content_type, text)` — the known identifiers of one message: patient reference
  and its bare id, MRNs and other patient identifiers, names, birth date, phone, street.
* `Redactor(identifiers)` — masks every occurrence of those identifiers, in their plain,
  HTML-escaped and JSON-escaped forms, word-bounded and case-insensitive, in one pass of one
  precompiled pattern; in HTML it leaves our own URLs and element ids alone.

No Flask, SQLAlchemy or I/O here: the web layer and the services decide when to apply it.
"""

from __future__ import annotations

import html
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .identifiers import extract_identifiers
from .payloads import FHIR_JSON, HL7_ER7
from .roles import Permission, Role, has_permission

# Shorter tokens are not identifying and would mask ordinary words ("Al", "Jo", "F") or numbers.
MIN_LENGTH = 3
# A number alone identifies nobody below this many digits (counts, years, our own row ids).
MIN_DIGITS = 5
MASK = "****"
_ID_LIKE = re.compile(r"[\w./:-]*\w\w")


@dataclass(frozen=True)
class PhiRule:
    """Who sees what. Roles in `sees_identifiers` see patient identifiers wherever they appear;
    every other role sees them masked everywhere (lists, free text, attempts, audit reasons,
    exports, API answers) except in a full payload it opened itself, which is an audited PHI view
    (`may_view_payload`)."""

    sees_identifiers: frozenset[Role] = frozenset({Role.CLINICAL_LEAD, Role.SERVICE})

    def masks(self, role: str | Role | None) -> bool:
        """True when `role` must not see patient identifiers (unknown roles: masked)."""
        try:
            return Role(role) not in self.sees_identifiers
        except ValueError:
            return True

    def may_view_payload(self, role: str | Role | None) -> bool:
        """True when `role` may open a full payload (recorded as a `phi.view`)."""
        return role is not None and has_permission(role, Permission.VIEW_PAYLOAD)


PHI_RULE = PhiRule()

# --- which values of a message identify its patient -------------------------------------------------

# HL7 v2 PID fields that carry identifiers or demographics (v2.5.1): 2 patient id, 3 identifier
# list, 4 alternate id, 5 name, 6 mother's maiden name, 7 birth date, 9 alias, 11 address,
# 13/14 phone, 18 account number, 19 SSN, 20 driver's licence, 21 mother's identifier.
_PID_FIELDS = (2, 3, 4, 5, 6, 7, 9, 11, 13, 14, 18, 19, 20, 21)
_PID_ALL_COMPONENTS = {5, 6, 9}  # names: family, given, middle, suffix...
_PATIENT_KINDS = {"patient", "patient_id"}
_FHIR_PATIENTS = {"Patient", "RelatedPerson", "Person"}


def phi_identifiers(content_type: str, text: str | None, message_type: str | None = None) -> set[str]:
    """The patient-identifying values a payload carries. Never raises: what cannot be read
    yields what could. `message_type` "Patient" makes a FHIR resource's own identifiers MRNs."""
    if not text:
        return set()
    found: set[str] = set()
    try:
        if content_type == FHIR_JSON:
            doc = json.loads(text)
            for kind, value in extract_identifiers(content_type, text, doc):
                if kind in _PATIENT_KINDS or (
                    kind == "identifier"
                    and isinstance(doc, dict)
                    and doc.get("resourceType") in _FHIR_PATIENTS
                ):
                    found.add(value)
            _fhir_people(doc, found, 0)
        elif content_type == HL7_ER7:
            found.update(v for k, v in extract_identifiers(content_type, text) if k in _PATIENT_KINDS)
            _hl7_pid(text, found)
    except (ValueError, RecursionError, TypeError, AttributeError, IndexError):
        pass
    return {v for v in (value.strip() for value in found) if identifying(v)}


def identifying(value: str) -> bool:
    """Long enough to identify someone (MIN_LENGTH, MIN_DIGITS for plain numbers)."""
    if len(value) < MIN_LENGTH or len(value) > 200:
        return False
    return not (value.isdigit() and len(value) < MIN_DIGITS)


def reference_forms(reference: str | None) -> set[str]:
    """`Patient/123456` and its bare id `123456`."""
    if not reference:
        return set()
    out = {reference}
    if "/" in reference:
        out.add(reference.rsplit("/", 1)[1])
    return {v for v in out if identifying(v)}


def _fhir_people(node: Any, found: set[str], depth: int) -> None:
    """Names, birth dates, phone numbers, address lines and references' display names of every
    person-like resource (the resource itself, `contained` ones) and of subject/patient displays."""
    if depth > 20:
        return
    if isinstance(node, list):
        for item in node:
            _fhir_people(item, found, depth + 1)
        return
    if not isinstance(node, dict):
        return
    if node.get("resourceType") in _FHIR_PATIENTS:
        for name in node.get("name") or []:
            if isinstance(name, dict):
                for key in ("family", "text"):
                    if isinstance(name.get(key), str):
                        found.add(name[key])
                for key in ("given", "prefix", "suffix"):
                    found.update(v for v in name.get(key) or [] if isinstance(v, str))
        if isinstance(node.get("birthDate"), str):
            found.add(node["birthDate"])
        for telecom in node.get("telecom") or []:
            if isinstance(telecom, dict) and isinstance(telecom.get("value"), str):
                found.add(telecom["value"])
        for address in node.get("address") or []:
            if isinstance(address, dict):
                found.update(v for v in address.get("line") or [] if isinstance(v, str))
        for ident in node.get("identifier") or []:
            if isinstance(ident, dict) and isinstance(ident.get("value"), str):
                found.add(ident["value"])
        if isinstance(node.get("id"), str) and depth:
            found.add(node["id"])
    for key in ("subject", "patient", "beneficiary", "individual"):
        ref = node.get(key)
        if isinstance(ref, dict) and isinstance(ref.get("display"), str):
            found.add(ref["display"])
            found.update(ref["display"].replace(",", " ").split())
    _fhir_people(node.get("contained"), found, depth + 1)
    for key in ("entry",):
        for entry in node.get(key) or []:
            if isinstance(entry, dict):
                _fhir_people(entry.get("resource"), found, depth + 1)


def _hl7_pid(text: str, found: set[str]) -> None:
    text = text.lstrip("\x0b\r\n ")
    if not text.startswith("MSH") or len(text) < 8:
        return
    field_sep, component, repetition = text[3], text[4], text[5] if len(text) > 5 else "~"
    subcomponent = text[7] if len(text) > 7 else "&"
    for segment in re.split(r"\r\n|\r|\n", text):
        fields = segment.split(field_sep)
        if fields[0] not in ("PID", "NK1", "MRG", "PD1"):
            continue
        numbers = _PID_FIELDS if fields[0] == "PID" else range(1, len(fields))
        for number in numbers:
            if number >= len(fields):
                continue
            for rep in fields[number].split(repetition):
                components = rep.split(component)
                if fields[0] == "PID" and number not in _PID_ALL_COMPONENTS:
                    components = components[:1]
                for value in components:
                    found.update(v for v in value.split(subcomponent) if v)


# --- the redactor ------------------------------------------------------------------------------------


_PLAIN = re.compile(r"[A-Za-z0-9 ._/:-]*")


def escaped_forms(value: str) -> set[str]:
    """How `value` may be written in what we send: as is, HTML-escaped, JSON-escaped (ASCII and
    not), and HTML-escaped JSON."""
    if _PLAIN.fullmatch(value):
        return {value}  # nothing in it is escaped anywhere
    forms = set()
    for ascii_only in (True, False):
        in_json = json.dumps(value, ensure_ascii=ascii_only)[1:-1]
        for form in (value, in_json):
            forms |= {form, html.escape(form), _jinja_escape(form)}
    return {f for f in forms if f}


def _jinja_escape(value: str) -> str:
    # markupsafe's spelling (what templates produce): &#34; and &#39; for the quotes.
    return (
        value.replace("&", "&amp;")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace('"', "&#34;")
        .replace("'", "&#39;")
    )


def _trie_pattern(words: Iterable[str]) -> str:
    """One regex alternation of literal words, factored as a trie: matching costs about the
    length of the text, not the number of words (a page can know a few thousand)."""
    trie: dict = {}
    for word in words:
        node = trie
        for char in word:
            node = node.get(char) or node.setdefault(char, {})
        node[""] = None

    def build(node: dict) -> str:
        branches = []
        for char, child in node.items():
            if not char:
                continue
            run = [_escape(char)]
            while len(child) == 1 and "" not in child:  # a chain: no group per character
                [(char, child)] = child.items()
                run.append(_escape(char))
            branches.append("".join(run) + build(child))
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return f"(?:{body})?" if "" in node else body

    return build(trie)


def _escape(char: str, _cache: dict[str, str] = {}) -> str:  # noqa: B006 - a deliberate cache
    escaped = _cache.get(char)
    if escaped is None:
        escaped = _cache[char] = re.escape(char)
    return escaped


# Attributes whose value is ours — URLs, element ids, htmx wiring: never rewritten (a patient id
# equal to an exception id must not break the exception's link). What a person reads — text,
# title, value, aria-label — is masked.
_OURS = (
    r"(?:href|src|action|formaction|id|for|name|class|method|type|rel|role|"
    r"hx-[a-z-]+|aria-(?:controls|labelledby|describedby|owns)|data-[a-z0-9-]+)"
)
_OUR_ATTRIBUTE = (
    rf"""\s{_OURS}\s*=\s*(?:"[^"]*"|'[^']*')"""
    # and whole tags that carry only our state: hidden inputs (CSRF token, versions), selection
    # checkboxes (their values are our row ids: a bare patient id that equals an exception id
    # must not turn a selection into "****"), meta tags.
    r"""|<input\s[^>]*type="(?:hidden|checkbox)"[^>]*>|<meta\s[^>]*>"""
)


def _case_folding() -> dict[int, int] | None:
    """str.translate table taking every character the regex engine treats as the same letter when
    ignoring case (beyond lower-casing: ı/i, ſ/s, µ/μ, the Greek and Cyrillic variants) to one of
    them; None when this Python does not expose the engine's table."""
    try:
        from re._casefix import _EXTRA_CASES  # the engine's own table (Python 3.11+)
    except ImportError:  # pragma: no cover - another Python
        return None
    return {cp: min((cp, *others)) for cp, others in _EXTRA_CASES.items() if min((cp, *others)) != cp}


_FOLDING = _case_folding()
_FOLDED_AWAY = re.compile("[" + "".join(map(chr, _FOLDING or {})) + "]") if _FOLDING else None


def _fold(text: str) -> str | None:
    """The text as a case-insensitive match sees it: lower-cased, equivalent letters made one
    (translated only when one of them occurs: str.translate is a dict lookup per character)."""
    if _FOLDED_AWAY is None:
        return None
    lowered = text.lower()
    return lowered.translate(_FOLDING) if _FOLDED_AWAY.search(lowered) else lowered


class Redactor:
    """Masks every occurrence of the given identifiers (and their escaped forms) in any text,
    case-insensitively and word-bounded (not inside a longer word or number), in one pass.

    `mask` replaces a match: the default keeps what a list needs to tell rows apart and no more
    (`Patient/****56`, `****`)."""

    def __init__(self, identifiers: Iterable[str]):
        values = {v for v in identifiers if v and identifying(v)}
        self.identifiers = frozenset(values)
        self._words: str | None = None
        self._text: re.Pattern | None = None
        self._html: re.Pattern | None = None
        self._html_folded: re.Pattern | None = None
        self._forms: set[str] = set()
        if values:
            # Matching ignores case: one lower-case spelling of each form is enough. Longest first
            # at each position (the trie's optional tails are greedy).
            self._forms = {form.lower() for value in values for form in escaped_forms(value)}
            self._words = _trie_pattern(self._forms)

    def __bool__(self) -> bool:
        return self._words is not None

    def _text_pattern(self) -> re.Pattern:
        # Compiled on first use, once: a page needs only the HTML one, an export only this one.
        if self._text is None:
            self._text = re.compile(rf"(?<!\w)(?:{self._words})(?!\w)", re.IGNORECASE)
        return self._text

    def _html_pattern(self) -> re.Pattern:
        if self._html is None:
            self._html = re.compile(
                rf"(?P<ours>{_OUR_ATTRIBUTE})|(?<!\w)(?:{self._words})(?!\w)", re.IGNORECASE
            )
        return self._html

    @staticmethod
    def mask(found: str) -> str:
        prefix, slash, tail = found.rpartition("/")
        if slash and prefix.isalpha():
            return f"{prefix}/{MASK}{tail[-2:] if len(tail) > 4 else ''}"
        # An id keeps its last two characters (rows stay distinguishable); a name keeps nothing.
        keep = len(found) > 6 and _ID_LIKE.fullmatch(found) is not None and any(c.isdigit() for c in found)
        return MASK + (found[-2:] if keep else "")

    def text(self, value: str) -> str:
        """Plain text, CSV or JSON text: every occurrence masked."""
        if self._words is None or not value:
            return value
        return self._text_pattern().sub(lambda m: self.mask(m.group(0)), value)

    def html(self, value: str) -> str:
        """An HTML document or fragment: text and attribute values masked, except our own URLs,
        element ids and htmx attributes (see _OURS).

        Matched case-sensitively on the text case-folded (`_fold`), which finds exactly what the
        case-insensitive pattern finds at half its cost (a queue page: 8 ms -> 4 ms); the
        original text is kept and only the matches are masked. A text whose folding changes its
        length (a character that lower-cases to two) is matched case-insensitively instead."""
        if self._words is None or not value:
            return value
        folded = _fold(value)
        if folded is None or len(folded) != len(value):
            return self._html_ignoring_case(value)
        if self._html_folded is None:
            words = _trie_pattern({_fold(form) for form in self._forms})  # _fold works: checked above
            self._html_folded = re.compile(rf"(?P<ours>{_OUR_ATTRIBUTE})|(?<!\w)(?:{words})(?!\w)")
        parts: list[str] = []
        last = 0
        for match in self._html_folded.finditer(folded):
            if match.group("ours"):
                continue
            start, end = match.span()
            parts.append(value[last:start])
            parts.append(self.mask(value[start:end]))
            last = end
        if not parts:
            return value
        parts.append(value[last:])
        return "".join(parts)

    def _html_ignoring_case(self, value: str) -> str:
        def replace(match: re.Match) -> str:
            return match.group(0) if match.group("ours") else self.mask(match.group(0))

        return self._html_pattern().sub(replace, value)

    def data(self, value: Any) -> Any:
        """A decoded JSON value: every string in it masked (keys and numbers kept)."""
        if self._words is None:
            return value
        if isinstance(value, str):
            return self.text(value)
        if isinstance(value, list):
            return [self.data(v) for v in value]
        if isinstance(value, dict):
            return {k: self.data(v) for k, v in value.items()}
        return value

    def found_in(self, value: str) -> bool:
        return self._words is not None and bool(value) and self._text_pattern().search(value) is not None
