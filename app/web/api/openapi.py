"""OpenAPI 3.1 description of /api/v1 (served at /api/v1/openapi.json).

Every route of the API blueprint is described here with its request and response schemas;
tests/web/test_openapi.py checks that against the URL map and validates real responses, and
tests/web/test_schemathesis.py fuzzes the API from this document.
"""

_ERROR = {"$ref": "#/components/schemas/Error"}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _resp(description: str, schema: dict | None = None) -> dict:
    out: dict = {"description": description}
    if schema is not None:
        out["content"] = {"application/json": {"schema": schema}}
    return out


_ERRORS = {
    "400": _resp(
        "Malformed request (missing Idempotency-Key, body not a JSON object, NUL characters)", _ERROR
    ),
    "401": _resp("Missing, invalid, revoked or expired bearer token", _ERROR),
    "403": _resp("Role may not do this, or four-eyes / separation of duties refuses it", _ERROR),
    "404": _resp("Not found", _ERROR),
    "409": _resp("State changed underneath / request with this key in progress / already exists", _ERROR),
    "422": _resp(
        "Invalid content (missing reason, unknown code, wrong type, key reused with another body)", _ERROR
    ),
}


def _errors(*codes: str) -> dict:
    return {c: _ERRORS[c] for c in codes}


_STR = {"type": "string"}
_NSTR = {"type": ["string", "null"]}
_INT = {"type": "integer"}
_NINT = {"type": ["integer", "null"]}
_BOOL = {"type": "boolean"}
_TIME = {"type": "string", "format": "date-time"}
_NTIME = {"type": ["string", "null"], "format": "date-time"}
_ROW_ID = {"type": "integer", "minimum": 1, "maximum": 2**31 - 1}
_CONTENT_TYPE = {"enum": ["application/fhir+json", "x-application/hl7-v2+er7"]}


def _obj(properties: dict, required: tuple[str, ...] | None = None) -> dict:
    """An object whose listed properties (all of them by default) are required."""
    return {
        "type": "object",
        "required": list(properties if required is None else required),
        "properties": properties,
    }


def _items(schema: dict) -> dict:
    return _obj({"items": {"type": "array", "items": schema}})


def _page(schema: dict) -> dict:
    return _obj({"items": {"type": "array", "items": schema}, "next_cursor": _NSTR})


def _path_id(description: str = "row id") -> dict:
    return {"name": "id", "in": "path", "required": True, "description": description, "schema": _ROW_ID}


def _json_body(schema_name: str) -> dict:
    return {"required": True, "content": {"application/json": {"schema": _ref(schema_name)}}}


def _op(
    summary: str,
    responses: dict,
    *errors: str,
    body: str | None = None,
    params: list | None = None,
) -> dict:
    op: dict = {"summary": summary}
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = _json_body(body)
    op["responses"] = {**responses, **_errors("400", "401", "403", *errors)}
    return op


def _idempotent_post(summary: str, request_schema: str, accepted: str, response_schema: str) -> dict:
    """A POST that takes an Idempotency-Key and answers 202 (the intake endpoints)."""
    return _op(
        summary,
        {"202": _resp(accepted, _ref(response_schema))},
        "404",
        "409",
        "422",
        body=request_schema,
        params=[{"name": "Idempotency-Key", "in": "header", "required": True, "schema": _STR}],
    )


