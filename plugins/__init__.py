"""The plugins shipped with rtserver.

Each is an ordinary plugin, registered through the ``rtserver.plugins`` entry
point group exactly as an outside team's plugin would be, and uses only the
public API: ``rtserver.plugins`` (hookimpl, EventHandler, Route),
``rtserver.web.APIHandler``, ``rtserver.protocol`` and the ``Hub``.
"""
