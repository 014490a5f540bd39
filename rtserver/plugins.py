"""Hook specs and the plugin manager.

A plugin is a module (or object) registered under the ``rtserver.plugins``
entry-point group whose functions are marked ``@hookimpl``. It hands back
*registrations* (event handlers and HTTP routes); the core gathers them once at
start-up, refuses clashes and misspelled hooks, and afterwards dispatching a
frame is one dictionary lookup. Every hook is documented in docs/plugins.md
(a test checks it).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any

import pluggy

from rtserver.config import Config, Role
from rtserver.log import get_logger

if TYPE_CHECKING:
    from rtserver.hub import Hub
    from rtserver.sessions import Connection

PROJECT = "rtserver"
ENTRY_POINT_GROUP = "rtserver.plugins"

hookspec = pluggy.HookspecMarker(PROJECT)
log = get_logger("rtserver.plugins")
hookimpl = pluggy.HookimplMarker(PROJECT)


class PluginError(Exception):
    """A plugin cannot be loaded or clashes with another; start-up stops."""


@dataclass(frozen=True)
class EventContext:
    """What an event handler gets besides its data."""

    hub: Hub
    connection: Connection
    event: str
    frame_id: str | int | None

    @property
    def user_id(self) -> str:
        """The registered user (handlers that require registration only)."""
        assert self.connection.user_id is not None
        return self.connection.user_id


Handler = Callable[[EventContext, Any], Awaitable[dict[str, Any] | None] | dict[str, Any] | None]


@dataclass(frozen=True)
class EventHandler:
    """One client event a plugin serves.

    ``handler(ctx, data)`` returns the ack's data (a dict, or None for ``{}``)
    or raises ``ProtocolError``. ``schema`` is a msgspec Struct (or any type
    msgspec can decode) that ``data`` is validated against first; None means
    a free-form object. ``requires_registration`` refuses the event with
    ``not_registered`` before a successful register; ``role`` refuses it with
    ``forbidden`` below that role.
    """

    event: str
    handler: Handler
    schema: Any = None
    requires_registration: bool = True
    role: Role | None = None


@dataclass(frozen=True)
class Route:
    """One HTTP route: a Tornado URL pattern and a ``web.APIHandler`` subclass.

    The handler's ``initialize`` receives ``hub`` plus ``kwargs``.
    """

    pattern: str
    handler: type
    kwargs: dict[str, Any] = field(default_factory=dict)
    name: str | None = None


class Hookspecs:
    @hookspec
    def rtserver_events(self, config: Config) -> Sequence[EventHandler]:  # type: ignore[empty-body]
        """Return the client events this plugin handles (``EventHandler`` list)."""

    @hookspec
    def rtserver_routes(self, config: Config) -> Sequence[Route]:  # type: ignore[empty-body]
        """Return the HTTP routes this plugin serves (``Route`` list)."""

    @hookspec
    def rtserver_startup(self, hub: Hub) -> Awaitable[None] | None:
        """Called once the store is open, before the port is listened on; may be async."""

    @hookspec
    def rtserver_shutdown(self, hub: Hub) -> Awaitable[None] | None:
        """Called while shutting down, before the store closes; may be async."""

    @hookspec
    def rtserver_connect(self, hub: Hub, connection: Connection) -> None:
        """Called when a WebSocket opens (not yet registered)."""

    @hookspec
    def rtserver_disconnect(self, hub: Hub, connection: Connection) -> None:
        """Called when a WebSocket closes; ``connection.user_id`` is set if it registered."""

    @hookspec
    def rtserver_delivered(
        self, hub: Hub, user_id: str, ids: list[str], connection: Connection | None
    ) -> None:
        """Called when notifications of ``user_id`` become delivered: confirmed by
        a receipts-session (``connection``), or first written to a session
        without receipts (``connection`` None). At least once per notification."""

    @hookspec
    def rtserver_notification(
        self, hub: Hub, user_id: str | None, notification: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Called for every notification accepted to send or store (per-user,
        batch, broadcast with ``user_id`` None, ``save_notification``), before it
        is validated, given its id, stored and pushed. Return a changed
        notification (a new dict, or this one changed), or None to keep it;
        raise ``ProtocolError`` to refuse it (the caller gets that error).
        Plugins run in ``plugins.enabled`` order, each given the result of the
        one before. Synchronous: it runs on the send path."""

    @hookspec
    def rtserver_authorize_topic(
        self, hub: Hub, connection: Connection, topic: str, action: str
    ) -> bool | None:
        """May ``connection`` ``action`` (``"subscribe"`` or ``"publish"``)
        ``topic``? True allows, False denies, None leaves it to the token's
        grants (``topics``, ``publish_topics``); any False denies. Synchronous."""


@dataclass(frozen=True)
class Registered:
    """An ``EventHandler`` and the plugin that registered it."""

    plugin: str
    spec: EventHandler


