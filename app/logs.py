"""Structured JSON logs (python-json-logger) carrying request id, job id, idempotency key,
actor and duration; never PHI: SQL parameters are left out of logged database errors, the
development server's request lines lose their query strings, and every line is masked like a
response for a role without PHI access (log_redactor)."""

from __future__ import annotations

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

    def formatTime(self, record, datefmt=None):  # noqa: N802 - logging's name
        return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z"

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


# A FHIR reference to a person and an HL7 v2 PID segment identify a patient by their shape alone.
_PATIENT_REFERENCE = re.compile(r"\b((?:Patient|Person|RelatedPerson)/)[A-Za-z0-9\-.]{1,64}")
_PID_SEGMENT = re.compile(r"\b(PID[|^])[^\r\n]*")


def log_redactor():
    """No PHI in logs (SPEC 7): a function masking, in one log line's fields, patient references
    and PID segments by their shape, and every known identifier of the messages this request or
    job has loaded (app.services.phi's collector; docs/SECURITY.md "PHI"). The identifiers are
    gathered once per line, not once per field, and a field that cannot hold a reference's or a
    segment's shape ("/", "PID") skips those patterns (one access-log line has a dozen fields;
    redacting them was a twentieth of an intake request's CPU)."""
    try:
        from app.domain.phi import reference_forms
        from app.services.phi import current_scope, redactor_for
    except ImportError:  # a line logged while those modules are still being imported
        known = None
    else:
        scope = current_scope()
        known = None
        if scope is not None and scope.references:
            known = redactor_for({v for ref in scope.references for v in reference_forms(ref)})

    def redact(text: str) -> str:
        if not text:
            return text
        if "/" in text:
            text = _PATIENT_REFERENCE.sub(r"\1****", text)
        if "PID" in text:
            text = _PID_SEGMENT.sub(r"\1****", text)
        return known.text(text) if known is not None else text

    return redact


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
