"""Server logic against a fake engine (tests/server_fake.py) in an in-process uvicorn: scheduling, cancellation,
SSE framing and every error path. The end-to-end proof on a real checkpoint is tests/test_server.py."""
from __future__ import annotations

import base64
import concurrent.futures as cf
import json
import time

import httpx
import openai
import pytest

from lfm2vl.serve.app import ServerSettings, create_app
from lfm2vl.serve.media import MediaPolicy
from lfm2vl.serve.scheduler import Scheduler
from server_fake import FakeBatchGenerator, FakeEngine
from server_util import ThreadServer, image_data_url, image_part, post_raw, sse_events
from server_util import openai_error as _error

KEY = "sk-test-key"
MODEL = "fake-vl"


@pytest.fixture(scope="module")
def served():
    engine = FakeEngine(step_delay_s=0.002)
    scheduler = Scheduler(engine, max_batch=8, max_seq_len=4096, prefill_chunk=64, make_generator=FakeBatchGenerator)
    settings = ServerSettings(model_id=MODEL, api_key=KEY, max_body_bytes=200_000, max_images=3,
                              default_max_tokens=40, context_len=600,
                              media=MediaPolicy(max_pixels=512 * 512))
    with ThreadServer(create_app(engine, scheduler, settings)) as server:
        server.engine, server.scheduler = engine, scheduler
        yield server


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0)


def _gen(served) -> FakeBatchGenerator:
    return served.scheduler.gen


def test_models_and_health(served, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(served.url + "/health").json()
    assert health["status"] == "ok" and health["model"] == MODEL


def test_plain_answer_usage_and_image(served, client):
    messages = [{"role": "user", "content": [image_part(image_data_url()), {"type": "text", "text": "hi"}]}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    prepared = served.engine.prepared[-1]
    img = prepared["messages"][0]["content"][0]["image"]
    assert img.size == (64, 48) and img.mode == "RGB"
    assert prepared["max_new_tokens"] == 12 and prepared["temperature"] == 0
    req = served.engine.prepare(prepared["messages"], **{k: v for k, v in prepared.items() if k != "messages"})
    assert r.choices[0].message.content == _gen(served).expected(req)
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.role == "assistant"
    assert r.usage.prompt_tokens == len(req.input_ids) and r.usage.completion_tokens == 12
    assert r.usage.total_tokens == r.usage.prompt_tokens + 12
    assert r.usage.prompt_tokens_details.cached_tokens == 0  # the usage is the Result's, reused tokens included


def test_stream_framing_equals_plain(served, client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"},
                {"role": "assistant", "content": "hi!"}, {"role": "user", "content": "again"}]
    plain = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finals) == 1 and finals[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20
    assert chunks[-1].usage.prompt_tokens == plain.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])
    with httpx.stream("POST", served.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": MODEL, "messages": messages, "max_tokens": 5, "stream": True}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and all("usage" not in e for e in events[:-1])


def test_stop_strings_and_options(served, client):
    messages = [{"role": "user", "content": "stop test"}]
    full = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0)
    text = full.choices[0].message.content
    stop = text[10:12]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0, stop=[stop, "@@"])
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == text[:text.find(stop)]
    streamed = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=30, temperature=0,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[:text.find(stop)]
    client.chat.completions.create(model=MODEL, messages=messages, max_completion_tokens=3, top_p=0.9, seed=1,
                                   presence_penalty=0.5, frequency_penalty=0.2, n=1,
                                   extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1,
                                               "min_image_tokens": 32, "max_image_tokens": 64,
                                               "do_image_splitting": False})
    opts = served.engine.prepared[-1]
    assert opts["max_new_tokens"] == 3 and opts["top_k"] == 5 and opts["do_image_splitting"] is False
    assert opts["presence_penalty"] == 0.5 and opts["seed"] == 1 and opts["max_image_tokens"] == 64


def test_seed_reproducible(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "sample"}], max_tokens=16, temperature=0.9)
    a = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    b = client.chat.completions.create(seed=7, **kw).choices[0].message.content
    c = client.chat.completions.create(seed=8, **kw).choices[0].message.content
    assert a == b and a != c


