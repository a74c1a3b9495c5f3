"""The dashboard's operator view, in a real headless Chromium against the full stack."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import open_page
from tests.support import Stack

pytestmark = pytest.mark.browser

TIMEOUT = 20_000
API_KEY = "browser-ops-key"
HOSTILE_TOPIC = '<img src=x onerror="window.__owned=1">'


@pytest.fixture
def ops_stack(make_stack: Callable[..., Stack]) -> Stack:
    stack = make_stack(TIDINGS_API_KEY=API_KEY)
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    return stack


@pytest.fixture
def ops_page(chromium_browser, ops_stack: Stack) -> Iterator[Page]:
    with open_page(chromium_browser, height=1100) as page:
        yield page


def show(page: Page, key: str) -> None:
    page.fill("#ops-key", key)
    page.click("#ops-form button[type=submit]")


def test_operator_view_needs_the_key_and_refreshes_live(ops_page: Page, ops_stack: Stack) -> None:
    page = ops_page
    page.goto(ops_stack.url + "/")
    expect(page.locator("#state")).to_have_text("connected", timeout=TIMEOUT)
    page.click("#ops summary")
    show(page, "not-the-key")
    expect(page.locator("#ops-status")).to_have_text("Wrong API key.")
    expect(page.locator("#ops-body")).to_be_hidden()

    show(page, API_KEY)
    expect(page.locator("#ops-lease")).to_contain_text(" pid ")
    # This page is a client of the one web worker.
    expect(page.locator("#ops-workers tr")).to_have_count(1)
    expect(page.locator("#ops-workers tr td").nth(1)).to_have_text("1")
    expect(page.locator("#ops-ingest")).to_contain_text("lag 0")
    expect(page.locator("#ops-no-drops")).to_be_visible()

    # A drop shows up on the next refresh, as text: a hostile topic is not markup.
    ops_stack.redis().publish(f"tidings:topic:{HOSTILE_TOPIC}", "1")
    drop = page.locator("#ops-drops li").first
    expect(drop.locator(".reason")).to_have_text("invalid_topic")
    expect(drop.locator(".topic")).to_have_text(HOSTILE_TOPIC)
    assert page.locator("#ops-drops img").count() == 0
    assert page.evaluate("window.__owned") is None
    expect(page.locator("#ops-dropped")).to_have_text("1")
    page.screenshot(path="/tmp/tidings-ops.png", full_page=True)

    # The key lives in this tab's sessionStorage: a reload shows the view again.
    page.reload()
    expect(page.locator("#ops")).to_have_attribute("open", "")
    expect(page.locator("#ops-lease")).to_contain_text(" pid ")
    page.click("#ops-forget")
    expect(page.locator("#ops-body")).to_be_hidden()
    assert page.evaluate("sessionStorage.getItem('tidings.apiKey')") is None
