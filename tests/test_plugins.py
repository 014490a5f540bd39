"""Plugins: entry-point loading, registrations, clashes, failures, an external package."""

from __future__ import annotations

import asyncio
import importlib
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from structlog.testing import capture_logs

from rtserver.app import make_app
from rtserver.client import ClientError
from rtserver.plugins import EventHandler, Hookspecs, PluginError, hookimpl
from rtserver.protocol import ProtocolError

from .conftest import StartServer, make_config

ROOT = Path(__file__).resolve().parent.parent


def plugin(**hooks: Any) -> SimpleNamespace:
    """A plugin object with the given hook implementations."""
    return SimpleNamespace(**{name: hookimpl(fn) for name, fn in hooks.items()})


def events(*specs: EventHandler) -> SimpleNamespace:
    def rtserver_events(config: Any) -> list[EventHandler]:
        return list(specs)

    return plugin(rtserver_events=rtserver_events)


class TestLoading:
    def test_shipped_plugins_load_from_entry_points(self, tmp_path: Path) -> None:
        """The three shipped plugins come from the rtserver.plugins entry points."""
        app = make_app(make_config(tmp_path))
        assert app.plugins.names() == ["registration", "notifications", "topics", "admin", "demo"]
        assert {"register", "mark_read", "get_notifications"} <= set(app.plugins.events)
        assert app.plugins.events["register"].plugin == "registration"

    def test_enabled_list_decides(self, tmp_path: Path) -> None:
        """Only enabled plugins load; their events and routes are absent otherwise."""
        app = make_app(make_config(tmp_path, plugins={"enabled": ["registration"]}))
        assert set(app.plugins.events) == {"register", "refresh"}
        assert app.plugins.routes == []

    def test_unknown_plugin_name_stops_startup(self, tmp_path: Path) -> None:
        """Enabling a plugin that is not installed names it."""
        with pytest.raises(PluginError, match="'nope'"):
            make_app(make_config(tmp_path, plugins={"enabled": ["registration", "nope"]}))

    def test_two_plugins_claiming_one_event_stop_startup(self, tmp_path: Path) -> None:
        """An event claimed twice is a clear error naming both plugins."""
        dup = events(EventHandler("register", lambda ctx, data: {}))
        with pytest.raises(
            PluginError,
            match="'register' is claimed by both plugin 'registration' and plugin 'dup'",
        ):
            make_app(make_config(tmp_path), plugins=[("dup", dup)])

    def test_misspelled_hook_stops_startup(self, tmp_path: Path) -> None:
        """A hookimpl that matches no hook spec is refused (pluggy check_pending)."""
        bad = plugin(rtserver_event=lambda config: [])
        with pytest.raises(PluginError) as err:
            make_app(make_config(tmp_path), plugins=[("bad", bad)])
        message = str(err.value)
        assert message.startswith("plugin 'bad': 'rtserver_event' is not an rtserver hook (hooks: ")
        assert "rtserver_events, " in message and "namespace" not in message

    def test_wrong_hook_arguments_stop_startup(self, tmp_path: Path) -> None:
        """A hookimpl asking for an argument the spec does not give is refused."""
        bad = plugin(rtserver_startup=lambda hub, nonsense: None)
        with pytest.raises(PluginError, match="nonsense"):
            make_app(make_config(tmp_path), plugins=[("bad", bad)])


class TestDispatch:
    async def test_plugin_event_and_lifecycle_hooks(self, start_server: StartServer) -> None:
        """A plugin's event is dispatched; startup, connect, disconnect hooks fire."""
        seen: list[str] = []

        async def ping(ctx: Any, data: dict[str, Any]) -> dict[str, Any]:
            return {"pong": data.get("n", 0) + 1, "user": ctx.user_id}

        p = plugin(
            rtserver_events=lambda config: [EventHandler("ping", ping)],
            rtserver_startup=lambda hub: seen.append("startup"),
            rtserver_connect=lambda hub, connection: seen.append("connect"),
            rtserver_disconnect=lambda hub, connection: seen.append(
                f"disconnect:{connection.user_id}"
            ),
            rtserver_shutdown=lambda hub: seen.append("shutdown"),
        )
        srv = await start_server(extra_plugins=[("pinger", p)])
        client = await srv.user("pat")
        assert await client.request("ping", {"n": 41}) == {"pong": 42, "user": "pat"}
        await client.close()
        for _ in range(100):
            if "disconnect:pat" in seen:
                break
            await asyncio.sleep(0.01)
        assert seen == ["startup", "connect", "disconnect:pat"]

    async def test_raising_handler_gets_internal_error_and_harms_nothing(
        self, start_server: StartServer
    ) -> None:
        """A handler that raises: its caller gets internal_error, the traceback is
        logged, the connection and other sessions carry on."""

        def boom(ctx: Any, data: Any) -> None:
            raise RuntimeError("kaboom")

        srv = await start_server(extra_plugins=[("boomer", events(EventHandler("boom", boom)))])
        client, other = await srv.user("a"), await srv.user("b")
        with capture_logs() as logs, pytest.raises(ClientError) as err:
            await client.request("boom")
        assert err.value.code == "internal_error"
        failed = [e for e in logs if e["event"] == "handler.failed"]
        assert failed and failed[0]["log_level"] == "error" and failed[0]["exc_info"] is True
        assert (await client.request("get_notifications")) == {"notifications": []}
        await srv.hub.send_notification("b", {"message": "fine"})
        assert (await other.next("notification"))["message"] == "fine"

    async def test_role_restricted_event(self, start_server: StartServer) -> None:
        """An EventHandler with role='admin' refuses users with forbidden."""
        srv = await start_server()
        client = await srv.user("plain")
        with pytest.raises(ClientError) as err:
            await client.request("admin.sessions")
        assert err.value.code == "forbidden"
        admin = await srv.connect()
        await admin.register(srv.token("root", "admin"))
        listed = await admin.request("admin.sessions")
        assert {s["user_id"] for s in listed["sessions"]} == {"plain", "root"}