_ATTEMPT = _obj(
    {
        "id": _INT,
        "trigger": _STR,
        "started_at": _TIME,
        "finished_at": _NTIME,
        "outcome": _STR,
        "category": _NSTR,
        "status_code": _NINT,
        "request_summary": _NSTR,
        "response_excerpt": _NSTR,
        "detail": _NSTR,
        "latency_ms": _NINT,
        "issues": {"type": "array", "items": {"type": "object"}},
    }
)
_DECISION = _obj(
    {
        "id": _INT,
        "action": _STR,
        "actor": _STR,
        "reason": _NSTR,
        "reason_code": _NSTR,
        "from_state": _NSTR,
        "to_state": _NSTR,
        "details": {"type": ["object", "null"]},
        "created_at": _TIME,
    }
)
_REPLAY = _obj(
    {
        "id": _INT,
        "exception_id": _INT,
        "message_id": _STR,
        "state": _STR,
        "corrected": _BOOL,
        "payload_version_id": _INT,
        "requested_by": _STR,
        "requested_at": _TIME,
        "request_reason": _NSTR,
        "approved_by": _NSTR,
        "approved_at": _NTIME,
        "started_at": _NTIME,
        "finished_at": _NTIME,
        "result": _NSTR,
    }
)
_SUMMARY_FIELDS = {
    "id": _INT,
    "state": _STR,
    "category": _STR,
    "connection": _STR,
    "message_type": _STR,
    "idempotency_key": _STR,
    "sla_due_at": _TIME,
    "created_at": _TIME,
}
_CONNECTION_REQUEST = {
    "name": {"type": "string", "pattern": "^[A-Za-z0-9_.:-]{1,120}$"},
    "customer": _STR,
    "protocol": {"enum": ["fhir-r4", "hl7v2-mllp"]},
    "endpoint": {"type": "string", "description": "http(s) base URL (FHIR) or HOST:PORT (MLLP)"},
    "environment": {"enum": ["prod", "test", "train"]},
    "vendor": _STR,
    "fhir_version": _STR,
    "conditional_create": _BOOL,
    "identifier_search": _BOOL,
    "diagnosis_code_system": {"enum": ["icd-10", "icd-9", "any"]},
    "enabled_message_types": {"type": "array", "items": _STR},
    "sequence_sensitive": {
        "type": "boolean",
        "description": "a later message for a patient waits behind an unresolved earlier one",
    },
}
_RETRY_POLICY = {
    "max_auto_retries": {"type": "integer", "minimum": 0, "maximum": 20},
    "retry_backoff_seconds": {"type": "number", "minimum": 0, "maximum": 3600},
    "circuit_failure_threshold": {"type": "integer", "minimum": 1, "maximum": 1000},
    "circuit_cooldown_seconds": {"type": "number", "minimum": 1, "maximum": 86400},
}
_ROLES = ["reviewer", "clinical_lead", "auditor", "admin", "service"]
_REASON = {
    "type": "string",
    "description": "why; required to disable, deactivate, reset, revoke or delete (audited with the change)",
}
_USER = _obj(
    {
        "id": _INT,
        "username": _STR,
        "role": {"enum": _ROLES},
        "active": _BOOL,
        "enrolled": {
            "type": ["boolean", "null"],
            "description": "a person has set a password; null for services",
        },
        "approvals_locked": _BOOL,
        "created_at": _TIME,
    }
)
_ENROLLMENT = {
    "enrollment_url": {"type": "string", "description": "one-time link for the person to set a password"},
    "enrollment_expires_in_hours": _INT,
}
_TOKEN_FIELDS = {
    "id": _INT,
    "user": _STR,
    "prefix": _STR,
    "created_at": _TIME,
    "expires_at": _NTIME,
    "last_used_at": _NTIME,
    "revoked_at": _NTIME,
}

