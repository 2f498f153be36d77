"""SPEC 9.2: the `recon` command as other tools drive it."""

import pytest
from click.testing import CliRunner

from app.cli import main


@pytest.fixture
def run(monkeypatch, database_url):
    monkeypatch.setenv("DATABASE_URL", database_url)
    runner = CliRunner()

    def invoke(*args, input=None):
        return runner.invoke(main, list(args), input=input, catch_exceptions=False)

    return invoke


def test_users_tokens_customers_connections(run):
    r = run(
        "users", "create", "nora", "--role", "reviewer", "--password-stdin", input="a long enough password\n"
    )
    assert r.exit_code == 0 and "created user nora (reviewer)" in r.output
    r = run("users", "create", "orders", "--role", "service")
    assert r.exit_code == 0
    r = run("tokens", "create", "orders")
    assert r.exit_code == 0 and r.output.strip().startswith("rcn_")
    assert run("customers", "add", "Mercy Health").exit_code == 0
    r = run(
        "connections",
        "add",
        "mercy-epic",
        "--customer",
        "Mercy Health",
        "--protocol",
        "fhir-r4",
        "--endpoint",
        "https://ehr.example/fhir",
        "--environment",
        "test",
        "--no-conditional-create",
    )
    assert r.exit_code == 0
    r = run("connections", "list")
    assert "mercy-epic" in r.output and "Mercy Health" in r.output and "closed" in r.output
    r = run("audit", "verify")
    assert r.exit_code == 0 and r.output.startswith("OK ")


def test_bad_input_is_a_clear_error_not_a_traceback(run):
    r = run(
        "connections", "add", "x", "--customer", "Nobody", "--protocol", "fhir-r4", "--endpoint", "http://e"
    )
    assert r.exit_code == 2 and "customer 'Nobody' not found" in r.output
    r = run("users", "create", "shorty", "--role", "reviewer", "--password-stdin", input="short\n")
    assert r.exit_code == 2 and "at least 8" in r.output
    r = run("tokens", "create", "ghost")
    assert r.exit_code == 2


def test_db_upgrade_is_idempotent(run):
    assert run("db", "upgrade").exit_code == 0
    assert run("db", "upgrade").output.strip() == "database at head"
