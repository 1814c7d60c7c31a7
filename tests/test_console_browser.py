"""The web console in a real browser: headless Chromium (Debian's `chromium`, driven by
Playwright) against real `timerd api` and `timerd daemon` processes on one SQLite file, and a
real loopback receiver.

One store, one daemon and one receiver serve the module; two API processes front the store: one
with keys (`TIMERD_AUTH=keys`) and one without (`TIMERD_AUTH=none`). Each test that needs exact
figures signs in with a key of its own tenant, so the tests cannot see one another's timers.
Every wait is on page state (Playwright's `expect`) or on the receiver, never a fixed sleep.

`TIMERD_SCREENSHOTS_DIR=docs` saves the README's screenshots there.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.procs import TimerdProcess, TimerdProcesses
from tests.support.receiver import Arrival, Receiver
from tests.support.waiting import wait_until
from timerd import keys
from timerd.store.sqlite import SqliteStore

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(
        f"{CHROMIUM} is missing: install Debian's chromium (scripts/test does, as root with "
        "apt-get) to drive the console in a browser",
        allow_module_level=True,
    )
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is missing")
from playwright.sync_api import Browser, Page, expect  # noqa: E402  (after the skips above)

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
WAIT_MS = 15_000  # the longest any page state is waited for
HOSTILE = '<img src=x onerror="window.__pwned = 1">'
VIEWPORT = {"width": 1200, "height": 760}
expect.set_options(timeout=WAIT_MS)


def gone(arrival: Arrival) -> int:
    """The receiver's status: 410 (permanent: a dead letter at once) under /hooks/gone/."""
    return 410 if "/gone/" in arrival.path else 200


