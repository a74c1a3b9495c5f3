"""The live dashboard at GET /, driven in a real headless Chromium.

These run against the full stack (gunicorn gevent web, Celery listener,
Redis) from the `stack` fixture: publications go in through the durable
ingest stream and must show up on the page, once each, across a web restart.
"""

from __future__ import annotations

import json
import re
import threading
import uuid

import pytest
from playwright.sync_api import Page, expect

pytestmark = pytest.mark.browser

TIMEOUT = 20_000  # ms, for anything that crosses the stack
SCREENSHOT = "/tmp/tidings-dashboard.png"

# Records every text #state shows from now on, in window.__states.
WATCH_STATE = """() => {
  const state = document.getElementById('state');
  window.__states = [state.textContent];
  new MutationObserver(() => window.__states.push(state.textContent))
    .observe(state, {childList: true, characterData: true, subtree: true});
}"""


def fresh_topic() -> str:
    return f"public.browser.{uuid.uuid4().hex[:12]}"


def open_dashboard(page: Page, stack) -> None:
    page.goto(stack.url + "/")
    expect(page.locator("#state")).to_have_text("connected", timeout=TIMEOUT)


def subscribe(page: Page, topic: str) -> None:
    """Subscribe through the form and wait for the server's ack."""
    page.fill("#topic", topic)
    page.click("#subscribe")
    acked = page.locator(f'#subscriptions li[data-topic="{topic}"]:not(.pending)')
    expect(acked).to_be_visible(timeout=TIMEOUT)


def first_publication_shown(page: Page, stack) -> str:
    """Open the dashboard on a fresh topic and see its first publication; return the topic."""
    topic = fresh_topic()
    open_dashboard(page, stack)
    subscribe(page, topic)
    stack.publish(topic, {"n": 1})
    expect(rows(page, topic)).to_have_count(1, timeout=TIMEOUT)
    return topic


def rows(page: Page, topic: str):
    return page.locator(f'#publications .publication[data-topic="{topic}"]')


def shown_data(page: Page, topic: str) -> list[object]:
    """The data of the topic's rows, top (newest) first."""
    return [json.loads(text) for text in rows(page, topic).locator("pre.data").all_text_contents()]


def test_live_publication_appears(page: Page, stack) -> None:
    open_dashboard(page, stack)
    expect(page.locator("#topic")).to_have_value("public.demo")
    subscribe(page, "public.demo")

    stack.publish("public.demo", {"n": 1})

    row = rows(page, "public.demo")
    expect(row).to_have_count(1, timeout=TIMEOUT)
    expect(row.locator("pre.data")).to_contain_text('"n": 1')
    offset = row.get_attribute("data-offset")
    assert offset is not None
    ms, seq = offset.split("-")
    assert ms.isdigit() and seq.isdigit()
    assert shown_data(page, "public.demo") == [{"n": 1}]
    page.screenshot(path=SCREENSHOT, full_page=True)


def test_restart_recovers_missed_publications(page: Page, stack) -> None:
    topic = first_publication_shown(page, stack)
    page.evaluate(WATCH_STATE)

    # Restart the web tier in the background; publish while it is down,
    # which the page sees as its connection dropping.
    failure: list[BaseException] = []

    def restart() -> None:
        try:
            stack.restart_web()
        except BaseException as exc:  # re-raised in the test's thread
            failure.append(exc)

    restarter = threading.Thread(target=restart, name="restart-web", daemon=True)
    restarter.start()
    page.wait_for_function(
        "() => window.__states.includes('reconnecting')", timeout=60_000, polling=50
    )
    stack.publish(topic, {"n": 2})
    stack.publish(topic, {"n": 3})
    restarter.join(timeout=120)
    assert not restarter.is_alive(), "stack.restart_web() did not return"
    if failure:
        raise failure[0]

    expect(page.locator("#state")).to_have_text("connected", timeout=TIMEOUT)
    expect(page.locator("#recovered")).to_have_text("recovered 2", timeout=TIMEOUT)
    expect(rows(page, topic)).to_have_count(3, timeout=TIMEOUT)
    states = page.evaluate("window.__states")
    assert states[states.index("reconnecting") :][-1] == "connected", states

    assert shown_data(page, topic) == [{"n": 3}, {"n": 2}, {"n": 1}]
    offsets = [rows(page, topic).nth(i).get_attribute("data-offset") for i in range(3)]
    assert len(set(offsets)) == 3, offsets
    recovered = rows(page, topic).and_(page.locator(".is-recovered"))
    expect(recovered).to_have_count(2)


def test_publication_data_is_rendered_as_text(page: Page, stack) -> None:
    topic = fresh_topic()
    open_dashboard(page, stack)
    subscribe(page, topic)
    img = "<img src=x onerror=window.__pwned=1>"
    script = "<script>window.__pwned=1</script>"

    stack.publish(topic, {"html": img})
    stack.publish(topic, script)

    expect(rows(page, topic)).to_have_count(2, timeout=TIMEOUT)
    expect(rows(page, topic).nth(1)).to_contain_text(img)
    expect(rows(page, topic).nth(0)).to_contain_text(script)
    assert shown_data(page, topic) == [script, {"html": img}]
    assert page.evaluate("typeof window.__pwned") == "undefined"
    expect(page.locator("#publications img")).to_have_count(0)
    expect(page.locator("#publications script")).to_have_count(0)


