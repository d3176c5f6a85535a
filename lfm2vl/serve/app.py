"""FastAPI routes of the OpenAI-compatible server: /v1/chat/completions, /v1/models, /health (and the chat page at /,
page.py).

A request is validated (schemas.py), its remote images (if the server allows them) are fetched on the media pool's
own threads (so slow image servers never hold the threads that serve other requests), its images are decoded and the
prompt is prepared by the engine in a worker thread (so a bad request fails with a 400 before anything streams),
then it is handed to the scheduler thread.
Streaming answers are server-sent events: a role chunk, content chunks, a finish chunk, an optional usage chunk,
then `data: [DONE]`. With tools, the text from a `<|tool_call_start|>` token on is held back; when the answer ends
it goes out as tool-call deltas (one chunk per call, OpenAI's shape) with finish_reason "tool_calls", or as content
if it did not parse as a call. If the client goes away (stream or not), the generation is cancelled and its row freed.
A pure-ASGI guard in front checks the API key (401) and the body size (413) before the body is parsed; HEAD is
answered wherever GET is (methods.py).
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import translate
from .errors import APIError, install_handlers
from .media import FetchPool
from .methods import HeadAsGet
from .page import add_page
from .scheduler import RequestFailed, Scheduler, SchedulerError, Ticket
from .schemas import ChatCompletion, ChatCompletionRequest
from .settings import ServerSettings

if TYPE_CHECKING:  # annotations only: the caller brings the engine, whose modules load with the model
    from lfm2vl.engine import Engine
    from lfm2vl.generate.request import Event, Request as EngineRequest, Result

log = logging.getLogger("lfm2vl.serve")


def create_app(engine: Engine, scheduler: Scheduler, settings: ServerSettings) -> FastAPI:
    fetcher = FetchPool(settings.media)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.stop()
        fetcher.close()

    app = FastAPI(title="lfm2vl", summary="OpenAI-compatible LFM2-VL server", lifespan=lifespan)
    install_handlers(app)
    app.add_middleware(HeadAsGet, router=app.router)  # inside the guard: HEAD /v1/... needs the key too
    app.add_middleware(_Guard, api_key=settings.api_key or None, max_body_bytes=settings.max_body_bytes,
                       after=scheduler.touch)
    created_at = int(time.time())

    if settings.ui:
        add_page(app, settings)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_id, **scheduler.stats()}

    def model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": created_at, "owned_by": "lfm2vl",
                "context_length": settings.context_len}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card(settings.model_id)]}

    @app.get("/v1/models/{model:path}")  # ids may contain slashes (hub ids)
    async def model(model: str):
        if model != settings.model_id and model not in settings.aliases:
            raise APIError(404, f"The model `{model}` does not exist; this server serves `{settings.model_id}`.",
                           param="model", code="model_not_found")
        return model_card(model)

    # `responses` documents the shape without filtering the dict through it (that would drop e.g. usage details)
    @app.post("/v1/chat/completions", responses={200: {"model": ChatCompletion}})
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if body.model != settings.model_id and body.model not in settings.aliases:
            raise APIError(404, f"The model `{body.model}` does not exist; this server serves `{settings.model_id}`.",
                           param="model", code="model_not_found")
        translate.check_image_count(body, settings.max_images)  # before anything is fetched
        fetched = await fetcher.fetch_all(translate.remote_images(body))
        req = await run_in_threadpool(_prepare, engine, body, settings, fetched)
        try:
            ticket = scheduler.submit(req)
        except SchedulerError as e:
            raise APIError(503, f"The server cannot take requests: {e}.", type="server_error") from None
        del req  # the scheduler owns it now: its pixel tensors go when the generation ends
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            hold_from = _call_start(engine) if body.tools and body.tool_choice != "none" else None
            return StreamingResponse(_sse(engine, scheduler, ticket, cid, created, body.model, include_usage,
                                          hold_from),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _collect(engine, scheduler, ticket, request, cid, created, body.model)

    return app


def _prepare(engine: Engine, body: ChatCompletionRequest, settings: ServerSettings,
             fetched: dict | None = None) -> EngineRequest:
    """Decode images (remote ones `fetched` beforehand), let the engine build the Request, and check it fits the
    context. Runs in a worker thread."""
    translate.check_image_budget(body, settings.max_image_tokens)
    messages, opts = translate.to_engine(body, settings.media, settings.max_images, fetched)
    asked = translate.requested_max_tokens(body)
    opts["max_new_tokens"] = asked if asked is not None else settings.default_max_tokens
    try:
        req = engine.prepare(messages, context=settings.context_len, **opts)
    except ValueError as e:  # the engine's own checks (e.g. the model's context): its message names the values
        code = "context_length_exceeded" if "context" in str(e) else None
        raise APIError(400, str(e)[:1].upper() + str(e)[1:], param="messages", code=code) from None
    n_prompt, ctx = len(req.input_ids), settings.context_len  # the engine refused a prompt that fills ctx
    room = ctx - n_prompt
    if asked is not None and asked > room:
        raise APIError(400, f"This server's context holds {ctx} tokens, but {n_prompt + asked} were requested "
                            f"({n_prompt} in the prompt, {asked} for the completion); lower max_tokens to at most "
                            f"{room}.", code="context_length_exceeded",
                       param="max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens")
    if opts["max_new_tokens"] > room:  # the server default does not fit: shrink it to the room left
        req = dataclasses.replace(req, max_new_tokens=room)
    return req


def _call_start(engine: Engine) -> int | None:
    """The id of the token that opens a tool call (None: the tokenizer has none)."""
    from lfm2vl.processor.tools import TOOL_CALL

    return engine.tokenizer.token_to_id(TOOL_CALL[0])


def _token_text(engine: Engine):
    return lambda tid: engine.tokenizer.decode([tid])


def _usage(result: Result) -> dict:
    """Usage from the finished request's Result (with the prompt tokens whose cache was reused)."""
    return translate.usage(result.prompt_tokens, result.completion_tokens, result.cached_tokens, result.image_tokens)