def test_concurrent_streams_batch_together(served, client):
    def run(i, stream):
        kw = dict(model=MODEL, messages=[{"role": "user", "content": f"request number {i}"}],
                  max_tokens=10 + 3 * i, temperature=0)
        if not stream:
            return client.chat.completions.create(**kw).choices[0].message.content
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                       if c.choices)

    alone = [run(i, False) for i in range(16)]
    before = len(_gen(served).batch_sizes)
    with cf.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda i: run(i, True), range(16)))
    assert together == alone
    assert max(_gen(served).batch_sizes[before:]) == 8  # rows were shared (max_batch 8), not served one by one
    assert _gen(served).thread_ids == {served.scheduler._thread.ident}  # only the scheduler touches the generator


def test_disconnect_cancels_and_frees_row(served):
    gen = _gen(served)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "long"}], "max_tokens": 590, "stream": True}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
    deadline = time.time() + 5
    while gen.running or gen.waiting:
        assert time.time() < deadline, "the abandoned stream kept its row"
        time.sleep(0.02)
    assert gen.cancelled, "no cancel reached the generator"


def test_disconnect_non_streaming_cancels(served):
    gen = _gen(served)
    n = len(gen.cancelled)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "long 2"}], "max_tokens": 590}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(served.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                   timeout=0.5)
    deadline = time.time() + 5
    while len(gen.cancelled) == n or gen.running:
        assert time.time() < deadline, "the abandoned request kept its row"
        time.sleep(0.02)


# ---- errors: one test each, OpenAI's shape and status ---------------------------------------------------------

def _post(served, body, key=KEY, **kw):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return post_raw(served.url, json.dumps(body).encode() if not isinstance(body, bytes) else body, headers, **kw)


def _user(*parts):
    return {"model": MODEL, "messages": [{"role": "user", "content": list(parts)}], "max_tokens": 4}


def test_error_invalid_json(served):
    err = _error(_post(served, b'{"model": "fake-vl", "messages": [}'), 400)
    assert "not valid JSON" in err["message"]


