"""A synthetic HL7 v2.5.1 corpus with the quirks production feeds really carry, plus a few real
published sample messages.

Everything generated here is invented: no patient, practitioner or identifier belongs to anyone
(the people come from `seed.corpus.PATIENTS`, plus two invented patients whose names are written in
Greek and Arabic script). Builders are pure functions of their arguments: the same
`random.Random(seed)` gives the same bytes, so tests and `seed.demo` see the same corpus every run.

Message types: ADT^A01, ADT^A04, ADT^A08, ORM^O01, ORU^R01, SIU^S12. Each generated message is
returned as `Hl7Message(raw bytes, quirks)`: the deliberate quirks it carries, by name from
`QUIRKS`; `quirk_counts` counts them over a corpus. The quirks model the field guide's production
data ("EHR Integration: A Modern Engineer's Guide for 2026", "The sandbox doesn't match
production"): Latin-1 in legacy fields, Windows-1252 from imported documents, UTF-8 double-encoded
on the way, names with diacritics and in several scripts, ICD-9 in one module and ICD-10 in
another, half-merged duplicate patients, custom Z-segments, dates in unusual formats — and what
interface engines do to messages (CR LF terminators, truncation, over-long fields, bad escapes).

`PUBLISHED_SAMPLES` are real sample messages shipped with open-source HL7 packages, verbatim, each
cited (repository, path, commit, license) where it is defined.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from . import corpus
from .corpus import SyntheticPatient

HL7_ER7 = "x-application/hl7-v2+er7"
MESSAGE_TYPES = ("ADT^A01", "ADT^A04", "ADT^A08", "ORM^O01", "ORU^R01", "SIU^S12")
STRUCTURES = {
    "ADT^A01": "ADT_A01",
    "ADT^A04": "ADT_A01",
    "ADT^A08": "ADT_A01",
    "ORM^O01": "ORM_O01",
    "ORU^R01": "ORU_R01",
    "SIU^S12": "SIU_S12",
}
WITH_DG1 = ("ADT^A01", "ADT^A04", "ADT^A08", "ORM^O01")  # the types that carry diagnoses here
DEFAULT_SEED = 2575
DEFAULT_SIZE = 96

# --------------------------------------------------------------------------- the quirk registry

QUIRKS: dict[str, str] = {
    # names
    "diacritics": "a Latin-script name with diacritics (José Núñez, Zoë Ødegård, Łukasz Wiśniewski)",
    "vietnamese_family_first": "a Vietnamese name, family name first in speech (Nguyễn Thị Hoa)",
    "greek_name": "a second PID-5 repetition in Greek script",
    "cyrillic_name": "a second PID-5 repetition in Cyrillic script",
    "arabic_name": "a second PID-5 repetition in Arabic script (right-to-left)",
    "cjk_name": "a second PID-5 repetition in Chinese characters (XPN-8 'I', ideographic)",
    # bytes
    "latin1_declared": "ISO 8859-1 bytes with MSH-18 '8859/1'",
    "latin1_undeclared": "ISO 8859-1 bytes and no MSH-18: a legacy module that never said so",
    "cp1252_declared": "Windows-1252 bytes (’ and – included) with MSH-18 'WINDOWS-1252'",
    "cp1252_undeclared": "Windows-1252 bytes (’ and – included) and no MSH-18",
    "double_encoded_utf8": "UTF-8 read as Windows-1252 and written as UTF-8 again (MÃ¼ller)",
    # dates
    "date_yyyymmdd": "timestamps (MSH-7, EVN-2, OBR-7, ...) with only a date: YYYYMMDD",
    "date_yyyymmddhhmm": "timestamps to the minute: YYYYMMDDHHMM",
    "date_offset": "timestamps with a UTC offset: YYYYMMDDHHMMSS+0100",
    # content
    "dg1_icd9": "DG1 diagnoses coded in ICD-9-CM only (I9C), from a module never remapped",
    "icd9_icd10_mix": "DG1 diagnoses in ICD-9-CM and ICD-10-CM in one message",
    "near_duplicate_patient": "a second record for a patient: same name and birth date, another MRN",
    "z_segment": "a site-defined Z-segment (ZPD, ZPV, ZOR)",
    "empty_pid3": "PID-3 (patient identifier list, required) empty",
    "empty_pid5": "PID-5 (patient name, required) empty",
    "overlong_field": "PID-11 street address far beyond its 2.5.1 length (a whole note pasted in)",
    "bad_escape": "an escape sequence that is not one (\\X4G\\, an unescaped path, a lone \\T)",
    # framing
    "crlf_terminators": "segments ended by CR LF instead of CR",
    "truncated": "the message cut off mid-segment (an engine's fixed buffer)",
}

ENCODING_QUIRKS = (
    "latin1_declared",
    "latin1_undeclared",
    "cp1252_declared",
    "cp1252_undeclared",
    "double_encoded_utf8",
)
DATE_QUIRKS = ("date_yyyymmdd", "date_yyyymmddhhmm", "date_offset")
ICD_QUIRKS = ("dg1_icd9", "icd9_icd10_mix")
SCRIPT_QUIRKS = ("greek_name", "cyrillic_name", "arabic_name", "cjk_name")
NAME_QUIRKS = ("diacritics", "vietnamese_family_first", *SCRIPT_QUIRKS)
# Chosen by the generator (the name quirks follow from the patient, near-duplicates from the corpus).
CHOSEN_QUIRKS = tuple(q for q in QUIRKS if q not in NAME_QUIRKS and q != "near_duplicate_patient")

# Their bytes differ from UTF-8 only where the patient's name is: not with an empty PID-5.
INVISIBLE_WITHOUT_NAME = ("latin1_declared", "latin1_undeclared", "double_encoded_utf8")

MSH18 = {
    "latin1_declared": "8859/1",
    "cp1252_declared": "WINDOWS-1252",  # not in HL7 table 0211, but what real engines send
}
CODECS = {
    "latin1_declared": "latin-1",
    "latin1_undeclared": "latin-1",
    "cp1252_declared": "cp1252",
    "cp1252_undeclared": "cp1252",
}


@dataclass(frozen=True)
class Hl7Message:
    """One corpus message: its bytes exactly as a sender puts them on the wire."""

    name: str
    message_type: str
    raw: bytes
    quirks: tuple[str, ...] = ()
    source: str = ""  # for published samples: where the message was published

    @property
    def published(self) -> bool:
        return bool(self.source)


# --------------------------------------------------------------------------- people

# Two invented patients whose names are also written in Greek and Arabic script.
# fmt: off
EXTRA_PATIENTS: tuple[SyntheticPatient, ...] = (
    SyntheticPatient("eleni-markou", ("Eleni",), "Markou", "1968-02-19", "female", "Astoria", alt_name="Ελένη Μάρκου", language=("el", "Greek")),
    SyntheticPatient("youssef-nasser", ("Youssef",), "Nasser", "1981-08-05", "male", "Dearborn", alt_name="يوسف ناصر", language=("ar", "Arabic")),
)
# fmt: on
PATIENTS: tuple[SyntheticPatient, ...] = corpus.PATIENTS + EXTRA_PATIENTS

# key -> (family, given, quirk, XPN-8 name representation): the name in its own script, sent as
# PID-5's second repetition after the Latin transliteration, as registration systems do.
NATIVE_NAMES: dict[str, tuple[str, str, str, str]] = {
    "dmitrii-smirnov": ("Смирнов", "Дмитрий", "cyrillic_name", ""),
    "li-wei": ("李", "伟", "cjk_name", "I"),
    "eleni-markou": ("Μάρκου", "Ελένη", "greek_name", ""),
    "youssef-nasser": ("ناصر", "يوسف", "arabic_name", ""),
}

# ISO 639-2 codes for PID-15 (primary language).
LANGUAGES = {
    "es": "spa",
    "nb": "nob",
    "vi": "vie",
    "fr": "fra",
    "pl": "pol",
    "lv": "lav",
    "yo": "yor",
    "ru": "rus",
    "zh": "zho",
    "tr": "tur",
    "el": "ell",
    "ar": "ara",
    "en-US": "eng",
}

STREETS = ("Harbor St", "Oak Ave", "Lakeshore Dr", "Maple Ct", "Riverside Blvd", "Elm St", "Cedar Ln")
STATES = {
    "Milwaukee": "WI",
    "Minneapolis": "MN",
    "Houston": "TX",
    "Boston": "MA",
    "New Orleans": "LA",
    "Duluth": "MN",
    "Chicago": "IL",
    "Cleveland": "OH",
    "Madison": "WI",
    "Providence": "RI",
    "Hartford": "CT",
    "Atlanta": "GA",
    "Brooklyn": "NY",
    "San Francisco": "CA",
    "Paterson": "NJ",
    "Racine": "WI",
    "Seattle": "WA",
    "El Paso": "TX",
    "Honolulu": "HI",
    "Burlington": "VT",
    "Astoria": "NY",
    "Dearborn": "MI",
}


def name_quirks(patient: SyntheticPatient) -> tuple[str, ...]:
    """The name quirks a patient brings into any message about them."""
    found = []
    latin = " ".join((*patient.given, patient.family))
    if any(ch.isalpha() and not ch.isascii() for ch in latin):
        found.append("diacritics")
    if patient.family_first:
        found.append("vietnamese_family_first")
    if patient.key in NATIVE_NAMES:
        found.append(NATIVE_NAMES[patient.key][2])
    return tuple(found)


def mrn(patient: SyntheticPatient, *, duplicate: bool = False) -> str:
    """A stable eight-digit MRN; `duplicate`: the half-merged second record's."""
    digest = hashlib.sha256(f"hl7|{patient.key}|{'dup' if duplicate else 'mrn'}".encode()).hexdigest()
    return f"{int(digest[:12], 16) % 10**8:08d}"


