"""The `recon` command (SPEC 9.2)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import click

from app.config import Settings
from app.domain.errors import DomainError


def _settings() -> Settings:
    return Settings.from_env()


def _sessions(settings: Settings):
    from app.db.session import session_factory

    return session_factory(settings.database_url)


def _fail(message: str, code: int = 1):
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


class _DomainErrors(click.Group):
    """Domain errors become a one-line message and a non-zero exit, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except DomainError as exc:
            _fail(exc.message, 2)


@click.group(cls=_DomainErrors)
def main() -> None:
    """Reconciliation Console: deliver EHR messages, reconcile failures, audit every decision."""


# --- db -----------------------------------------------------------------------------------------


@main.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Migrate the database to the newest schema."""
    from app.db.migrate import upgrade

    settings = _settings()
    upgrade(settings.database_url)
    click.echo("database at head")


# --- users, tokens, customers, connections -------------------------------------------------------


@db.command("app-role")
@click.argument("name")
@click.option("--password-stdin", is_flag=True, help="Set the role's password from standard input.")
@click.option("--check", is_flag=True, help="Only report what differs from the intended grants (exit 1).")
def db_app_role(name: str, password_stdin: bool, check: bool) -> None:
    """Create or update NAME, the PostgreSQL role the web app and workers run as.

    Run as the owner (the role that runs `recon db upgrade`); re-run after every upgrade.
    NAME gets ordinary DML on product tables, SELECT/INSERT on audit_events,
    SELECT/INSERT/DELETE on audit_pending, SELECT/UPDATE on audit_head, USAGE/SELECT on
    sequences; no TRUNCATE, no ownership, no DDL (docs/SECURITY.md). SQLite has no roles:
    the command says so and exits 0."""
    from app.db.session import get_engine
    from app.services.db_roles import RoleError, check_app_role, ensure_app_role

    settings = _settings()
    engine = get_engine(settings.database_url)
    if engine.dialect.name != "postgresql":
        click.echo(
            "database roles are a PostgreSQL feature; on SQLite protect the database file with "
            "file permissions (nothing done)"
        )
        return
    password = None
    if password_stdin and not check:
        password = sys.stdin.readline().rstrip("\n")
        if not password:
            _fail("empty password on standard input")
    try:
        if not check:
            with engine.begin() as conn:
                ensure_app_role(conn, name, password)
        with engine.connect() as conn:
            problems = check_app_role(conn, name)
    except RoleError as exc:
        _fail(str(exc))
    if problems:
        for problem in problems:
            click.echo(f"WRONG {problem}")
        sys.exit(1)
    click.echo(f"OK {name}: app role privileges as intended" if check else f"OK {name}: app role ready")


@main.group()
def users() -> None:
    """Console and service users."""


@users.command("create")
@click.argument("username")
@click.option(
    "--role", required=True, type=click.Choice(["reviewer", "clinical_lead", "auditor", "admin", "service"])
)
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def users_create(username: str, role: str, password_stdin: bool) -> None:
    """Create a user. Console roles need a password (prompted, or --password-stdin)."""
    from app.db.session import transaction
    from app.services.users import create_user

    password = None
    if role != "service":
        if password_stdin:
            password = sys.stdin.readline().rstrip("\r\n")
        else:
            password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    with transaction(_sessions(_settings())) as s:
        user = create_user(s, username, role, password, actor="system:cli")
    click.echo(f"created user {user.username} ({user.role})")


@main.group()
def tokens() -> None:
    """Personal API tokens."""


@tokens.command("create")
@click.argument("username")
@click.option(
    "--expires-days",
    type=click.IntRange(1, 365),
    default=90,
    show_default=True,
    help="Days until the token expires (at most 365).",
)
def tokens_create(username: str, expires_days: int) -> None:
    """Print a new bearer token for USERNAME (shown once; stored hashed).

    Any user, service or person: the operator who holds the database credential bootstraps
    accounts and automation with it. Audited with actor system:cli."""
    from app.db.session import transaction
    from app.services.users import by_username, create_token

    with transaction(_sessions(_settings())) as s:
        user = by_username(s, username)
        if user is None:
            _fail(f"no user {username!r}", 2)
        token = create_token(s, user, actor="system:cli", days=expires_days)
    click.echo(token)


@main.group()
def customers() -> None:
    """Customers (health systems, practice groups)."""


@customers.command("add")
@click.argument("name")
def customers_add(name: str) -> None:
    from app.db.session import transaction
    from app.services.connections import add_customer

    with transaction(_sessions(_settings())) as s:
        customer = add_customer(s, name, actor="system:cli")
    click.echo(f"added customer {customer.name} (id {customer.id})")


@main.group()
def connections() -> None:
    """EHR connections, configured at runtime."""


@connections.command("add")
@click.argument("name")
@click.option("--customer", required=True)
@click.option("--protocol", required=True, type=click.Choice(["fhir-r4", "hl7v2-mllp"]))
@click.option("--endpoint", required=True, help="Base URL (FHIR) or HOST:PORT (MLLP).")
@click.option("--environment", default="prod", type=click.Choice(["prod", "test", "train"]))
@click.option("--conditional-create/--no-conditional-create", default=True)
@click.option("--identifier-search/--no-identifier-search", default=True)
@click.option(
    "--diagnosis-codes",
    default="icd-10",
    type=click.Choice(["icd-10", "icd-9", "any"]),
    help="Diagnosis code system the EHR expects; the other ICD revision becomes a code_set exception.",
)
@click.option(
    "--sequence-sensitive/--no-sequence-sensitive",
    default=False,
    help="A later message for a patient waits behind an unresolved earlier one.",
)
def connections_add(
    name,
    customer,
    protocol,
    endpoint,
    environment,
    conditional_create,
    identifier_search,
    diagnosis_codes,
    sequence_sensitive,
):
    """Add a connection for CUSTOMER."""
    from app.db.session import transaction
    from app.services.connections import add_connection

    with transaction(_sessions(_settings())) as s:
        conn = add_connection(
            s,
            name,
            customer=customer,
            protocol=protocol,
            endpoint=endpoint,
            environment=environment,
            conditional_create=conditional_create,
            identifier_search=identifier_search,
            diagnosis_code_system=diagnosis_codes,
            sequence_sensitive=sequence_sensitive,
            actor="system:cli",
        )
    click.echo(f"added connection {conn.name} (id {conn.id})")


@connections.command("update")
@click.argument("name")
@click.option("--sequence-sensitive/--no-sequence-sensitive", default=None)
def connections_update(name: str, sequence_sensitive: bool | None) -> None:
    """Change a connection's ordering (sequence-sensitive: per patient, in order)."""
    from app.db.session import transaction
    from app.services.connections import set_sequence_sensitive

    with transaction(_sessions(_settings())) as s:
        if sequence_sensitive is not None:
            set_sequence_sensitive(s, name, sequence_sensitive, actor="system:cli")
    click.echo(f"updated connection {name}")