SCHEMAS = {
    "Error": _obj({"error": _obj({"code": _STR, "message": _STR})}),
    "MessageRequest": _obj(
        {
            "connection": _STR,
            "message_type": _STR,
            "payload": _STR,
            "payload_base64": {"type": "string", "contentEncoding": "base64"},
            "content_type": _CONTENT_TYPE,
        },
        ("connection", "message_type", "content_type"),
    ),
    "MessageAccepted": _obj(
        {
            "id": _STR,
            "idempotency_key": _STR,
            "status": _STR,
            "exception_id": _INT,
            "category": _STR,
        },
        ("id", "idempotency_key", "status"),
    ),
    "ExceptionReport": _obj(
        {
            "connection": _STR,
            "message_type": _STR,
            "payload": _STR,
            "payload_base64": {"type": "string", "contentEncoding": "base64"},
            "content_type": _CONTENT_TYPE,
            "error": {"type": "string", "description": "the engine's own error text"},
        },
        ("connection", "message_type", "content_type", "error"),
    ),
    "ExceptionReported": _obj({"id": _STR, "exception_id": _INT, "category": _STR}),
    "Attempt": _ATTEMPT,
    "Decision": _DECISION,
    "Replay": _REPLAY,
    "Message": _obj(
        {
            "id": _STR,
            "idempotency_key": _STR,
            "status": _STR,
            "connection": _STR,
            "message_type": _STR,
            "control_id": _STR,
            "created_at": _TIME,
            "attempts": {"type": "array", "items": _ref("Attempt")},
            "exception_id": _NINT,
            "exception_state": _NSTR,
        }
    ),
    "ExceptionSummary": _obj(_SUMMARY_FIELDS),
    "Exception": _obj(
        {
            **_SUMMARY_FIELDS,
            "version": _INT,
            "detail": _NSTR,
            "assignee": _NSTR,
            "needs_not_applied_confirmation": _BOOL,
            "attempts": {"type": "array", "items": _ref("Attempt")},
            "decisions": {"type": "array", "items": _ref("Decision")},
            "replays": {"type": "array", "items": _ref("Replay")},
            "payload": {"type": ["string", "null"], "description": "current payload version as decoded text"},
            "encoding": _STR,
            "payload_sha256": _STR,
            "payload_version": _INT,
            "payload_base64": {"type": ["string", "null"], "description": "exact bytes when not UTF-8"},
        }
    ),
    "DecisionRequest": _obj(
        {
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
            "expected_version": _INT,
        },
        ("action",),
    ),
    "DecisionRecorded": _obj({"decision": _ref("Decision"), "state": _STR}),
    "BulkDecisionRequest": _obj(
        {
            "action": {"enum": ["resubmit", "discard", "escalate", "assign", "claim"]},
            "ids": {
                "type": "array",
                "items": _INT,
                "maxItems": 200,
                "description": "a fixed list, each once",
            },
            "expected_versions": {
                "type": "object",
                "additionalProperties": _INT,
                "description": "exception id -> the version the caller saw (409 on that item if it moved)",
            },
            "reason": _STR,
            "reason_code": _NSTR,
            "assignee": _NSTR,
        },
        ("action", "ids"),
    ),
    "BulkDecisionResult": _obj(
        {
            "action": _STR,
            "applied": _INT,
            "failed": _INT,
            "results": {
                "type": "array",
                "items": _obj(
                    {
                        "exception_id": _INT,
                        "ok": _BOOL,
                        "status": {
                            "type": "integer",
                            "description": "200 applied, else the refusal's status",
                        },
                        "code": _STR,
                        "message": _STR,
                        "state": _NSTR,
                    }
                ),
            },
        }
    ),
    "ReplayDecisionRequest": _obj(
        {
            "password": {"type": "string", "description": "approve: your own password, re-entered"},
            "reason": {"type": "string", "description": "reject: why (required)"},
            "expected_version": {"type": "integer", "description": "the exception version you reviewed"},
        },
        (),
    ),
    "ReplayDecided": _obj({"decision": _ref("Decision"), "state": _STR, "replay": _ref("Replay")}),
    "AuditEvent": _obj(
        {
            "id": _INT,
            "occurred_at": _TIME,
            "actor": _STR,
            "action": _STR,
            "subject_type": _STR,
            "subject_id": _STR,
            "from_state": _NSTR,
            "to_state": _NSTR,
            "reason": _NSTR,
            "reason_code": _NSTR,
            "details": {"type": ["object", "null"]},
            "prev_hash": _STR,
            "hash": _STR,
        }
    ),
    "AuditVerification": _obj(
        {
            "ok": _BOOL,
            "events": _INT,
            "head": _STR,
            "broken_event_id": _NINT,
            "problem": _NSTR,
            "checked_at": _TIME,
        }
    ),
    "Drift": _obj(
        {
            "flags": {
                "type": "array",
                "items": _obj(
                    {
                        "id": _INT,
                        "connection": _STR,
                        "kind": _STR,
                        "first_seen_at": _TIME,
                        "where": _NSTR,
                        "detail": _NSTR,
                        "example_exception_id": _NINT,
                        "count_24h": _INT,
                    }
                ),
            },
            "counts": {
                "type": "array",
                "items": _obj({"connection": _STR, "kind": _STR, "last_24h": _INT, "last_7d": _INT}),
            },
        }
    ),
    "DriftAcknowledged": _obj(
        {"id": _INT, "kind": _STR, "acknowledged_at": _NTIME, "acknowledged_by": _NSTR}
    ),
    "CustomerRequest": _obj({"name": {"type": "string", "maxLength": 120}}),
    "PauseRequest": _obj({"reason": _STR, "until": _TIME}, ("reason",)),
    "ResumeRequest": _obj({"reason": _STR}, ()),
    "Customer": _obj({"id": _INT, "name": _STR, "created_at": _TIME}),
    "ConnectionRequest": _obj(_CONNECTION_REQUEST, ("name", "customer", "protocol", "endpoint")),
    "ConnectionChanges": _obj(
        {"enabled": _BOOL, "sequence_sensitive": _BOOL, **_RETRY_POLICY, "reason": _REASON}, ()
    ),
    "Connection": _obj(
        {
            "id": _INT,
            **{k: v for k, v in _CONNECTION_REQUEST.items() if k != "name"},
            "name": _STR,
            "enabled": _BOOL,
            "circuit": {"enum": ["closed", "open", "half_open"]},
            "paused": {
                "type": ["object", "null"],
                "description": "the maintenance window, null when not paused",
                "properties": {"paused_at": _TIME, "until": _NTIME, "reason": _STR, "by": _STR},
            },
            **{k: {"type": "number"} for k in _RETRY_POLICY},
            "created_at": _TIME,
        }
    ),
    "ConnectionTest": _obj({"ok": _BOOL, "detail": _STR}),
    "SlaRuleRequest": _obj(
        {
            "minutes": {"type": "integer", "minimum": 1, "maximum": 60 * 24 * 30},
            "category": _NSTR,
            "risk": {"enum": ["high", "normal", None]},
            "customer": {"type": ["string", "null"], "description": "customer name; null = every customer"},
        },
        ("minutes",),
    ),
    "SlaRuleChanges": _obj({"minutes": {"type": "integer", "minimum": 1, "maximum": 60 * 24 * 30}}),
    "SlaRule": _obj({"id": _INT, "category": _NSTR, "risk": _NSTR, "customer": _NSTR, "minutes": _INT}),
    "UserRequest": _obj({"username": {"type": "string", "maxLength": 80}, "role": {"enum": _ROLES}}),
    "UserChanges": _obj({"role": {"enum": _ROLES}, "active": _BOOL, "reason": _REASON}, ()),
    "Reason": _obj({"reason": _REASON}, ()),
    "User": _USER,
    "UserCreated": _obj({"user": _ref("User"), **_ENROLLMENT}, ("user",)),
    "UserReset": _obj({"user": _ref("User"), **_ENROLLMENT}),
    "TokenRequest": _obj(
        {
            "user": {"type": "string", "description": "username of a service account"},
            "days": {"type": "integer", "minimum": 1, "maximum": 365, "default": 90},
        },
        ("user",),
    ),
    "Token": _obj(_TOKEN_FIELDS),
    "TokenCreated": _obj({**_TOKEN_FIELDS, "token": {"type": "string", "description": "shown once"}}),
}

