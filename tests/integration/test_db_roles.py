"""Issue 7, database roles: migrations run as the owner; the app and workers run as an app role
(`recon db app-role`) that cannot rewrite the audit log — no UPDATE, DELETE, TRUNCATE, ALTER or
trigger change on audit_events — yet runs the whole product loop. /readyz warns when the app
connects as the owner or a superuser."""

from __future__ import annotations

import uuid

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from app.cli import main
from tests.integration import test_core_loop as core_loop
from tests.integration.test_core_loop import tokens  # noqa: F401  (the core loop's fixture)

AUDIT_ATTACKS = [
    "UPDATE audit_events SET reason = 'rewritten' WHERE id = 1",
    "DELETE FROM audit_events WHERE id = 1",
    "TRUNCATE audit_events",
    "ALTER TABLE audit_events DISABLE TRIGGER audit_events_no_update_delete",
    "ALTER TABLE audit_events DISABLE TRIGGER ALL",
    "DROP TRIGGER audit_events_no_update_delete ON audit_events",
    "ALTER TABLE audit_events ADD COLUMN note text",
    "DROP TABLE audit_events",
    "TRUNCATE audit_pending",
    "ALTER TABLE audit_pending DISABLE TRIGGER ALL",
    "UPDATE audit_pending SET actor = 'someone else'",
    "CREATE TABLE intruder (id int)",
]


def _cli(url: str, *args: str, input: str | None = None):
    return CliRunner().invoke(
        main, list(args), input=input, catch_exceptions=False, env={"DATABASE_URL": url}
    )


@pytest.fixture
def owner_and_role(db_template):
    """A fresh test database (owned by the test superuser, who ran the migrations) and a
    unique app role for it, created with `recon db app-role`; both dropped afterwards."""
    from app.db.session import dispose_engines

    fresh, drop = db_template
    owner_url = fresh()
    role = f"recon_app_{uuid.uuid4().hex[:10]}"
    r = _cli(owner_url, "db", "app-role", role)
    assert r.exit_code == 0, r.output
    assert f"OK {role}" in r.output
    app_url = (
        sa.engine.make_url(owner_url).set(username=role, password=None).render_as_string(hide_password=False)
    )
    yield owner_url, app_url, role
    dispose_engines()
    drop(owner_url)
    admin = sa.create_engine(
        sa.engine.make_url(owner_url).set(database="postgres"), isolation_level="AUTOCOMMIT"
    )
    with admin.connect() as c:
        c.exec_driver_sql(f'DROP ROLE IF EXISTS "{role}"')
    admin.dispose()


@pytest.fixture
def database_url(owner_and_role):
    """Everything the product does in these tests (app, sessions, users, worker) runs as the app role."""
    from app.db.session import get_engine

    url = owner_and_role[1]
    yield url
    get_engine(url).dispose()


def _seed_one_event(url: str) -> None:
    from app.db.session import session_factory, transaction
    from app.services import audit

    with transaction(session_factory(url)) as s:
        audit.record(s, actor="rita", action="test.seed", subject_type="exception", subject_id="1")


@pytest.mark.postgres
@pytest.mark.parametrize("statement", AUDIT_ATTACKS)
def test_the_app_role_cannot_rewrite_the_audit_log(owner_and_role, statement):
    owner_url, app_url, _ = owner_and_role
    _seed_one_event(app_url)
    engine = sa.create_engine(app_url)
    try:
        with pytest.raises(sa.exc.DBAPIError) as caught, engine.begin() as conn:
            conn.exec_driver_sql(statement)
        # Refused for want of privilege or ownership, not by the triggers alone.
        assert "permission denied" in str(caught.value) or "must be owner" in str(caught.value)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM audit_events").scalar() == 1
    finally:
        engine.dispose()
    assert _cli(owner_url, "audit", "verify").output.startswith("OK 1 events")


