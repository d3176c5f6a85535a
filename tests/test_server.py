"""End to end: a real `python -m lfm2vl serve` process on a free port, a tiny random checkpoint, the official openai client.

One server per module (started once). Only what needs the real process and engine is tested here: greedy answers
equal the engine run in this process on the same checkpoint, concurrent answers equal the same requests served
alone, the serve flags (API key, limits) reach the server, the engine's own refusals become 400s, the server still
answers afterwards, and Ctrl-C (SIGINT) stops it cleanly. Routes, validation and the shape of every error are
tested in process against a fake engine (tests/test_server_app.py).
"""
from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import subprocess
import time

import httpx
import openai
import pytest

import lfm2vl
from server_util import ServerProcess, image_data_url, image_part, post_raw, sse_events
from server_util import openai_error as _error

KEY = "sk-lfm2vl-test"
MODEL = "tiny-vl"
CONTEXT = 1024


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    srv = ServerProcess(["--model", str(tiny_checkpoint), "--served-model-name", MODEL, "--api-key", KEY,
                         "--dtype", "float32", "--max-batch", "16", "--max-seq-len", str(CONTEXT),
                         "--prefill-chunk", "64", "--max-images", "2", "--max-image-pixels", str(640 * 480),
                         "--max-body-mb", "1", "--log-level", "warning"],
                        tmp_path_factory.mktemp("serve") / "stderr.log")
    assert MODEL in srv.lines[-1] and str(tiny_checkpoint) in srv.lines[-1]  # startup names the model and the address
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    return lfm2vl.load(str(tiny_checkpoint), dtype="float32")


def _alone(engine, messages, **options):
    """The engine's answer in this process, for the server's messages in the engine's format."""
    return engine.generate(messages, temperature=0, **options)


IMG = image_data_url(96, 64)
VISION_MSG = [{"role": "user", "content": [image_part(IMG), {"type": "text", "text": "What is in this image?"}]}]
VISION_MSG_ENGINE = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMG}},
                                                  {"type": "text", "text": "What is in this image?"}]}]


def test_plain_answer_with_image_equals_engine(client, engine):
    r = client.chat.completions.create(model=MODEL, messages=VISION_MSG, max_tokens=24, temperature=0)
    ref = _alone(engine, VISION_MSG_ENGINE, max_new_tokens=24)
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == ref.text
    assert choice.finish_reason == ref.finish_reason
    assert r.usage.prompt_tokens == ref.prompt_tokens > 64  # the image's tokens are counted
    assert r.usage.completion_tokens == ref.completion_tokens and r.usage.total_tokens == ref.prompt_tokens + \
        ref.completion_tokens
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == MODEL


