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


class ServerProcess:
    """`python -m lfm2vl serve ARGS --port 0` in a child process; `.url` once its startup line is read."""

    def __init__(self, args: list[str], log_path, timeout_s: float = 120):
        import os
        import subprocess
        import sys
        from pathlib import Path

        root = Path(__file__).resolve().parent.parent
        self.log_path = log_path
        with open(log_path, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "lfm2vl", "serve", "--port", "0", *args],
                                         stdout=subprocess.PIPE, stderr=err, text=True, cwd=root,
                                         env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.lines: list[str] = []
        self.url = None
        deadline = time.time() + timeout_s
        for line in self.proc.stdout:
            self.lines.append(line)
            if " at http://" in line:
                self.url = line.split(" at ")[1].split()[0].removesuffix("/v1")
                break
            assert time.time() < deadline, "server did not start in time"
        if self.url is None:
            self.stop()
            raise AssertionError(f"server did not start: {''.join(self.lines)}\n{open(log_path).read()}")
        threading.Thread(target=lambda: self.lines.extend(self.proc.stdout), daemon=True).start()

    def memory_mib(self) -> dict[str, float]:
        """The process's VmRSS (resident now) and VmHWM (peak resident) in MiB."""
        out = {}
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(value.split()[0]) / 1024
        return out

    def reset_peak(self) -> None:
        """Start VmHWM afresh from the current resident size (Linux: clear_refs 5)."""
        with open(f"/proc/{self.proc.pid}/clear_refs", "w") as f:
            f.write("5")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
