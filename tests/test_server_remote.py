"""`lfm2vl serve --allow-remote-images` as a real process: remote image URLs are fetched from public addresses only.

A local HTTP server on 127.0.0.1 stands in for an internal service (it would answer with a valid PNG); every way of
pointing the server at it is refused before any connection is made, and the client gets one uniform error while the
real reason goes to the server's log. (The default, remote images off, is checked by tests/test_server.py.)
"""
from __future__ import annotations

import http.server
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

from checkpoints import cached_checkpoint
from server_util import image_part, openai_error

ROOT = Path(__file__).resolve().parent.parent


class _Internal(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), (1, 2, 3)).save(buf, format="PNG")
        png = buf.getvalue()

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                self.send_response(200)
                self.send_header("Content-Length", str(len(png)))
                self.end_headers()
                self.wfile.write(png)

        super().__init__(("127.0.0.1", 0), Handler)
        self.connections = 0
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def verify_request(self, request, client_address):
        self.connections += 1
        return True


def test_allow_remote_images_refuses_internal_addresses(tmp_path_factory, tmp_path):
    checkpoint = cached_checkpoint(tmp_path_factory, "tiny-lfm2vl")[0]
    internal = _Internal()
    port = internal.server_address[1]
    log = tmp_path / "stderr.log"
    cmd = [sys.executable, "-m", "lfm2vl", "serve", "--model", str(checkpoint), "--served-model-name", "tiny-vl",
           "--port", "0", "--dtype", "float32", "--max-seq-len", "1024", "--allow-remote-images",
           "--remote-timeout", "3", "--log-level", "warning"]
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, cwd=ROOT,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        url, deadline = None, time.time() + 120
        for line in proc.stdout:
            if " at http://" in line:
                url = line.split(" at ")[1].split()[0].removesuffix("/v1")
                break
            assert time.time() < deadline
        assert url is not None, f"server did not start: {log.read_text()}"
        for image_url in (f"http://127.0.0.1:{port}/cat.png", f"http://localhost:{port}/cat.png",
                          f"http://[::ffff:127.0.0.1]:{port}/cat.png", "http://169.254.169.254/latest/meta-data/"):
            body = {"model": "tiny-vl", "max_tokens": 2,
                    "messages": [{"role": "user", "content": [image_part(image_url), {"type": "text", "text": "?"}]}]}
            err = openai_error(httpx.post(url + "/v1/chat/completions", json=body, timeout=30), 400)
            assert err["message"] == "messages[0].content[0]: the image URL could not be fetched."
            assert err["code"] == "image_fetch_failed" and err["param"] == "messages[0].content[0]"
        assert internal.connections == 0
        assert "not a public address" in log.read_text()  # the reason is in the server's log, not the answer
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        internal.shutdown()