def _encodable(text: str, codec: str) -> bool:
    try:
        text.encode(codec)
    except UnicodeEncodeError:
        return False
    return True


def _patient_text(patient: SyntheticPatient) -> str:
    return " ".join((*patient.given, patient.family, patient.city))


def patients_for(quirks: Iterable[str]) -> tuple[SyntheticPatient, ...]:
    """The patients a message with these chosen quirks can be about."""
    quirks = set(quirks)
    pool = PATIENTS
    for quirk, codec in CODECS.items():
        if quirk in quirks:  # the bytes must differ from UTF-8, and the name must fit the code page
            pool = tuple(
                p
                for p in pool
                if p.key not in NATIVE_NAMES
                and not _patient_text(p).isascii()
                and _encodable(_patient_text(p), codec)
            )
    if "double_encoded_utf8" in quirks:
        pool = tuple(p for p in pool if not _patient_text(p).isascii())
    return pool


# --------------------------------------------------------------------------- fields


def escape(value: str) -> str:
    """HL7 escaping of data that contains the delimiters (| ^ ~ \\ &)."""
    out = value.replace("\\", "\\E\\")
    for ch, esc in (("|", "\\F\\"), ("^", "\\S\\"), ("~", "\\R\\"), ("&", "\\T\\")):
        out = out.replace(ch, esc)
    return out


