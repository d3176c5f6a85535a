"""Continuous batching through the server, on the real engine and BatchGenerator (tiny random checkpoint):
a long prompt that arrives while another answer streams is prefilled in chunks, and the streaming answer gets a
token at every one of those steps (it is not stalled for the whole prefill)."""
from __future__ import annotations

import math
import threading

import httpx
import pytest

from lfm2vl.generate.batch import BatchGenerator
from lfm2vl.serve.app import ServerSettings, create_app
from lfm2vl.serve.scheduler import Scheduler
from server_util import ThreadServer

CHUNK = 64


class RecordingGenerator(BatchGenerator):
    """The real generator, logging which requests were added and which got a token at each step."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.log: list[tuple] = []

    def add(self, req):
        rid = super().add(req)
        self.log.append(("add", rid, len(req.input_ids)))
        return rid

    def step(self):
        events = super().step()
        self.log.append(("step", {e.rid for e in events}))
        return events


@pytest.fixture(scope="module")
def served(tiny_engine):
    scheduler = Scheduler(tiny_engine, max_batch=4, max_seq_len=2048, prefill_chunk=CHUNK,
                               make_generator=RecordingGenerator)
    with ThreadServer(create_app(tiny_engine, scheduler, ServerSettings(model_id="m", context_len=2048))) as server:
        server.scheduler = scheduler
        yield server


def test_long_prefill_is_chunked_while_others_decode(served):
    gen = served.scheduler.gen
    body_a = {"model": "m", "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 400,
              "min_tokens": 400, "temperature": 0, "stream": True}
    long_text = " ".join(f"word{i}" for i in range(220))
    body_b = {"model": "m", "messages": [{"role": "user", "content": long_text}], "max_tokens": 2, "temperature": 0}
    with httpx.stream("POST", served.url + "/v1/chat/completions", json=body_a, timeout=60) as a:
        lines = a.iter_lines()
        for _ in range(6):  # A is decoding
            next(lines)
        b = httpx.post(served.url + "/v1/chat/completions", json=body_b, timeout=60)
        assert b.status_code == 200, b.text
    adds = [e for e in gen.log if e[0] == "add"]
    (_, rid_a, _), (_, rid_b, n_b) = adds[-2], adds[-1]
    assert n_b > 5 * CHUNK
    start = gen.log.index(adds[-1])
    steps = [e[1] for e in gen.log[start + 1:] if e[0] == "step"]
    first_b = next(i for i, rids in enumerate(steps) if rid_b in rids)
    # B's prompt took several steps (chunks of CHUNK tokens), and A got a token at every one of them
    assert first_b + 1 >= math.ceil(n_b / CHUNK) - 1
    assert all(rid_a in rids for rids in steps[:first_b + 1])
