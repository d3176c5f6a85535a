"""media.py and remote.py: every image source the server accepts, and every way it refuses one (400 naming the part).

Remote fetching is tested against HTTP servers on 127.0.0.x that the tests start: 127.0.0.1 stands in for an
internal service (it must never receive a connection), and where a fetch must succeed the policy's testing-only
`allowed_networks` lets exactly the stand-in through (127.0.0.2 plays an outside server).
"""
from __future__ import annotations

import base64
import concurrent.futures as cf
import http.server
import io
import ipaddress
import logging
import os
import socket
import ssl
import threading
import time
import urllib.parse
from pathlib import Path

import httpx
import pytest
from PIL import Image

from lfm2vl.serve import remote
from lfm2vl.serve.app import ServerSettings, create_app
from lfm2vl.serve.cli import build_parser, main, media_policy
from lfm2vl.serve.errors import APIError
from lfm2vl.serve.media import MediaPolicy, load_image
from lfm2vl.serve.scheduler import Scheduler
from server_fake import FakeBatchGenerator, FakeEngine
from server_util import ThreadServer, free_port, image_data_url, image_part

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
        self.server.hosts.append(self.headers.get("Host"))
        path, _, query = self.path.partition("?")
        if path == "/ok.png":
            body = _png(12, 6)
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif path == "/text":
            self.send_response(200)
            self.send_header("Content-Length", "5")
            self.end_headers()
            self.wfile.write(b"hello")
        elif path == "/big.png":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the limit must hold while reading
            self.wfile.write(b"\x89PNG" + b"0" * 300_000)
        elif path == "/slow.png":  # the body trickles
            self.send_response(200)
            self.end_headers()
            self._trickle(b"0" * 40, 0.05)
        elif path == "/slow-head":  # the status line itself trickles: only a deadline over the headers stops it
            self._trickle(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n\r\n", 0.2)
        elif path == "/trickle":  # one byte a second, at most 20 s
            self._trickle(b"HTTP/1.1 200 OK\r\nContent-Type: image/png\r\n\r\n" + b"0" * 20, 1.0, limit=20)
        elif path == "/to":  # redirects to ?url=
            self.send_response(302)
            self.send_header("Location", urllib.parse.parse_qs(query)["url"][0])
            self.end_headers()
        elif path == "/loop":
            self.send_response(301)
            self.send_header("Location", "/loop")
            self.end_headers()
        else:
            self.send_response(404)
            self.end_headers()

    def _trickle(self, data: bytes, every_s: float, limit: int = 50):
        for byte in data[:limit]:
            self.wfile.write(bytes([byte]))
            time.sleep(every_s)


class _Site(http.server.ThreadingHTTPServer):
    """A test HTTP(S) server on `host` that counts the connections it accepts and records Host headers (and SNI)."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, host: str, port: int = 0, tls: bool = False):
        super().__init__((host, port), _Handler)
        self.connections, self.hosts, self.sni = 0, [], []
        if tls:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(TLS_DIR / "images.test.pem", TLS_DIR / "images.test.key")
            ctx.sni_callback = lambda sock, name, ctx: self.sni.append(name)
            self.socket = ctx.wrap_socket(self.socket, server_side=True)
        self.port = self.server_address[1]
        self.url = f"{'https' if tls else 'http'}://{host}:{self.port}"
        threading.Thread(target=self.serve_forever, daemon=True).start()

    def verify_request(self, request, client_address):
        self.connections += 1
        return True

    def handle_error(self, request, client_address):
        pass  # a client hanging up on a trickle is expected


# a self-signed certificate for images.test, valid until 2126: openssl req -x509 -newkey ec -pkeyopt
# ec_paramgen_curve:prime256v1 -nodes -days 36500 -subj /CN=images.test -addext subjectAltName=DNS:images.test
# -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,digitalSignature,keyCertSign
# -addext extendedKeyUsage=serverAuth -keyout images.test.key -out images.test.pem
TLS_DIR = Path(__file__).parent / "fixtures" / "tls"
FAILED = f"{WHERE}: the image URL could not be fetched."


@pytest.fixture(scope="module")
def site():
    """127.0.0.1: the internal service. Remote fetching must never reach it unless a test lets 127.0.0.1 through."""
    server = _Site("127.0.0.1")
    yield server
    server.shutdown()


@pytest.fixture(scope="module")
def outside():
    """127.0.0.2: plays a server on the internet (tests let exactly 127.0.0.2/32 through the address filter)."""
    server = _Site("127.0.0.2")
    yield server
    server.shutdown()


OUTSIDE = ("127.0.0.2/32",)


def _fetch_failed(url, policy):
    e = _refused(url, policy, "image_fetch_failed")
    assert e.message == FAILED, e.message


@pytest.fixture
def dns(monkeypatch):
    """Host names ending in .test resolve through the dict this returns ({name: [addresses] or an exception});
    `lookups` counts the lookups of each name."""
    table, lookups, real = {}, {}, socket.getaddrinfo

    def getaddrinfo(host, port, *args, **kwargs):
        if not str(host).endswith(".test"):
            return real(host, port, *args, **kwargs)
        lookups[host] = lookups.get(host, 0) + 1
        answer = table[host]
        if callable(answer):
            answer = answer(lookups[host])
        if isinstance(answer, BaseException):
            raise answer
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port))
                for a in answer]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    table["lookups"] = lookups
    return table


def test_remote_images_off_by_default(site):
    assert MediaPolicy().allow_remote is False
    before = site.connections
    e = _refused(site.url + "/ok.png", MediaPolicy(), "remote_images_disabled")
    assert "data: URL" in e.message and "--allow-remote-images" in e.message
    assert site.connections == before


def test_serve_flag_turns_remote_images_on():
    assert media_policy(build_parser().parse_args([])).allow_remote is False
    policy = media_policy(build_parser().parse_args(["--allow-remote-images", "--remote-timeout", "3"]))
    assert policy.allow_remote is True and policy.fetch_timeout_s == 3 and policy.allowed_networks == ()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--no-remote-images"])  # the old opt-out is gone: off is the default


NOT_PUBLIC = [
    "127.0.0.1", "127.8.9.10", "10.0.0.1", "172.16.5.4", "172.31.255.255", "192.168.1.1", "169.254.169.254",
    "100.64.0.1", "100.127.255.254", "0.0.0.0", "0.1.2.3", "224.0.0.1", "239.255.255.250", "255.255.255.255",
    "240.0.0.1", "192.0.2.1", "198.18.0.1", "192.0.0.8",
    "::1", "::", "fc00::1", "fd12:3456::1", "fe80::1", "fe80::1%1", "fec0::1", "ff02::1", "ff0e::1",
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1", "::127.0.0.1", "64:ff9b::a9fe:a9fe",
    "2002:7f00:1::", "2002:a9fe:a9fe::1", "2001:db8::1", "2001::1", "100::1", "3fff::1"]
PUBLIC = ["8.8.8.8", "1.1.1.1", "93.184.216.34", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e",
          "::ffff:8.8.8.8", "64:ff9b::808:808"]


@pytest.mark.parametrize("address,public", [(a, False) for a in NOT_PUBLIC] + [(a, True) for a in PUBLIC])
def test_address_filter(address, public):
    assert remote.is_public(ipaddress.ip_address(address)) is public


def test_internal_service_gets_no_connection(site, dns):
    """127.0.0.1 is never connected to: not by address, another spelling of it, a name, a name with one internal
    address among public ones, nor a name that points inside on its second lookup (DNS rebinding)."""
    dns["internal.test"] = ["10.1.2.3", "127.0.0.1"]
    dns["mixed.test"] = ["8.8.8.8", "127.0.0.1"]  # every address must be public, not just the first
    dns["rebind.test"] = lambda n: ["127.0.0.2"] if n == 1 else ["127.0.0.1"]
    policy = MediaPolicy(allow_remote=True, allowed_networks=OUTSIDE, fetch_timeout_s=2)
    port = site.port
    stand_in = _Site("127.0.0.2", port)  # an outside server on the internal service's port
    before = site.connections
    try:
        for url in (f"http://127.0.0.1:{port}/ok.png", f"http://localhost:{port}/ok.png",
                    f"http://2130706433:{port}/ok.png", f"http://0x7f.1:{port}/ok.png", f"http://0.0.0.0:{port}/ok.png",
                    f"http://[::ffff:127.0.0.1]:{port}/ok.png", f"http://[::1]:{port}/ok.png",
                    f"https://127.0.0.1:{port}/ok.png", f"http://internal.test:{port}/ok.png",
                    f"http://mixed.test:{port}/ok.png", "http://169.254.169.254/latest/meta-data/"):
            _fetch_failed(url, policy)
        assert load_image(f"http://rebind.test:{port}/ok.png", policy, WHERE).size == (12, 6)
        assert dns["lookups"]["rebind.test"] == 1 and stand_in.hosts == [f"rebind.test:{port}"]  # Host keeps the name
    finally:
        stand_in.shutdown()
    assert site.connections == before


def test_redirects_are_vetted_at_every_hop(site, outside):
    policy = MediaPolicy(allow_remote=True, allowed_networks=OUTSIDE, fetch_timeout_s=2)
    assert load_image(outside.url + "/ok.png", policy, WHERE).size == (12, 6)  # the stand-in is reachable
    assert load_image(outside.url + "/to?url=/ok.png", policy, WHERE).size == (12, 6)  # redirects are followed
    before = site.connections
    for target in (f"{site.url}/ok.png", f"http://localhost:{site.port}/ok.png", "file:///etc/passwd"):
        _fetch_failed(outside.url + "/to?url=" + urllib.parse.quote(target, safe=""), policy)
    assert site.connections == before
    n = len(outside.hosts)
    _fetch_failed(outside.url + "/loop", policy)
    assert len(outside.hosts) - n == 6  # the first request and 5 redirects, then it gives up


def test_https_uses_the_host_name_for_sni_and_certificate(dns, monkeypatch):
    server = _Site("127.0.0.2", tls=True)
    try:
        dns["images.test"] = ["127.0.0.2"]
        dns["other.test"] = ["127.0.0.2"]
        policy = MediaPolicy(allow_remote=True, allowed_networks=OUTSIDE, fetch_timeout_s=3)
        _fetch_failed(f"https://images.test:{server.port}/ok.png", policy)  # the system CAs do not know the test CA
        trusting = ssl.create_default_context(cafile=str(TLS_DIR / "images.test.pem"))
        monkeypatch.setattr(remote, "_tls_context", lambda: trusting)
        assert load_image(f"https://images.test:{server.port}/ok.png", policy, WHERE).size == (12, 6)
        assert server.sni[-1] == "images.test" and server.hosts[-1] == f"images.test:{server.port}"
        _fetch_failed(f"https://other.test:{server.port}/ok.png", policy)  # the certificate names images.test only
    finally:
        server.shutdown()


def test_every_remote_failure_is_one_uniform_error(site, dns, caplog):
    dns["nowhere.test"] = socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    local = MediaPolicy(allow_remote=True, allowed_networks=("127.0.0.0/8",), max_bytes=200_000,
                        fetch_timeout_s=0.8)
    assert load_image(site.url + "/ok.png", local, WHERE).size == (12, 6)
    caplog.set_level(logging.INFO, logger="lfm2vl.serve")
    cases = {
        site.url + "/missing.png": "HTTP 404",                      # an error status
        site.url + "/text": "could not be decoded",                  # fetched, but not an image
        site.url + "/big.png": "over the limit of 200000",          # too large
        site.url + "/slow.png": "deadline",                          # too slow
        f"http://127.0.0.1:{free_port()}/a.png": "Connection refused",  # nothing listens
        "http://nowhere.test/a.png": "Name or service not known",   # DNS failure
        "http://127.0.0.1:99999/a.png": "malformed URL",            # a port out of range
        site.url + "/to?url=file:///etc/passwd": "not http(s)",     # a redirect off http(s)
    }
    for url, reason in cases.items():
        caplog.clear()
        _fetch_failed(url, local)
        assert reason in caplog.text, (url, caplog.text)  # the real reason is in the server's log only
    few_pixels = MediaPolicy(allow_remote=True, allowed_networks=("127.0.0.0/8",), max_pixels=50)
    _fetch_failed(site.url + "/ok.png", few_pixels)  # a real image, over the pixel limit
    _fetch_failed(site.url + "/ok.png", MediaPolicy(allow_remote=True))  # a refused address reads the same


def test_one_deadline_covers_dns_and_headers(site, dns):
    local = MediaPolicy(allow_remote=True, allowed_networks=("127.0.0.0/8",), fetch_timeout_s=0.8)
    t = time.monotonic()
    _fetch_failed(site.url + "/slow-head", local)  # every read is quick, the whole answer is not
    assert time.monotonic() - t < 2.5
    dns["slow-dns.test"] = lambda n: time.sleep(3) or ["127.0.0.1"]
    t = time.monotonic()
    _fetch_failed(f"http://slow-dns.test:{site.port}/ok.png", local)
    assert time.monotonic() - t < 2.5


MODEL = "fake-vl"


def _post(url, body):
    t = time.monotonic()
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
    return r, time.monotonic() - t


def test_slow_image_servers_do_not_delay_text_requests(site):
    """45 requests whose image trickles 1 byte/s: a text-only request still answers at once, the image requests fail
    with the uniform error at the deadline, and at most the fetch pool's size of them ever connects."""
    deadline_s = 3.0
    engine = FakeEngine()
    scheduler = Scheduler(engine, max_batch=8, make_generator=FakeBatchGenerator)
    policy = MediaPolicy(allow_remote=True, allowed_networks=("127.0.0.1/32",), fetch_timeout_s=deadline_s)
    settings = ServerSettings(model_id=MODEL, max_images=3, default_max_tokens=8, media=policy)
    slow = {"model": MODEL, "max_tokens": 4, "messages": [
        {"role": "user", "content": [image_part(site.url + "/trickle"), {"type": "text", "text": "what?"}]}]}
    text = {"model": MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hello"}]}
    with ThreadServer(create_app(engine, scheduler, settings)) as server:
        before = site.connections
        too_many = {**slow, "messages": [{"role": "user", "content": [image_part(site.url + "/ok.png")] * 4}]}
        r, _ = _post(server.url, too_many)  # the image count is checked before anything is fetched
        assert r.status_code == 400 and r.json()["error"]["code"] == "too_many_images"
        assert site.connections == before
        with cf.ThreadPoolExecutor(45) as pool:
            futures = [pool.submit(_post, server.url, slow) for _ in range(45)]
            wait = time.monotonic() + 10
            while site.connections == before:  # the fetches are under way
                assert time.monotonic() < wait, "no image fetch started"
                time.sleep(0.01)
            answer, text_s = _post(server.url, text)
            pending, connected = sum(not f.done() for f in futures), site.connections - before
            slow_results = [f.result() for f in futures]
    assert answer.status_code == 200 and text_s < 3
    assert pending == 45  # the text answer came while every image request was still waiting for its image
    assert connected <= policy.fetch_workers  # the fetches ran on the pool: at most its size at once
    for r, took in slow_results:
        assert r.status_code == 400 and r.json()["error"]["message"] == "messages[0].content[0]: the image URL " \
            "could not be fetched." and r.json()["error"]["code"] == "image_fetch_failed"
        assert took < deadline_s + 4


def test_serve_refuses_a_remote_timeout_not_above_zero(capsys):
    for value in ("0", "-1", "nan"):
        with pytest.raises(SystemExit) as exit:  # argparse's way: usage, one line, status 2
            main(["--remote-timeout", value])  # refused before any model is loaded
        assert exit.value.code == 2
        assert "--remote-timeout must be a positive number" in capsys.readouterr().err