_LIST_EXCEPTIONS_PARAMS = [
    {"name": n, "in": "query", "schema": _STR} for n in ("state", "category", "connection", "q", "cursor")
] + [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 500}}]
_AUDIT_PARAMS = [
    {"name": n, "in": "query", "schema": _STR} for n in ("since", "until", "actor", "action", "cursor")
] + [{"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 1000}}]
_REPLAY_PARAMS = [
    {
        "name": "state",
        "in": "query",
        "schema": {
            "enum": ["pending_approval", "rejected", "queued", "running", "succeeded", "failed", "lost"]
        },
    },
    {"name": "cursor", "in": "query", "schema": _STR},
    {"name": "limit", "in": "query", "schema": {"type": "integer", "minimum": 1, "maximum": 200}},
]

PATHS = {
    "/messages": {
        "post": _idempotent_post(
            "Submit an outbound message",
            "MessageRequest",
            "Accepted (or the original response for a repeated key)",
            "MessageAccepted",
        )
    },
    "/messages/{id}": {
        "get": _op(
            "Message status, attempts and exception (a service account sees its own messages only)",
            {"200": _resp("The message", _ref("Message"))},
            "404",
            params=[{"name": "id", "in": "path", "required": True, "schema": _STR}],
        )
    },
    "/exceptions": {
        "get": _op(
            "List exceptions (keyset pagination, sorted by SLA due time)",
            {"200": _resp("A page", _page(_ref("ExceptionSummary")))},
            "422",
            params=_LIST_EXCEPTIONS_PARAMS,
        ),
        "post": _idempotent_post(
            "Report a message that failed in an interface engine; it enters the human queues",
            "ExceptionReport",
            "Stored and queued (or the original response for a repeated key)",
            "ExceptionReported",
        ),
    },
    "/exceptions/{id}": {
        "get": _op(
            "One exception with attempts, decisions, replays and its payload (audited PHI view)",
            {"200": _resp("The exception", _ref("Exception"))},
            "404",
            params=[_path_id("exception id")],
        )
    },
    "/exceptions/{id}/decisions": {
        "post": _op(
            "Record a decision (four-eyes enforced on approve)",
            {"201": _resp("Recorded", _ref("DecisionRecorded"))},
            "404",
            "409",
            "422",
            body="DecisionRequest",
            params=[_path_id("exception id")],
        )
    },
    "/exceptions/bulk-decisions": {
        "post": _op(
            "One action on a fixed list of exceptions (the queue's bulk bar); each item is decided on "
            "its own and reported",
            {"200": _resp("Every item's result", _ref("BulkDecisionResult"))},
            "422",
            body="BulkDecisionRequest",
        )
    },
    "/replays": {
        "get": _op(
            "Replays newest first; state=pending_approval is the approvals queue",
            {"200": _resp("A page", _page(_ref("Replay")))},
            "422",
            params=_REPLAY_PARAMS,
        )
    },
    "/replays/{id}": {
        "get": _op(
            "One replay", {"200": _resp("The replay", _ref("Replay"))}, "404", params=[_path_id("replay id")]
        )
    },
    "/replays/{id}/approve": {
        "post": _op(
            "Approve a pending replay with your password re-entered (never your own or a related "
            "request; 5 wrong passwords in 15 minutes lock approvals)",
            {"201": _resp("Approved; a worker delivers it", _ref("ReplayDecided"))},
            "404",
            "409",
            "422",
            body="ReplayDecisionRequest",
            params=[_path_id("replay id")],
        )
    },
    "/replays/{id}/reject": {
        "post": _op(
            "Reject a pending replay with a reason; the exception returns to its queue",
            {"201": _resp("Rejected", _ref("ReplayDecided"))},
            "404",
            "409",
            "422",
            body="ReplayDecisionRequest",
            params=[_path_id("replay id")],
        )
    },
    "/drift": {
        "get": _op(
            "Data drift per connection: unacknowledged first sightings of a kind, counts by kind",
            {"200": _resp("Flags and counts", _ref("Drift"))},
        )
    },
    "/drift/{id}/acknowledge": {
        "post": _op(
            "Acknowledge a drift flag (audited)",
            {"200": _resp("Acknowledged", _ref("DriftAcknowledged"))},
            "404",
            params=[_path_id("drift flag id")],
        )
    },
    "/audit": {
        "get": _op(
            "Audit events, oldest first",
            {"200": _resp("A page", _page(_ref("AuditEvent")))},
            "422",
            params=_AUDIT_PARAMS,
        )
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
                        "text/csv": {"schema": _STR},
                        "application/x-ndjson": {"schema": _STR},
                        "application/fhir+ndjson": {"schema": _STR},
                    },
                },
                **_errors("400", "401", "403", "422"),
            },
        }
    },
    "/audit/verify": {
        "post": _op(
            "Recompute the hash chain now and compare it with the stored head",
            {"200": _resp("The result (ok false names the first broken event)", _ref("AuditVerification"))},
        )
    },
    "/customers": {
        "get": _op("Customers by name", {"200": _resp("Customers", _items(_ref("Customer")))}),
        "post": _op(
            "Add a customer (audited)",
            {"201": _resp("Created", _ref("Customer"))},
            "409",
            "422",
            body="CustomerRequest",
        ),
    },
    "/connections": {
        "get": _op("Connections by name", {"200": _resp("Connections", _items(_ref("Connection")))}),
        "post": _op(
            "Register an EHR connection (endpoint validated for its protocol; audited)",
            {"201": _resp("Created", _ref("Connection"))},
            "404",
            "409",
            "422",
            body="ConnectionRequest",
        ),
    },
    "/connections/{id}": {
        "get": _op(
            "One connection", {"200": _resp("The connection", _ref("Connection"))}, "404", params=[_path_id()]
        ),
        "patch": _op(
            "Enable or disable a connection and change its retry and circuit-breaker policy (audited)",
            {"200": _resp("The connection as changed", _ref("Connection"))},
            "404",
            "422",
            body="ConnectionChanges",
            params=[_path_id("connection id")],
        ),
    },
    "/connections/{id}/circuit/reset": {
        "post": _op(
            "Close the connection's circuit breaker (audited)",
            {"200": _resp("The connection", _ref("Connection"))},
            "404",
            params=[_path_id("connection id")],
        )
    },
    "/connections/{id}/pause": {
        "post": _op(
            "Pause the connection for maintenance (audited): nothing is sent; deliveries and replays "
            "are held, not spent",
            {"200": _resp("The connection, with its pause", _ref("Connection"))},
            "404",
            "422",
            body="PauseRequest",
            params=[_path_id("connection id")],
        )
    },
    "/connections/{id}/resume": {
        "post": _op(
            "End the maintenance window (audited); what it held drains in order",
            {"200": _resp("The connection, and how many held items were released", _ref("Connection"))},
            "404",
            "409",
            body="ResumeRequest",
            params=[_path_id("connection id")],
        )
    },
    "/connections/{id}/test": {
        "post": _op(
            "Probe the connection's own stored endpoint (nothing is delivered; audited)",
            {"200": _resp("The probe's result", _ref("ConnectionTest"))},
            "404",
            params=[_path_id("connection id")],
        )
    },
    "/sla-rules": {
        "get": _op("SLA policy rules", {"200": _resp("Rules", _items(_ref("SlaRule")))}),
        "post": _op(
            "Add an SLA rule (category × clinical risk × optional customer → minutes; audited)",
            {"201": _resp("Created", _ref("SlaRule"))},
            "404",
            "409",
            "422",
            body="SlaRuleRequest",
        ),
    },
    "/sla-rules/{id}": {
        "patch": _op(
            "Change a rule's minutes (audited)",
            {"200": _resp("The rule", _ref("SlaRule"))},
            "404",
            "422",
            body="SlaRuleChanges",
            params=[_path_id("rule id")],
        ),
        "delete": _op(
            "Delete a rule (with a reason; audited); lookups fall back to less specific rules or the defaults",
            {"204": _resp("Deleted")},
            "404",
            "422",
            params=[
                _path_id("rule id"),
                {"name": "reason", "in": "query", "required": True, "schema": _REASON},
            ],
        ),
    },
    "/users": {
        "get": _op("Users by name", {"200": _resp("Users", _items(_ref("User")))}),
        "post": _op(
            "Create a user: a person gets a one-time enrollment link to set their own password "
            "(never one chosen by the admin); a service account gets none",
            {"201": _resp("Created", _ref("UserCreated"))},
            "409",
            "422",
            body="UserRequest",
        ),
    },
    "/users/{id}": {
        "get": _op("One user", {"200": _resp("The user", _ref("User"))}, "404", params=[_path_id("user id")]),
        "patch": _op(
            "Change a user's role (clinical-lead grants audited as such) or deactivate / reactivate",
            {"200": _resp("The user as changed", _ref("User"))},
            "404",
            "409",
            "422",
            body="UserChanges",
            params=[_path_id("user id")],
        ),
    },
    "/users/{id}/reset": {
        "post": _op(
            "Reset a person's password: it stops working, every session ends, a new one-time link "
            "is returned",
            {"200": _resp("The new link", _ref("UserReset"))},
            "404",
            "409",
            "422",
            body="Reason",
            params=[_path_id("user id")],
        )
    },
    "/users/{id}/approval-lock/clear": {
        "post": _op(
            "Let an account approve again after 5 wrong approval passwords (not your own)",
            {"200": _resp("The user", _ref("User"))},
            "404",
            "409",
            params=[_path_id("user id")],
        )
    },
    "/tokens": {
        "get": _op(
            "API tokens, newest first (prefixes only)", {"200": _resp("Tokens", _items(_ref("Token")))}
        ),
        "post": _op(
            "Create a token for a service account (shown once). A person's account is 403 "
            "token_for_person: people create their own tokens on My tokens",
            {"201": _resp("Created", _ref("TokenCreated"))},
            "404",
            "409",
            "422",
            body="TokenRequest",
        ),
    },
    "/tokens/{id}/revoke": {
        "post": _op(
            "Revoke a token (with a reason); requests with it fail from now on",
            {"200": _resp("The token", _ref("Token"))},
            "404",
            "409",
            "422",
            body="Reason",
            params=[_path_id("token id")],
        )
    },
    "/openapi.json": {
        "get": {
            "summary": "This document",
            "security": [],
            "responses": {
                "200": _resp("OpenAPI 3.1", {"type": "object", "required": ["openapi", "paths"]}),
                **_errors("400"),
            },
        }
    },
}

