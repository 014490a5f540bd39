"""rtserver: a Tornado real-time notification server with plugins.

The Python API lives on ``rtserver.hub.Hub`` (``send_notification``,
``send_direct_message``, ``send_broadcast_notification``, ...); build a server
with ``rtserver.app.make_app(config)``.
"""

from __future__ import annotations

__version__ = "0.1.0"
