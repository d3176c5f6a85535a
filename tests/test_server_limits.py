"""A real `lfm2vl serve` process against hostile and careless use: start-up flags, memory and time bounds.

Memory claims read the server process's VmRSS / VmHWM from /proc around one request (the peak is reset first).
"""
from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from PIL import Image

from server_util import ServerProcess, image_data_url, image_part, openai_error, post_raw

ROOT = Path(__file__).resolve().parent.parent
MODEL = "tiny-vl"


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve_limits") / "stderr.log"
    srv = ServerProcess(["--model", str(tiny_checkpoint), "--served-model-name", MODEL, "--dtype", "float32",
                         "--max-body-mb", "40", "--log-level", "warning"], log)
    yield srv
    srv.stop()


def _serve(args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lfm2vl", "serve", "--port", "0", *args], capture_output=True,
                          text=True, timeout=120, cwd=ROOT)


def _chat(url: str, content, **fields) -> httpx.Response:
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 1, **fields}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


def _settled_rss(server: ServerProcess, seconds: float = 3.0) -> float:
    """VmRSS once the server has had time to go idle (its scheduler trims the heap after half a second)."""
    time.sleep(seconds)
    return server.memory_mib()["VmRSS"]


# ---- start-up ---------------------------------------------------------------------------------------------------
def test_a_model_with_a_short_context_serves_with_its_own_context(tiny_checkpoint, tmp_path):
    short = tmp_path / "short"
    shutil.copytree(tiny_checkpoint, short)
    config = json.loads((short / "config.json").read_text())
    config["text_config"]["max_position_embeddings"] = 2048
    (short / "config.json").write_text(json.dumps(config))
    srv = ServerProcess(["--model", str(short), "--dtype", "float32", "--log-level", "warning"], tmp_path / "log")
    try:
        assert "context 2048" in srv.lines[-1]
        models = httpx.get(srv.url + "/v1/models", timeout=30).json()
        assert models["data"][0]["context_length"] == 2048
    finally:
        srv.stop()


@pytest.mark.parametrize("flag, value, words", [
    ("--max-batch", "0", "--max-batch must be at least 1"),
    ("--max-body-mb", "nan", "--max-body-mb must be a positive number"),
    ("--api-key", "", "--api-key is empty"),
    ("--api-key", "a\nb", "--api-key has '\\n' at position 2"),
    ("--api-key", "a b", "--api-key has ' ' at position 2"),
    ("--host", "", "--host is empty"),
    ("--served-model-name", " ", "--served-model-name is empty"),
])
def test_a_bad_flag_is_one_line_and_exit_2_before_loading(flag, value, words):
    done = _serve(["--model", "/nonexistent/model", flag, value])  # checked before the model would fail to load
    assert done.returncode == 2 and words in done.stderr
    assert "Traceback" not in done.stderr and "could not load" not in done.stderr


@pytest.mark.parametrize("flags, words", [
    (["--max-batch", "100000"], "--max-batch 100000 rows of --max-seq-len 4096 tokens need a"),
    (["--max-seq-len", "8192"], "--max-seq-len 8192 is longer than the model's context (4096 tokens)"),
])
def test_a_flag_the_model_cannot_take_is_one_line_and_exit_2(tiny_checkpoint, flags, words):
    done = _serve(["--model", str(tiny_checkpoint), *flags])
    assert done.returncode == 2 and words in done.stderr and "Traceback" not in done.stderr


def test_a_blank_api_key_from_the_environment_is_named_by_its_variable(monkeypatch):
    monkeypatch.setenv("LFM2VL_API_KEY", " ")
    done = _serve(["--model", "/nonexistent/model"])
    assert done.returncode == 2 and "$LFM2VL_API_KEY is empty" in done.stderr


def test_an_empty_api_key_in_the_environment_means_no_key(tiny_checkpoint, tmp_path, monkeypatch):
    monkeypatch.setenv("LFM2VL_API_KEY", "")
    srv = ServerProcess(["--model", str(tiny_checkpoint), "--served-model-name", MODEL, "--dtype", "float32",
                         "--log-level", "warning"], tmp_path / "log")
    try:
        assert "API key off" in srv.lines[-1]
        assert _chat(srv.url, "hi").status_code == 200
    finally:
        srv.stop()


# ---- routes -----------------------------------------------------------------------------------------------------
def test_one_model_can_be_retrieved_by_its_id(server):
    card = httpx.get(server.url + f"/v1/models/{MODEL}", timeout=30).json()
    assert card["id"] == MODEL and card["object"] == "model" and card["context_length"] == 4096
    err = openai_error(httpx.get(server.url + "/v1/models/other", timeout=30), 404)
    assert err["code"] == "model_not_found"


# ---- memory and time --------------------------------------------------------------------------------------------
def test_an_image_token_budget_beyond_the_checkpoint_is_refused_without_memory(server):
    server.reset_peak()
    before = server.memory_mib()["VmRSS"]
    r = _chat(server.url, [image_part(image_data_url(64, 48)), {"type": "text", "text": "hi"}],
              max_image_tokens=100000)
    err = openai_error(r, 400)
    assert err["param"] == "max_image_tokens" and "1 to 256" in err["message"]
    assert server.memory_mib()["VmHWM"] - before < 100


def test_a_huge_text_is_refused_quickly_without_tokenizing_it(server):
    server.reset_peak()
    before = server.memory_mib()["VmRSS"]
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "word " * 6_000_000}]})
    t0 = time.perf_counter()
    err = openai_error(post_raw(server.url, body.encode()), 400)
    took = time.perf_counter() - t0
    assert err["code"] == "context_length_exceeded" and "30000000 characters" in err["message"]
    assert took < 10, f"{took:.1f} s"
    assert server.memory_mib()["VmHWM"] - before < 600  # the 30 MB body itself, parsed once
    assert _settled_rss(server) - before < 100


@pytest.fixture
def fresh_server(tiny_checkpoint, tmp_path):
    srv = ServerProcess(["--model", str(tiny_checkpoint), "--served-model-name", MODEL, "--dtype", "float32",
                         "--log-level", "warning"], tmp_path / "log")
    yield srv
    srv.stop()


def _large_images(n: int) -> list[dict]:
    buf = io.BytesIO()
    Image.new("RGB", (5700, 5700), (40, 90, 200)).save(buf, format="PNG")
    return [image_part("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())] * n


def test_memory_returns_near_idle_after_a_request_with_large_images(fresh_server):
    server = fresh_server
    _chat(server.url, [image_part(image_data_url(64, 48)), {"type": "text", "text": "warm up"}])
    idle = _settled_rss(server)
    server.reset_peak()
    r = _chat(server.url, _large_images(8) + [{"type": "text", "text": "hi"}], do_image_splitting=False)
    assert r.status_code == 200, r.text
    assert server.memory_mib()["VmHWM"] - idle > 500  # the request did take memory (8 decoded 5700x5700 images)
    assert _settled_rss(server) - idle < 100


def test_memory_returns_near_idle_after_a_refused_request_with_large_images(fresh_server):
    server = fresh_server
    idle = _settled_rss(server)
    server.reset_peak()
    r = _chat(server.url, _large_images(8) + [{"type": "text", "text": "hi"}])  # 88 tiles: over the context
    assert openai_error(r, 400)["code"] == "context_length_exceeded"
    assert server.memory_mib()["VmHWM"] - idle > 500
    assert _settled_rss(server) - idle < 100
