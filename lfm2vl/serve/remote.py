"""Fetch one http(s) URL for the server without letting a client reach the server's own network.

- A host name is resolved once and every address it resolves to must be public (`is_public`: no loopback, private,
  link-local, carrier-grade NAT, multicast, unspecified, reserved or documentation addresses, also when embedded in
  an IPv6 address). The socket connects to a vetted address itself, so no second DNS answer (rebinding) is ever
  used; https keeps the host name for SNI, the certificate check and the Host header.
- Redirects (301, 302, 303, 307, 308) are followed here, at most `max_redirects`, to http(s) only, and every hop is
  resolved and vetted again.
- One deadline covers the whole fetch: DNS, connect, TLS handshake, request, headers, every redirect and the body;
  each read waits at most the time left, so a server that trickles bytes cannot stretch it.
- Proxy settings from the environment are not used: the address check needs the real peer.
Every failure raises FetchError with the real reason, for the server's log; the server shows clients one uniform text.
"""
from __future__ import annotations

import concurrent.futures
import functools
import http.client
import io
import ipaddress
import socket
import ssl
import time
import urllib.parse

from ..files.urls import split_http_url

REDIRECTS = {301, 302, 303, 307, 308}

# Addresses that are never public, checked on top of ipaddress' `is_global` (whose tables vary across Python versions)
_BLOCKED = tuple(ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12", "192.0.0.0/24",
    "192.0.2.0/24", "192.88.99.0/24", "192.168.0.0/16", "198.18.0.0/15", "198.51.100.0/24", "203.0.113.0/24",
    "224.0.0.0/4", "240.0.0.0/4",
    "::/128", "::1/128", "100::/64", "2001::/23", "2001:db8::/32", "3fff::/20", "fc00::/7", "fe80::/10", "fec0::/10",
    "ff00::/8"))
_GLOBAL_UNICAST_V6 = ipaddress.ip_network("2000::/3")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")  # IPv6 that a NAT64 gateway turns into the IPv4 in its last 32 bits

# getaddrinfo cannot be interrupted: lookups run here so a fetch stops waiting for one at its deadline
_resolver = concurrent.futures.ThreadPoolExecutor(max_workers=8, thread_name_prefix="lfm2vl-dns")


class FetchError(Exception):
    """Why a fetch failed (for the server's log, never for the client)."""


Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def is_public(ip: Address) -> bool:
    """True for an address on the public internet; an IPv6 address that carries an IPv4 one is judged by that."""
    if ip.version == 6:
        embedded = ip.ipv4_mapped or ip.sixtofour
        if embedded is None and ip in _NAT64:
            embedded = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
        if embedded is not None:
            return is_public(embedded)
        if ip.scope_id or ip not in _GLOBAL_UNICAST_V6:
            return False
    return ip.is_global and not ip.is_multicast and not any(ip in net for net in _BLOCKED)


def fetch(url: str, *, deadline: float, max_bytes: int, max_redirects: int = 5,
          allowed_networks: tuple[str, ...] = ()) -> bytes:
    """The body of `url` (a 2xx answer, at most `max_bytes`), fetched before `deadline` (time.monotonic()).

    `allowed_networks` (CIDR strings) count as public; the server never fills it from the command line or a request
    (tests use it to stand a local server in for an outside one).
    """
    allowed = tuple(ipaddress.ip_network(n) for n in allowed_networks)
    for _ in range(max_redirects + 1):
        status, location, body = _get(url, deadline, max_bytes, allowed)
        if status not in REDIRECTS:
            return body
        if not location:
            raise FetchError(f"HTTP {status} without a Location header from {_origin(url)}")
        try:
            url = urllib.parse.urljoin(url, location)
        except ValueError as e:
            raise FetchError(f"malformed redirect from {_origin(url)}: {e}") from None
    raise FetchError(f"more than {max_redirects} redirects, the last to {_origin(url)}")