def timestamp(at: datetime, style: str, rng: random.Random) -> str:
    """An HL7 DTM in the given style: full (YYYYMMDDHHMMSS), date, minute, offset."""
    if style == "date_yyyymmdd":
        return at.strftime("%Y%m%d")
    if style == "date_yyyymmddhhmm":
        return at.strftime("%Y%m%d%H%M")
    if style == "date_offset":
        return at.strftime("%Y%m%d%H%M%S") + rng.choice(("+0100", "-0500", "+0000", "+0530"))
    return at.strftime("%Y%m%d%H%M%S")


def _segment(name: str, fields: dict[int, str]) -> str:
    """A segment from {field number: value}; empty trailing fields are left off."""
    last = max(fields) if fields else 0
    return "|".join([name, *(fields.get(i, "") for i in range(1, last + 1))])


def _xpn(patient: SyntheticPatient) -> str:
    if patient.family_first:  # Vietnamese: Nguyễn (family) Thị (middle) Hoa (given)
        family, given, middle = patient.family, patient.given[-1], " ".join(patient.given[:-1])
    else:
        family, given, middle = patient.family, patient.given[0], " ".join(patient.given[1:])
    latin = "^".join([escape(family), escape(given), escape(middle), "", "", "", "L"])
    if patient.key not in NATIVE_NAMES:
        return latin
    n_family, n_given, _, representation = NATIVE_NAMES[patient.key]
    native = "^".join([n_family, n_given, "", "", "", "", "L", representation]).rstrip("^")
    return f"{latin}~{native}"


def _xcn(who: corpus.Practitioner) -> str:
    words = who.display.replace("Dr. ", "").split(",")[0].split()
    return "^".join([who.npi, escape(words[-1]), escape(" ".join(words[:-1])), "", "", "", "", "", "NPI"])


# --------------------------------------------------------------------------- one message


@dataclass(frozen=True)
class Parties:
    """Who sends and who receives: MSH-3/4 and MSH-5/6 (the simulator's tenant is MSH-6)."""

    sending_application: str = "RECON"
    sending_facility: str = "MERCY"
    receiving_application: str = "EHR"
    receiving_facility: str = "EHR"


BASE_TIME = datetime(2026, 11, 30, 7, 0, 0)


