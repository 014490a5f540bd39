"""examples/flask_app: a real Flask app (Flask from PyPI) whose views call
Publisher against a real rtserver; the notification a view sends arrives
over a WebSocket."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path
from typing import Any

import pytest

from rtserver.client import Client

from .processes import ServerProcess
from .test_run import write_config

flask = pytest.importorskip("flask", reason="pip install -e '.[test]' brings Flask")
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flask_app" / "app.py"
SECRET = "run-test-secret-0123456789-0123456789"  # write_config's


def load_example() -> Any:
    spec = importlib.util.spec_from_file_location("flask_example", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_a_flask_view_notifies_a_live_session(tmp_path: Path) -> None:
    node = ServerProcess(write_config(tmp_path))
    node.start()
    try:
        app = load_example().create_app(node.base, SECRET)
        web = app.test_client()

        def get(path: str) -> Any:
            return web.get(path)

        token = (await asyncio.to_thread(get, "/rt-token/user123")).get_data(as_text=True)
        ws = await Client.connect(node.ws)
        await ws.register(token, receipts=False)
        posted = await asyncio.to_thread(web.post, "/forms/user123/submit")
        assert posted.status_code == 201
        note = await ws.next("notification")
        assert note["id"] == posted.get_json()["notification_id"]
        assert note["category"] == "immigration" and note["type"] == "success"
        page = await asyncio.to_thread(get, "/inbox/user123")
        assert page.status_code == 200
        html = page.get_data(as_text=True)
        assert '<small id="unread">1</small>' in html and "/static/rtclient.js" in html
        read = await asyncio.to_thread(get, f"/email/read/user123/{note['id']}")
        assert read.get_json() == {"updated": 1, "unread_count": 0}
        assert (await ws.next("read"))["ids"] == [note["id"]]
        await ws.close()
        app.extensions["rtserver"].close()
    finally:
        node.stop()
