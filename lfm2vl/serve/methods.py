"""HTTP methods beyond the routes' own: HEAD wherever GET is served, and the `Allow` header of a 405.

FastAPI routes answer only the methods they are declared with. HeadAsGet, a pure-ASGI layer in front of the
router, answers HEAD on a path that has a GET route with that route's response: the same status and headers
(Content-Length included), no body. Every HEAD response leaves without a body, errors included. `allowed` lists
the methods a path answers, for the `Allow` header every 405 carries (errors.py).
"""
from __future__ import annotations

from starlette.routing import Match


def allowed(routes, scope) -> list[str]:
    """The methods some route of `routes` answers on the scope's path (HEAD where GET is), sorted."""
    methods: set[str] = set()
    for route in routes:
        match, _ = route.matches(scope)
        if match != Match.NONE:
            methods |= set(getattr(route, "methods", None) or ())
    if "GET" in methods:
        methods.add("HEAD")
    return sorted(methods)


class HeadAsGet:
    """HEAD on a path with a GET route runs that route as a GET; any HEAD response is sent without its body."""

    def __init__(self, app, router):
        self.app, self.router = app, router

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] != "HEAD":
            return await self.app(scope, receive, send)
        as_get = {**scope, "method": "GET"}
        if any(route.matches(as_get)[0] == Match.FULL for route in self.router.routes):
            scope = as_get

        async def headers_only(message):
            if message["type"] == "http.response.body":
                if message.get("more_body", False):
                    return
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app(scope, receive, headers_only)
