"""The one check of an http(s) URL that lfm2vl connects to: an OpenAI-compatible endpoint of `lfm2vl eval`
(--server, --judge) and an image URL the server fetches (serve/remote.py).

    split_http_url("http://127.0.0.1:8000/v1")   # HttpURL(scheme='http', host='127.0.0.1', port=8000, ...)
    split_http_url("http://[::1")                # ValueError: "'[' without a matching ']'"
    check_http_url("http://[::1")                # ValueError: "'http://[::1' is not a valid http(s) URL (...)"

A URL passes when it is not empty, holds no whitespace or control character, has the scheme http or https, a host
(a name, an IPv4 address, or an IPv6 address in brackets) and, if given, a port from 1 to 65535. The ValueError's
message is the reason alone (split_http_url) or names the URL too (check_http_url). Imports nothing of lfm2vl.
"""
from __future__ import annotations

import ipaddress
import re
import urllib.parse
from typing import NamedTuple

DEFAULT_PORTS = {"http": 80, "https": 443}
_IPV4_STYLE = re.compile(r"[0-9]+\.[0-9]+\.[0-9]+\.[0-9]+")  # a host that reads as IPv4 must be a valid one


class HttpURL(NamedTuple):
    scheme: str  # "http" or "https"
    host: str    # lower-cased (an IPv6 address without its brackets)
    port: int    # as given, else the scheme's default
    path: str
    query: str

    @property
    def default_port(self) -> bool:
        return self.port == DEFAULT_PORTS[self.scheme]


def check_http_url(url: str) -> str:
    """`url` itself, or ValueError saying "'URL' is not a valid http(s) URL (REASON)"."""
    try:
        split_http_url(url)
    except ValueError as e:
        raise ValueError(f"{url!r} is not a valid http(s) URL ({e})") from None
    return url


def split_http_url(url: str) -> HttpURL:
    """`url`'s parts, or ValueError with the reason it is not a usable http(s) URL."""
    if not url:
        raise ValueError("empty")
    bad = next((c for c in url if c.isspace() or not c.isprintable()), None)
    if bad is not None:
        raise ValueError(f"it holds whitespace or a control character, {bad!r}")
    if "://" not in url:
        try:  # "localhost:8000": say what is missing, and what else is wrong with the rest
            split_http_url("http://" + url)
        except ValueError as e:
            raise ValueError(f"no scheme: it starts with neither http:// nor https://; also {e}") from None
        raise ValueError("no scheme: it starts with neither http:// nor https://")
    scheme = url.partition("://")[0].lower()
    if scheme not in DEFAULT_PORTS:
        raise ValueError(f"the scheme {scheme!r} is not http(s)")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as e:
        netloc = url.partition("://")[2].split("/", 1)[0]
        if netloc.count("[") != netloc.count("]"):
            raise ValueError("'[' without a matching ']'") from None
        if "[" in netloc:
            raise ValueError(f"{netloc[netloc.find('['):netloc.find(']') + 1]} is not an IPv6 address") from None
        raise ValueError(f"invalid host: {e}") from None
    hostport = parts.netloc.rpartition("@")[2]
    host = parts.hostname or ""
    if not host:
        raise ValueError("no host")
    if hostport.startswith("["):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"[{host}] is not an IPv6 address") from None
        rest = hostport.partition("]")[2]
        if rest and not rest.startswith(":"):
            raise ValueError(f"{rest!r} after the IPv6 address where ':PORT' belongs")
        port_text = rest[1:]
    else:
        port_text = hostport.partition(":")[2]
        if _IPV4_STYLE.fullmatch(host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{host} is not an IPv4 address") from None
        elif not host.isascii():
            try:
                host.encode("idna")
            except UnicodeError:
                raise ValueError(f"the host {host!r} is not a valid domain name") from None
    if port_text and not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"the port {port_text!r} is not a number from 1 to 65535")
    port = int(port_text) if port_text else DEFAULT_PORTS[scheme]
    if not 1 <= port <= 65535:
        raise ValueError(f"port {port} is out of range 1-65535")
    return HttpURL(scheme, host, port, parts.path, parts.query)