def _origin(url: str) -> str:
    """scheme://host:port of a URL, for logs (its path and query may carry secrets)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}"


def _left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the fetch deadline passed")
    return left


def _get(url: str, deadline: float, max_bytes: int, allowed) -> tuple[int, str | None, bytes]:
    """One request: (status, Location, body); the body is read only for a 2xx answer."""
    try:
        parts = split_http_url(url)
        host = parts.host.encode("idna").decode("ascii")
    except (ValueError, UnicodeError) as e:
        raise FetchError(f"malformed URL: {e}") from None
    scheme, port = parts.scheme, parts.port
    sock = None
    try:
        sock = _connect(_resolve(host, port, deadline, allowed), deadline)
        if scheme == "https":
            sock.settimeout(_left(deadline))  # the handshake's total time (CPython's ssl module keeps one deadline)
            sock = _tls_context().wrap_socket(sock, server_hostname=host)
        conn = http.client.HTTPConnection(host, port)
        conn.sock = _TimedSocket(sock, deadline)
        shown = f"[{host}]" if ":" in host else host
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn.request("GET", target, headers={
            "Host": shown if parts.default_port else f"{shown}:{port}",
            "User-Agent": "lfm2vl-server", "Accept": "image/*", "Connection": "close"})
        resp = conn.getresponse()
        if resp.status in REDIRECTS:
            return resp.status, resp.getheader("Location"), b""
        if not 200 <= resp.status < 300:
            raise FetchError(f"HTTP {resp.status} from {_origin(url)}")
        size = resp.getheader("Content-Length", "")
        if size.isdigit() and int(size) > max_bytes:
            raise FetchError(f"{_origin(url)} announced {size} bytes, over the limit of {max_bytes}")
        chunks, total = [], 0
        while chunk := resp.read1(65536):
            total += len(chunk)
            if total > max_bytes:
                raise FetchError(f"the body from {_origin(url)} is over the limit of {max_bytes} bytes")
            chunks.append(chunk)
        return resp.status, None, b"".join(chunks)
    except FetchError:
        raise
    except TimeoutError:  # a read or connect that waited out the time left
        raise FetchError(f"{_origin(url)}: the fetch deadline passed") from None
    except (OSError, http.client.HTTPException, ValueError) as e:  # ssl.SSLError and TimeoutError are OSErrors
        raise FetchError(f"{_origin(url)}: {type(e).__name__}: {e}") from None
    finally:
        if sock is not None:
            sock.close()


def _resolve(host: str, port: int, deadline: float, allowed) -> list[tuple[int, tuple]]:
    """[(family, sockaddr)] of `host`, all of them public (or in `allowed`), else FetchError."""
    future = _resolver.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    try:
        infos = future.result(timeout=_left(deadline))
    except TimeoutError:
        future.cancel()
        raise FetchError(f"resolving {host} took past the deadline") from None
    except OSError as e:
        raise FetchError(f"resolving {host} failed: {e}") from None
    addrs = []
    for family, _, _, _, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        ip = ipaddress.ip_address(sockaddr[0])
        if not (is_public(ip) or any(ip in net for net in allowed)):
            raise FetchError(f"{host} resolves to {ip}, which is not a public address")
        addrs.append((family, sockaddr))
    if not addrs:
        raise FetchError(f"{host} has no IPv4 or IPv6 address")
    return addrs


def _connect(addrs: list[tuple[int, tuple]], deadline: float) -> socket.socket:
    """A TCP connection to the first vetted address that answers (no name is looked up here)."""
    error = None
    for family, sockaddr in addrs:
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.settimeout(_left(deadline))
            sock.connect(sockaddr)
            return sock
        except OSError as e:
            sock.close()
            error = e
    raise FetchError(f"connecting to {addrs[-1][1][0]} failed: {error}")


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """The system's trusted certificates with host name checking (tests substitute one that trusts their own)."""
    return ssl.create_default_context()


class _TimedSocket:
    """What http.client needs of a socket, with every send and read limited to the time left before the deadline."""

    def __init__(self, sock: socket.socket, deadline: float):
        self.sock, self.deadline = sock, deadline

    def sendall(self, data) -> None:
        self.sock.settimeout(_left(self.deadline))
        self.sock.sendall(data)

    def makefile(self, mode: str = "rb") -> io.BufferedReader:
        return io.BufferedReader(_TimedReader(self))

    def close(self) -> None:
        pass  # http.client closes a `Connection: close` connection before reading the body; _get closes the socket


class _TimedReader(io.RawIOBase):
    def __init__(self, timed: _TimedSocket):
        self.timed = timed

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        self.timed.sock.settimeout(_left(self.timed.deadline))
        return self.timed.sock.recv_into(buffer)