def build_message(
    message_type: str,
    rng: random.Random,
    *,
    quirks: Sequence[str] = (),
    patient: SyntheticPatient | None = None,
    parties: Parties = Parties(),
    duplicate_record: bool = False,
    name: str = "",
) -> Hl7Message:
    """One HL7 v2.5.1 message of `message_type` carrying the chosen `quirks` (CHOSEN_QUIRKS) and the
    name quirks of its patient. Pure: the same rng state gives the same bytes."""
    if message_type not in MESSAGE_TYPES:
        raise ValueError(f"unknown message type {message_type!r}")
    chosen = list(dict.fromkeys(quirks))
    unknown = [q for q in chosen if q not in CHOSEN_QUIRKS]
    if unknown:
        raise ValueError(f"not a chosen quirk: {unknown}")
    for group in (ENCODING_QUIRKS, DATE_QUIRKS, ICD_QUIRKS):
        if len([q for q in chosen if q in group]) > 1:
            raise ValueError(f"at most one of {group}")
    if any(q in ICD_QUIRKS for q in chosen) and message_type not in WITH_DG1:
        raise ValueError(f"{message_type} carries no DG1 here")
    if "empty_pid5" in chosen and any(q in INVISIBLE_WITHOUT_NAME for q in chosen):
        raise ValueError("without a name in PID-5, Latin-1 and double-encoded bytes look like UTF-8")
    if patient is None:
        patient = rng.choice(patients_for(chosen))
    elif patient not in patients_for(chosen):
        raise ValueError(f"{patient.key} cannot carry {chosen}")
    encoding = next((q for q in chosen if q in ENCODING_QUIRKS), None)
    style = next((q for q in chosen if q in DATE_QUIRKS), "full")
    icd = next((q for q in chosen if q in ICD_QUIRKS), None)

    at = BASE_TIME + timedelta(minutes=rng.randint(0, 3 * 24 * 60), seconds=rng.randint(0, 59))
    ts = lambda t: timestamp(t, style, rng)  # noqa: E731
    practitioner = rng.choice(corpus.PRACTITIONERS)
    event = message_type.split("^")[1]
    control = f"{event}{rng.getrandbits(40):010X}"
    msh = {
        2: "^~\\&",
        3: parties.sending_application,
        4: parties.sending_facility,
        5: parties.receiving_application,
        6: parties.receiving_facility,
        7: ts(at),
        9: f"{message_type}^{STRUCTURES[message_type]}",
        10: control,
        11: "P",
        12: "2.5.1",
        15: "AL",
        16: "NE",
        17: "USA",
    }
    if encoding in MSH18:
        msh[18] = MSH18[encoding]
    segments = ["MSH|" + "|".join(msh.get(i, "") for i in range(2, max(msh) + 1))]

    # PID
    record = mrn(patient, duplicate=duplicate_record)
    street = f"{rng.randint(2, 9800)} {rng.choice(STREETS)}"
    if encoding in ("cp1252_declared", "cp1252_undeclared"):
        street += " \u2013 Apt " + str(rng.randint(1, 40))  # the en dash a word processor typed
    other = ""
    if "bad_escape" in chosen:
        other = rng.choice(("Apt 4\\X4G\\", "C:\\RESULTS\\SCAN.PDF", "Bldg \\T rear entrance", "\\Q1\\"))
    if "overlong_field" in chosen:
        note = "Patient states mail goes to the neighbour when away; call before delivery. "
        street += " " + (note * (rng.randint(800, 2400) // len(note) + 1)).strip()
    pid = {
        1: "1",
        3: "" if "empty_pid3" in chosen else f"{record}^^^{parties.sending_facility}^MR",
        5: "" if "empty_pid5" in chosen else _xpn(patient),
        7: patient.birth_date.replace("-", ""),
        8: {"male": "M", "female": "F"}.get(patient.gender, "U"),
        11: "^".join(
            [
                escape(street),
                other,
                escape(patient.city),
                STATES.get(patient.city, "NY"),
                f"{rng.randint(10000, 99999)}",
                "USA",
                "H",
            ]
        ),  # fmt: skip
        13: f"^PRN^PH^^1^{rng.randint(200, 989)}^{rng.randint(2000000, 9999999)}",
        15: f"{LANGUAGES.get(patient.language[0], 'und')}^{patient.language[1]}^ISO639",
        18: f"V{rng.randint(10**7, 10**8 - 1)}^^^{parties.sending_facility}^AN",
    }
    pid_segment = _segment("PID", pid)
    zpd = None
    if "z_segment" in chosen:
        kind = rng.choice(("ZPD", "ZPV", "ZOR"))
        if kind == "ZPD":  # custom demographics: preferred name and interpreter need
            zpd = _segment("ZPD", {1: "1", 2: escape(patient.display), 3: "Y" if rng.random() < 0.5 else "N"})
        elif kind == "ZPV":
            zpd = _segment("ZPV", {1: "1", 2: rng.choice(("VIP", "STAFF", "RESEARCH")), 3: ts(at)})
        else:
            zpd = _segment("ZOR", {1: "1", 2: f"BED-{rng.randint(100, 999)}", 3: "PORTABLE"})
    location = f"{rng.choice(('4W', '5E', 'ICU', 'ED'))}^{rng.randint(401, 499)}^{rng.choice('AB')}^MERCY"
    pv1 = _segment(
        "PV1",
        {1: "1", 2: rng.choice(("I", "O", "E")), 3: location, 7: _xcn(practitioner), 19: f"{rng.getrandbits(32)}"},
    )  # fmt: skip
    dg1 = _diagnoses(rng, icd, ts(at - timedelta(hours=rng.randint(1, 48))))

    if message_type.startswith("ADT"):
        segments += [
            _segment("EVN", {1: event, 2: ts(at), 6: ts(at - timedelta(minutes=rng.randint(1, 30)))})
        ]
        segments += [pid_segment, *([zpd] if zpd else []), pv1, *dg1]
    elif message_type == "ORM^O01":
        system, code, display, *_ = rng.choice(corpus.ORDERABLES)
        placer = f"ORD{rng.randint(10**6, 10**7 - 1)}"
        coding = "LN" if system == corpus.LOINC else "SCT"
        segments += [pid_segment, *([zpd] if zpd else []), pv1]
        segments += [
            _segment("ORC", {1: "NW", 2: f"{placer}^RECON", 5: "SC", 9: ts(at), 12: _xcn(practitioner)}),
            _segment(
                "OBR",
                {
                    1: "1",
                    2: f"{placer}^RECON",
                    4: f"{code}^{escape(display)}^{coding}",
                    7: ts(at),
                    16: _xcn(practitioner),
                },
            ),  # fmt: skip
            *dg1,
        ]
    elif message_type == "ORU^R01":
        panel, panel_display, members = rng.choice(corpus.PANELS)
        placer, filler = f"ORD{rng.randint(10**6, 10**7 - 1)}", f"LAB{rng.randint(10**6, 10**7 - 1)}"
        collected = at - timedelta(hours=rng.randint(1, 6))
        segments += [pid_segment, *([zpd] if zpd else []), pv1]
        segments += [
            _segment("ORC", {1: "RE", 2: f"{placer}^RECON", 3: f"{filler}^LAB", 12: _xcn(practitioner)}),
            _segment(
                "OBR",
                {
                    1: "1",
                    2: f"{placer}^RECON",
                    3: f"{filler}^LAB",
                    4: f"{panel}^{escape(panel_display)}^LN",
                    7: ts(collected),
                    16: _xcn(practitioner),
                    22: ts(at),
                    24: "LAB",
                    25: "F",
                },
            ),  # fmt: skip
        ]
        for n, loinc in enumerate(members, start=1):
            test = next(t for t in corpus.LAB_TESTS if t.loinc == loinc)
            value = round(rng.uniform(test.low * 0.8, test.high * 1.2), test.decimals)
            flag = "H" if value > test.high else "L" if value < test.low else "N"
            low, high = (f"{v:.{test.decimals}f}" for v in (test.low, test.high))
            segments.append(
                _segment(
                    "OBX",
                    {
                        1: str(n),
                        2: "NM",
                        3: f"{loinc}^{escape(test.text)}^LN",
                        5: f"{value:.{test.decimals}f}",
                        6: escape(test.unit),
                        7: f"{low}-{high}",
                        8: flag,
                        11: "F",
                        14: ts(collected),
                    },
                )  # fmt: skip
            )
    else:  # SIU^S12: a new appointment booked
        start = at + timedelta(days=rng.randint(1, 30), hours=rng.randint(0, 8))
        start = start.replace(minute=rng.choice((0, 15, 30, 45)), second=0)
        minutes = rng.choice((15, 20, 30, 45))
        end = start + timedelta(minutes=minutes)
        appointment = f"APT{rng.randint(10**6, 10**7 - 1)}"
        reason = rng.choice(
            (("ROUTINE", "Routine"), ("FOLLOWUP", "A follow up visit"), ("CHECKUP", "A routine check-up"))
        )
        segments += [
            _segment(
                "SCH",
                {1: f"{appointment}^RECON", 2: f"{appointment}^EHR", 6: "^BOOKED", 7: f"{reason[0]}^{reason[1]}^HL70276",
                 8: "NORMAL^Routine schedule request^HL70277", 9: str(minutes), 10: "MIN",
                 11: f"^^{minutes}^{ts(start)}^{ts(end)}", 25: "Booked^Booked^HL70278"},
            ),  # fmt: skip
            pid_segment,
            *([zpd] if zpd else []),
            pv1,
            _segment("RGS", {1: "1", 2: "A"}),
            _segment("AIS", {1: "1", 2: "A", 3: "99213^Office visit, established^CPT", 4: ts(start), 7: str(minutes), 8: "MIN"}),
            _segment("AIP", {1: "1", 2: "A", 3: _xcn(practitioner), 4: "ATND^Attending^HL70443", 6: ts(start)}),
        ]  # fmt: skip

    text = ("\r\n" if "crlf_terminators" in chosen else "\r").join(segments) + (
        "\r\n" if "crlf_terminators" in chosen else "\r"
    )
    raw = _encode(text, encoding)
    if "truncated" in chosen:
        raw = _truncate(raw, rng)
    all_quirks = tuple(
        q for q in QUIRKS if q in chosen or q in name_quirks(patient) and "empty_pid5" not in chosen
    )
    if duplicate_record:
        all_quirks = tuple(q for q in QUIRKS if q in all_quirks or q == "near_duplicate_patient")
    return Hl7Message(name or f"{message_type.replace('^', '-')}-{control}", message_type, raw, all_quirks)


def _diagnoses(rng: random.Random, icd: str | None, when: str) -> list[str]:
    """DG1 segments: ICD-10-CM (I10), ICD-9-CM only (I9C), or one of each."""
    pairs = list(corpus.ICD9_TO_ICD10.items())
    (code9, display9), (code10, display10) = rng.choice(pairs)
    if icd == "dg1_icd9":
        rows = [(code9, display9, "I9C")]
    elif icd == "icd9_icd10_mix":
        (other9, other_display9), _ = rng.choice([p for p in pairs if p[1][0] != code10])
        rows = [(code10, display10, "I10"), (other9, other_display9, "I9C")]
    else:
        rows = [(code10, display10, "I10")]
    return [
        _segment("DG1", {1: str(n), 3: f"{code}^{escape(text)}^{system}", 5: when, 6: "A"})
        for n, (code, text, system) in enumerate(rows, start=1)
    ]


def double_encode(text: str) -> str:
    """UTF-8 bytes misread as Windows-1252 (bytes it leaves undefined read as Latin-1), the way an
    engine channel set to the wrong code page does it: 'Müller' -> 'MÃ¼ller'."""
    return "".join(
        bytes([b]).decode("cp1252") if _encodable_cp1252_byte(b) else bytes([b]).decode("latin-1")
        for b in text.encode("utf-8")
    )


def _encodable_cp1252_byte(b: int) -> bool:
    return b not in (0x81, 0x8D, 0x8F, 0x90, 0x9D)


def _encode(text: str, encoding: str | None) -> bytes:
    if encoding in CODECS:
        return text.encode(CODECS[encoding])
    if encoding == "double_encoded_utf8":
        return double_encode(text).encode("utf-8")
    return text.encode("utf-8")


def _truncate(raw: bytes, rng: random.Random) -> bytes:
    """Cut inside the last segment, after its third field, as a fixed-size engine buffer does
    (never on a terminator, never inside a UTF-8 sequence): what came before stays whole."""
    start = max(raw.rfind(b"\r", 0, len(raw) - 2), raw.rfind(b"\n", 0, len(raw) - 2)) + 1
    lo = start + 4
    for _ in range(3):
        bar = raw.find(b"|", lo)
        lo = bar + 1 if 0 < bar < len(raw) - 3 else lo
    cuts = [
        cut
        for cut in range(lo, len(raw) - 1)
        if raw[cut - 1] not in b"\r\n" and raw[cut] not in b"\r\n" and (raw[cut] & 0xC0) != 0x80
    ]
    return raw[: rng.choice(cuts)]


# --------------------------------------------------------------------------- a corpus

# Every chosen quirk at least once, and every name quirk through a patient that carries it:
# (message type, chosen quirks, patient key or None).
# fmt: off
COVERAGE: tuple[tuple[str, tuple[str, ...], str | None], ...] = (
    ("ADT^A01", (), "jose-nunez"),
    ("ADT^A04", (), "nguyen-thi-hoa"),
    ("ADT^A08", (), "eleni-markou"),
    ("ORU^R01", (), "dmitrii-smirnov"),
    ("SIU^S12", (), "youssef-nasser"),
    ("ORM^O01", (), "li-wei"),
    ("ADT^A08", ("latin1_declared",), "francois-lefevre"),
    ("ORU^R01", ("latin1_undeclared",), "bjorn-astrom"),
    ("ADT^A04", ("cp1252_declared",), "sean-oconnell"),
    ("ORM^O01", ("cp1252_undeclared",), "chloe-dubois-muller"),
    ("ADT^A01", ("double_encoded_utf8",), "chloe-dubois-muller"),
    ("ORU^R01", ("date_yyyymmdd",), None),
    ("SIU^S12", ("date_yyyymmddhhmm",), None),
    ("ADT^A04", ("date_offset",), None),
    ("ADT^A01", ("dg1_icd9",), None),
    ("ORM^O01", ("icd9_icd10_mix",), None),
    ("ADT^A08", ("z_segment",), None),
    ("ADT^A04", ("empty_pid3",), None),
    ("ADT^A08", ("empty_pid5",), None),
    ("ORU^R01", ("overlong_field",), None),
    ("SIU^S12", ("bad_escape",), None),
    ("ORM^O01", ("crlf_terminators",), None),
    ("ORU^R01", ("truncated",), None),
)
# fmt: on
NEAR_DUPLICATE_PAIRS = 3


def random_quirks(message_type: str, rng: random.Random) -> list[str]:
    """0-3 chosen quirks that can go together on this message type."""
    pool = [q for q in CHOSEN_QUIRKS if message_type in WITH_DG1 or q not in ICD_QUIRKS]
    chosen: list[str] = []
    for quirk in rng.sample(pool, k=rng.choice((0, 0, 1, 1, 1, 2, 2, 3))):
        groups = [g for g in (ENCODING_QUIRKS, DATE_QUIRKS, ICD_QUIRKS) if quirk in g]
        if groups and any(q in groups[0] for q in chosen):
            continue
        if {quirk, *chosen} >= {"empty_pid5"} and {quirk, *chosen} & set(INVISIBLE_WITHOUT_NAME):
            continue
        chosen.append(quirk)
    return chosen


def generate(
    seed: int = DEFAULT_SEED, size: int = DEFAULT_SIZE, *, parties: Parties = Parties()
) -> list[Hl7Message]:
    """`size` messages (at least the coverage list plus the near-duplicate pairs), reproducible for
    a seed: every quirk of QUIRKS occurs at least once."""
    rng = random.Random(seed)
    by_key = {p.key: p for p in PATIENTS}
    out: list[Hl7Message] = []
    for n, (message_type, quirks, key) in enumerate(COVERAGE):
        patient = by_key[key] if key else None
        out.append(
            build_message(
                message_type, rng, quirks=quirks, patient=patient, parties=parties, name=f"coverage-{n:02d}"
            )
        )
    # Half-merged duplicates: the same person registered again under a new MRN (ADT^A04), usually
    # after a first registration that used the canonical record.
    for n in range(NEAR_DUPLICATE_PAIRS):
        patient = rng.choice([p for p in PATIENTS if p.key not in NATIVE_NAMES])
        out.append(build_message("ADT^A01", rng, patient=patient, parties=parties, name=f"dup-{n}-first"))
        out.append(
            build_message(
                "ADT^A04",
                rng,
                patient=patient,
                parties=parties,
                duplicate_record=True,
                name=f"dup-{n}-second",
            )
        )
    while len(out) < size:
        message_type = rng.choice(MESSAGE_TYPES)
        quirks = random_quirks(message_type, rng)
        out.append(
            build_message(message_type, rng, quirks=quirks, parties=parties, name=f"random-{len(out):03d}")
        )
    return out


def quirk_counts(messages: Iterable[Hl7Message]) -> dict[str, int]:
    """{quirk: number of messages carrying it} for every quirk in QUIRKS (zeros included)."""
    counts = Counter(q for m in messages for q in m.quirks)
    return {q: counts.get(q, 0) for q in QUIRKS}


# --------------------------------------------------------------------------- published samples

# Real sample messages as published with open-source HL7 v2 packages, verbatim (byte for byte as
# the source string defines them). None is about a real person: they are the standards' and the
# packages' own illustrations.
#
# python-hl7 (https://github.com/johnpaulett/python-hl7), tests/samples.py at commit
# 113f8a01ae0116c6d735df5309cb7b7c3fe3b3c4. BSD 3-Clause License,
# "Copyright (C) 2009-2020 John Paulett (john -at- paulett.org). All rights reserved."
#  * `sample_hl7`: there cited as "Sample message from HL7 Normative Edition" (an ORU^R01 v2.4).
#  * `sample_file`: a batch file (FHS/BHS ... BTS/FTS) there cited as from the Victorian Department
#    of Health's VINAH public-health reporting specification, appendix A sample messages
#    (http://www.health.vic.gov.au/hdss/vinah/2006-07/appendix-a-sample-messages.pdf).
PYTHON_HL7_SAMPLE_HL7 = "\r".join(
    [
        "MSH|^~\\&|GHH LAB|ELAB-3|GHH OE|BLDG4|200202150930||ORU^R01|CNTRL-3456|P|2.4",
        "PID|||555-44-4444||EVERYWOMAN^EVE^E^^^^L|JONES|196203520|F|||153 FERNWOOD DR.^^STATESVILLE^OH^35292||(206)3345232|(206)752-121||||AC555444444||67-A4335^OH^20030520",
        "OBR|1|845439^GHH OE|1045813^GHH LAB|1554-5^GLUCOSE|||200202150730||||||||555-55-5555^PRIMARY^PATRICIA P^^^^MD^^LEVEL SEVEN HEALTHCARE, INC.|||||||||F||||||444-44-4444^HIPPOCRATES^HOWARD H^^^^MD",
        "OBX|1|SN|1554-5^GLUCOSE^POST 12H CFST:MCNC:PT:SER/PLAS:QN||^182|mg/dl|70_105|H|||F",
        "OBX|2|FN|1553-5^GLUCOSE^POST 12H CFST:MCNC:PT:SER/PLAS:QN||^182|mg/dl|70_105|H|||F\r",
    ]
)  # fmt: skip
PYTHON_HL7_SAMPLE_FILE = "\r".join(
    [
        "FHS|^~\\&||ABCHS||AUSDHSV|20070101123401|||abchs20070101123401.hl7|",
        "BHS|^~\\&||ABCHS||AUSDHSV|20070101123401||||abchs20070101123401-1",
        "MSH|^~\\&||ABCHS||AUSDHSV|20070101112951||ADT^A04^ADT_A01|12334456778890|P|2.5|||NE|NE|AU|ASCII",
        "EVN|A04|20060705000000",
        "PID|1||0000112234^^^100^A||XXXXXXXXXX^^^^^^S||10131113|1||4|^^RICHMOND^^3121||||1201||||||||1100|||||||||AAA",
        "PD1||2",
        "NK1|1||1||||||||||||||||||2",
        "PV1|1|O||||^^^^^1",
        "BTS|1",
        "FTS|1",
        "",
    ]
)  # fmt: skip

# hl7apy (https://github.com/crs4/hl7apy), tests/test_parser.py at commit
# 0b619c320d65d4baa78f970fce81b6e67f794913. MIT License, "Copyright (c) 2012-2018, CRS4":
# "Permission is hereby granted, free of charge, to any person obtaining a copy of this software
# and associated documentation files (the "Software"), to deal in the Software without restriction
# ... The above copyright notice and this permission notice shall be included in all copies or
# substantial portions of the Software."
#  * the ADT^A01 of test_parse_message_ignoring_groups (msh + evn + pid + nk1 + pv1 + in1);
#  * the OML^O33 of _get_multiple_segments_groups_message (several specimens and orders).
HL7APY_ADT_A01 = (
    "MSH|^~\\&|SEND APP|SEND FAC|REC APP|REC FAC|20080115153000||ADT^A01^ADT_A01|0123456789|P|2.5||||AL\r"
    "EVN||20080115153000||AAA|AAA|20080114003000\r"
    "PID|1||123-456-789^^^HOSPITAL^MR||SURNAME^NAME^A|||M|||1111 SOMEWHERE^^SOMEWHERE^^^USA||555~444|||M\r"
    "NK1|1|WOMAN^WIFE|SPO|1111 SOMEWHERE^^SOMEWHERE^^^USA\r"
    "PV1|1|I|PATIENT WARD|U||||^REFER^DOCTOR^^MD|^CONSUL^DOC|CAR||||2|A0|||||||||||||||||||||||||||||2013\r"
    "IN1|1|INSURANCE PLAN ID^PLAN DESC|COMPANY ID|INS CNY, INC.|5555 INSURERS STREET^^SOMEWHERE^^^USA"
)
HL7APY_OML_O33 = (
    "MSH|^~\\&|SEND APP|SEND FAC|REC APP|REC FAC|20110708162817||OML^O33^OML_O33|978226056138290600|D|2.5|||||USA||EN\r"
    "PID|||1010110909194822^^^GATEWAY_IL&1.3.6.1.4.1.21367.2011.2.5.17&ISO^PK||PIPPO^PLUTO^^^^^L||19790515|M|||VIA DI TOPOLINO^CAGLIARI^CAGLIARI^^09100^100^H^^092009^^~^^^^^^L^^^|||||||PPPPPP79E15B354I^^^CF|||||CAGLIARI|||100|||||||||||\r"
    "PV1||O|||||||||||||||||1107080001^^^LIS\r"
    "SPM|1|100187400201^||SPECIMEN^Blood|||||||PSN^Human Patient||||||20110708162817||20110708162817|||||||1|CONTAINER^CONTAINER DESC\r"
    "ORC|NW|83428|83428|18740|SC||||20110708162817||||||||^\r"
    "TQ1|||||||||R\r"
    "OBR||83428|83428|TPO^ANTI THYROPEROXIDASE ANTIBODIES(TPO)^^TPO||||||||||||ND^UNKNOWN^UNKNOWN\r"
    "SPM|2|100187400101^||SPECIMEN^Blood|||||||PSN^Human Patient||||||20110708162817||20110708162817|||||||1|CONTAINER^CONTAINER DESC\r"
    "ORC|NW|83425|83425|18740|SC||||20110708162817||||||||^\r"
    "TQ1|||||||||R\r"
    "OBR||83425|83425|CA^S-CALCIUM^^CA||||||||||||ND^UNKNOWN^UNKNOWN\r"
    "ORC|NW|83426|83426|18740|SC||||20110708162817||||||||^\r"
    "TQ1|||||||||R\r"
    "OBR||83426|83426|HDL^HDL CHOLESTEROL^^HDL||||||||||||ND^UNKNOWN^UNKNOWN\r"
    "ORC|NW|83427|83427|18740|SC||||20110708162817||||||||^\r"
    "TQ1|||||||||R\r"
    "OBR||83427|83427|LDL^LDL CHOLESTEROL^^LDL||||||||||||ND^UNKNOWN^UNKNOWN\r"
)  # fmt: skip

_PYTHON_HL7 = "python-hl7 tests/samples.py @113f8a01 (BSD-3-Clause)"
_HL7APY = "hl7apy tests/test_parser.py @0b619c32 (MIT)"
PUBLISHED_SAMPLES: tuple[Hl7Message, ...] = (
    Hl7Message("python-hl7-sample-hl7", "ORU^R01", PYTHON_HL7_SAMPLE_HL7.encode("ascii"), (), _PYTHON_HL7),
    Hl7Message("python-hl7-vinah-batch", "ADT^A04", PYTHON_HL7_SAMPLE_FILE.encode("ascii"), (), _PYTHON_HL7),
    Hl7Message("hl7apy-adt-a01", "ADT^A01", HL7APY_ADT_A01.encode("ascii"), (), _HL7APY),
    Hl7Message("hl7apy-oml-o33", "OML^O33", HL7APY_OML_O33.encode("ascii"), (), _HL7APY),
)


def full_corpus(seed: int = DEFAULT_SEED, size: int = DEFAULT_SIZE, *, parties: Parties = Parties()):
    """The generated corpus followed by the published samples."""
    return [*generate(seed, size, parties=parties), *PUBLISHED_SAMPLES]
