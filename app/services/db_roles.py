"""The application's PostgreSQL role (docs/SECURITY.md, "Database roles").

Migrations run as the owner role (it owns every table, sequence and trigger). The web app and
the workers run as an *app role* holding only what they need: ordinary DML on the product
tables, and on the audit tables only what appending and sealing need. The app role owns
nothing, so it cannot ALTER a table, drop or disable a trigger, or TRUNCATE: the triggers that
keep the audit log append-only hold against it.

`ensure_app_role` is run by the owner (`recon db app-role NAME`); it is idempotent and is
re-run after every `recon db upgrade`. Default privileges also give tables the owner creates
later ordinary DML, so a new product table works before the re-run; the re-run narrows any new
audit table to its proper grants. `check_app_role` lists what differs from that intent.
"""

from __future__ import annotations

import re

import sqlalchemy as sa

TABLE_PRIVILEGES = ("SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER")
DML = frozenset({"SELECT", "INSERT", "UPDATE", "DELETE"})
# The audit tables: append, seal, never rewrite. audit_head needs UPDATE because the sealer
# (which runs in the app and workers) advances it; a rewritten head is caught by checkpoints.
SPECIAL = {
    "audit_events": frozenset({"SELECT", "INSERT"}),
    "audit_pending": frozenset({"SELECT", "INSERT", "DELETE"}),
    "audit_head": frozenset({"SELECT", "UPDATE"}),
    "alembic_version": frozenset({"SELECT"}),  # /readyz reads it; only migrations write it
}
SEQUENCE_PRIVILEGES = frozenset({"USAGE", "SELECT"})

_NAME = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")


class RoleError(ValueError):
    pass


def expected_privileges(table: str) -> frozenset[str]:
    return SPECIAL.get(table, DML)


def _ident(conn: sa.Connection, name: str) -> str:
    return conn.dialect.identifier_preparer.quote_identifier(name)


def _validate(name: str) -> None:
    if not _NAME.match(name):
        raise RoleError(f"role name must be lowercase letters, digits and _ (got {name!r})")


def _tables(conn: sa.Connection) -> list[str]:
    return list(
        conn.execute(
            sa.text(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = current_schema() AND c.relkind IN ('r', 'p') ORDER BY 1"
            )
        ).scalars()
    )


def _sequences(conn: sa.Connection) -> list[str]:
    return list(
        conn.execute(
            sa.text(
                "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = current_schema() AND c.relkind = 'S' ORDER BY 1"
            )
        ).scalars()
    )


def ensure_app_role(conn: sa.Connection, name: str, password: str | None = None) -> None:
    """Create or update the app role `name` (run by the owner, in one transaction)."""
    _validate(name)
    owner = conn.execute(sa.text("SELECT current_user")).scalar()
    if name == owner:
        raise RoleError(f"{name} is the role running migrations (the owner); the app role must be another")
    audit_owner = conn.execute(
        sa.text(
            "SELECT tableowner FROM pg_tables WHERE schemaname = current_schema() AND tablename = 'audit_events'"
        )
    ).scalar()
    if audit_owner is None:
        raise RoleError("no audit_events table here: run `recon db upgrade` first")
    if audit_owner != owner:
        raise RoleError(f"run this as the owner of the tables ({audit_owner}), not as {owner}")
    role, db, schema = _ident(conn, name), _ident(conn, conn.engine.url.database or ""), None
    schema = _ident(conn, conn.execute(sa.text("SELECT current_schema()")).scalar())
    exists = conn.execute(sa.text("SELECT 1 FROM pg_roles WHERE rolname = :n"), {"n": name}).first()
    attrs = "LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION NOBYPASSRLS INHERIT"
    conn.exec_driver_sql(f"{'ALTER' if exists else 'CREATE'} ROLE {role} {attrs}")
    if password is not None:
        # Sent as a literal (utility statements take no parameters); quoted by the server.
        literal = conn.execute(sa.text("SELECT quote_literal(:p)"), {"p": password}).scalar()
        conn.exec_driver_sql(f"ALTER ROLE {role} PASSWORD {literal}")
    # Membership in the owner role would lend it the owner's rights.
    if conn.execute(
        sa.text("SELECT 1 FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member WHERE r.rolname = :n"),
        {"n": name},
    ).first():
        for granted in conn.execute(
            sa.text(
                "SELECT g.rolname FROM pg_auth_members m JOIN pg_roles r ON r.oid = m.member "
                "JOIN pg_roles g ON g.oid = m.roleid WHERE r.rolname = :n"
            ),
            {"n": name},
        ).scalars():
            conn.exec_driver_sql(f"REVOKE {_ident(conn, granted)} FROM {role}")
    conn.exec_driver_sql(f"GRANT CONNECT ON DATABASE {db} TO {role}")
    conn.exec_driver_sql(f"REVOKE CREATE ON SCHEMA {schema} FROM {role}")
    conn.exec_driver_sql(f"GRANT USAGE ON SCHEMA {schema} TO {role}")
    for table in _tables(conn):
        t = _ident(conn, table)
        conn.exec_driver_sql(f"REVOKE ALL ON TABLE {schema}.{t} FROM {role}")
        conn.exec_driver_sql(
            f"GRANT {', '.join(sorted(expected_privileges(table)))} ON TABLE {schema}.{t} TO {role}"
        )
    for seq in _sequences(conn):
        s = _ident(conn, seq)
        conn.exec_driver_sql(f"REVOKE ALL ON SEQUENCE {schema}.{s} FROM {role}")
        conn.exec_driver_sql(f"GRANT USAGE, SELECT ON SEQUENCE {schema}.{s} TO {role}")
    owner_ident = _ident(conn, owner)
    conn.exec_driver_sql(
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner_ident} IN SCHEMA {schema} "
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON TABLES TO {role}"
    )
    conn.exec_driver_sql(
        f"ALTER DEFAULT PRIVILEGES FOR ROLE {owner_ident} IN SCHEMA {schema} GRANT USAGE, SELECT ON SEQUENCES TO {role}"
    )


