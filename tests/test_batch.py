"""BatchGenerator logic on a MockModel: finish reasons, stop strings, max_new_tokens, eos, seeds, batching,
requests joining/leaving between steps, prompts prefilled together, prefix reuse without re-encoding images, cache
growth."""
import pytest
import torch

from lfm2vl.generate.batch import BatchGenerator
from lfm2vl.generate.passes import prefill_group
from lfm2vl.generate.request import Request
from lfm2vl.generate.sampling import SamplingParams
from mock_model import EOS, mock_engine
from tokenizer_build import build_tokenizer

TOK = build_tokenizer()
TEXT = "Hello world! 日本語 🙂 END more text"
SCRIPT = TOK.encode(TEXT, add_special_tokens=False).ids
PROMPT = [1, 6, 600, 601]
GREEDY = SamplingParams(temperature=0, repetition_penalty=1.0, min_p=0.0)
SAMPLE = dict(temperature=1.0, min_p=0.0, repetition_penalty=1.0)


def run(engine, *reqs, **kw):
    gen = BatchGenerator(engine, **kw)
    rids = [gen.add(r) for r in reqs]
    events = {r: [] for r in rids}
    while gen.has_work():
        for ev in gen.step():
            events[ev.rid].append(ev)
    return [events[r] for r in rids]


def req(**kw):
    kw.setdefault("params", GREEDY)
    kw.setdefault("eos_ids", (EOS,))
    return Request(list(kw.pop("input_ids", PROMPT)), **kw)


def test_greedy_spells_script_then_stops_at_eos():
    (evs,) = run(mock_engine(script=SCRIPT), req(max_new_tokens=100))
    res = evs[-1].result
    assert res.token_ids == SCRIPT + [EOS]
    assert res.text == TEXT and res.finish_reason == "stop"
    assert "".join(e.text for e in evs) == TEXT
    assert all(e.finish_reason is None for e in evs[:-1])
    assert res.prompt_tokens == 4 and res.completion_tokens == len(SCRIPT) + 1


def test_max_new_tokens_gives_length():
    (evs,) = run(mock_engine(script=SCRIPT), req(max_new_tokens=3))
    res = evs[-1].result
    assert res.token_ids == SCRIPT[:3] and res.finish_reason == "length" and len(evs) == 3
    assert res.text == TOK.decode(SCRIPT[:3])


def test_stop_string_excluded_and_streamed_pieces_agree():
    (evs,) = run(mock_engine(script=SCRIPT), req(max_new_tokens=100, stop=["END"]))
    res = evs[-1].result
    assert res.finish_reason == "stop" and res.text == "Hello world! 日本語 🙂 "
    assert "".join(e.text for e in evs) == res.text
    assert "\ufffd" not in "".join(e.text for e in evs)
    assert TOK.decode(res.token_ids).startswith(res.text + "END")  # stopped on the token completing "END"


def test_stop_string_never_matching_keeps_full_text():
    (evs,) = run(mock_engine(script=SCRIPT), req(max_new_tokens=100, stop=["ENDX", "zz"]))
    assert evs[-1].result.text == TEXT and evs[-1].result.finish_reason == "stop"


def test_min_new_tokens_suppresses_eos():
    (evs,) = run(mock_engine(script=SCRIPT[:2]), req(max_new_tokens=6, min_new_tokens=6))
    res = evs[-1].result
    assert len(res.token_ids) == 6 and EOS not in res.token_ids and res.finish_reason == "length"


def test_same_seed_same_output_and_seed_matters():
    e = mock_engine(peak=0.0, noise=3.0)
    a = run(e, req(params=SamplingParams(**SAMPLE, seed=11), max_new_tokens=20))[0][-1].result
    b = run(e, req(params=SamplingParams(**SAMPLE, seed=11), max_new_tokens=20))[0][-1].result
    c = run(e, req(params=SamplingParams(**SAMPLE, seed=12), max_new_tokens=20))[0][-1].result
    assert a.token_ids == b.token_ids and a.text == b.text
    assert a.token_ids != c.token_ids


def test_temperature_zero_is_deterministic_and_ignores_seed():
    e = mock_engine(peak=0.0, noise=3.0)
    outs = [run(e, req(params=SamplingParams(temperature=0, seed=s), max_new_tokens=10))[0][-1].result.token_ids
            for s in (None, 1, 2)]
    assert outs[0] == outs[1] == outs[2]