@connections.command("pause")
@click.argument("name")
@click.option("--reason", required=True, help="Why (audited), e.g. the EHR's maintenance window.")
@click.option("--until", default=None, help="ISO time (UTC) the window ends; default: until resumed.")
def connections_pause(name: str, reason: str, until: str | None) -> None:
    """Pause NAME for maintenance: nothing is sent; deliveries and replays are held, not spent."""
    from app.db.session import transaction
    from app.services.connections import pause_connection

    end = _parse_iso(until)
    with transaction(_sessions(_settings())) as s:
        conn = pause_connection(s, name, reason=reason, until=end, actor="system:cli")
    click.echo(f"paused {conn.name}" + (f" until {end:%Y-%m-%d %H:%M} UTC" if end else " until resumed"))


@connections.command("resume")
@click.argument("name")
@click.option("--reason", default=None)
def connections_resume(name: str, reason: str | None) -> None:
    """End NAME's maintenance window; what it held drains in order."""
    from app.db.session import transaction
    from app.services.connections import resume_connection

    with transaction(_sessions(_settings())) as s:
        released = resume_connection(s, name, actor="system:cli", reason=reason)
    click.echo(f"resumed {name}: {released} held item(s) released")


@connections.command("list")
def connections_list() -> None:
    """List connections with their circuit state."""
    import sqlalchemy as sa

    from app.db.models import Connection
    from app.db.session import transaction
    from app.services.connections import circuit_state

    with transaction(_sessions(_settings())) as s:
        rows = s.scalars(sa.select(Connection).order_by(Connection.name)).all()
        click.echo(
            f"{'NAME':<28} {'CUSTOMER':<32} {'PROTOCOL':<11} {'ENV':<5} {'ENABLED':<7} {'CIRCUIT':<9} ENDPOINT"
        )
        for c in rows:
            click.echo(
                f"{c.name:<28} {c.customer.name:<32} {c.protocol:<11} {c.environment:<5} "
                f"{'yes' if c.enabled else 'no':<7} {circuit_state(c):<9} {c.endpoint}"
            )


