"""OpenAPI 3.1 description of /api/v1 (served at /api/v1/openapi.json)."""

_ERROR = {"$ref": "#/components/schemas/Error"}


def _resp(description: str, schema: dict | None = None) -> dict:
    out: dict = {"description": description}
    if schema is not None:
        out["content"] = {"application/json": {"schema": schema}}
    return out


_ERRORS = {
    "400": _resp("Malformed request (missing Idempotency-Key, body not JSON)", _ERROR),
    "401": _resp("Missing or invalid bearer token", _ERROR),
    "403": _resp("Role may not do this, or self-approval", _ERROR),
    "404": _resp("Not found", _ERROR),
    "409": _resp("State changed underneath / request with this key in progress", _ERROR),
    "422": _resp("Invalid content (missing reason, unknown code, key reused with another body)", _ERROR),
}


def _errors(*codes: str) -> dict:
    return {c: _ERRORS[c] for c in codes}


_STR = {"type": "string"}
_NSTR = {"type": ["string", "null"]}
_TIME = {"type": "string", "format": "date-time"}


def _idempotent_post(summary: str, request_schema: str, accepted: str, response_schema: str) -> dict:
    """A POST that takes an Idempotency-Key and answers 202 (the intake endpoints)."""
    return {
        "summary": summary,
        "parameters": [{"name": "Idempotency-Key", "in": "header", "required": True, "schema": _STR}],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{request_schema}"}}},
        },
        "responses": {
            "202": _resp(accepted, {"$ref": f"#/components/schemas/{response_schema}"}),
            **_errors("400", "401", "403", "404", "409", "422"),
        },
    }