def check_app_role(conn: sa.Connection, name: str) -> list[str]:
    """What is wrong with `name` as the app role here; an empty list when nothing is."""
    _validate(name)
    row = conn.execute(
        sa.text(
            "SELECT rolcanlogin, rolsuper, rolcreatedb, rolcreaterole, rolreplication, rolbypassrls "
            "FROM pg_roles WHERE rolname = :n"
        ),
        {"n": name},
    ).first()
    if row is None:
        return [f"role {name} does not exist"]
    problems = []
    login, superuser, createdb, createrole, replication, bypassrls = row
    if not login:
        problems.append(f"{name} cannot log in")
    for flag, label in (
        (superuser, "SUPERUSER"),
        (createdb, "CREATEDB"),
        (createrole, "CREATEROLE"),
        (replication, "REPLICATION"),
        (bypassrls, "BYPASSRLS"),
    ):
        if flag:
            problems.append(f"{name} has {label}")
    if not conn.execute(
        sa.text("SELECT has_database_privilege(:n, current_database(), 'CONNECT')"), {"n": name}
    ).scalar():
        problems.append(f"{name} cannot connect to this database")
    if conn.execute(
        sa.text("SELECT has_schema_privilege(:n, current_schema(), 'CREATE')"), {"n": name}
    ).scalar():
        problems.append(f"{name} can CREATE in schema (DDL)")
    owned = conn.execute(
        sa.text(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND pg_has_role(:n, c.relowner, 'USAGE') ORDER BY 1"
        ),
        {"n": name},
    ).scalars()
    owned = list(owned)
    if owned:
        problems.append(
            f"{name} owns (or acts as the owner of) {', '.join(owned[:5])}" + (" …" if len(owned) > 5 else "")
        )
    for table in _tables(conn):
        have = {
            priv
            for priv in TABLE_PRIVILEGES
            if conn.execute(
                sa.text(
                    "SELECT has_table_privilege(:n, quote_ident(current_schema()) || '.' || quote_ident(:t), :p)"
                ),
                {"n": name, "t": table, "p": priv},
            ).scalar()
        }
        want = expected_privileges(table)
        if have - want:
            problems.append(f"{table}: has {', '.join(sorted(have - want))} (not needed)")
        if want - have:
            problems.append(f"{table}: lacks {', '.join(sorted(want - have))}")
    for seq in _sequences(conn):
        have = {
            priv
            for priv in ("USAGE", "SELECT", "UPDATE")
            if conn.execute(
                sa.text(
                    "SELECT has_sequence_privilege(:n, quote_ident(current_schema()) || '.' || quote_ident(:s), :p)"
                ),
                {"n": name, "s": seq, "p": priv},
            ).scalar()
        }
        if have - SEQUENCE_PRIVILEGES:
            problems.append(
                f"sequence {seq}: has {', '.join(sorted(have - SEQUENCE_PRIVILEGES))} (not needed)"
            )
        if SEQUENCE_PRIVILEGES - have:
            problems.append(f"sequence {seq}: lacks {', '.join(sorted(SEQUENCE_PRIVILEGES - have))}")
    return problems


def connection_warnings(conn: sa.Connection) -> list[str]:
    """/readyz: the app should not run as a superuser or as the owner of its tables."""
    if conn.dialect.name != "postgresql":
        return []
    warnings = []
    user, superuser = conn.execute(
        sa.text("SELECT current_user, rolsuper FROM pg_roles WHERE rolname = current_user")
    ).one()
    if superuser:
        warnings.append(f"connected as superuser {user}: run the app as the app role (recon db app-role)")
    owns = conn.execute(
        sa.text(
            "SELECT 1 FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = current_schema() AND c.relname = 'audit_events' "
            "AND pg_has_role(current_user, c.relowner, 'USAGE')"
        )
    ).first()
    if owns:
        warnings.append(
            f"connected as {user}, the owner of the tables: it can disable the audit triggers; "
            "run the app as the app role (recon db app-role)"
        )
    return warnings
