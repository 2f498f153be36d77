"""SPEC 3.3: SLA windows by category and risk, per-customer overrides, timer status."""

from datetime import datetime, timedelta

from freezegun import freeze_time

from app.domain.sla import SlaPolicy, SlaRule, SlaStatus, format_remaining, sla_status
from app.services.clock import utcnow

T0 = datetime(2026, 11, 30, 8, 0, 0)


def test_defaults():
    policy = SlaPolicy()
    assert policy.window("ehr_rejected", "high") == timedelta(minutes=30)
    assert policy.window("unknown_outcome", "high") == timedelta(minutes=15)
    assert policy.window("unknown_outcome", "normal") == timedelta(minutes=15)
    assert policy.window("transport", "normal") == timedelta(hours=4)


def test_per_customer_override_beats_global_rule():
    policy = SlaPolicy(
        [SlaRule(60, category="ehr_rejected"), SlaRule(10, category="ehr_rejected", customer_id=3)]
    )
    assert policy.window("ehr_rejected", "normal", customer_id=3) == timedelta(minutes=10)
    assert policy.window("ehr_rejected", "normal", customer_id=4) == timedelta(minutes=60)
    assert policy.window("code_set", "normal", customer_id=3) == timedelta(hours=4)


def test_more_specific_rule_wins():
    policy = SlaPolicy([SlaRule(120, risk="high"), SlaRule(20, category="code_set", risk="high")])
    assert policy.window("code_set", "high") == timedelta(minutes=20)
    assert policy.window("auth", "high") == timedelta(minutes=120)


def test_timer_status_moves_from_on_track_to_at_risk_to_breached():
    due = T0 + timedelta(minutes=40)
    with freeze_time(T0 + timedelta(minutes=10)):
        assert sla_status(utcnow(), T0, due) is SlaStatus.ON_TRACK
    with freeze_time(T0 + timedelta(minutes=31)):  # 9 of 40 minutes left: under 25%
        assert sla_status(utcnow(), T0, due) is SlaStatus.AT_RISK
    with freeze_time(T0 + timedelta(minutes=40)):
        assert sla_status(utcnow(), T0, due) is SlaStatus.BREACHED


def test_remaining_text():
    assert format_remaining(T0, T0 + timedelta(minutes=12, seconds=3)) == "12m 03s left"
    assert format_remaining(T0 + timedelta(hours=1, minutes=5), T0) == "breached 1h 05m ago"
