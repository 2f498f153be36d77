"""Structured JSON logs (python-json-logger) carrying request id, job id, idempotency key,
actor and duration; never PHI: SQL parameters are left out of logged database errors, the
development server's request lines lose their query strings, and every line is masked like a
response for a role without PHI access (log_redactor)."""

from __future__ import annotations

import json
import logging
import re
import sys
import time

from pythonjsonlogger.json import JsonFormatter as _LibraryJsonFormatter


def _hide_sql_parameters(exc: BaseException | None) -> None:
    """SQLAlchemy prints a failed statement's parameters (patient references, payload text) in the
    exception's message; mark every database error in the chain to leave them out."""
    from sqlalchemy.exc import StatementError

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, StatementError):
            exc.hide_parameters = True
        exc = exc.__cause__ or exc.__context__


class JsonFormatter(_LibraryJsonFormatter):
    """One JSON object per line: ts, level, logger, msg, then every `extra` field given."""

    def __init__(self):
        super().__init__(
            "%(levelname)s %(name)s %(message)s",
            rename_fields={"levelname": "level", "name": "logger", "message": "msg", "exc_info": "exc"},
            timestamp="ts",
            json_default=str,
        )

    def format(self, record: logging.LogRecord) -> str:
        """The library's format() for this configuration, without its generic steps (defaults,
        static fields, a datetime for the timestamp that add_fields replaces, a JSON encoder
        built per line): the same keys in the same order, redacted the same way. A record whose
        msg is a dict takes the library's own path."""
        if isinstance(record.msg, dict):
            return super().format(record)
        record.message = record.getMessage()
        # add_fields: the format's fields, renamed
        log_data = {"level": record.levelname, "logger": record.name, "msg": record.message}
        if record.exc_info:
            log_data["exc"] = self.formatException(record.exc_info)
        if not log_data.get("exc") and record.exc_text:
            log_data["exc"] = record.exc_text
        if record.stack_info:
            log_data["stack_info"] = self.formatStack(record.stack_info)
        # every other attribute of the record: the caller's `extra` fields (merge_record_extra)
        skip, rename = self._skip_fields, self.rename_fields
        for key, value in record.__dict__.items():
            if key not in skip and not (hasattr(key, "startswith") and key.startswith("_")):
                log_data[rename.get(key, key)] = value
        log_data["ts"] = self.formatTime(record)
        log_data["level"] = record.levelname.lower()
        return _ENCODER.encode(self.process_log_record(log_data))

    _second: tuple[int, str] = (-1, "")  # the last second formatted, and its text

    def formatTime(self, record, datefmt=None):  # noqa: N802 - logging's name
        second = int(record.created)
        last = self._second
        if last[0] != second:
            last = self._second = (second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second)))
        return last[1] + f".{int(record.msecs):03d}Z"

    def add_fields(self, log_data, record, message_dict) -> None:
        super().add_fields(log_data, record, message_dict)
        log_data["ts"] = self.formatTime(record)
        log_data["level"] = record.levelname.lower()

    def formatException(self, ei):  # noqa: N802 - logging's name
        _hide_sql_parameters(ei[1])
        return super().formatException(ei)

    def process_log_record(self, log_data):
        # The last step before a line is written: every string in it, message, extras and
        # traceback alike, loses what identifies a patient (log_redactor).
        redact = log_redactor()
        return {key: redact(value) if isinstance(value, str) else value for key, value in log_data.items()}


# json.dumps(log_data, default=str), as the library calls it, with the encoder built once.
_ENCODER = json.JSONEncoder(default=str)

# A FHIR reference to a person and an HL7 v2 PID segment identify a patient by their shape alone.
_PATIENT_REFERENCE = re.compile(r"\b((?:Patient|Person|RelatedPerson)/)[A-Za-z0-9\-.]{1,64}")
_PID_SEGMENT = re.compile(r"\b(PID[|^])[^\r\n]*")


def log_redactor():
    """No PHI in logs (SPEC 7): a function masking, in one log line's fields, patient references
    and PID segments by their shape, and every known identifier of the messages this request or
    job has loaded (app.services.phi's collector; docs/SECURITY.md "PHI"). The identifiers are
    gathered once per line, not once per field, and a field that cannot hold a reference's or a
    segment's shape ("Patient/", "Person/", "PID") skips those patterns (one access-log line has
    a dozen fields, two of them paths; redacting them was a twentieth of an intake request's CPU)."""
    scope_of = _phi_scope()
    known = None
    if scope_of is not None:
        current_scope, redactor_for, reference_forms = scope_of
        scope = current_scope()
        if scope is not None and scope.references:
            known = redactor_for({v for ref in scope.references for v in reference_forms(ref)})

    def redact(text: str) -> str:
        if not text:
            return text
        if "/" in text and ("Patient/" in text or "Person/" in text):
            text = _PATIENT_REFERENCE.sub(r"\1****", text)
        if "PID" in text:
            text = _PID_SEGMENT.sub(r"\1****", text)
        return known.text(text) if known is not None else text

    return redact


_phi_functions = None


def _phi_scope():
    """(current_scope, redactor_for, reference_forms) of the PHI modules, imported on first use;
    None for a line logged while those modules are still being imported."""
    global _phi_functions
    if _phi_functions is None:
        try:
            from app.domain.phi import reference_forms
            from app.services.phi import current_scope, redactor_for
        except ImportError:
            return None
        _phi_functions = (current_scope, redactor_for, reference_forms)
    return _phi_functions


_QUERY_IN_REQUEST_LINE = re.compile(r'("[A-Z]+ [^ ?"]*)\?[^ "]*')


class DropQueryStrings(logging.Filter):
    """The development server logs each request line; a query string can carry a token
    (`?access_token=`) or a search term: keep the path only."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "?" in message:
            record.msg = _QUERY_IN_REQUEST_LINE.sub(r"\1", message)
            record.args = None
        return True


def configure_logging(app=None, level: int = logging.INFO) -> None:
    werkzeug_log = logging.getLogger("werkzeug")
    if not any(isinstance(f, DropQueryStrings) for f in werkzeug_log.filters):
        werkzeug_log.addFilter(DropQueryStrings())
    logger = logging.getLogger("recon")
    if any(isinstance(h.formatter, JsonFormatter) for h in logger.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
