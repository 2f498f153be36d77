"""Issue 9: the hand-off bound and the re-queue rule (app/domain/liveness.py), and the fault points
the drills plant (app/services/faults.py). No I/O."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from app.domain.liveness import HandoffPolicy, JobStatus, JobView, requeue_reason
from app.services import faults

POLICY = HandoffPolicy(lease_seconds=15, housekeeping_seconds=2, margin_seconds=10)


def test_bound_is_lease_plus_two_housekeeping_passes_plus_margin():
    assert POLICY.worker_timeout_seconds == 6
    assert POLICY.bound_seconds == 15 + 2 * 2 + 10
    # Defaults: a 90 s lease, housekeeping every 2 s, a 10 s margin.
    assert HandoffPolicy().bound_seconds == 104


def test_bound_uses_the_worker_timeout_when_it_exceeds_the_lease():
    slow = HandoffPolicy(lease_seconds=5, housekeeping_seconds=4, margin_seconds=1)
    assert slow.worker_timeout_seconds == 12
    assert slow.bound_seconds == 12 + 8 + 1


# (job as the queue reports it, seconds since relayed) -> requeue?  Written from the rule:
# work whose RQ job belongs to a dead worker, or is gone, or ended unclaimed, is queued again; work
# in line behind other work is a backlog, not a lost hand-off; nothing is judged before one pass.
CASES = [
    (JobView(None), 1, False),  # relayed a moment ago: give it one pass
    (JobView(None), 3, True),  # Redis lost the job
    (JobView(JobStatus.FINISHED), 3, True),
    (JobView(JobStatus.FAILED), 3, True),
    (JobView(JobStatus.STOPPED), 3, True),
    (JobView(JobStatus.CANCELED), 3, True),
    (JobView(JobStatus.QUEUED, waiting_in_queue=True), 3, False),
    (JobView(JobStatus.QUEUED, waiting_in_queue=True), 10_000, False),  # a backlog, however long
    (JobView(JobStatus.QUEUED), 3, True),  # in no list at all: taken by a worker that vanished
    (JobView(JobStatus.QUEUED, in_transit=True), 3, False),  # a worker is starting it right now
    (JobView(JobStatus.QUEUED, in_transit=True), 6, True),  # ... for longer than the claim timeout
    (JobView(JobStatus.STARTED, worker_alive=False), 3, True),  # the worker that took it died
    (JobView(JobStatus.STARTED, worker_alive=True, started_seconds=0.1), 500, False),
    (JobView(JobStatus.STARTED, worker_alive=True, started_seconds=6), 500, True),  # stuck before claim
    (JobView(JobStatus.STARTED, worker_alive=None), 3, False),
    (JobView(JobStatus.STARTED, worker_alive=None), 6, True),
    (JobView(JobStatus.SCHEDULED), 3, False),
    (JobView(JobStatus.SCHEDULED), 6, True),
    (JobView(JobStatus.OTHER), 6, True),
]


@pytest.mark.parametrize(("job", "seconds", "expected"), CASES)
def test_requeue_rule(job, seconds, expected):
    assert (requeue_reason(job, seconds, POLICY) is not None) is expected


job_views = st.builds(
    JobView,
    status=st.one_of(st.none(), st.sampled_from(JobStatus)),
    waiting_in_queue=st.booleans(),
    in_transit=st.booleans(),
    worker_alive=st.one_of(st.none(), st.booleans()),
    started_seconds=st.one_of(st.none(), st.floats(0, 10_000)),
)


@given(job=job_views, seconds=st.floats(0, 100_000))
def test_nothing_but_a_queue_backlog_waits_past_the_claim_timeout(job, seconds):
    """Liveness: once an item has been unclaimed longer than the claim timeout, either its job is
    verifiably in line in the queue, or it is a live worker's freshly started job, or it is queued
    again."""
    reason = requeue_reason(job, seconds, POLICY)
    if seconds < POLICY.claim_timeout_seconds:
        return
    in_line = job.status is JobStatus.QUEUED and job.waiting_in_queue
    just_started = (
        job.status is JobStatus.STARTED
        and job.worker_alive is not False
        and job.started_seconds is not None
        and job.started_seconds < POLICY.claim_timeout_seconds
    )
    assert reason is not None or in_line or just_started


@given(job=job_views, seconds=st.floats(0, 100_000))
def test_a_dead_workers_job_is_always_queued_again_after_one_pass(job, seconds):
    if (
        job.status is JobStatus.STARTED
        and job.worker_alive is False
        and seconds >= POLICY.housekeeping_seconds
    ):
        assert requeue_reason(job, seconds, POLICY)


def test_fault_plan_parses_points_and_actions():
    assert faults.parse("dequeued=kill, called=sleep:2.5") == {"dequeued": "kill", "called": "sleep:2.5"}
    assert faults.parse("") == {}


@pytest.mark.parametrize("spec", ["deqeued=kill", "claimed=explode", "called=sleep:soon", "claimed"])
def test_fault_plan_refuses_typos(spec):
    with pytest.raises(ValueError):
        faults.parse(spec)


def test_fault_checkpoint_is_inert_without_the_variable(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.checkpoint("dequeued")  # returns, does nothing


def test_fault_checkpoint_sleeps_where_planned(monkeypatch):
    slept = []
    monkeypatch.setenv(faults.ENV, "claimed=sleep:0.25")
    monkeypatch.setattr(faults.time, "sleep", slept.append)
    faults.checkpoint("dequeued")
    faults.checkpoint("claimed")
    assert slept == [0.25]