# Bulk replay (issue 6; app/web/api/bulk_replays.py): a fixed list approved once, released paced.
_BULK_FIELDS = {
    "id": _INT,
    "state": {"enum": ["requested", "approved", "running", "paused", "completed", "cancelled", "rejected"]},
    "version": _INT,
    "total": _INT,
    "reason": _STR,
    "pace": _obj({"count": _INT, "per_seconds": {"type": "number"}}),
    "requested_by": _STR,
    "requested_at": _TIME,
    "approved_by": _NSTR,
    "approved_at": _NTIME,
    "started_at": _NTIME,
    "finished_at": _NTIME,
    "progress": _obj({k: _INT for k in ("total", "held", "released", "delivered", "failed", "cancelled")}),
}
_BULK_ITEM = _obj(
    {
        "position": _INT,
        "exception_id": _INT,
        "state": {"enum": ["held", "released", "delivered", "failed", "cancelled"]},
        "replay_id": _NINT,
        "release_at": _NTIME,
        "note": _NSTR,
    }
)
SCHEMAS.update(
    {
        "BulkReplay": _obj(_BULK_FIELDS),
        "BulkReplayDetail": _obj({**_BULK_FIELDS, "items": {"type": "array", "items": _BULK_ITEM}}),
        "BulkReplayRequest": _obj(
            {
                "exception_ids": {"type": "array", "items": _ROW_ID, "maxItems": 1000},
                "reason": _STR,
                "expected_versions": {"type": "object", "additionalProperties": _INT},
                "pace": _obj({"count": _INT, "per_seconds": {"type": "number"}}, ()),
            },
            ("exception_ids", "reason"),
        ),
        "BulkReplayDecisionRequest": _obj(
            {
                "password": {"type": "string", "description": "approve: your own password, re-entered"},
                "reason": {"type": "string", "description": "reject, cancel: why (required)"},
                "expected_version": {"type": "integer", "description": "the batch version you reviewed"},
            },
            (),
        ),
    }
)
PATHS.update(
    {
        "/bulk-replays": {
            "get": _op(
                "Bulk replays, newest first, with progress",
                {
                    "200": _resp(
                        "The latest batches", _obj({"items": {"type": "array", "items": _ref("BulkReplay")}})
                    )
                },
            ),
            "post": _op(
                "Request one replay batch of exactly these exceptions (all or nothing); a clinical lead "
                "approves it once",
                {"201": _resp("Requested", _ref("BulkReplay"))},
                "409",
                "422",
                body="BulkReplayRequest",
            ),
        },
        "/bulk-replays/{id}": {
            "get": _op(
                "One batch: its fixed list (each item's state and replay) and its progress",
                {"200": _resp("The batch", _ref("BulkReplayDetail"))},
                "404",
                params=[_path_id("bulk replay id")],
            )
        },
        "/bulk-replays/{id}/{action}": {
            "post": _op(
                "approve (a clinical lead, not the requester, password re-entered) | reject | pause | "
                "resume | cancel (held items return to their queues; released ones finish)",
                {"200": _resp("Decided", _ref("BulkReplay"))},
                "404",
                "409",
                "422",
                body="BulkReplayDecisionRequest",
                params=[
                    _path_id("bulk replay id"),
                    {
                        "name": "action",
                        "in": "path",
                        "required": True,
                        "schema": {"enum": ["approve", "reject", "pause", "resume", "cancel"]},
                    },
                ],
            )
        },
    }
)


OPENAPI = {
    "openapi": "3.1.0",
    "info": {
        "title": "Reconciliation Console API",
        "version": "1.0.0",
        "description": "Outbound EHR messages with idempotency keys, exception queues, decisions, replays, "
        "administration and audit. Every call is authorised and audited like the same action in the console.",
    },
    "servers": [{"url": "/api/v1"}],
    "security": [{"bearer": []}],
    "components": {
        "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        "schemas": SCHEMAS,
    },
    "paths": PATHS,
}
