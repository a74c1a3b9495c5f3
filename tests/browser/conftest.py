"""Headless Chromium for the dashboard tests (Playwright, the system's browser).

The browser is Debian's `chromium`, never one downloaded by `playwright
install`. Without it the tests skip on a developer machine and fail in CI.
The `stack` fixture (gunicorn + celery + redis) comes from tests/conftest.py.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _chromium_path() -> str | None:
    if os.access("/usr/bin/chromium", os.X_OK):
        return "/usr/bin/chromium"
    return shutil.which("chromium")


@pytest.fixture(scope="session")
def chromium_browser() -> Iterator[object]:
    """One headless Chromium for the session."""
    executable = _chromium_path()
    if executable is None:
        message = "no chromium binary (apt-get install chromium)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            browser.close()


@contextmanager
def open_page(chromium_browser, height: int = 900) -> Iterator[object]:
    """A fresh browser context and page; uncaught page errors fail the test."""
    context = chromium_browser.new_context(viewport={"width": 1280, "height": height})
    context.set_default_timeout(20_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda error: errors.append(str(error)))
    try:
        yield page
    finally:
        context.close()
    assert not errors, f"uncaught JavaScript errors on the page: {errors}"


@pytest.fixture
def page(chromium_browser, stack) -> Iterator[object]:
    """A page for the dashboard tests.

    It depends on `stack` only to be torn down first: a page still connected
    would hold gunicorn's graceful shutdown open.
    """
    with open_page(chromium_browser) as opened:
        yield opened
