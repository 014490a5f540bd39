"""The browser client and the demo inbox in a real headless Chromium (Debian's
package, driven by Playwright for Python), against a real run.py process."""

from __future__ import annotations

import json
import os
import shutil
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ..processes import ServerProcess
from ..test_run import write_config

playwright_sync = pytest.importorskip(
    "playwright.sync_api", reason="pip install -e '.[test]' brings Playwright"
)

CHROMIUM = (
    os.environ.get("RTSERVER_CHROMIUM")
    or shutil.which("chromium")
    or shutil.which("chromium-browser")
)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Chromium: apt-get install chromium (.ci/run does)"
)
DOCS = Path(__file__).resolve().parents[2] / "docs"
# Flags for a closed network and a root user (see the machine notes): no sandbox,
# no background networking, no first-run.
ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


class LiveServer(ServerProcess):
    """run.py on a loopback port; restartable on the same port and data."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(write_config(tmp_path))

    def post(self, path: str, body: dict[str, Any], token: str | None = None) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        req = urllib.request.Request(
            self.base + path, data=json.dumps(body).encode(), headers=headers, method="POST"
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            return json.loads(resp.read())  # type: ignore[no-any-return]

    def send(self, user_id: str, message: str, **extra: Any) -> str:
        token = self.post("/api/test/token", {"user_id": "svc", "role": "publisher"})["token"]
        reply = self.post(f"/api/notifications/{user_id}", {"message": message, **extra}, token)
        return str(reply["notification"]["id"])


@pytest.fixture
def live(tmp_path: Path) -> Iterator[LiveServer]:
    server = LiveServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_sync.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS, headless=True)
        yield b
        b.close()


def open_inbox(context: Any, live: LiveServer, user: str) -> Any:
    page = context.new_page()
    page.goto(f"{live.base}/demo?user={user}&backoff=200")
    page.wait_for_selector('#status[data-state="open"]', timeout=10000)
    return page


def messages(page: Any) -> list[str]:
    return page.eval_on_selector_all(".notification .message", "els => els.map(e => e.textContent)")  # type: ignore[no-any-return]


def test_two_tabs_of_one_user_and_a_third_of_another(live: LiveServer, browser: Any) -> None:
    """A notification shows in both tabs of its user and not in the other user's;
    marking it read in one tab drops the badge in the other."""
    alice = browser.new_context()
    tab1, tab2 = open_inbox(alice, live, "alice"), open_inbox(alice, live, "alice")
    bob = open_inbox(browser.new_context(), live, "bob")
    live.send(
        "alice", "Your immigration form has been submitted", type="success", category="immigration"
    )
    for tab in (tab1, tab2):
        tab.wait_for_selector(".notification.unread .message", timeout=10000)
        assert messages(tab) == ["Your immigration form has been submitted"]
        playwright_sync.expect(tab.locator("#badge")).to_have_text("1")
    bob.wait_for_timeout(500)
    assert messages(bob) == []
    playwright_sync.expect(bob.locator("#badge")).to_have_text("0")

    tab1.click(".notification .mark")
    playwright_sync.expect(tab2.locator("#badge")).to_have_text("0", timeout=10000)
    playwright_sync.expect(tab2.locator(".notification.unread")).to_have_count(0)


def test_reconnects_by_itself_after_a_server_restart(live: LiveServer, browser: Any) -> None:
    """Restart the server: the page reconnects without a reload and the next
    notification arrives."""
    page = open_inbox(browser.new_context(), live, "carol")
    page.evaluate("window.marker = 'same page'")
    live.stop()
    page.wait_for_selector('#status[data-state="closed"]', timeout=10000)
    live.start()
    page.wait_for_selector('#status[data-state="open"]', timeout=20000)
    live.send("carol", "Back after the restart")
    page.wait_for_selector(".notification .message", timeout=10000)
    assert "Back after the restart" in messages(page)
    assert page.evaluate("window.marker") == "same page"


def test_missed_while_the_tab_was_closed(live: LiveServer, browser: Any) -> None:
    """Close the tab, send, reopen: the missed notification is there."""
    context = browser.new_context()
    page = open_inbox(context, live, "dave")
    page.close()
    live.send("dave", "Sent while you were away", type="warning")
    again = open_inbox(context, live, "dave")
    again.wait_for_selector(".notification .message", timeout=10000)
    assert messages(again) == ["Sent while you were away"]
    playwright_sync.expect(again.locator("#badge")).to_have_text("1")


def test_admin_panel_and_screenshot(live: LiveServer, browser: Any, tmp_path: Path) -> None:
    """The admin panel sends to a user and broadcasts; the page renders them
    (a screenshot is taken; RTSERVER_SCREENSHOTS=1 refreshes the one in docs/)."""
    page = open_inbox(browser.new_context(viewport={"width": 1200, "height": 760}), live, "user123")
    live.send("user123", "Your case status has been updated", case_id=881)
    page.fill("#send input[name=to]", "user123")
    page.fill("#send input[name=message]", "Your immigration form was approved")
    page.select_option("#send select[name=type]", "success")
    page.fill("#send input[name=category]", "immigration")
    page.click("#send button")
    page.fill("#broadcast input[name=message]", "Maintenance tonight at 22:00")
    page.click("#broadcast button")
    playwright_sync.expect(page.locator(".notification")).to_have_count(3, timeout=10000)
    assert messages(page)[0] == "Maintenance tonight at 22:00"
    playwright_sync.expect(page.locator("#badge")).to_have_text("2")
    playwright_sync.expect(page.locator("#panel-result")).to_contain_text("Broadcast reached 1")
    shot = tmp_path / "demo.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("RTSERVER_SCREENSHOTS"):
        shutil.copy(shot, DOCS / "demo-inbox.png")


def test_rtclient_is_served_as_a_module(live: LiveServer, browser: Any) -> None:
    """/static/rtclient.js loads as an ES module and exposes the seed's API."""
    page = browser.new_context().new_page()
    page.goto(f"{live.base}/demo")
    exported = page.evaluate("import('/static/rtclient.js').then(m => Object.keys(m).sort())")
    assert {
        "initializeSocket",
        "addSocketEventHandler",
        "removeSocketEventHandler",
        "markRead",
        "getNotifications",
        "subscribe",
    } <= set(exported)