# --- seed ---------------------------------------------------------------------------------------


@main.group()
def seed() -> None:
    """Demo data."""


@seed.command("demo")
@click.option("--sim-url", default="http://127.0.0.1:8090", show_default=True)
def seed_demo(sim_url: str) -> None:
    """Load the synthetic demo data set (does nothing if it is already there)."""
    from seed.demo import load_demo

    result = load_demo(_sessions(_settings()), sim_base_url=sim_url)
    _print_logins(result)


def _print_logins(result) -> None:
    click.echo("Demo logins (console):")
    for username, role, password in result.logins:
        click.echo(f"  {username:<10} {role:<14} password: {password}")


# --- processes ----------------------------------------------------------------------------------


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
def web(host: str, port: int) -> None:
    """Serve the console and the API (development server; use gunicorn in production)."""
    from app import create_app
    from app.adapters.redis_conn import redis_url

    settings = _settings()
    redis_url(settings)  # starts or joins the embedded Redis when REDIS_URL is unset
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # run atexit: leave no embedded Redis behind
    app = create_app()
    click.echo(f"console on http://{host}:{port}")
    app.run(host=host, port=port, debug=False, use_reloader=False, threaded=True)


@main.command()
@click.option("--burst", is_flag=True, help="Run until nothing is ready, then exit.")
def worker(burst: bool) -> None:
    """RQ worker plus the outbox relay, scheduled retries and the lease reaper."""
    from rq import Queue

    from app.adapters.queue import run_worker, worker_name
    from app.adapters.redis_conn import connect, redis_url
    from app.logs import configure_logging
    from app.services.delivery import Runtime
    from jobs.delivery import install_runtime

    configure_logging()
    settings = _settings()
    connection = connect(redis_url(settings))
    queue = Queue(settings.queue_name, connection=connection)
    rt = Runtime.from_settings(settings, worker_name())
    install_runtime(rt)
    if not burst:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        counts = run_worker(rt, queue, burst=burst)
    except KeyboardInterrupt:
        return
    click.echo(f"worker done: {counts}")


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--fhir-port", default=8090, show_default=True, type=int)
@click.option(
    "--mllp-port",
    default=2575,
    show_default=True,
    type=int,
    help="HL7 v2 MLLP listener port (tenant = MSH-6 receiving facility).",
)
@click.option("--profile", default="default", show_default=True)
def sim(host: str, fhir_port: int, mllp_port: int, profile: str) -> None:
    """Run the simulated EHR."""
    from app.simulator.fhir_server import run_sim

    run_sim(host, fhir_port, profile, mllp_port)


@main.command()
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
@click.option("--sim-port", default=8090, show_default=True, type=int)
@click.option(
    "--mllp-port",
    default=2575,
    show_default=True,
    type=int,
    help="The simulated EHR's HL7 v2 MLLP listener (the demo's MLLP connections point at it).",
)
def run(host: str, port: int, sim_port: int, mllp_port: int) -> None:
    """Everything for a local demo: migrate, seed, simulated EHR, a worker and the console."""
    from app.adapters.redis_conn import redis_url, stop_embedded
    from app.db.migrate import upgrade
    from seed.demo import load_demo

    settings = _settings()
    upgrade(settings.database_url)
    result = load_demo(_sessions(settings), sim_base_url=f"http://127.0.0.1:{sim_port}", mllp_port=mllp_port)
    env = dict(
        os.environ,
        REDIS_URL=redis_url(settings),
        DATABASE_URL=settings.database_url,
        RECON_INSTANCE=str(settings.instance_path),
    )
    exe = [sys.executable, "-m", "app.cli"]
    children = [
        subprocess.Popen([*exe, "sim", "--fhir-port", str(sim_port), "--mllp-port", str(mllp_port)], env=env),
        subprocess.Popen([*exe, "worker"], env=env),
        subprocess.Popen([*exe, "web", "--host", host, "--port", str(port)], env=env),
    ]
    _print_logins(result)
    click.echo(
        f"\nConsole: http://{host}:{port}   simulated EHR: http://127.0.0.1:{sim_port}"
        f" (HL7 v2 MLLP on 127.0.0.1:{mllp_port})   Ctrl-C stops all"
    )
    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        while not stopping and all(c.poll() is None for c in children):
            time.sleep(0.5)
    finally:
        for child in children:
            if child.poll() is None:
                child.terminate()
        for child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
        stop_embedded()
    failed = [c for c in children if c.returncode not in (0, -signal.SIGTERM, None)]
    if failed and not stopping:
        _fail("a child process exited; everything was stopped")


