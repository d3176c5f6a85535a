"""OpenAI's error shape and the handlers that make every failure use it.

Every error leaves the server as `{"error": {"message", "type", "param", "code"}}` with the status OpenAI uses
(400 bad request, 401 key, 404 model or route, 405 method, with an `Allow` header, 413 body, 500 server). Unexpected
exceptions are logged with their traceback on the server side and answered with a generic 500: no traceback ever
reaches the client.
"""
from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .methods import allowed

log = logging.getLogger("lfm2vl.serve")

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "rate_limit_error", 503: "server_error"}


class APIError(Exception):
    """An error for the client: raise it anywhere in a request and the handler answers in OpenAI's shape."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        headers = {**({"WWW-Authenticate": "Bearer"} if self.status == 401 else {}), **(headers or {})}
        return JSONResponse(self.body(), status_code=self.status, headers=headers or None)


_TYPE_NAMES = {"str", "int", "float", "bool", "dict", "list", "none", "json-or-python"}


def loc_to_param(loc) -> str | None:
    """('body', 'messages', 0, 'content', 'list[...]', 1, 'text') -> 'messages[0].content[1].text' (OpenAI's spelling).

    pydantic puts union branch names ('str', 'list[...]') and discriminator tags in the location; they mean nothing
    to a client, so they are dropped (a tag is recognised by being repeated by the field name after it).
    """
    parts = [p for p in loc if not (isinstance(p, str) and (p in _TYPE_NAMES or "[" in p))]
    if parts[:1] == ["body"]:
        parts = parts[1:]
    parts = [p for i, p in enumerate(parts) if not (i + 1 < len(parts) and parts[i + 1] == p)]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


_NOT_AN_OBJECT = ("missing", "model_attributes_type", "model_type", "dict_type")  # the body as a whole


def _body_message(body) -> str:
    """The body is no JSON object (empty, not sent as JSON, or another JSON value): what it must be instead."""
    if body is None or body == b"":
        got = "it is empty"
    elif isinstance(body, bytes):
        got = "it was not sent as JSON (Content-Type: application/json)"
    else:
        kinds = ((bool, "boolean"), (int, "number"), (float, "number"), (str, "string"), (list, "array"))
        got = "it is a JSON " + next((k for t, k in kinds if isinstance(body, t)), "value")
    return f"The request body must be a JSON object with the fields model and messages; {got}."


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "Invalid request body.", None
    first = max(errors, key=lambda e: len(e.get("loc", ())))  # of a union's branch errors, the deepest is the one meant
    if first.get("type") == "json_invalid":
        ctx = first.get("ctx") or {}
        return f"The request body is not valid JSON: {ctx.get('error', 'parse error')}.", None
    if tuple(first.get("loc", ())) == ("body",) and first.get("type") in _NOT_AN_OBJECT:
        return _body_message(first.get("input")), None
    param = loc_to_param(first.get("loc", ()))
    msg = first.get("msg", "invalid value")
    if msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    text = f"{param}: {msg}" if param else msg
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return text, param


def install_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        message, param = _validation_message(exc)
        return APIError(400, message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        headers = None
        if exc.status_code == 404:
            message = f"Unknown route {request.method} {request.url.path}."
        elif exc.status_code == 405:
            methods = allowed(request.app.router.routes, request.scope)
            message = f"Method {request.method} is not allowed on {request.url.path}; it takes {', '.join(methods)}."
            headers = {"Allow": ", ".join(methods)}
        code = {413: "request_too_large"}.get(exc.status_code)
        return APIError(exc.status_code, message, code=code).response(headers)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return APIError(500, "The server had an internal error while processing the request; it was logged.",
                        type="server_error").response()
