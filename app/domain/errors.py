"""Errors the domain raises; the web layer maps each to one HTTP status."""


class DomainError(Exception):
    """Base class. `code` is the stable machine-readable error code."""

    code = "domain_error"
    http_status = 400

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        self.message = message
        if code:
            self.code = code


class Forbidden(DomainError):
    """The actor's role may not do this (or four-eyes was violated)."""

    code = "forbidden"
    http_status = 403


class Conflict(DomainError):
    """The state changed underneath, or the action is not allowed in the current state."""

    code = "conflict"
    http_status = 409


class Invalid(DomainError):
    """The request is well-formed but its content breaks a rule (missing reason, unknown code)."""

    code = "invalid"
    http_status = 422


class NotFound(DomainError):
    code = "not_found"
    http_status = 404