# --- audit --------------------------------------------------------------------------------------


@main.group()
def audit() -> None:
    """The hash-chained audit log."""


def _parse_iso(value: str | None) -> datetime | None:
    if not value:
        return None
    from app.domain.timeparse import parse_utc

    try:
        return parse_utc(value)
    except ValueError:
        raise click.BadParameter(f"not an ISO 8601 timestamp: {value}") from None


@audit.command("export")
@click.option("--format", "fmt", required=True, type=click.Choice(["csv", "jsonl", "fhir-ndjson"]))
@click.option("--since")
@click.option("--until")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path))
def audit_export(fmt: str, since: str | None, until: str | None, out: Path | None) -> None:
    """Stream an export (audited; ends with the chain head it covers)."""
    from app.services.audit_export import stream_export

    lines = stream_export(
        _sessions(_settings()), fmt, actor="system:cli", since=_parse_iso(since), until=_parse_iso(until)
    )
    if out is None:
        for line in lines:
            sys.stdout.write(line)
        return
    with out.open("w", encoding="utf-8", newline="") as fh:
        for line in lines:
            fh.write(line)
    click.echo(f"wrote {out}", err=True)


@audit.command("verify")
@click.option(
    "--jobs",
    type=int,
    default=lambda: min(os.cpu_count() or 1, 4),
    show_default="CPUs, at most 4",
    help="PostgreSQL: processes checking ranges of a large chain in one snapshot.",
)
@click.option(
    "--checkpoints",
    "checkpoints_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Also require every checkpoint recorded in this file (recon audit checkpoint) on the chain.",
)
def audit_verify(jobs: int, checkpoints_file: Path | None) -> None:
    """Recompute the chain: exit 0 'OK <n> events head <hash>', else name the first broken event
    (or, with --checkpoints, the first recorded checkpoint the chain no longer reaches).

    Reads one read-only snapshot (REPEATABLE READ on PostgreSQL): no writer waits for it."""
    from app.services.audit import check_checkpoints, read_checkpoints, verify_database

    checkpoints = None
    if checkpoints_file is not None:
        try:
            checkpoints = read_checkpoints(checkpoints_file)
        except ValueError as exc:
            _fail(str(exc))
    engine = _sessions(_settings()).kw["bind"]
    result = verify_database(engine, jobs=jobs)
    if not result.ok:
        click.echo(
            f"BROKEN at event {result.broken_id}: {result.problem} ({result.count} events verified before it)"
        )
        sys.exit(1)
    if checkpoints:
        missed = check_checkpoints(engine, checkpoints)
        if missed is not None:
            click.echo(
                f"BROKEN at checkpoint {missed.at} (event {missed.last_id}): "
                "the chain no longer reaches the recorded head"
            )
            sys.exit(1)
    click.echo(f"OK {result.count} events head {result.head}")


@audit.command("checkpoint")
@click.option(
    "--file",
    "path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Append here (default RECON_AUDIT_CHECKPOINT_FILE, else <instance>/audit-checkpoints.jsonl).",
)
def audit_checkpoint(path: Path | None) -> None:
    """Seal, then anchor the chain head now: one JSON line to the log stream (logger
    recon.audit.checkpoint) and one appended (O_APPEND, fsync) to the checkpoint file."""
    from app.logs import configure_logging
    from app.services.audit import write_checkpoint

    settings = _settings()
    configure_logging()
    target = path or settings.checkpoint_file()
    try:
        cp = write_checkpoint(_sessions(settings), target)
    except RuntimeError as exc:
        _fail(str(exc))
    click.echo(f"checkpoint {cp.at} event {cp.last_id} hash {cp.hash} -> {target}")


