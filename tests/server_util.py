"""Helpers shared by the server tests: images as data URLs, a uvicorn server in a thread, SSE parsing."""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time

import httpx
from PIL import Image


def image_data_url(w: int = 64, h: int = 48, fmt: str = "PNG", color=(200, 30, 40)) -> str:
    buf = io.BytesIO()
    img = Image.new("RGB", (w, h), color)
    for x in range(0, w, 4):  # some structure so the vision tower sees more than one colour
        img.putpixel((x, (x * 7) % h), (x % 256, 255 - x % 256, 90))
    img.save(buf, format=fmt)
    mime = {"PNG": "png", "JPEG": "jpeg", "WEBP": "webp", "GIF": "gif"}[fmt]
    return f"data:image/{mime};base64," + base64.b64encode(buf.getvalue()).decode()


def image_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadServer:
    """uvicorn serving `app` on a free port in a background thread (for in-process tests)."""

    def __init__(self, app):
        import uvicorn

        self.port = free_port()
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def sse_events(lines) -> list:
    """Parse `data: ...` lines of an SSE stream into JSON objects; '[DONE]' stays a string."""
    out = []
    for line in lines:
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def post_raw(url: str, content: bytes, headers: dict | None = None) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", content=content,
                      headers={"Content-Type": "application/json", **(headers or {})}, timeout=30)


def openai_error(r: httpx.Response, status: int) -> dict:
    """Assert an error response has `status` and exactly OpenAI's error shape, with no traceback; return it."""
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and "Traceback" not in r.text
    return err