def test_progress_demo_reaches_done(page: Page, stack) -> None:
    open_dashboard(page, stack)
    page.click("#start-job")

    # The topic the API answered with, shown while the job runs.
    expect(page.locator("#job-topic")).to_have_text(
        re.compile(r"^public\.jobs\.[0-9a-f]+$"), timeout=TIMEOUT
    )
    page.wait_for_function(
        "() => document.getElementById('job-progress').value === 100", timeout=60_000
    )
    expect(page.locator("#job-status")).to_have_text("done", timeout=TIMEOUT)
    expect(page.locator("#start-job")).to_be_enabled()


def test_an_unanswered_resubscribe_reconnects(page: Page, stack) -> None:
    topic = first_publication_shown(page, stack)
    # The next connection never answers (acks are dropped on arrival, as on a
    # wedged path); the page must not stay silent on it.
    page.evaluate(
        """() => {
          const t = window.tidings;
          t._ackTimeout = 1000;
          window.__connects = 0;
          t.socket.on('connect', () => { window.__connects += 1; });
          const onack = t.socket.onack;
          t.socket.onack = function (packet) {
            if (window.__connects === 1) return;
            return onack.call(this, packet);
          };
          t.socket.io.engine.close();
        }"""
    )
    page.wait_for_function("() => window.__connects >= 2", timeout=TIMEOUT, polling=50)
    stack.publish(topic, {"n": 2})
    expect(rows(page, topic)).to_have_count(2, timeout=TIMEOUT)
    assert shown_data(page, topic) == [{"n": 2}, {"n": 1}]


def test_many_topics_resubscribe_past_the_subscribe_rate(page: Page, stack) -> None:
    topics = [fresh_topic() for _ in range(24)]  # more than the 20 subscribes/s allowed
    open_dashboard(page, stack)
    page.evaluate(
        """async (topics) => {
          const t = window.tidings;
          window.__got = {};
          window.__connects = 0;
          t.socket.on('connect', () => { window.__connects += 1; });
          for (const topic of topics) {  // at the allowed pace
            window.__got[topic] = [];
            const ack = await t.subscribe(topic, (pubs) => {
              pubs.forEach((p) => window.__got[topic].push(p.data.n));
            });
            if (!ack.ok) throw new Error('subscribe ' + topic + ': ' + ack.error);
            await new Promise((resolve) => setTimeout(resolve, 70));
          }
          t.socket.io.engine.close();  // all 24 resubscribe at once
        }""",
        topics,
    )
    page.wait_for_function("() => window.__connects >= 1", timeout=TIMEOUT, polling=50)
    stack.publish_many([(topic, {"n": n}) for topic in topics for n in range(2)])
    page.wait_for_function(
        "(topics) => topics.every((t) => window.__got[t].length === 2)",
        arg=topics,
        timeout=TIMEOUT,
        polling=100,
    )
    got = page.evaluate("(topics) => topics.map((t) => window.__got[t])", topics)
    assert got == [[0, 1]] * len(topics)


def test_live_publication_over_sse_then_a_restart_recovers(page: Page, stack) -> None:
    """A real EventSource: live events, then the web tier restarts and it resumes."""
    open_dashboard(page, stack)
    served = page.evaluate("() => fetch('/static/tidings.js').then((r) => r.text())")
    assert "GENERATED from clients/js/src" in served  # the package's browser build
    page.select_option("#transport", "sse")
    expect(page.locator("#transport")).to_have_value("sse", timeout=TIMEOUT)
    expect(page.locator("#state")).to_have_text("connected", timeout=TIMEOUT)
    topic = fresh_topic()
    subscribe(page, topic)
    stack.publish(topic, {"n": 1})
    stack.publish(topic, {"n": 2})
    expect(rows(page, topic)).to_have_count(2, timeout=TIMEOUT)
    assert shown_data(page, topic) == [{"n": 2}, {"n": 1}]
    page.evaluate(WATCH_STATE)
    stopped = threading.Event()

    def restart() -> None:
        stack.stop_web()
        stopped.set()

    threading.Thread(target=restart, daemon=True).start()
    assert stopped.wait(60)
    # Published while the stream is down: the browser's EventSource comes
    # back with Last-Event-ID and gets them.
    stack.publish(topic, {"n": 3})
    stack.publish(topic, {"n": 4})
    stack.start_web()
    stack.wait_ready()
    expect(rows(page, topic)).to_have_count(4, timeout=TIMEOUT)
    assert shown_data(page, topic) == [{"n": 4}, {"n": 3}, {"n": 2}, {"n": 1}]
    offsets = [rows(page, topic).nth(i).get_attribute("data-offset") for i in range(4)]
    assert len(set(offsets)) == 4, offsets