@pytest.mark.postgres
def test_the_app_role_appends_and_seals(owner_and_role):
    from app.db.session import session_factory, transaction
    from app.services import audit

    _, app_url, _ = owner_and_role
    sessions = session_factory(app_url)
    for _ in range(3):
        _seed_one_event(app_url)
    with transaction(sessions, read_only=True) as s:
        assert audit.pending_summary(s).count == 0
        assert audit.head(s).last_id == 3
    engine = sa.create_engine(app_url)
    try:
        with engine.begin() as conn:  # INSERT is granted (the sealer's; hashes are checked by verify)
            conn.exec_driver_sql(
                "INSERT INTO audit_pending (occurred_at, actor, action, subject_type, subject_id, details) "
                "VALUES (now(), 'rita', 'test.raw', 'exception', '2', '{}')"
            )
    finally:
        engine.dispose()
    assert audit.seal(sessions) == 1
    assert audit.verify_database(sessions.kw["bind"]).count == 4


@pytest.mark.postgres
def test_check_passes_for_the_app_role_and_fails_for_the_owner(owner_and_role):
    owner_url, _, role = owner_and_role
    r = _cli(owner_url, "db", "app-role", role, "--check")
    assert r.exit_code == 0 and f"OK {role}" in r.output, r.output
    # Idempotent: a second run changes nothing and still checks clean.
    assert _cli(owner_url, "db", "app-role", role).exit_code == 0
    assert _cli(owner_url, "db", "app-role", role, "--check").exit_code == 0
    owner = sa.engine.make_url(owner_url).username
    r = _cli(owner_url, "db", "app-role", owner, "--check")
    assert r.exit_code == 1
    assert f"WRONG {owner} has SUPERUSER" in r.output
    assert "audit_events: has DELETE, REFERENCES, TRIGGER, TRUNCATE, UPDATE (not needed)" in r.output
    # The owner cannot be made the app role.
    r = _cli(owner_url, "db", "app-role", owner)
    assert r.exit_code == 1 and "the app role must be another" in r.output


@pytest.mark.postgres
def test_check_names_a_stray_grant_and_a_rerun_removes_it(owner_and_role):
    owner_url, _, role = owner_and_role
    engine = sa.create_engine(owner_url)
    try:
        with engine.begin() as conn:
            conn.exec_driver_sql(f'GRANT UPDATE, TRUNCATE ON audit_events TO "{role}"')
            conn.exec_driver_sql(f'REVOKE DELETE ON audit_pending FROM "{role}"')
    finally:
        engine.dispose()
    r = _cli(owner_url, "db", "app-role", role, "--check")
    assert r.exit_code == 1
    assert "WRONG audit_events: has TRUNCATE, UPDATE (not needed)" in r.output
    assert "WRONG audit_pending: lacks DELETE" in r.output
    assert _cli(owner_url, "db", "app-role", role).exit_code == 0
    assert _cli(owner_url, "db", "app-role", role, "--check").exit_code == 0


@pytest.mark.postgres
def test_a_table_created_by_a_later_migration_is_usable_before_the_rerun(owner_and_role):
    owner_url, app_url, role = owner_and_role
    owner = sa.create_engine(owner_url)
    app = sa.create_engine(app_url)
    try:
        with owner.begin() as conn:
            conn.exec_driver_sql("CREATE TABLE later_table (id serial PRIMARY KEY, note text)")
        with app.begin() as conn:  # default privileges: ordinary DML, sequences
            conn.exec_driver_sql("INSERT INTO later_table (note) VALUES ('x')")
            conn.exec_driver_sql("UPDATE later_table SET note = 'y'")
            conn.exec_driver_sql("DELETE FROM later_table")
        with pytest.raises(sa.exc.DBAPIError), app.begin() as conn:
            conn.exec_driver_sql("TRUNCATE later_table")
    finally:
        owner.dispose()
        app.dispose()
    assert _cli(owner_url, "db", "app-role", role, "--check").exit_code == 0


