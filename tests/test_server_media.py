"""media.py: every image source the server accepts, and every way it refuses one (400 naming the part)."""
from __future__ import annotations

import base64
import http.server
import io
import os
import threading
import time

import pytest
from PIL import Image

from lfm2vl.serve.errors import APIError
from lfm2vl.serve.media import MediaPolicy, load_image
from server_util import image_data_url

WHERE = "messages[0].content[1]"


def _png(w=20, h=10) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def _refused(url, policy, code):
    with pytest.raises(APIError) as e:
        load_image(url, policy, WHERE)
    assert e.value.status == 400 and e.value.param == WHERE and WHERE in e.value.message
    assert e.value.code == code, e.value.message
    return e.value


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF"])
def test_data_url_formats(fmt):
    img = load_image(image_data_url(33, 17, fmt), MediaPolicy(), WHERE)
    assert img.size == (33, 17) and img.mode == "RGB"


def test_rgba_and_animated_gif_first_frame():
    buf = io.BytesIO()
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0)]]
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:])
    img = load_image("data:image/gif;base64," + base64.b64encode(buf.getvalue()).decode(), MediaPolicy(), WHERE)
    assert img.getpixel((0, 0)) == (255, 0, 0)
    buf = io.BytesIO()
    Image.new("RGBA", (5, 5), (9, 8, 7, 100)).save(buf, format="PNG")
    assert load_image("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), MediaPolicy(),
                      WHERE).mode == "RGB"


def test_data_url_refusals():
    policy = MediaPolicy()
    _refused("data:image/png;base64,!!!!", policy, "invalid_image")
    _refused("data:image/png;base64," + base64.b64encode(b"not an image at all").decode(), policy, "invalid_image")
    _refused("data:image/svg+xml;base64,PHN2Zz4=", policy, "invalid_image_format")
    _refused("data:image/png,rawbytes", policy, "invalid_image_url")
    _refused("data:image/png;base64", policy, "invalid_image_url")
    bmp = io.BytesIO()
    Image.new("RGB", (4, 4)).save(bmp, format="BMP")  # a real image, but not an accepted format
    _refused("data:image/png;base64," + base64.b64encode(bmp.getvalue()).decode(), policy, "invalid_image_format")
    _refused("ftp://example.com/a.png", policy, "invalid_image_url")


def test_pixel_and_byte_limits_checked_before_decoding():
    big = image_data_url(300, 300)
    _refused(big, MediaPolicy(max_pixels=300 * 299), "image_too_large")
    _refused(big, MediaPolicy(max_bytes=100), "image_too_large")
    # a bomb: a tiny file claiming 30000x30000 pixels is refused from its header
    buf = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 200_000
    e = _refused("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode(), MediaPolicy(),
                 "image_too_large")
    assert "900000000" in e.message


def test_local_files_only_inside_allowed_dir(tmp_path):
    root = tmp_path / "media"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.png").write_bytes(_png())
    outside = tmp_path / "secret.png"
    outside.write_bytes(_png(7, 7))
    os.symlink(outside, root / "link.png")
    os.symlink(tmp_path, root / "up")
    _refused(str(root / "sub" / "a.png"), MediaPolicy(), "local_images_disabled")
    policy = MediaPolicy(allowed_dir=str(root))
    assert load_image(str(root / "sub" / "a.png"), policy, WHERE).size == (20, 10)
    assert load_image("sub/a.png", policy, WHERE).size == (20, 10)
    assert load_image((root / "sub" / "a.png").as_uri(), policy, WHERE).size == (20, 10)
    _refused(str(outside), policy, "path_not_allowed")
    _refused("../secret.png", policy, "path_not_allowed")
    _refused("sub/../../secret.png", policy, "path_not_allowed")
    _refused(str(root / "link.png"), policy, "path_not_allowed")       # symlink pointing out
    _refused("up/secret.png", policy, "path_not_allowed")              # symlinked folder pointing out
    _refused(outside.as_uri(), policy, "path_not_allowed")
    _refused("sub/missing.png", policy, "invalid_image_url")
    _refused("sub", policy, "invalid_image_url")


class _Handler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def do_GET(self):
        if self.path == "/ok.png":
            body = _png(12, 6)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/big.png":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the limit must hold while reading
            self.wfile.write(b"\x89PNG" + b"0" * 300_000)
        elif self.path == "/slow.png":
            self.send_response(200)
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"0" * 10)
                self.wfile.flush()
                time.sleep(0.05)
        elif self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "file:///etc/passwd")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()


@pytest.fixture(scope="module")
def http_url():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.handle_error = lambda request, address: None  # the client hanging up on /slow.png is expected
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_remote_fetch_with_limits(http_url):
    policy = MediaPolicy(max_bytes=200_000, fetch_timeout_s=0.8)
    assert load_image(http_url + "/ok.png", policy, WHERE).size == (12, 6)
    _refused(http_url + "/ok.png", MediaPolicy(allow_remote=False), "remote_images_disabled")
    _refused(http_url + "/big.png", policy, "image_too_large")
    t = time.monotonic()
    _refused(http_url + "/slow.png", policy, "image_fetch_timeout")  # trickles bytes: only a total deadline stops it
    assert time.monotonic() - t < 1.5
    _refused(http_url + "/missing.png", policy, "image_fetch_failed")
    _refused(http_url + "/redirect", policy, "image_fetch_failed")  # no redirect to file://
