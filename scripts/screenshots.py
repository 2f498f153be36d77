"""Screenshots of the console for docs/screenshots/: queue, detail, approvals and dashboard at
1440 and 390 px wide, on the demo data set (issue 8).

    .venv/bin/python scripts/screenshots.py [--out docs/screenshots] [--chromium /usr/bin/chromium]

Builds a throwaway instance (SQLite under a temporary folder, the embedded Redis), loads the demo
data set, serves the console on an ephemeral port and drives Debian's Chromium through Playwright.
Nothing outside that folder and --out is touched. `make screenshots` runs it.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDTHS = {"1440": (1440, 900), "390": (390, 844)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    parser.add_argument("--chromium", default=os.environ.get("RECON_CHROMIUM", "/usr/bin/chromium"))
    parser.add_argument("--pages", default="queue,detail,approvals,dashboard")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    folder = Path(tempfile.mkdtemp(prefix="recon-shots-"))
    os.environ["RECON_INSTANCE"] = str(folder)
    os.environ.setdefault("SECRET_KEY", "screenshots-only")
    os.environ.pop("REDIS_URL", None)
    database_url = f"sqlite:///{folder / 'recon.db'}"
    sys.path.insert(0, str(ROOT))

    from werkzeug.serving import make_server

    from app import create_app
    from app.db.migrate import upgrade
    from app.db.session import session_factory
    from seed.demo import DEMO_PASSWORD, load_demo

    upgrade(database_url)
    load_demo(session_factory(database_url))
    app = create_app({"DATABASE_URL": database_url})
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        shoot(base, out, args.chromium, DEMO_PASSWORD, args.pages.split(","))
    finally:
        server.shutdown()
    return 0


def shoot(base: str, out: Path, chromium: str, password: str, pages: list[str]) -> None:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        for label, (width, height) in WIDTHS.items():
            context = browser.new_context(viewport={"width": width, "height": height})
            page = context.new_page()
            page.goto(f"{base}/login")
            page.fill("input[name=username]", "lena")  # a clinical lead sees every one of these pages
            page.fill("input[name=password]", password)
            page.click("button[type=submit]")
            page.wait_for_selector(".whoami")
            for name in pages:
                page.goto(f"{base}{path_of(page, base, name)}")
                page.wait_for_load_state("networkidle")
                if name == "approvals":
                    # The review panel of the first item, as a clinical lead works the list.
                    first = page.get_by_text("Review the first item")
                    if first.count() and first.first.is_visible():
                        with page.expect_response(lambda r: "/approvals/" in r.url):
                            first.first.click()
                        page.wait_for_load_state("networkidle")
                        page.wait_for_timeout(300)  # htmx settles the swapped panel
                target = out / f"{name}-{label}.png"
                page.screenshot(path=str(target), full_page=False)
                print(target.relative_to(ROOT) if target.is_relative_to(ROOT) else target)
            context.close()
        browser.close()


def path_of(page, base: str, name: str) -> str:
    if name == "queue":
        return "/queues/all"
    if name == "dashboard":
        return "/"
    if name == "approvals":
        return "/approvals"
    if name == "detail":
        # The first exception of the queue whose latest attempt the EHR rejected with issues.
        page.goto(f"{base}/queues/ehr_rejected")
        return page.locator("[data-row-link]").first.get_attribute("href")
    raise SystemExit(f"unknown page {name!r}")


if __name__ == "__main__":
    raise SystemExit(main())