@pytest.mark.postgres
def test_the_product_loop_runs_as_the_app_role(
    owner_and_role,
    client,
    tokens,  # noqa: F811
    fhir_connection,
    sim_control,
    run_worker,
    sessions,
):
    """submit → deliver → exception → correct → approve → replay → resolved, audited and
    exported, every step as the app role (the app, its sessions and the worker use its URL)."""
    _, app_url, role = owner_and_role
    with sessions() as s:
        assert s.execute(sa.text("SELECT current_user")).scalar() == role
    core_loop.test_rejected_order_is_corrected_approved_replayed_and_resolved(
        client, tokens, fhir_connection, sim_control, run_worker, sessions
    )


@pytest.mark.postgres
def test_readyz_warns_as_the_owner_and_not_as_the_app_role(owner_and_role, client, redis_url):
    from app import create_app

    r = client.get("/readyz")  # the app fixture runs as the app role here
    assert r.status_code == 200 and r.json["status"] == "ready"
    assert r.json["warnings"] == []
    owner_url = owner_and_role[0]
    as_owner = create_app({"DATABASE_URL": owner_url, "REDIS_URL": redis_url, "TESTING": True}).test_client()
    r = as_owner.get("/readyz")
    assert r.status_code == 200 and r.json["status"] == "ready"
    warnings = " | ".join(r.json["warnings"])
    assert "superuser" in warnings and "owner of the tables" in warnings


@pytest.mark.postgres
def test_readyz_warns_for_an_owner_that_is_not_a_superuser(owner_and_role, redis_url):
    """A plain owner (NOSUPERUSER) is warned about too: owning the tables is enough to disable
    the audit triggers."""
    from app import create_app
    from app.db.session import get_engine

    owner_url = owner_and_role[0]
    plain = f"recon_owner_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(owner_url, isolation_level="AUTOCOMMIT")
    url = sa.engine.make_url(owner_url).set(username=plain).render_as_string(hide_password=False)
    try:
        with admin.connect() as c:
            c.exec_driver_sql(f'CREATE ROLE "{plain}" LOGIN NOSUPERUSER')
            c.exec_driver_sql(f'GRANT SELECT ON ALL TABLES IN SCHEMA public TO "{plain}"')
            c.exec_driver_sql(f'ALTER TABLE audit_events OWNER TO "{plain}"')
        r = (
            create_app({"DATABASE_URL": url, "REDIS_URL": redis_url, "TESTING": True})
            .test_client()
            .get("/readyz")
        )
        assert r.status_code == 200
        assert len(r.json["warnings"]) == 1 and "owner of the tables" in r.json["warnings"][0]
    finally:
        get_engine(url).dispose()
        with admin.connect() as c:
            c.exec_driver_sql(f'REASSIGN OWNED BY "{plain}" TO CURRENT_USER')
            c.exec_driver_sql(f'DROP OWNED BY "{plain}"')
            c.exec_driver_sql(f'DROP ROLE "{plain}"')
        admin.dispose()


def test_on_sqlite_the_command_explains_and_does_nothing(tmp_path, redis_url):
    """SQLite has no roles: `recon db app-role` says so and exits 0 (a deployment script runs
    unchanged on both); /readyz has no warning to give. (Runs on its own SQLite file in both
    passes.)"""
    from app import create_app
    from app.db.migrate import upgrade
    from app.db.session import get_engine

    url = f"sqlite:///{tmp_path / 'roles.db'}"
    upgrade(url)
    try:
        for args in (["db", "app-role", "recon_app"], ["db", "app-role", "recon_app", "--check"]):
            r = _cli(url, *args)
            assert r.exit_code == 0 and "database roles are a PostgreSQL feature" in r.output
        r = (
            create_app({"DATABASE_URL": url, "REDIS_URL": redis_url, "TESTING": True})
            .test_client()
            .get("/readyz")
        )
        assert r.status_code == 200 and r.json["warnings"] == []
    finally:
        get_engine(url).dispose()
