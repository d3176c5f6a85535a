"""An OpenAI-compatible chat endpoint (lfm2vl serve, vLLM, a judge model): the one place that turns a URL into an
HTTP client, names the endpoint in errors and finds the served model's name.

    ep = Endpoint("http://127.0.0.1:8000/v1", api_key=None, timeout_s=600, what="server", error=RunError)
    ep.client.post("/v1/chat/completions", json=...)      # the caller owns its request and its retries
    ep.first_model("--served-model")                       # the first id of /v1/models, or `error` naming the flag

The URL may end in /v1 or /v1/chat/completions; requests go to <base>/v1/... . `check_url` is the check of a URL
(the command line runs it before any work; Endpoint runs it too). Errors are raised as `error` (the caller's
exception class, so its command reports them as its own).
"""
from __future__ import annotations


def check_url(url: str) -> str:
    """`url` itself when it is an http(s) URL (files/urls.py rules) that httpx can also parse, else ValueError saying
    "'URL' is not a valid http(s) URL (REASON)". The command line checks --server and --judge with it."""
    import httpx

    from ..files.urls import check_http_url

    check_http_url(url)
    try:
        httpx.URL(url)
    except httpx.InvalidURL as e:  # e.g. an international host name that IDNA 2008 refuses
        raise ValueError(f"{url!r} is not a valid http(s) URL ({e})") from None
    return url


class Endpoint:
    def __init__(self, url: str, *, api_key: str | None = None, timeout_s: float = 600.0,
                 connections: int | None = None, what: str = "server", error: type[Exception] = RuntimeError):
        import httpx

        try:
            check_url(url)
        except ValueError as e:
            raise error(f"{what}: {e}") from None
        self.url, self.what, self.error = url, what, error
        base = url.rstrip("/").removesuffix("/chat/completions").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=connections) if connections else httpx.Limits()
        self.client = httpx.Client(base_url=base, headers=headers, limits=limits,
                                   timeout=httpx.Timeout(timeout_s, connect=10.0))

    def unreachable(self, e: Exception) -> Exception:
        return self.error(f"cannot reach the {self.what} at {self.url}: {e}")

    def first_model(self, flag: str) -> str:
        """The first model id the endpoint lists at /v1/models; `flag` is the option that names one instead."""
        import httpx

        try:
            r = self.client.get("/v1/models")
        except httpx.TransportError as e:
            raise self.unreachable(e) from None
        try:
            r.raise_for_status()
            return r.json()["data"][0]["id"]
        except Exception:  # noqa: BLE001 - any odd answer: ask for the name
            raise self.error(f"the {self.what} at {self.url} did not list a model at /v1/models (HTTP "
                             f"{r.status_code}); pass {flag} NAME") from None

    def close(self) -> None:
        self.client.close()