class Plugins:
    """The loaded plugins and what they registered."""

    def __init__(self, config: Config, extra: Sequence[tuple[str, object]] = ()) -> None:
        self.config = config
        self.pm = pluggy.PluginManager(PROJECT)
        self.pm.add_hookspecs(Hookspecs)
        installed = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
        for name in config.plugins.enabled:
            ep = installed.get(name)
            if ep is None:
                known = ", ".join(sorted(installed)) or "none"
                raise PluginError(
                    f"plugins.enabled: no plugin named {name!r} is installed"
                    f" (entry points in {ENTRY_POINT_GROUP}: {known})"
                )
            try:
                module = ep.load()
            except Exception as err:
                raise PluginError(f"plugin {name!r} failed to import: {err!r}") from err
            self._register(name, module)
        for name, plugin in extra:
            self._register(name, plugin)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as err:
            raise PluginError(self._invalid(err)) from None
        self.events = self._collect_events()
        self.routes = self._collect_routes()

    def _register(self, name: str, plugin: object) -> None:
        try:
            self.pm.register(plugin, name=name)
        except (ValueError, pluggy.PluginValidationError) as err:
            raise PluginError(f"plugin {name!r}: {err}") from None

    def _invalid(self, err: pluggy.PluginValidationError) -> str:
        """What is wrong with a plugin's hooks, naming the plugin once."""
        name = self.pm.get_name(err.plugin) or getattr(err.plugin, "__name__", "?")
        unknown = re.search(r"unknown hook '([^']+)'", str(err))
        if unknown is None:
            return f"plugin {name!r}: {str(err).split(' in plugin ')[0]}"
        hooks = ", ".join(sorted(h for h in dir(Hookspecs) if h.startswith("rtserver_")))
        return f"plugin {name!r}: {unknown.group(1)!r} is not an rtserver hook (hooks: {hooks})"

    def notification_filters(self, hub: Hub) -> list[NotificationHook]:
        """The ``rtserver_notification`` implementations, in order."""
        return [
            NotificationHook(hub, impl.function, tuple(impl.argnames))
            for impl in self.pm.hook.rtserver_notification.get_hookimpls()
        ]

    def topic_authorizers(self, hub: Hub) -> list[Callable[[Connection, str, str], bool | None]]:
        """The ``rtserver_authorize_topic`` implementations, in order; one
        that raises denies (and is logged)."""

        def bind(impl: Any) -> Callable[[Connection, str, str], bool | None]:
            names = tuple(impl.argnames)

            def authorize(connection: Connection, topic: str, action: str) -> bool | None:
                given = {"hub": hub, "connection": connection, "topic": topic, "action": action}
                try:
                    verdict = impl.function(**{name: given[name] for name in names})
                except Exception:
                    log.exception("hook.failed", hook="rtserver_authorize_topic", topic=topic)
                    return False
                return None if verdict is None else bool(verdict)

            return authorize

        return [bind(impl) for impl in self.pm.hook.rtserver_authorize_topic.get_hookimpls()]

    def names(self) -> list[str]:
        return [name for name, _ in self.pm.list_name_plugin()]

    def _each(self, hook: str, **kwargs: Any) -> list[tuple[str, Any]]:
        out = []
        for impl in getattr(self.pm.hook, hook).get_hookimpls():  # registration order
            args = {k: kwargs[k] for k in impl.argnames}
            out.append((impl.plugin_name, impl.function(**args)))
        return out

    def _collect_events(self) -> dict[str, Registered]:
        events: dict[str, Registered] = {}
        for plugin, specs in self._each("rtserver_events", config=self.config):
            for spec in specs or ():
                if not isinstance(spec, EventHandler):
                    raise PluginError(
                        f"plugin {plugin!r}: rtserver_events must return EventHandler"
                    )
                if spec.event in events:
                    raise PluginError(
                        f"event {spec.event!r} is claimed by both plugin"
                        f" {events[spec.event].plugin!r} and plugin {plugin!r}"
                    )
                events[spec.event] = Registered(plugin, spec)
        return events

    def _collect_routes(self) -> list[tuple[str, Route]]:
        seen: dict[str, str] = {}
        routes: list[tuple[str, Route]] = []
        for plugin, specs in self._each("rtserver_routes", config=self.config):
            for route in specs or ():
                if route.pattern in seen:
                    raise PluginError(
                        f"route {route.pattern!r} is claimed by both plugin"
                        f" {seen[route.pattern]!r} and plugin {plugin!r}"
                    )
                seen[route.pattern] = plugin
                routes.append((plugin, route))
        return routes

    async def call_async(self, hook: str, **kwargs: Any) -> None:
        """Run a lifecycle hook on every plugin, awaiting async implementations."""
        for _, result in self._each(hook, **kwargs):
            if inspect.isawaitable(result):
                await result

    def implemented(self, hook: str) -> bool:
        """Whether any plugin implements ``hook`` (to skip work nobody hears)."""
        return bool(getattr(self.pm.hook, hook).get_hookimpls())

    def notify(self, hook: str, **kwargs: Any) -> list[Any]:
        """Run a per-connection hook; the caller deals with awaitables."""
        return [result for _, result in self._each(hook, **kwargs)]


class NotificationHook:
    """One plugin's ``rtserver_notification`` as ``(user_id, notification) ->
    notification``: called with the arguments it asks for; None keeps it."""

    __slots__ = ("function", "hub", "names")

    def __init__(self, hub: Hub, function: Callable[..., Any], names: tuple[str, ...]) -> None:
        self.hub = hub
        self.function = function
        self.names = names

    def __call__(self, user_id: str | None, notification: dict[str, Any]) -> Any:
        given = {"hub": self.hub, "user_id": user_id, "notification": notification}
        changed = self.function(**{name: given[name] for name in self.names})
        return notification if changed is None else changed