def _logprob_entry(event: Event, token_text) -> dict:
    return translate.logprob_entry(event.token_id, event.logprob, event.top_logprobs, token_text)


def _raise_for(item: Event | Exception) -> None:
    if isinstance(item, ValueError):
        raise APIError(400, str(item), param=None if isinstance(item, RequestFailed) else "messages")
    if isinstance(item, Exception):
        text = str(item)
        raise APIError(503 if "shutting down" in text else 500, f"{text[:1].upper()}{text[1:]}; it was logged.",
                       type="server_error")


async def _collect(engine: Engine, scheduler: Scheduler, ticket: Ticket, request: Request, cid, created, model):
    pieces, logprobs = [], []
    token_text = _token_text(engine)
    next_check, getter = time.monotonic() + 0.25, None
    try:
        while True:
            if time.monotonic() >= next_check:  # nobody reads a non-streamed answer: look for the client now and then
                next_check = time.monotonic() + 0.25
                if await request.is_disconnected():
                    log.info("client gone before %s finished; cancelled", cid)
                    return JSONResponse({}, status_code=499)
            # one get() task kept across timeouts: cancelling a get() that just won its item could drop the item
            getter = getter or asyncio.ensure_future(ticket.events.get())
            done, _ = await asyncio.wait({getter}, timeout=0.25)
            if not done:
                continue
            item, getter = getter.result(), None
            _raise_for(item)
            pieces.append(item.text)
            if item.logprob is not None:
                logprobs.append(_logprob_entry(item, token_text))
            if item.finish_reason is not None:
                result = item.result
                if result.tool_calls:
                    return translate.completion(cid, created, model, result.text, "tool_calls", _usage(result),
                                                logprobs or None, tool_calls=result.tool_calls,
                                                timing=translate.timings(result))
                return translate.completion(cid, created, model, "".join(pieces), item.finish_reason,
                                            _usage(result), logprobs or None, timing=translate.timings(result))
    finally:
        if getter is not None:
            getter.cancel()
        scheduler.cancel(ticket)


