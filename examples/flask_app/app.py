"""A small Flask app that notifies its users through rtserver.

Its views call ``rtserver.publisher.Publisher`` (HTTP, retried, idempotent)
where the Flask-SocketIO module had ``send_notification`` and friends; its page
loads ``rtclient.js`` from rtserver. It mints its users' rtserver tokens with
the secret it shares with rtserver (``auth.secret``).

    pip install -e '.[test]'     # Flask comes with the test extras
    python run.py &              # rtserver on :8888
    RTSERVER_URL=http://127.0.0.1:8888 \\
    RTSERVER_SECRET=dev-only-insecure-secret-change-me-0123456789 \\
        flask --app examples/flask_app/app.py run --port 5003

Then open http://127.0.0.1:5003/inbox/user123 and, in another terminal,
``curl -X POST http://127.0.0.1:5003/forms/user123/submit``.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jwt
from flask import Flask, jsonify, render_template_string

from rtserver.publisher import Publisher, PublishError

PAGE = """<!doctype html>
<meta charset="utf-8">
<title>Inbox of {{ user_id }}</title>
<h1>Inbox of {{ user_id }} <small id="unread">{{ unread }}</small> unread</h1>
<ul id="list"></ul>
<script type="module">
  import { initializeSocket, addSocketEventHandler } from '{{ rt_url }}/static/rtclient.js';
  addSocketEventHandler('notification', (n) => {
    const li = document.createElement('li');
    li.textContent = n.message;
    document.querySelector('#list').prepend(li);
  });
  addSocketEventHandler('unread', (count) => { document.querySelector('#unread').textContent = count; });
  await initializeSocket({
    url: '{{ ws_url }}',
    getToken: () => fetch('/rt-token/{{ user_id }}').then((r) => r.text()),
  });
</script>
"""


def create_app(rt_url: str | None = None, secret: str | None = None) -> Flask:
    app = Flask(__name__)
    rt_url = (rt_url or os.environ["RTSERVER_URL"]).rstrip("/")
    secret = secret or os.environ["RTSERVER_SECRET"]

    def token(user_id: str, role: str = "user", ttl: int = 3600) -> str:
        now = int(time.time())
        claims = {"sub": user_id, "role": role, "iat": now, "exp": now + ttl}
        return jwt.encode(claims, secret, algorithm="HS256")

    # One for the whole app: safe to share between request threads.
    rt = Publisher(rt_url, token("flask-app", "publisher", ttl=365 * 86400))
    app.extensions["rtserver"] = rt

    @app.post("/forms/<user_id>/submit")
    def submit_form(user_id: str) -> Any:
        # ... process the form ...
        try:
            sent = rt.send_notification(
                user_id,
                {
                    "message": "Your immigration form has been submitted successfully",
                    "type": "success",
                    "category": "immigration",
                },
            )
        except PublishError as err:  # stored nowhere: say so, try again later
            return jsonify({"error": err.message}), 503
        return jsonify({"notification_id": sent["notification"]["id"]}), 201

    @app.get("/inbox/<user_id>")
    def inbox(user_id: str) -> str:
        ws_url = rt_url.replace("http", "ws", 1) + "/ws"
        return render_template_string(
            PAGE, user_id=user_id, unread=rt.unread_count(user_id), rt_url=rt_url, ws_url=ws_url
        )

    @app.get("/email/read/<user_id>/<notification_id>")
    def read_from_email(user_id: str, notification_id: str) -> Any:
        return jsonify(rt.mark_read(user_id, [notification_id]))

    @app.get("/rt-token/<user_id>")
    def rt_token(user_id: str) -> str:
        # In a real app: only for the logged-in user (flask_login.current_user).
        return token(user_id)

    return app


if os.environ.get("RTSERVER_URL"):
    app = create_app()