def test_error_schema(served):
    err = _error(_post(served, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "temperature": 9}), 400)
    assert err["param"] == "temperature" and "2" in err["message"]
    err = _error(_post(served, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "top_p": 1.5}), 400)
    assert err["param"] == "top_p"
    err = _error(_post(served, {"model": MODEL, "messages": []}), 400)
    assert err["param"] == "messages"
    err = _error(_post(served, {"model": MODEL, "messages": [{"role": "user", "content": [{"type": "video"}]}]}), 400)
    assert err["param"].startswith("messages[0].content[0]")
    err = _error(_post(served, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "n": 2}), 400)
    assert err["param"] == "n" and "n must be 1" in err["message"]
    _error(_post(served, {"messages": [{"role": "user", "content": "x"}]}), 400)
    _error(_post(served, [1, 2]), 400)
    err = _error(post_raw(served.url, b'{"model": "fake-vl", "messages": [{"role": "user", "content": [{"type": '
                                      b'"text", "text": "a\\ud800"}]}]}', {"Authorization": f"Bearer {KEY}"}), 400)
    assert err["param"] == "messages[0].content[0].text" and "surrogate" in err["message"]
    err = _error(_post(served, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "seed": 2**70}), 400)
    assert err["param"] == "seed"
    err = _error(_post(served, {"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}), 400)
    assert err["param"] == "messages[0].role"


@pytest.mark.parametrize("field, value, words", [
    ("max_tokens", True, ["valid integer"]),
    ("max_tokens", 5.0, ["valid integer"]),
    ("stream", "yes", ["valid boolean"]),
    ("logprobs", 1, ["valid boolean"]),
    ("temperature", True, ["valid number"]),
    ("user", 5, ["valid string"]),
])
def test_error_lax_types(served, field, value, words):
    err = _error(_post(served, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], field: value}), 400)
    assert err["param"] == field and all(w in err["message"] for w in words), err


@pytest.mark.parametrize("content, content_type, words", [
    (b"", "application/json", ["it is empty"]),
    (b'{"model": "fake-vl", "messages": [{"role": "user", "content": "x"}]}', "text/plain", ["application/json"]),
    (b"[1, 2]", "application/json", ["JSON array"]),
])
def test_error_body_that_is_no_json_object(served, content, content_type, words):
    r = httpx.post(served.url + "/v1/chat/completions", content=content,
                   headers={"Content-Type": content_type, "Authorization": f"Bearer {KEY}"}, timeout=30)
    err = _error(r, 400)
    assert "request body must be a JSON object with the fields model and messages" in err["message"], err
    assert all(w in err["message"] for w in words), err


@pytest.mark.parametrize("value", [b"NaN", b"Infinity", b"-Infinity"])
def test_error_non_finite_number(served, value):
    body = b'{"model": "%s", "messages": [{"role": "user", "content": "x"}], "temperature": %s}' % (MODEL.encode(),
                                                                                                   value)
    err = _error(_post(served, body), 400)
    assert err["param"] == "temperature" and "finite number" in err["message"]


def test_the_server_takes_the_engines_roles():
    from typing import get_args

    from lfm2vl.processor.chat import ROLES
    from lfm2vl.serve.schemas import Message

    assert set(get_args(Message.model_fields["role"].annotation)) == set(ROLES)


def test_pass_through_fields_are_engine_options():
    """Every request field the server passes on unchanged is a request field and an engine option of that name."""
    from lfm2vl.generate.options import ENGINE_OPTIONS
    from lfm2vl.serve import translate
    from lfm2vl.serve.schemas import ChatCompletionRequest

    names = set(translate._PASS_THROUGH)
    assert names <= set(ENGINE_OPTIONS) and names <= set(ChatCompletionRequest.model_fields)


def test_batching_defaults_have_one_home():
    """The engine, the scheduler and `lfm2vl serve` default to generate/options.py's MAX_BATCH and PREFILL_CHUNK."""
    import inspect

    from lfm2vl.engine import Engine
    from lfm2vl.generate.options import MAX_BATCH, PREFILL_CHUNK
    from lfm2vl.serve.cli import build_parser

    sched = inspect.signature(Scheduler).parameters
    assert (sched["max_batch"].default, sched["prefill_chunk"].default) == (MAX_BATCH, PREFILL_CHUNK)
    assert inspect.signature(Engine).parameters["prefill_chunk"].default == PREFILL_CHUNK
    args = build_parser().parse_args([])
    assert (args.max_batch, args.prefill_chunk) == (MAX_BATCH, PREFILL_CHUNK)


def test_error_image_that_is_no_image_names_no_object(served):
    err = _error(_post(served, _user(image_part("data:image/png;base64,aGVsbG8gd29ybGQ="))), 400)
    assert "could not be decoded" in err["message"] and " at 0x" not in err["message"]


def test_error_n_via_openai_client(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=3)
    assert "n must be 1" in str(e.value)


def test_error_undecodable_image(served):
    good = image_part(image_data_url())
    bad = image_part("data:image/png;base64," + "iVBORw0KGgoAAAANSUhEUg" + "A" * 40)
    err = _error(_post(served, _user({"type": "text", "text": "a"}, good, bad)), 400)
    assert err["param"] == "messages[0].content[2]" and "messages[0].content[2]" in err["message"]
    jpeg = base64.b64decode(image_data_url(64, 64, "JPEG").split(",")[1])
    truncated = image_part("data:image/jpeg;base64," + base64.b64encode(jpeg[:200]).decode())
    err = _error(_post(served, _user({"type": "text", "text": "a"}, good, truncated)), 400)
    assert err["param"] == "messages[0].content[2]" and "could not be decoded" in err["message"]
    err = _error(_post(served, _user(image_part("data:image/png;base64,@@@not base64@@@"))), 400)
    assert err["param"] == "messages[0].content[0]"
    err = _error(_post(served, _user(image_part("data:text/plain;base64,aGVsbG8="))), 400)
    assert "media type" in err["message"]


def test_error_prompt_longer_than_context(served):
    err = _error(_post(served, _user({"type": "text", "text": "x" * 700})), 400)
    assert err["code"] == "context_length_exceeded" and "701" in err["message"] and "600" in err["message"]
    err = _error(_post(served, {**_user({"type": "text", "text": "x" * 100}), "max_tokens": 550}), 400)
    assert "651" in err["message"] and "600" in err["message"]


def test_error_unknown_model(served):
    err = _error(_post(served, {**_user({"type": "text", "text": "x"}), "model": "gpt-9"}), 404)
    assert err["code"] == "model_not_found" and "gpt-9" in err["message"]


def test_error_body_too_large(served):
    err = _error(_post(served, _user({"type": "text", "text": "x" * 300_000})), 413)
    assert err["code"] == "request_too_large"

    def chunks():  # no Content-Length: the limit holds while the body is read
        yield b'{"model": "fake-vl", "messages": [{"role": "user", "content": "'
        for _ in range(30):
            yield b"y" * 10_000
        yield b'"}]}'

    r = httpx.post(served.url + "/v1/chat/completions", content=chunks(),
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    _error(r, 413)


def test_error_too_many_images_or_pixels(served):
    url = image_data_url(8, 8)
    err = _error(_post(served, _user(*[image_part(url)] * 4)), 400)
    assert err["code"] == "too_many_images" and "4" in err["message"] and "3" in err["message"]
    err = _error(_post(served, _user(image_part(image_data_url(1024, 600)))), 400)
    assert err["code"] == "image_too_large" and err["param"] == "messages[0].content[0]"


def test_error_api_key(served):
    body = _user({"type": "text", "text": "x"})
    assert _error(_post(served, body, key=None), 401)["code"] == "invalid_api_key"
    assert _error(_post(served, body, key="sk-wrong"), 401)["code"] == "invalid_api_key"
    _error(httpx.get(served.url + "/v1/models"), 401)
    assert httpx.get(served.url + "/health").status_code == 200  # health needs no key
    bad = openai.OpenAI(base_url=served.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_error_remote_images_disabled_and_local_paths(served):
    err = _error(_post(served, _user(image_part("http://127.0.0.1:9/x.png"))), 400)  # off by default
    assert err["code"] == "remote_images_disabled" and "--allow-remote-images" in err["message"]
    err = _error(_post(served, _user(image_part("/etc/passwd"))), 400)
    assert err["code"] == "local_images_disabled"


def test_error_unsupported_feature_and_route(served):
    body = {**_user({"type": "text", "text": "x"}), "logit_bias": {"1": 5}}
    assert "logit_bias" in _error(_post(served, body), 400)["message"]
    _error(httpx.get(served.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}), 404)
    _error(httpx.get(served.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}), 405)


@pytest.mark.parametrize("path", ["/health", "/v1/models", f"/v1/models/{MODEL}"])
def test_head_answers_with_the_headers_of_get_and_no_body(served, path):
    auth = {"Authorization": f"Bearer {KEY}"}
    get, head = (httpx.request(m, served.url + path, headers=auth) for m in ("GET", "HEAD"))
    assert head.status_code == get.status_code == 200 and head.content == b""
    assert {**head.headers, "date": ""} == {**get.headers, "date": ""}


@pytest.mark.parametrize("method, path, allow", [
    ("GET", "/v1/chat/completions", "POST"),
    ("HEAD", "/v1/chat/completions", "POST"),
    ("POST", "/health", "GET, HEAD"),
    ("DELETE", f"/v1/models/{MODEL}", "GET, HEAD"),
])
def test_a_405_lists_the_methods_of_the_path_in_allow(served, method, path, allow):
    r = httpx.request(method, served.url + path, headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 405 and r.headers["allow"] == allow
    if method != "HEAD":
        assert _error(r, 405)["message"].endswith(f"it takes {allow}.")


def test_internal_error_is_generic_500(served, monkeypatch):
    def boom(messages, **options):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(served.engine, "prepare", boom)
    r = _post(served, _user({"type": "text", "text": "x"}))
    err = _error(r, 500)
    assert err["type"] == "server_error" and "secret" not in r.text


def test_still_answers_after_errors(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "still there?"}],
                                       max_tokens=4)
    assert len(r.choices[0].message.content) > 0