def doc_block(language: str, containing: str) -> str:
    doc = (ROOT / "docs" / "plugins.md").read_text()
    blocks: list[str] = re.findall(rf"```{language}\n(.*?)```", doc, re.S)
    (found,) = [b for b in blocks if containing in b]
    return found


@pytest.fixture(scope="module")
def installed_echo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The plugin package docs/plugins.md shows, copied out of it as a reader
    would (its module and its pyproject.toml), pip-installed into a target dir."""
    package = tmp_path_factory.mktemp("rtserver-echo")
    (package / "rtserver_echo").mkdir()
    (package / "rtserver_echo" / "__init__.py").write_text(doc_block("python", "def echo("))
    (package / "pyproject.toml").write_text(doc_block("toml", "[project]"))
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(package),
        ],
        check=True,
        capture_output=True,
    )
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    yield target
    sys.path.remove(str(target))
    sys.modules.pop("rtserver_echo", None)


async def test_external_plugin_package_over_websocket(
    installed_echo: Path, start_server: StartServer
) -> None:
    """An installed package with an rtserver.plugins entry point adds an event and
    a route, configured by name, without touching the core."""
    srv = await start_server(
        plugins={
            "enabled": ["registration", "notifications", "admin", "echo"],
            "settings": {"echo": {"prefix": ">"}},
        }
    )
    client = await srv.user("ext")
    assert await client.request("echo", {"text": "ab", "times": 2}) == {
        "text": ">abab",
        "user_id": "ext",
    }
    with pytest.raises(ClientError) as err:
        await client.request("echo", {"text": 5})
    assert err.value.code == "bad_request" and "data.text" in err.value.message
    status, body = await srv.http("GET", "/api/echo/count")
    assert (status, body) == (200, {"sessions": 1})


def test_every_hook_is_documented() -> None:
    """docs/plugins.md has a section for every hook spec."""
    doc = (ROOT / "docs" / "plugins.md").read_text()
    hooks = [name for name in vars(Hookspecs) if name.startswith("rtserver_")]
    assert hooks
    for name in hooks:
        assert re.search(rf"^###\s+`?{name}", doc, re.M), f"{name} is not documented"


class TestNotificationHook:
    """``rtserver_notification``: change, redact or refuse a notification before
    it is stored and pushed, in one place for every way of sending."""

    @staticmethod
    def hooks() -> list[tuple[str, object]]:
        def tag(notification: dict[str, Any]) -> dict[str, Any]:
            if notification.get("type") == "spam":
                raise ProtocolError("forbidden", "spam is not sent", status=403)
            if notification.get("type") == "crash":
                raise RuntimeError("a bug in the plugin")
            return {k: v for k, v in notification.items() if k != "ssn"} | {"tagged": 1}

        def count(user_id: str | None, notification: dict[str, Any]) -> None:
            notification["tagged"] += 1  # runs second: sees the first one's result
            notification["for"] = user_id

        return [
            ("tag", plugin(rtserver_notification=tag)),
            ("count", plugin(rtserver_notification=count)),
        ]

    async def test_changed_stored_and_pushed_alike(self, start_server: StartServer) -> None:
        srv = await start_server(extra_plugins=self.hooks())
        client = await srv.user("u1")
        token = srv.token("svc", "publisher")
        status, body = await srv.http(
            "POST", "/api/notifications/u1", {"message": "hi", "ssn": "123"}, token=token
        )
        assert status == 201
        pushed = await client.next("notification")
        (stored,) = await srv.hub.get_notifications_for_user("u1")
        for seen in (pushed, body["notification"], stored.to_wire()):
            assert "ssn" not in seen and seen["tagged"] == 2 and seen["for"] == "u1"
        status, _ = await srv.http(
            "POST",
            "/api/notifications",
            [{"user_id": "u2", "notification": {"message": "b"}}],
            token=token,
        )
        assert status == 201
        (batched,) = await srv.hub.get_notifications_for_user("u2")
        assert batched.to_wire()["tagged"] == 2
        await srv.hub.send_broadcast_notification({"message": "all"})
        broadcast = await client.next("notification")
        assert broadcast["tagged"] == 2 and broadcast["for"] is None

    async def test_refused_and_failing(self, start_server: StartServer) -> None:
        srv = await start_server(extra_plugins=self.hooks())
        token = srv.token("svc", "publisher")
        status, body = await srv.http(
            "POST", "/api/notifications/u1", {"message": "x", "type": "spam"}, token=token
        )
        assert (status, body["error"]["code"]) == (403, "forbidden")
        status, body = await srv.http(
            "POST",
            "/api/notifications",
            [
                {"user_id": "u1", "notification": {"message": "ok"}},
                {"user_id": "u1", "notification": {"message": "x", "type": "spam"}},
            ],
            token=token,
        )
        assert status == 403 and body["error"]["message"] == "[1]: spam is not sent"
        with capture_logs() as logs:
            status, body = await srv.http(
                "POST", "/api/notifications/u1", {"message": "x", "type": "crash"}, token=token
            )
        assert (status, body["error"]["code"]) == (500, "internal_error")
        assert [e["hook"] for e in logs if e["event"] == "hook.failed"] == ["rtserver_notification"]
        assert await srv.hub.get_notifications_for_user("u1") == []  # nothing stored