OPENAPI = {
    "openapi": "3.1.0",
    "info": {
        "title": "Reconciliation Console API",
        "version": "1.0.0",
        "description": "Outbound EHR messages with idempotency keys, exception queues, decisions, audit.",
    },
    "servers": [{"url": "/api/v1"}],
    "security": [{"bearer": []}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error"],
                "properties": {
                    "error": {
                        "type": "object",
                        "required": ["code", "message"],
                        "properties": {"code": _STR, "message": _STR},
                    }
                },
            },
            "MessageRequest": {
                "type": "object",
                "required": ["connection", "message_type", "content_type"],
                "properties": {
                    "connection": _STR,
                    "message_type": _STR,
                    "payload": _STR,
                    "payload_base64": {"type": "string", "contentEncoding": "base64"},
                    "content_type": {"enum": ["application/fhir+json", "x-application/hl7-v2+er7"]},
                },
            },
            "MessageAccepted": {
                "type": "object",
                "required": ["id", "idempotency_key", "status"],
                "properties": {
                    "id": _STR,
                    "idempotency_key": _STR,
                    "status": _STR,
                    "exception_id": {"type": "integer"},
                    "category": _STR,
                },
            },
            "ExceptionReport": {
                "type": "object",
                "required": ["connection", "message_type", "content_type", "error"],
                "properties": {
                    "connection": _STR,
                    "message_type": _STR,
                    "payload": _STR,
                    "payload_base64": {"type": "string", "contentEncoding": "base64"},
                    "content_type": {"enum": ["application/fhir+json", "x-application/hl7-v2+er7"]},
                    "error": {"type": "string", "description": "the engine's own error text"},
                },
            },
            "ExceptionReported": {
                "type": "object",
                "required": ["id", "exception_id", "category"],
                "properties": {"id": _STR, "exception_id": {"type": "integer"}, "category": _STR},
            },
            "ExceptionSummary": {
                "type": "object",
                "required": [
                    "id",
                    "state",
                    "category",
                    "connection",
                    "message_type",
                    "idempotency_key",
                    "sla_due_at",
                    "created_at",
                ],
                "properties": {
                    "id": {"type": "integer"},
                    "state": _STR,
                    "category": _STR,
                    "connection": _STR,
                    "message_type": _STR,
                    "idempotency_key": _STR,
                    "sla_due_at": _TIME,
                    "created_at": _TIME,
                },
            },
            "DecisionRequest": {
                "type": "object",
                "required": ["action"],
                "properties": {
                    "action": {
                        "enum": [
                            "resubmit",
                            "resubmit_corrected",
                            "approve",
                            "reject",
                            "discard",
                            "escalate",
                            "confirm_not_applied",
                            "comment",
                            "assign",
                            "claim",
                        ]
                    },
                    "reason": _STR,
                    "reason_code": _NSTR,
                    "payload": _NSTR,
                    "password": _NSTR,
                    "assignee": _NSTR,
                    "expected_version": {"type": "integer"},
                },
            },
            "AuditEvent": {
                "type": "object",
                "properties": {
                    "id": {"type": "integer"},
                    "occurred_at": _TIME,
                    "actor": _STR,
                    "action": _STR,
                    "subject_type": _STR,
                    "subject_id": _STR,
                    "from_state": _NSTR,
                    "to_state": _NSTR,
                    "reason": _NSTR,
                    "reason_code": _NSTR,
                    "details": {"type": "object"},
                    "prev_hash": _STR,
                    "hash": _STR,
                },
            },
        },
    },
    "paths": {
        "/messages": {
            "post": _idempotent_post(
                "Submit an outbound message",
                "MessageRequest",
                "Accepted (or the original response for a repeated key)",
                "MessageAccepted",
            )
        },
        "/messages/{id}": {
            "get": {
                "summary": "Message status, attempts and exception",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": _STR}],
                "responses": {"200": _resp("The message"), **_errors("401", "403", "404")},
            }
        },
        "/exceptions": {
            "get": {
                "summary": "List exceptions (keyset pagination, sorted by SLA due time)",
                "parameters": [
                    {"name": n, "in": "query", "schema": _STR}
                    for n in ("state", "category", "connection", "q", "cursor")
                ]
                + [{"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 500}}],
                "responses": {
                    "200": _resp(
                        "A page",
                        {
                            "type": "object",
                            "properties": {
                                "items": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/ExceptionSummary"},
                                },
                                "next_cursor": _NSTR,
                            },
                        },
                    ),
                    **_errors("401", "403", "422"),
                },
            },
            "post": _idempotent_post(
                "Report a message that failed in an interface engine; it enters the human queues",
                "ExceptionReport",
                "Stored and queued (or the original response for a repeated key)",
                "ExceptionReported",
            ),
        },
        "/exceptions/{id}": {
            "get": {
                "summary": "One exception with attempts, decisions, replays and its payload (audited PHI view)",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}],
                "responses": {"200": _resp("The exception"), **_errors("401", "403", "404")},
            }
        },
        "/drift": {
            "get": {
                "summary": "Data drift per connection: unacknowledged first sightings of a kind, counts by kind",
                "responses": {
                    "200": _resp(
                        "Flags and counts",
                        {
                            "type": "object",
                            "properties": {
                                "flags": {"type": "array", "items": {"type": "object"}},
                                "counts": {"type": "array", "items": {"type": "object"}},
                            },
                        },
                    ),
                    **_errors("401", "403"),
                },
            }
        },
        "/exceptions/{id}/decisions": {
            "post": {
                "summary": "Record a decision (four-eyes enforced on approve)",
                "parameters": [{"name": "id", "in": "path", "required": True, "schema": {"type": "integer"}}],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": {"$ref": "#/components/schemas/DecisionRequest"}}
                    },
                },
                "responses": {
                    "201": _resp(
                        "Recorded",
                        {"type": "object", "properties": {"decision": {"type": "object"}, "state": _STR}},
                    ),
                    **_errors("400", "401", "403", "404", "409", "422"),
                },
            }
        },
        "/audit": {
            "get": {
                "summary": "Audit events, oldest first",
                "parameters": [
                    {"name": n, "in": "query", "schema": _STR}
                    for n in ("since", "until", "actor", "action", "cursor")
                ]
                + [{"name": "limit", "in": "query", "schema": {"type": "integer", "maximum": 1000}}],
                "responses": {
                    "200": _resp(
                        "A page",
                        {
                            "type": "object",
                            "properties": {
                                "items": {
                                    "type": "array",
                                    "items": {"$ref": "#/components/schemas/AuditEvent"},
                                },
                                "next_cursor": _NSTR,
                            },
                        },
                    ),
                    **_errors("401", "403", "422"),
                },
            }
        },
        "/audit/export": {
            "get": {
                "summary": "Streamed export ending with the chain head it covers",
                "parameters": [
                    {"name": "format", "in": "query", "schema": {"enum": ["csv", "jsonl", "fhir-ndjson"]}},
                    {"name": "since", "in": "query", "schema": _STR},
                    {"name": "until", "in": "query", "schema": _STR},
                ],
                "responses": {
                    "200": {
                        "description": "The export",
                        "content": {
                            "text/csv": {},
                            "application/x-ndjson": {},
                            "application/fhir+ndjson": {},
                        },
                    },
                    **_errors("401", "403", "422"),
                },
            }
        },
        "/openapi.json": {
            "get": {"summary": "This document", "security": [], "responses": {"200": _resp("OpenAPI 3.1")}}
        },
    },
}