class _FlakyGenerator(FakeBatchGenerator):
    """Raises inside step() while a request whose prompt contains BOOM is running (a model failure)."""

    def step(self):
        if any("BOOM" in "".join(map(chr, r.req.input_ids)) for r in [*self.running.values(), *self.waiting]):
            raise RuntimeError("simulated kernel failure")
        return super().step()


def test_generation_failure_fails_the_batch_then_recovers():
    engine = FakeEngine()
    scheduler = Scheduler(engine, max_batch=4, make_generator=_FlakyGenerator)
    with ThreadServer(create_app(engine, scheduler, ServerSettings(model_id=MODEL))) as server:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "BOOM"}], "max_tokens": 5}
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
        err = _error(r, 500)
        assert err["type"] == "server_error" and "simulated" not in r.text
        with httpx.stream("POST", server.url + "/v1/chat/completions", json={**body, "stream": True}) as r:
            events = sse_events(r.iter_lines())
        assert "error" in events[-1]  # a stream that fails ends with an error event, in OpenAI's shape
        body["messages"][0]["content"] = "fine"
        r = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
        assert r.status_code == 200 and len(r.json()["choices"][0]["message"]["content"]) == 5
        assert len(engine.generators) == 3  # a fresh generator after each failure


def test_a_template_that_rejects_the_messages_is_a_400(tmp_path):
    """The engine's chat template raising (raise_exception) is the client's 400, never a 500."""
    import shutil

    import lfm2vl
    folder = tmp_path / "m"
    shutil.copytree(lfm2vl.bundled_model(), folder)
    (folder / "chat_template.jinja").write_text('{{ raise_exception("no user turns here") }}')
    engine = lfm2vl.load(folder, optimize=False)
    scheduler = Scheduler(engine, max_batch=1, max_seq_len=256, prefill_chunk=64)
    settings = ServerSettings(model_id=MODEL, api_key=KEY, context_len=256)
    with ThreadServer(create_app(engine, scheduler, settings)) as server:
        err = _error(_post(server, _user({"type": "text", "text": "hi"})), 400)
    assert err["message"] == "The chat template rejected these messages: no user turns here"