def test_batch_equals_one_at_a_time_including_sampling():
    e = mock_engine(peak=0.0, noise=3.0)
    reqs = lambda: [req(params=SamplingParams(**SAMPLE, seed=5), max_new_tokens=7),
                    req(input_ids=[1, 6, 700, 701, 702], params=GREEDY, max_new_tokens=12),
                    req(params=SamplingParams(temperature=0.7, top_k=50, seed=9), max_new_tokens=3, stop=["e"])]
    together = [evs[-1].result for evs in run(e, *reqs(), max_batch=4)]
    alone = [run(e, r)[0][-1].result for r in reqs()]
    for t, a in zip(together, alone):
        assert (t.token_ids, t.text, t.finish_reason) == (a.token_ids, a.text, a.finish_reason)


def test_requests_join_and_leave_between_steps_and_wait_for_a_free_row():
    e = mock_engine(peak=0.0, noise=3.0)
    gen = BatchGenerator(e, max_batch=2)
    mk = lambda seed, n: req(params=SamplingParams(**SAMPLE, seed=seed), max_new_tokens=n)
    r1, r2 = gen.add(mk(1, 3)), gen.add(mk(2, 10))
    results = {}
    steps = 0
    r3 = None
    while gen.has_work() or r3 is None:
        if steps == 1:
            r3 = gen.add(mk(3, 5))  # joins while two are running; gets r1's row when r1 leaves
        for ev in gen.step():
            if ev.result:
                results[ev.rid] = ev.result
        steps += 1
    for rid, (seed, n) in zip((r1, r2, r3), [(1, 3), (2, 10), (3, 5)]):
        assert results[rid].token_ids == run(e, mk(seed, n))[0][-1].result.token_ids


def test_cancel_frees_the_row():
    e = mock_engine(script=SCRIPT)
    gen = BatchGenerator(e, max_batch=1)
    a = gen.add(req(max_new_tokens=50))
    gen.step()
    b = gen.add(req(max_new_tokens=2))
    gen.cancel(a)
    res = gen.run([b])
    assert res[b].token_ids == SCRIPT[:2] and not gen.has_work()


def test_chunked_prefill_calls_and_same_output():
    e = mock_engine(script=SCRIPT, prompt_len=40)
    prompt = [1] + list(range(600, 639))
    (evs,) = run(e, req(input_ids=prompt, max_new_tokens=5), prefill_chunk=16)
    assert [t for r, t in e.model.forward_calls[:3]] == [16, 16, 8]
    assert evs[-1].result.token_ids == SCRIPT[:5]


@pytest.mark.parametrize("left,starts,budget,capacity,want", [
    ([25, 20, 30, 28], [0, 0, 0, 0], 512, 1000, ([0, 1, 2, 3], 30)),  # similar prompts: one pass, the longest's length
    ([3, 41, 6], [0, 0, 0], 64, 1000, ([0, 1, 2], 6)),  # the long one feeds 6 tokens, the first is padded 3 -> 6
    ([100, 10], [0, 0], 512, 1000, ([0], 100)),  # 10 padded to 100 would be mostly padding
    ([10, 5, 8], [0, 95, 0], 64, 100, ([0, 2], 10)),  # the second row has no room for 10 more tokens
    ([900, 20], [0, 0], 512, 1000, ([0], 512)),  # a long prompt takes the whole budget
])
def test_prefill_group_pads_at_most_half_within_the_budget_and_the_rows_room(left, starts, budget, capacity, want):
    assert prefill_group(left, starts, budget, capacity) == want


def test_a_burst_of_prompts_is_prefilled_in_one_pass_with_the_same_results():
    e = mock_engine(peak=0.0, noise=3.0)
    reqs = lambda: [req(input_ids=[1, 6] + list(range(600, 600 + n)), max_new_tokens=4) for n in (3, 4, 6, 7)]
    together = [evs[-1].result.token_ids for evs in run(e, *reqs(), max_batch=4)]
    assert e.model.forward_calls[0] == (None, 9) and e.model.call_lengths[0] == [5, 6, 8, 9]  # all 4 rows
    assert together == [run(e, r)[0][-1].result.token_ids for r in reqs()]


