"""The dashboard's presence panel and operator section, in headless Chromium on the full stack."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from playwright.sync_api import Page, expect

from tests.browser.conftest import open_page
from tests.presence_support import API_KEY, SECRET, User, token
from tests.support import Stack, wait_for

pytestmark = pytest.mark.browser

TIMEOUT = 20_000
HOSTILE_SUB = '<img src=x onerror="window.__owned=1">'


@pytest.fixture
def presence_stack(make_stack: Callable[..., Stack]) -> Stack:
    stack = make_stack(
        TIDINGS_API_KEY=API_KEY,
        TIDINGS_SECRET=SECRET,
        TIDINGS_PRESENCE_TOPICS="public.room.*",
        TIDINGS_JOIN_LEAVE_TOPICS="public.room.*",
    )
    stack.start_worker()
    stack.start_web()
    stack.wait_ready()
    return stack


@pytest.fixture
def presence_page(chromium_browser, presence_stack: Stack) -> Iterator[Page]:
    with open_page(chromium_browser, height=1400) as page:
        yield page


def test_presence_panel_and_operator_disconnect(presence_page: Page, presence_stack: Stack) -> None:
    page, stack = presence_page, presence_stack
    topic = f"public.room.{uuid.uuid4().hex[:10]}"
    page.goto(stack.url + "/")
    page.evaluate("t => sessionStorage.setItem('tidings.token', t)", token("alice", []))
    page.reload()
    expect(page.locator("#state")).to_have_text("connected", timeout=TIMEOUT)
    page.fill("#topic", topic)
    page.click("#subscribe")
    # The panel follows the topic just subscribed to.
    expect(page.locator("#presence-topic")).to_have_value(topic, timeout=TIMEOUT)
    expect(page.locator('#presence-users li[data-sub="alice"] .clients')).to_have_text("\u00d71")

    # Another user joins from Python: the page hears the join and shows them, as text.
    other = User(stack.url, token(HOSTILE_SUB, []))
    assert other.connect()
    other.subscribe(topic)
    expect(page.locator("#presence-users li")).to_have_count(2, timeout=TIMEOUT)
    expect(page.locator("#presence-users li .sub").nth(0)).to_have_text(HOSTILE_SUB)
    expect(page.locator("#presence-count")).to_have_text("2")
    assert page.locator("#presence-users img").count() == 0

    # A topic without presence says so.
    page.fill("#presence-topic", "public.demo")
    page.click("#presence-form button[type=submit]")
    expect(page.locator("#presence-status")).to_have_text("This topic keeps no presence.")
    page.fill("#presence-topic", topic)
    page.click("#presence-form button[type=submit]")
    expect(page.locator("#presence-users li")).to_have_count(2, timeout=TIMEOUT)

    # The operator lists topics with their clients and disconnects the other user.
    page.click("#ops summary")
    page.fill("#ops-key", API_KEY)
    page.click("#ops-form button[type=submit]")
    row = page.locator(f'#ops-topics tr[data-topic="{topic}"]')
    expect(row.locator("td.num")).to_have_text("2", timeout=TIMEOUT)
    page.fill("#ops-disconnect-sub", HOSTILE_SUB)
    page.click("#ops-disconnect button[type=submit]")
    expect(page.locator("#ops-disconnect-status")).to_have_text(
        f"Disconnected 1 connection of {HOSTILE_SUB}", timeout=TIMEOUT
    )
    wait_for(lambda: not other.connected, timeout=5)
    expect(page.locator("#presence-users li")).to_have_count(1, timeout=TIMEOUT)
    expect(row.locator("td.num")).to_have_text("1", timeout=TIMEOUT)
    assert page.evaluate("window.__owned") is None
    page.screenshot(path="/tmp/tidings-presence.png", full_page=True)
    other.close()