def test_image_token_budget_is_the_engines_rule(served):
    """The server refuses image-token knobs beyond the checkpoint's budget with the message of the check the engine
    applies to every call (processor/config.py check_image_budget), naming the field."""
    from lfm2vl.processor.config import check_image_budget

    with pytest.raises(ValueError) as engine_error:
        check_image_budget({"min_image_tokens": 5000}, 256)
    err = _error(_post(served, {"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                "min_image_tokens": 5000}), 400)
    assert err["param"] == "min_image_tokens" and err["message"] == f"{engine_error.value}."


def test_stop_strings_follow_the_engines_rule(served):
    err = _error(_post(served, {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stop": ["a", ""]}),
                 400)
    assert err["param"] == "stop" and "stop strings must be non-empty strings" in err["message"]


def test_tools_and_call_arguments_nested_too_deeply_are_400s_naming_the_field(served):
    """A tool schema or an earlier call's arguments nested past the bound every recursive step relies on
    (files/jsontext.py MAX_DEPTH) is the client's 400, never a 500."""
    schema = {"type": "string"}
    for _ in range(800):
        schema = {"type": "array", "items": schema}
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": schema}}}}]
    err = _error(_post(served, {**_user({"type": "text", "text": "hi"}), "tools": tools}), 400)
    assert "tools[0].function.parameters is nested too deeply" in err["message"], err
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "[" * 5000 + "]" * 5000}}
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "c1", "content": "ok"}]
    err = _error(_post(served, {"model": MODEL, "messages": messages, "max_tokens": 4}), 400)
    assert "arguments" in err["param"] and "nested too deeply" in err["message"], err
