"""Issue 7, Input: /metrics behind a token (or this host only), connection endpoints validated by
protocol and "Test connection" calling nothing else, access logs without query strings but with
actor and duration, and database errors logged without their SQL parameters."""

from __future__ import annotations

import json
import logging

import pytest
import sqlalchemy as sa

from app.db.models import Connection
from app.db.session import transaction
from app.logs import JsonFormatter

# --- /metrics -------------------------------------------------------------------------------------


def test_metrics_without_a_token_only_for_this_host(client, users):
    assert client.get("/metrics").status_code == 200  # the test client is 127.0.0.1
    remote = client.get("/metrics", environ_base={"REMOTE_ADDR": "10.2.3.4"})
    assert remote.status_code == 401 and "recon_" not in remote.get_data(as_text=True)


def test_metrics_with_a_token_need_it_from_everywhere(app, client, users):
    app.config["RECON_SETTINGS"].metrics_token = "scrape-secret-123"
    assert client.get("/metrics").status_code == 401  # even from loopback
    assert client.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code == 401
    # a console user's API token is not the scrape token
    assert (
        client.get("/metrics", headers={"Authorization": f"Bearer {users['svc_token']}"}).status_code == 401
    )
    ok = client.get(
        "/metrics",
        headers={"Authorization": "bearer scrape-secret-123"},
        environ_base={"REMOTE_ADDR": "10.2.3.4"},
    )
    assert ok.status_code == 200 and "recon_" in ok.get_data(as_text=True)


# --- connection endpoints and "Test connection" ---------------------------------------------------


@pytest.mark.parametrize(
    "protocol, endpoint",
    [
        ("fhir-r4", "javascript:alert(document.cookie)"),
        ("fhir-r4", "file:///etc/passwd"),
        ("fhir-r4", "gopher://internal:70/"),
        ("fhir-r4", "http://user:secret@ehr.example/fhir"),
        ("fhir-r4", "ehr.example:443"),
        ("fhir-r4", "http://ehr.example/fhir?x=1"),
        ("hl7v2-mllp", "javascript:alert(1)"),
        ("hl7v2-mllp", "http://ehr.example:2575"),
        ("hl7v2-mllp", "ehr.example"),
        ("hl7v2-mllp", "ehr.example:99999"),
    ],
)
def test_endpoints_are_validated_by_protocol(login, post, sessions, protocol, endpoint):
    login("adam")
    post("/admin/customers", {"name": "Lakeside"})
    data = {"name": "bad", "customer": "Lakeside", "protocol": protocol, "endpoint": endpoint}
    data |= {"environment": "test", "vendor": "generic"}
    assert post("/admin/connections", data).status_code == 422
    with transaction(sessions) as s:
        assert s.scalar(sa.select(Connection).where(Connection.name == "bad")) is None


def test_valid_endpoints_are_accepted(login, post):
    login("adam")
    post("/admin/customers", {"name": "Lakeside"})
    for n, (protocol, endpoint) in enumerate(
        [("fhir-r4", "https://ehr.example/fhir/R4"), ("hl7v2-mllp", "10.1.2.3:2575")]
    ):
        data = {"name": f"ok-{n}", "customer": "Lakeside", "protocol": protocol, "endpoint": endpoint}
        data |= {"environment": "test", "vendor": "generic"}
        assert post("/admin/connections", data).status_code == 303, endpoint


def test_test_connection_probes_nothing_but_a_valid_stored_endpoint(
    login, post, connection, sessions, audit_events, monkeypatch
):
    from app.adapters.ehr import base

    probed = []
    monkeypatch.setattr(base, "adapter_for", lambda settings: probed.append(settings.endpoint))
    with transaction(sessions) as s:  # a row stored before endpoints were validated
        s.get(Connection, connection.id).endpoint = "javascript:alert(1)"
    client = login("adam")
    # the form carries no endpoint of its own: an extra field is ignored
    assert (
        post(f"/admin/connections/{connection.id}/test", {"endpoint": "http://10.0.0.1:22"}).status_code
        == 303
    )
    assert probed == []
    assert "not probed" in client.get("/admin/connections").get_data(as_text=True)
    [event] = audit_events(action="connection.test")
    assert event.details["ok"] is False


# --- logs -----------------------------------------------------------------------------------------


@pytest.fixture
def access_log():
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep()
    logger = logging.getLogger("recon.access")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_access_log_has_actor_and_duration_and_no_query_string(client, users, access_log):
    token = users["svc_token"]
    client.get(f"/api/v1/openapi.json?access_token={token}&q=Patient/12345")
    client.get("/api/v1/exceptions?cursor=x", headers={"Authorization": f"Bearer {token}"})
    lines = [json.loads(JsonFormatter().format(r)) for r in access_log]
    assert lines, "no access log lines"
    for line in lines:
        text = json.dumps(line)
        assert token not in text and "12345" not in text and "?" not in line["msg"]
        assert isinstance(line["duration_ms"], float)
        assert {"ts", "level", "logger", "msg", "request_id", "path", "status"} <= set(line)
    assert lines[-1]["actor"] == "svc" and lines[-1]["status"] == 403


def test_development_server_request_lines_lose_their_query_strings():
    from app.logs import DropQueryStrings

    record = logging.LogRecord(
        "werkzeug",
        logging.INFO,
        __file__,
        1,
        '%s - - [%s] "%s" %s %s',
        ("127.0.0.1", "now", "GET /api/v1/audit?access_token=rcn_secret HTTP/1.1", 200, "-"),
        None,
    )
    DropQueryStrings().filter(record)
    assert "rcn_secret" not in record.getMessage() and "GET /api/v1/audit HTTP/1.1" in record.getMessage()


def test_database_errors_are_logged_without_their_parameters(sessions):
    import sys

    patient = "Patient/" + "9" * 250
    with pytest.raises(sa.exc.DBAPIError) as failed, transaction(sessions) as s:
        s.execute(sa.text("SELECT * FROM no_such_table WHERE ref = :ref"), {"ref": patient})
    assert "9999999999" not in str(failed.value)  # the engines hide parameters (hide_parameters=True)
    # ... and should an error that carries them reach the log anyway, the log line drops them.
    shown = sa.exc.DBAPIError("SELECT * FROM t WHERE ref = ?", (patient,), Exception("boom"))
    assert "9999999999" in str(shown)
    try:
        raise RuntimeError("unhandled") from shown
    except RuntimeError:
        record = logging.LogRecord(
            "recon.web", logging.ERROR, __file__, 1, "unhandled error", (), sys.exc_info()
        )
    line = JsonFormatter().format(record)
    assert "9999999999" not in line
    assert "SELECT * FROM t" in line and "unhandled error" in line


def test_a_forged_queue_cursor_past_the_id_column_is_422_not_500(client, users, sessions):
    import base64 as b64

    from app.services.users import create_token

    with transaction(sessions) as s:
        token = create_token(s, s.merge(users["rita"]))
    for item_id in (2**31, 2**63 - 1, -1):
        cursor = b64.urlsafe_b64encode(json.dumps(["2026-12-02T10:00:00", item_id]).encode()).decode()
        r = client.get(f"/api/v1/exceptions?cursor={cursor}", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 422 and r.json["error"]["code"] == "invalid_cursor", (item_id, r.status_code)