@audit.command("seal")
def audit_seal() -> None:
    """Seal recorded events into the chain now (normally done right after each commit and by
    the worker's housekeeping); prints how many were sealed and how many are still pending."""
    import sqlalchemy as sa

    from app.db.models import AuditPending
    from app.db.session import transaction
    from app.services.audit import pending_summary, seal

    sessions = _sessions(_settings())
    with transaction(sessions, read_only=True) as s:
        newest = s.scalar(sa.select(sa.func.max(AuditPending.seq)))
    # Another sealer at work: wait for it (up to 30 s) rather than report its events as stuck.
    sealed = seal(sessions, wait_for=newest, timeout=30.0) if newest is not None else 0
    with transaction(sessions, read_only=True) as s:
        left = pending_summary(s)
    click.echo(
        f"sealed {sealed}; pending {left.count}"
        + (f" (oldest {left.oldest_at:%Y-%m-%d %H:%M:%S} UTC)" if left.oldest_at else "")
    )
    if left.count:
        sys.exit(1)


# --- batch import -------------------------------------------------------------------------------


@main.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--connection", "connection", required=True, help="Connection the messages are for.")
@click.option(
    "--as",
    "as_user",
    default="importer",
    show_default=True,
    help="Service user the messages are submitted as. 'importer' is created (role service, no "
    "password, no token; audited as system:cli) when missing; any other name must exist.",
)
@click.option(
    "--batch-size",
    default=200,
    show_default=True,
    type=click.IntRange(1, 10_000),
    help="Messages per database transaction.",
)
def import_batch(file: Path, connection: str, as_user: str, batch_size: int) -> None:
    """Import an HL7 v2 batch file or a FHIR NDJSON file into CONNECTION.

    HL7 v2: FHS/BHS…BTS/FTS batches, bare concatenated messages or MLLP-framed blocks, split on
    the file's bytes (Latin-1/cp1252 kept byte-for-byte). FHIR NDJSON: one resource per line,
    blank lines skipped. The format is read from the content. Each message goes through the same
    intake as POST /api/v1/messages with the idempotency key import:<file SHA-256, 16 hex>:<position>:
    importing the same file again creates nothing new, and a run that stopped half-way resumes
    when re-run. Unreadable items become data_shape exceptions with their bytes kept.
    """
    from contextlib import ExitStack

    from app.services.batch_import import import_file

    done, bars = 0, ExitStack()

    def advance(item) -> None:
        """Progress by bytes of the file; the bar appears once the file and target are checked."""
        nonlocal done, bar
        if bar is None:
            bar = bars.enter_context(
                click.progressbar(length=size, label=f"importing {file.name}", file=sys.stderr)
            )
        end = item.offset + len(item.raw)
        bar.update(max(0, end - done))
        done = max(done, end)

    size, bar = file.stat().st_size, None
    with bars:
        summary = import_file(
            _sessions(_settings()), file, connection, as_user=as_user, batch_size=batch_size, on_item=advance
        )
        if bar is not None:
            bar.update(max(0, size - done))
    for line in summary.lines():
        click.echo(line)


@main.group()
def payloads() -> None:
    """Payload retention (docs/SECURITY.md "PHI")."""


@payloads.command("purge")
@click.option("--dry-run", is_flag=True, help="Only count what would be purged.")
@click.option(
    "--days", type=click.IntRange(min=1), help="Retention in days (default RECON_PAYLOAD_RETENTION_DAYS, 90)."
)
def payloads_purge(dry_run: bool, days: int | None) -> None:
    """Purge the payloads of delivered messages older than the retention period (audited as
    payload.purged; the hash and size stay). Unresolved items and the audit log are never purged."""
    from app.services.phi import purge_payloads

    result = purge_payloads(_sessions(_settings()), days=days, actor="system:cli", dry_run=dry_run)
    verb = "would purge" if dry_run else "purged"
    click.echo(
        f"{verb} {result.versions} payload versions of {result.messages} delivered messages "
        f"({result.bytes} bytes) last changed before {result.cutoff.isoformat(timespec='seconds')}Z"
    )


if __name__ == "__main__":
    main()