def test_token_refresh_keeps_the_page_connected(tmp_path: Path, browser: Any) -> None:
    """With 3-second tokens, rtclient.js fetches a fresh one through getToken when
    the server warns, so the session outlives its first token."""
    config = tmp_path / "refresh.yaml"
    config.write_text(
        "auth:\n  secret: refresh-secret-0123456789-0123456789\n  expiry_warning: 1.5\n"
        f"store:\n  data_dir: {tmp_path}\n"
        "server:\n  test_routes: true\n"
        "logging:\n  format: json\n  metrics_interval: 0\n"
    )
    server = ServerProcess(config)
    server.start()
    try:
        page = browser.new_context().new_page()
        page.goto(f"{server.base}/demo")
        page.evaluate(
            """async (base) => {
                const { RTClient } = await import('/static/rtclient.js');
                const mint = async () => (await (await fetch('/api/test/token', {method: 'POST',
                    body: JSON.stringify({user_id: 'ivy', ttl: 3})})).json()).token;
                window.events = [];
                window.rtc = new RTClient({url: base.replace('http', 'ws') + '/ws', getToken: mint});
                for (const e of ['connect', 'disconnect', 'token_expiring', 'notification'])
                    window.rtc.on(e, (d) => window.events.push(e));
                await window.rtc.connect();
            }""",
            server.base,
        )
        page.wait_for_timeout(4500)  # past the first token's expiry
        events = page.evaluate("window.events")
        assert "token_expiring" in events and "disconnect" not in events, events
        token = json.loads(
            urllib.request.urlopen(
                urllib.request.Request(
                    server.base + "/api/test/token",
                    data=json.dumps({"user_id": "svc", "role": "publisher"}).encode(),
                    method="POST",
                ),
                timeout=10,
            ).read()
        )["token"]
        req = urllib.request.Request(
            server.base + "/api/notifications/ivy",
            data=json.dumps({"message": "still here"}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            method="POST",
        )
        assert json.loads(urllib.request.urlopen(req, timeout=10).read())["delivered"] == 1
    finally:
        server.stop()


def test_topics_resubscribe_after_a_server_restart(live: LiveServer, browser: Any) -> None:
    """rtclient.js: a handler and a subscription made before initializeSocket
    work; after a server restart the page resubscribes by itself from the
    last publication it saw, and what was published while it was away arrives
    once."""
    page = browser.new_context().new_page()
    page.goto(f"{live.base}/demo")
    page.evaluate(
        """async () => {
            const rt = await import('/static/rtclient.js');
            window.got = [];
            window.connects = 0;
            rt.addSocketEventHandler('connect', () => { window.connects += 1; });
            window.room = rt.subscribe('case:5', (p) => window.got.push(p.data.n));
            await rt.initializeSocket({
                url: `ws://${location.host}/ws`, backoffBase: 200,
                getToken: async () => (await (await fetch('/api/test/token', {method: 'POST',
                    body: JSON.stringify({user_id: 'erin', topics: ['case:*']})})).json()).token,
            });
            await window.room.ready;
        }"""
    )
    publisher = live.post("/api/test/token", {"user_id": "svc", "role": "publisher"})["token"]

    def publish(n: int) -> None:
        live.post("/api/topics/case:5/publications", {"n": n}, publisher)

    publish(1)
    page.wait_for_function("window.got.length === 1", timeout=10000)
    live.stop()
    live.start()
    publish(2)  # likely before the page is back: recovered when it resubscribes
    page.wait_for_function("window.connects === 2 && window.got.length === 2", timeout=20000)
    publish(3)
    page.wait_for_function("window.got.length === 3", timeout=10000)
    page.wait_for_timeout(300)
    assert page.evaluate("window.got") == [1, 2, 3]
    presence = page.evaluate("window.room.presence()")
    assert presence["users"] == [{"user_id": "erin", "sessions": presence["users"][0]["sessions"]}]


def test_the_case_room_shows_who_is_there_and_status_updates(
    live: LiveServer, browser: Any
) -> None:
    """Two people enter case 881's room in the demo: each sees the other
    there; a status posted from the panel shows in both; one leaves."""
    lawyer = open_inbox(browser.new_context(), live, "lawyer")
    client = open_inbox(browser.new_context(), live, "client")
    for page in (lawyer, client):
        page.select_option("#room-pick select", "case:881")
        page.click("#room-pick button")
        page.wait_for_function("window.room && window.room.lastId", timeout=10000)
    playwright_sync.expect(lawyer.locator("#room-people")).to_have_text("client, lawyer")
    playwright_sync.expect(client.locator("#room-people")).to_have_text("client, lawyer")
    lawyer.select_option("#case-status select", "case:881")
    lawyer.fill("#case-status input[name=status]", "Hearing set for 3 March")
    lawyer.click("#case-status button")
    for page in (lawyer, client):
        playwright_sync.expect(page.locator("#room-log .room-status")).to_have_text(
            ["Hearing set for 3 March"], timeout=10000
        )
    client.close()
    playwright_sync.expect(lawyer.locator("#room-people")).to_have_text("lawyer", timeout=10000)
