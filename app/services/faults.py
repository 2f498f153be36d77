"""Fault injection for chaos drills and tests: a named point in the delivery path where a worker can
be made to die or stall. Inert unless RECON_FAULT_INJECT is set — never set it in production.

RECON_FAULT_INJECT="point=action[,point=action...]"

points:  dequeued  RQ has marked the job started; the work is not claimed yet
         claimed   the claim has committed; the EHR has not been called
         called    the EHR has answered; the result is not recorded yet
actions: kill          SIGKILL this process (as the OOM killer or a host failure would)
         sleep:SECONDS stall here (a slow step that keeps the window open)
"""

from __future__ import annotations

import os
import signal
import time

POINTS = ("dequeued", "claimed", "called")
ENV = "RECON_FAULT_INJECT"


def parse(spec: str) -> dict[str, str]:
    """`dequeued=kill,called=sleep:3` → {"dequeued": "kill", "called": "sleep:3"}; unknown points or
    actions raise ValueError, so a typo in a drill fails loudly instead of injecting nothing."""
    plan: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in spec.split(","))):
        point, _, action = part.partition("=")
        if point not in POINTS:
            raise ValueError(f"{ENV}: unknown point {point!r} (one of {', '.join(POINTS)})")
        if action != "kill" and not (action.startswith("sleep:") and _is_number(action[6:])):
            raise ValueError(f"{ENV}: unknown action {action!r} (kill or sleep:SECONDS)")
        plan[point] = action
    return plan


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def checkpoint(point: str) -> None:
    """Act out the fault planned for `point`, if any."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    action = parse(spec).get(point)
    if action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
        time.sleep(60)  # the signal is delivered asynchronously; never run past the point
    elif action:
        time.sleep(float(action[6:]))