@pytest.mark.parametrize("chunk", [16, 64])
def test_a_prefill_pass_is_at_most_half_padding_and_within_the_chunk(chunk):
    e = mock_engine(peak=0.0, noise=3.0)
    reqs = lambda: [req(input_ids=[1] + list(range(600, 600 + n)), max_new_tokens=3) for n in (2, 40, 5, 11, 3)]
    together = [evs[-1].result.token_ids for evs in run(e, *reqs(), max_batch=8, prefill_chunk=chunk)]
    calls = [(rows, T, n) for (rows, T), n in zip(e.model.forward_calls, e.model.call_lengths) if T > 1]
    assert any(n is not None for _, _, n in calls)  # some pass did pad
    for rows, T, n in calls:
        assert len(rows or [0]) * T <= chunk and all(2 * k >= T for k in (n or [T]))
    assert together == [run(e, r, prefill_chunk=chunk)[0][-1].result.token_ids for r in reqs()]


def test_logprobs_reported():
    (evs,) = run(mock_engine(script=SCRIPT), req(params=SamplingParams(temperature=0, logprobs=True,
                                                                        top_logprobs=2), max_new_tokens=3))
    res = evs[-1].result
    assert len(res.logprobs) == 3 and all(lp <= 0 for lp in res.logprobs)
    assert res.top_logprobs[0][0][0] == SCRIPT[0]
    assert evs[0].logprob == res.logprobs[0]


def test_prompt_too_long_and_image_mismatch_raise():
    gen = BatchGenerator(mock_engine(), max_seq_len=8)
    with pytest.raises(ValueError, match="8"):
        gen.add(req(input_ids=list(range(600, 610))))
    with pytest.raises(ValueError, match="<image>"):
        gen.add(req(input_ids=[1, 396, 396], pixel_values=torch.zeros(1, 16, 768),
                    pixel_attention_mask=torch.ones(1, 16), spatial_shapes=torch.tensor([[4, 4]])))


def test_fixed_capacity_ends_with_length():
    (evs,) = run(mock_engine(peak=0.0), req(max_new_tokens=None, params=GREEDY), max_seq_len=10)
    res = evs[-1].result
    assert res.finish_reason == "length" and res.prompt_tokens + res.completion_tokens == 11  # last one not fed


def test_cache_grows_past_initial_capacity(monkeypatch):
    monkeypatch.setattr("lfm2vl.generate.batch.DEFAULT_CAPACITY", 8)
    e = mock_engine(peak=0.0)
    gen = BatchGenerator(e)
    res = gen.run([gen.add(req(max_new_tokens=20))])
    assert len(next(iter(res.values())).token_ids) == 20 and gen.capacity >= 24


def image_req(prompt, px_value, **kw):
    """One 4x4-patch unit -> 4 <image> tokens."""
    return req(input_ids=prompt, pixel_values=torch.full((1, 16, 768), px_value),
               pixel_attention_mask=torch.ones(1, 16, dtype=torch.int32), spatial_shapes=torch.tensor([[4, 4]]),
               **kw)


def test_prefix_reuse_skips_prefill_and_image_encoding():
    e = mock_engine(script=SCRIPT, prompt_len=7)
    gen = BatchGenerator(e, max_batch=1)
    p1 = [1, 498, 396, 396, 396, 396, 499]
    r1 = gen.run([gen.add(image_req(p1, 0.5, max_new_tokens=3))])
    assert e.model.encoded_units == 1
    first = list(r1.values())[0]
    p2 = p1 + first.token_ids[:-1] + [7, 600]  # the same conversation, continued
    r2 = list(gen.run([gen.add(image_req(p2, 0.5, max_new_tokens=2))]).values())[0]
    assert e.model.encoded_units == 1  # the image was not encoded again
    assert r2.cached_tokens == len(p1) + 2
    assert e.model.forward_calls[-2][1] == 2  # prefill of the two new tokens only (then one decode step)
    # a different image with the same placeholders is not reused
    gen.run([gen.add(image_req(p2, 0.25, max_new_tokens=2))])
    assert e.model.encoded_units == 2


def test_interleaved_followers_each_get_all_their_events():
    e = mock_engine(script=SCRIPT)
    gen = BatchGenerator(e, max_batch=2)
    a, b = gen.add(req(max_new_tokens=5)), gen.add(req(max_new_tokens=8))
    fa, fb = gen.follow(a), gen.follow(b)
    got = {a: [], b: []}
    for _ in range(3):  # alternate between the two iterators
        got[a].append(next(fa))
        got[b].append(next(fb))
    got[a] += list(fa)
    got[b] += list(fb)
    assert [ev.token_id for ev in got[a]] == SCRIPT[:5] and got[a][-1].result.finish_reason == "length"
    assert [ev.token_id for ev in got[b]] == SCRIPT[:8]
    assert not gen._mail and not gen.has_work()