def _sse_line(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n\n"


async def _sse(engine: Engine, scheduler: Scheduler, ticket: Ticket, cid, created, model, include_usage,
               hold_from: int | None = None):
    """hold_from: the token id from which text is held back as a possible tool call (None: never)."""
    pending_lp = []  # logprobs of tokens whose text is held back ride on the next chunk
    held: list[str] | None = None  # text since a tool call opened
    token_text = _token_text(engine)
    try:
        yield _sse_line(translate.chunk(cid, created, model, {"role": "assistant", "content": ""},
                                        with_usage_field=include_usage))
        while True:
            item = await ticket.events.get()
            try:
                _raise_for(item)
            except APIError as e:
                yield _sse_line(e.body())
                return
            if item.logprob is not None:
                pending_lp.append(_logprob_entry(item, token_text))
            if hold_from is not None and item.token_id == hold_from and held is None:
                held = []
            if held is not None:
                held.append(item.text)
            elif item.text:
                yield _sse_line(translate.chunk(cid, created, model, {"content": item.text},
                                                with_usage_field=include_usage, logprobs=pending_lp or None))
                pending_lp = []
            if item.finish_reason is not None:
                reason, calls = item.finish_reason, item.result.tool_calls
                if calls:
                    reason = "tool_calls"
                    for i, call in enumerate(calls):
                        yield _sse_line(translate.chunk(cid, created, model, {"tool_calls": [{"index": i, **call}]},
                                                        with_usage_field=include_usage))
                elif held:  # not a call after all: the text goes out as it is
                    yield _sse_line(translate.chunk(cid, created, model, {"content": "".join(held)},
                                                    with_usage_field=include_usage, logprobs=pending_lp or None))
                    pending_lp = []
                yield _sse_line(translate.chunk(cid, created, model, {}, reason, with_usage_field=include_usage,
                                                logprobs=pending_lp or None, timing=translate.timings(item.result)))
                if include_usage:
                    yield _sse_line(translate.chunk(cid, created, model, None, use=_usage(item.result)))
                yield b"data: [DONE]\n\n"
                return
    finally:  # also runs when Starlette cancels the stream because the client disconnected
        if not ticket.done:
            log.info("stream %s ended early (client gone); cancelled", cid)
        scheduler.cancel(ticket)


class _Guard:
    """Pure-ASGI checks before any parsing: API key (401) on /v1/*, body size (413) from the header or while read;
    `after()` runs when a request to /v1/* has ended, however it ended.

    Pure ASGI rather than BaseHTTPMiddleware so streaming responses and disconnect detection pass through untouched.
    """

    def __init__(self, app, api_key: str | None, max_body_bytes: int, after=None):
        self.app, self.api_key, self.max_body, self.after = app, api_key, max_body_bytes, after

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.api_key is not None and scope["path"].startswith("/v1"):
            auth = headers.get("authorization", "")
            if not auth:
                return await APIError(401, "Missing API key: send the header `Authorization: Bearer <key>`.",
                                      code="invalid_api_key").response()(scope, receive, send)
            token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(token.encode(), self.api_key.encode()):
                return await APIError(401, "Incorrect API key provided.",
                                      code="invalid_api_key").response()(scope, receive, send)
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.max_body:
            return await _too_large(int(length), self.max_body)(scope, receive, send)
        seen = 0

        async def limited_receive():  # no or a lying Content-Length: count while the body is read
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:  # an HTTPException passes FastAPI's body reader unchanged -> 413
                    raise StarletteHTTPException(413, _too_large_message(seen, self.max_body))
            return message

        try:
            await self.app(scope, limited_receive, send)
        finally:
            if self.after is not None and scope["path"].startswith("/v1"):
                self.after()


def _too_large_message(size: int, limit: int) -> str:
    return f"The request body is over {limit} bytes (got at least {size}); send smaller or fewer images."


def _too_large(size: int, limit: int) -> JSONResponse:
    return APIError(413, _too_large_message(size, limit), code="request_too_large").response()
