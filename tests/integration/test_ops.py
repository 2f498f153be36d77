"""SPEC 7 and 9.3: health, readiness, metrics, request ids, the OpenAPI document."""

import re

from tests.factories import make_exception


def test_healthz_and_readyz(client):
    assert client.get("/healthz").json == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200
    assert r.json["checks"] == {"database": "ok", "redis": "ok", "migrations": "ok"}


def test_metrics_expose_queue_depth_breaches_and_circuits(client, sessions, users):
    make_exception(sessions, users["svc"], key="m-1", category="code_set")
    body = client.get("/metrics").get_data(as_text=True)
    assert 'recon_queue_depth{category="code_set",state="open"} 1' in body
    assert "# TYPE recon_attempt_latency_ms histogram" in body
    assert 'recon_circuit_open{connection="mercy-epic"} 0' in body


def test_request_id_is_echoed_or_made(client):
    assert client.get("/healthz", headers={"X-Request-Id": "abc-123"}).headers["X-Request-Id"] == "abc-123"
    made = client.get("/healthz", headers={"X-Request-Id": "bad id with spaces"}).headers["X-Request-Id"]
    assert len(made) == 32


def test_openapi_describes_every_route(client, app):
    doc = client.get("/api/v1/openapi.json").json
    # Path parameters are compared by position: the document names them {id}, {action}, ...
    documented = {re.sub(r"\{[^}]+\}", "{}", "/api/v1" + p) for p in doc["paths"]}
    routed = {
        re.sub(r"<[^>]+>", "{}", str(rule))
        for rule in app.url_map.iter_rules()
        if str(rule).startswith("/api/v1")
    }
    assert routed == documented


def test_api_without_token_is_401_json(client):
    r = client.get("/api/v1/exceptions")
    assert r.status_code == 401 and r.json["error"]["code"] == "unauthorized"
    r = client.get("/api/v1/exceptions", headers={"Authorization": "Bearer nope"})
    assert r.status_code == 401


def test_service_role_cannot_read_queues_or_decide(client, users, sessions):
    exc_id = make_exception(sessions, users["svc"], key="m-2")
    auth = {"Authorization": f"Bearer {users['svc_token']}"}
    assert client.get("/api/v1/exceptions", headers=auth).status_code == 403
    r = client.post(
        f"/api/v1/exceptions/{exc_id}/decisions", json={"action": "comment", "reason": "x"}, headers=auth
    )
    assert r.status_code == 403 and r.json["error"]["code"] == "forbidden"