def test_usage_counts_image_tokens_and_timings_come_in_llamacpp_names(server, client, engine):
    r = client.chat.completions.create(model=MODEL, messages=VISION_MSG, max_tokens=8, temperature=0)
    ids = engine.prepare(VISION_MSG_ENGINE).input_ids
    assert r.usage.prompt_tokens_details.image_tokens == ids.count(engine.model.config.image_token_id) > 0
    t = r.model_extra["timings"]
    assert t["prompt_n"] == r.usage.prompt_tokens - r.usage.prompt_tokens_details.cached_tokens
    assert t["predicted_n"] == r.usage.completion_tokens == 8
    assert t["ttft_ms"] > 0 and t["prompt_ms"] > 0 and t["predicted_ms"] > 0 and t["predicted_per_second"] > 0
    body = {"model": MODEL, "messages": VISION_MSG, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as resp:
        events = sse_events(resp.iter_lines())
    final = [e for e in events[:-1] if e["choices"] and e["choices"][0]["finish_reason"]]
    assert len(final) == 1 and final[0]["timings"]["predicted_n"] == 4  # timings ride on the finish chunk


def test_streamed_answer_with_image(server, client, engine):
    chunks = list(client.chat.completions.create(model=MODEL, messages=VISION_MSG, max_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    ref = _alone(engine, VISION_MSG_ENGINE, max_new_tokens=24)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == \
        [ref.finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == ref.prompt_tokens
    assert chunks[-1].usage.completion_tokens == ref.completion_tokens
    body = {"model": MODEL, "messages": VISION_MSG, "max_tokens": 6, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:  # raw SSE framing
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r.iter_lines())
    assert events[-1] == "[DONE]" and all(e["object"] == "chat.completion.chunk" for e in events[:-1])


def test_multi_turn(client, engine):
    messages = [{"role": "system", "content": "You are a helpful multimodal assistant by Liquid AI."},
                {"role": "user", "content": [image_part(IMG), {"type": "text", "text": "Describe it."}]},
                {"role": "assistant", "content": "A red mat with a cat."},
                {"role": "user", "content": "What colour is the mat?"}]
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    engine_msgs = [messages[0], {"role": "user", "content": [{"type": "image_url", "image_url": {"url": IMG}},
                                                             {"type": "text", "text": "Describe it."}]},
                   *messages[2:]]
    ref = _alone(engine, engine_msgs, max_new_tokens=16)
    assert r.choices[0].message.content == ref.text and r.usage.prompt_tokens == ref.prompt_tokens


def test_stop_strings(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Count: 1 2 3 4 5 6 7 8 9 10"}], temperature=0)
    text = client.chat.completions.create(max_tokens=40, **kw).choices[0].message.content
    clean = [i for i in range(2, len(text) - 2) if "\ufffd" not in text[i:i + 2]]
    assert clean, f"answer too short to pick a stop string from: {text!r}"
    stop = text[clean[len(clean) // 2]:clean[len(clean) // 2] + 2]
    want = text[:text.find(stop)]
    r = client.chat.completions.create(max_tokens=40, stop=[stop, "\x00never"], **kw)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == want
    streamed = client.chat.completions.create(max_tokens=40, stop=stop, stream=True, **kw)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want


def test_max_completion_tokens_and_length(client):
    r = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hello"}],
                                       max_completion_tokens=3, temperature=0,
                                       extra_body={"repetition_penalty": 1.0, "top_k": 0})
    assert r.usage.completion_tokens <= 3
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 3 else "stop")


def test_logprobs(client):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Say something."}], max_tokens=8, temperature=0,
              logprobs=True, top_logprobs=3)
    r = client.chat.completions.create(**kw)
    entries = r.choices[0].logprobs.content
    assert len(entries) == r.usage.completion_tokens
    for e in entries:  # greedy: the chosen token is the most likely one
        assert len(e.top_logprobs) == 3 and e.logprob <= 0 and abs(e.top_logprobs[0].logprob - e.logprob) < 1e-5
        assert e.token == e.top_logprobs[0].token
    streamed = [c for c in client.chat.completions.create(stream=True, **kw) if c.choices and c.choices[0].logprobs]
    assert [e.token for c in streamed for e in c.choices[0].logprobs.content] == [e.token for e in entries]


def test_16_concurrent_streams_equal_alone(client):
    def request(i):
        content = f"Request {i}: the quick brown fox jumps over the lazy dog {i * 7}."
        if i % 4 == 0:
            content = [image_part(image_data_url(40 + 8 * i, 64, color=(i * 15, 80, 200))),
                       {"type": "text", "text": content}]
        return dict(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=12 + 2 * i,
                    temperature=0)

    def streamed(i):
        return "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True,
                                                                                               **request(i))
                       if c.choices)

    alone = [client.chat.completions.create(**request(i)).choices[0].message.content for i in range(16)]
    with cf.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(streamed, range(16)))
    for i in range(16):
        assert together[i] == alone[i], f"request {i} differs when batched"


def test_client_disconnect_frees_row(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go on"}], "max_tokens": 900, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(8):
            next(lines)
        assert httpx.get(server.url + "/health").json()["active_requests"] == 1
    deadline = time.time() + 10
    while httpx.get(server.url + "/health").json()["active_requests"]:
        assert time.time() < deadline, "the abandoned stream was not cancelled"
        time.sleep(0.05)


# ---- refusals that need the real process: the serve flags and the engine's own checks ------------------------

def _post(server, body, key=KEY):
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return post_raw(server.url, raw, {"Authorization": f"Bearer {key}"} if key else {})


def _user(*parts, **extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": list(parts)}], "max_tokens": 4, **extra}


TEXT = {"type": "text", "text": "hi"}


def test_engine_refuses_a_prompt_over_the_context(server):
    words = " ".join(f"w{i}" for i in range(400))  # ~1700 tokens: over the server's context, within the model's
    err = _error(_post(server, _user({"type": "text", "text": words})), 400)
    assert err["code"] == "context_length_exceeded" and f"holds {CONTEXT} tokens" in err["message"]
    assert int(err["message"].split("The prompt has ")[1].split()[0]) > CONTEXT
    words = " ".join(f"w{i}" for i in range(1500))  # ~6400 tokens: over the model's own context (4096) as well
    err = _error(_post(server, _user({"type": "text", "text": words})), 400)
    assert err["code"] == "context_length_exceeded" and f"holds {CONTEXT} tokens" in err["message"]
    assert int(err["message"].split("prompt has ")[1].split()[0]) > 4096


def test_max_body_mb_flag_limits_the_body(server):
    _error(_post(server, _user({"type": "text", "text": "z" * (1024 * 1024 + 10)})), 413)


def test_max_images_flag_limits_the_images(server):
    small = image_part(image_data_url(16, 16))
    assert _error(_post(server, _user(small, small, small, TEXT)), 400)["code"] == "too_many_images"


def test_max_image_pixels_flag_limits_the_pixels(server):
    err = _error(_post(server, _user(image_part(image_data_url(700, 500)), TEXT)), 400)
    assert err["code"] == "image_too_large" and err["param"] == "messages[0].content[0]"


def test_api_key_flag_requires_the_key(server):
    assert _error(_post(server, _user(TEXT), key=None), 401)["code"] == "invalid_api_key"
    assert _error(_post(server, _user(TEXT), key="sk-wrong"), 401)["code"] == "invalid_api_key"


def test_still_answers_after_a_refused_request(server, client):
    _error(_post(server, _user({"type": "text", "text": " ".join(f"w{i}" for i in range(1500))})), 400)
    r = client.chat.completions.create(model=MODEL, messages=VISION_MSG, max_tokens=4, temperature=0)
    assert r.choices[0].finish_reason in ("stop", "length")


def test_ctrl_c_stops_the_server_cleanly(tiny_checkpoint, tmp_path):
    srv = ServerProcess(["--model", str(tiny_checkpoint), "--dtype", "float32", "--log-level", "warning"],
                        tmp_path / "stderr.log")
    try:
        r = httpx.post(srv.url + "/v1/chat/completions", timeout=120,
                       json={"model": tiny_checkpoint.name, "messages": VISION_MSG, "max_tokens": 4, "temperature": 0})
        assert r.status_code == 200, r.text
        srv.proc.send_signal(signal.SIGINT)
        try:
            code = srv.proc.wait(30)
        except subprocess.TimeoutExpired:
            pytest.fail("the server did not exit within 30 s of Ctrl-C (SIGINT); stdout: "
                        f"{''.join(srv.lines)[-500:]!r}; stderr: {(tmp_path / 'stderr.log').read_text()[-1500:]!r}")
        assert code == 0
        time.sleep(0.2)
        assert any("stopped" in line for line in srv.lines)
        assert "Traceback" not in (tmp_path / "stderr.log").read_text()
    finally:
        srv.stop()
