"""Headless Chromium for the browser tests, driven by Playwright.

Playwright drives the system's Chromium (Debian's ``chromium`` package, which ``.ci/run``
installs) through ``executable_path``: no browser is downloaded. Tests that need it skip
with the reason when it is missing (``SYNCBENCH_CHROMIUM`` names another binary).

    with chromium_page() as page:
        page.goto(url)
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

CHROMIUM = os.environ.get("SYNCBENCH_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--mute-audio"]


def require_chromium() -> str:
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} is missing: install Debian's chromium (apt-get install chromium; .ci/run does), "
                    f"or set SYNCBENCH_CHROMIUM to a Chromium binary")
    return CHROMIUM


@contextmanager
def chromium_page(width: int = 1400, height: int = 1000) -> Iterator:
    """A Playwright page in a fresh headless Chromium, closed on exit."""
    from playwright.sync_api import sync_playwright

    executable = require_chromium()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(60_000)
            yield page
        finally:
            browser.close()