@dataclass
class Stack:
    """The processes of the module and what the tests need to reach them."""

    keyed: TimerdProcess
    open: TimerdProcess
    receiver: Receiver
    db: Path

    def key(self, tenant: str) -> str:
        """A new API key of `tenant`."""
        token, key = keys.new_key(tenant, tenant, time.time_ns() // 1_000_000)
        store = SqliteStore(str(self.db))
        try:
            store.add_key(key)
        finally:
            store.close()
        return token

    def create(self, token: str, **fields: Any) -> dict[str, Any]:
        """Create a timer through the keyed API (the receiver's URL unless `url` is given)."""
        body = {"url": self.receiver.url, **fields}
        answer = httpx.post(f"{self.keyed.base_url}/timers", json=body, headers=bearer(token))
        assert answer.status_code == 201, answer.text
        created: dict[str, Any] = answer.json()
        return created

    def read(self, token: str, timer_id: str) -> dict[str, Any]:
        answer = httpx.get(f"{self.keyed.base_url}/timers/{timer_id}", headers=bearer(token))
        assert answer.status_code == 200, answer.text
        timer: dict[str, Any] = answer.json()
        return timer

    def arrivals_of(self, timer_id: str) -> list[Arrival]:
        return [a for a in list(self.receiver.arrivals) if a.timer_id == timer_id]


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    path = tmp_path_factory.mktemp("console-browser")
    db = path / "timerd.db"
    store_url = f"sqlite:///{db}"
    fast = {"TIMERD_POLL_INTERVAL_S": "0.2"}
    with Receiver(gone, body=HOSTILE.encode()) as receiver, TimerdProcesses(path) as procs:
        # started together (each takes seconds to import), then waited for
        keyed = procs.start("api", store_url, env={"TIMERD_AUTH": "keys"}, ready=False)
        open_api = procs.start("api", store_url, env={"TIMERD_AUTH": "none"}, ready=False)
        daemon = procs.start("daemon", store_url, env=fast, ready=False)
        for proc in (keyed, open_api, daemon):
            proc.wait_ready()
        yield Stack(keyed, open_api, receiver, db)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context (its own sessionStorage) and page; fails the test if the page
    threw a JavaScript error."""
    context = browser.new_context(viewport=VIEWPORT)
    opened = context.new_page()
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.set_default_timeout(WAIT_MS)
    yield opened
    context.close()
    assert not errors, errors


def sign_in(page: Page, stack: Stack, token: str, fragment: str = "") -> None:
    """Open the keyed console (at `#fragment`) and sign in with `token` through the form."""
    page.goto(f"{stack.keyed.base_url}/ui{fragment}")
    expect(page.locator("#sign-in")).to_be_visible()
    page.fill("#api-key", token)
    page.click("#sign-in-form button[type=submit]")
    expect(page.locator("#sign-in")).to_be_hidden()


def screenshot(page: Page, name: str, tmp_path: Path) -> None:
    """Save a PNG of the page (in TIMERD_SCREENSHOTS_DIR too, when set)."""
    shot = page.screenshot(path=tmp_path / name, full_page=True)
    assert shot.startswith(b"\x89PNG")
    target = os.environ.get("TIMERD_SCREENSHOTS_DIR")
    if target:
        (Path(target) / name).write_bytes(shot)


def test_the_overview_shows_the_counts_live(page: Page, stack: Stack, tmp_path: Path) -> None:
    token = stack.key("overview")
    sign_in(page, stack, token)
    count = lambda state: page.locator(f"[data-count={state}] .value")  # noqa: E731
    expect(count("pending")).to_have_text("0")
    # created after the page loaded: the figures change without a reload
    for _ in range(3):
        stack.create(token, hours=1, payload={"order": 42})
    delivered = [stack.create(token, seconds=0.05)["id"] for _ in range(4)]
    dead = stack.create(token, seconds=0.05, url=stack.receiver.url + "/gone")["id"]
    for timer_id in [*delivered, dead]:
        wait_until(lambda t=timer_id: stack.arrivals_of(t), 10, f"the webhook of {timer_id}")
    expect(count("pending")).to_have_text("3")
    expect(count("fired")).to_have_text("4")
    expect(count("failed")).to_have_text("1")
    expect(page.locator("[data-figure=fired] .value")).to_have_text("4")
    expect(page.locator("[data-figure=failed] .value")).to_have_text("1")
    expect(page.locator("[data-figure=lateness]")).to_contain_text("p99")
    expect(page.locator("[data-figure=next]")).to_contain_text("Next due")
    expect(page.locator("[data-figure=firing]")).to_contain_text("partitions held by 1 daemon")
    expect(page.locator("#overview")).to_contain_text(":")  # the daemon, as host:pid:nonce
    screenshot(page, "console-overview.png", tmp_path)
    page.click("[data-count=failed]")  # the dead letters, one click away
    expect(page.locator("#timer-list tbody tr")).to_have_count(1)
    expect(page.locator(f"tr[data-id='{dead}']")).to_be_visible()


def test_a_created_timer_is_listed_and_its_detail_shows_the_delivery_as_text(
    page: Page, stack: Stack, tmp_path: Path
) -> None:
    token = stack.key("create")
    sign_in(page, stack, token, "#/new")
    page.fill("#new-url", stack.receiver.url)
    page.fill("#new-when", "1")
    page.fill("#new-payload", json.dumps({"note": HOSTILE}))
    page.fill("#new-headers", '{"x-trace": "<b>bold</b>"}')
    page.click("#new button[type=submit]")
    expect(page.locator("#timer-id")).to_have_text(re.compile("[0-9a-f]{24}"))
    timer_id = page.locator("#timer-id").inner_text()
    # the detail follows the timer until it has fired, without a reload
    expect(page.locator("[data-field=State]")).to_have_text("fired")
    assert stack.arrivals_of(timer_id)
    expect(page.locator("#payload")).to_contain_text(json.dumps(HOSTILE))  # JSON-escaped
    expect(page.locator("#headers")).to_contain_text("<b>bold</b>")
    history = page.locator("#history tbody tr")
    expect(history).to_have_count(1)
    expect(history.first).to_contain_text("200")
    expect(history.first).to_contain_text(HOSTILE)  # the receiver's answer, as text
    assert page.evaluate("window.__pwned") is None  # no onerror ran
    assert page.locator("img, b").count() == 0  # no markup came from the data
    screenshot(page, "console-timer.png", tmp_path)
    page.click("[data-nav=timers]")
    expect(page.locator(f"tr[data-id='{timer_id}']")).to_contain_text("fired")


def test_cancel_move_and_replay_from_the_page_with_the_apis_refusals(
    page: Page, stack: Stack
) -> None:
    token = stack.key("act")
    pending = stack.create(token, hours=1)
    sign_in(page, stack, token, f"#/timers/{pending['id']}")
    expect(page.locator("[data-field=State]")).to_have_text("pending")
    page.fill("#move-to", "not a time")
    page.click("#move button[type=submit]")
    expect(page.locator("#action-error")).to_contain_text("422 invalid_field")
    page.fill("#move-to", "7200")
    page.click("#move button[type=submit]")
    expect(page.locator("[data-field='Time left']")).to_have_text(re.compile(r"71\d\d s|7200 s"))
    assert stack.read(token, pending["id"])["time_left"] > 3600
    page.click("#cancel")
    expect(page.locator("[data-field=State]")).to_have_text("cancelled")
    assert stack.read(token, pending["id"])["state"] == "cancelled"

    # refused: cancelled behind the page's back, then cancelled from the page
    other = stack.create(token, hours=1)
    page.goto(f"{stack.keyed.base_url}/ui#/timers/{other['id']}")
    expect(page.locator("#cancel")).to_be_visible()
    answer = httpx.delete(f"{stack.keyed.base_url}/timers/{other['id']}", headers=bearer(token))
    assert answer.status_code == 200
    page.click("#cancel")
    expect(page.locator("#action-error")).to_have_text("409 state_conflict: the timer is cancelled")

    # replay a dead letter: delivered again, and failed again (the receiver says 410)
    dead = stack.create(token, seconds=0.05, url=stack.receiver.url + "/gone")
    wait_until(lambda: stack.read(token, dead["id"])["state"] == "failed", 10, "a dead letter")
    page.goto(f"{stack.keyed.base_url}/ui#/timers/{dead['id']}")
    expect(page.locator("[data-field='Last status']")).to_have_text("410")
    page.click("#replay")
    wait_until(lambda: len(stack.arrivals_of(dead["id"])) == 2, 10, "the replayed webhook")
    wait_until(lambda: stack.read(token, dead["id"])["state"] == "failed", 10, "failed again")
    page.reload()
    expect(page.locator("#history tbody tr")).to_have_count(2)


def test_filters_by_url_prefix_and_opens_by_id(page: Page, stack: Stack) -> None:
    token = stack.key("filter")
    alpha = stack.create(token, hours=1, url="https://alpha.example/hooks")
    beta = stack.create(token, hours=1, url="https://beta.example/hooks")
    sign_in(page, stack, token, "#/timers")
    expect(page.locator("#timer-list tbody tr")).to_have_count(2)
    page.fill("#filter-url", "https://beta.example/")
    page.click("#filters button[type=submit]")
    expect(page.locator("#timer-list tbody tr")).to_have_count(1)
    expect(page.locator(f"tr[data-id='{beta['id']}']")).to_be_visible()
    page.fill("#find-id", alpha["id"])
    page.click("#find button[type=submit]")
    expect(page.locator("#timer-id")).to_have_text(alpha["id"])
    page.goto(f"{stack.keyed.base_url}/ui#/timers/{'0' * 24}")
    expect(page.locator("#load-error")).to_have_text("404 not_found: no timer with this id")


def test_a_missing_or_wrong_key_shows_the_sign_in_prompt_not_data(page: Page, stack: Stack) -> None:
    token = stack.key("alone")
    stack.create(stack.key("neighbour"), hours=1)  # another tenant's timer
    page.goto(f"{stack.keyed.base_url}/ui")
    expect(page.locator("#sign-in")).to_be_visible()
    expect(page.locator("#sign-in-reason")).to_have_text("This timerd needs an API key.")
    assert page.locator("#view").inner_text() == ""
    page.fill("#api-key", token + "x")
    page.click("#sign-in-form button[type=submit]")
    expect(page.locator("#sign-in-reason")).to_have_text("The API refused this key.")
    expect(page.locator("#sign-in")).to_be_visible()
    assert page.locator("#view").inner_text() == ""
    assert page.evaluate("sessionStorage.length") == 0
    page.fill("#api-key", token)
    page.click("#sign-in-form button[type=submit]")
    expect(page.locator("[data-count=pending] .value")).to_have_text("0")  # not the neighbour's
    page.goto(f"{stack.keyed.base_url}/ui#/timers")
    expect(page.locator("#timer-list")).to_have_text("No timers.")
    assert token not in page.url
    assert page.context.cookies() == []
    assert page.evaluate("sessionStorage.getItem('timerd.apiKey')") == token
    page.click("#sign-out")
    expect(page.locator("#sign-in")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


def test_without_keys_the_console_opens_straight_on_the_overview(page: Page, stack: Stack) -> None:
    page.goto(f"{stack.open.base_url}/ui")
    expect(page.locator("#overview .card")).to_have_count(4)
    expect(page.locator("#sign-in")).to_be_hidden()
    expect(page.locator("#sign-out")).to_be_hidden()


def test_a_failed_timer_shows_its_failure_callback(page: Page, stack: Stack) -> None:
    token = stack.key("callbacks")
    hook = stack.receiver.url + "/failures"
    dead = stack.create(token, seconds=0.05, url=stack.receiver.url + "/gone", on_failure_url=hook)
    sign_in(page, stack, token, f"#/timers/{dead['id']}")
    expect(page.locator("[data-field='On failure']")).to_have_text(hook)
    expect(page.locator("[data-field=Callback]")).to_have_text("delivered, 1 attempt, last 200")


def test_a_series_shows_its_schedule_and_is_paused_and_resumed_from_the_page(
    page: Page, stack: Stack
) -> None:
    token = stack.key("series")
    series = stack.create(token, every="1h", payload={"digest": "<b>daily</b>"})
    sign_in(page, stack, token, f"#/timers/{series['id']}")
    expect(page.locator("[data-field=Schedule]")).to_contain_text("every 1h from ")
    expect(page.locator("#upcoming li")).to_have_count(5)
    page.click("#pause")
    expect(page.locator("[data-field=State]")).to_have_text("paused")
    assert stack.read(token, series["id"])["state"] == "paused"
    expect(page.locator("#pause")).to_have_count(0)
    page.click("#resume")
    expect(page.locator("[data-field=State]")).to_have_text("pending")
    assert stack.read(token, series["id"])["state"] == "pending"
    # paused behind the page's back, then paused from the page: the API's 409 is shown
    answer = httpx.post(
        f"{stack.keyed.base_url}/timers/{series['id']}/pause", headers=bearer(token)
    )
    assert answer.status_code == 200
    page.click("#pause")
    expect(page.locator("#action-error")).to_contain_text("409 state_conflict")
