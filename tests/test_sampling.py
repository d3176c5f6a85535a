"""Sampling filters: exact survivors on hand-built distributions, parity with transformers' logits processors,
seeded reproducibility and greedy behaviour."""
import math

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from lfm2vl.generate.sampling import (Sampler, SamplingParams, apply_min_p, apply_presence_frequency,
                                      apply_repetition_penalty, apply_temperature, apply_top_k, apply_top_p,
                                      sample_from_logits, token_logprobs)


def logits_of(probs):
    return torch.tensor(probs, dtype=torch.float32).log()


def survivors(x):
    return torch.isfinite(x).nonzero().flatten().tolist()


def test_top_k_exact_survivors():
    x = logits_of([0.1, 0.4, 0.05, 0.3, 0.15])
    assert survivors(apply_top_k(x, 2)) == [1, 3]
    assert survivors(apply_top_k(x, 1)) == [1]
    assert survivors(apply_top_k(x, 99)) == [0, 1, 2, 3, 4]


def test_top_p_exact_survivors():
    x = logits_of([0.5, 0.25, 0.15, 0.1])
    assert survivors(apply_top_p(x, 0.5)) == [0]  # the top token alone reaches 0.5
    assert survivors(apply_top_p(x, 0.6)) == [0, 1]
    assert survivors(apply_top_p(x, 0.8)) == [0, 1, 2]
    assert survivors(apply_top_p(x, 1.0)) == [0, 1, 2, 3]
    assert survivors(apply_top_p(logits_of([0.01, 0.97, 0.02]), 0.1)) == [1]  # at least one is kept


def test_min_p_exact_survivors():
    x = logits_of([0.6, 0.2, 0.1, 0.06, 0.04])
    # threshold = 0.15 * 0.6 = 0.09 -> 0.6, 0.2, 0.1 survive
    assert survivors(apply_min_p(x, 0.15)) == [0, 1, 2]
    assert survivors(apply_min_p(x, 0.5)) == [0]
    assert survivors(apply_min_p(x, 0.0)) == [0, 1, 2, 3, 4]


def test_surviving_mass_after_filters():
    x = logits_of([0.4, 0.3, 0.2, 0.1])
    p = apply_top_k(x, 3).softmax(-1)
    assert torch.allclose(p, torch.tensor([4 / 9, 3 / 9, 2 / 9, 0.0]), atol=1e-6)


def test_repetition_penalty_signs():
    x = torch.tensor([2.0, -2.0, 1.0, -1.0])
    seen = torch.tensor([True, True, False, False])
    assert apply_repetition_penalty(x, seen, 2.0).tolist() == [1.0, -4.0, 1.0, -1.0]


def test_presence_frequency():
    x = torch.zeros(4)
    counts = torch.tensor([0.0, 1.0, 3.0, 0.0])
    assert apply_presence_frequency(x, counts, 0.5, 0.25).tolist() == [0.0, -0.75, -1.25, 0.0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_filters_match_transformers(seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(3, 200, generator=g) * 3
    ids = torch.randint(0, 200, (3, 17), generator=g)
    seen = torch.zeros(3, 200, dtype=torch.bool).scatter_(1, ids, True)
    torch.testing.assert_close(apply_repetition_penalty(scores, seen, 1.3),
                               RepetitionPenaltyLogitsProcessor(1.3)(ids, scores.clone()), rtol=0, atol=0)
    torch.testing.assert_close(apply_temperature(scores, 0.7), TemperatureLogitsWarper(0.7)(ids, scores),
                               rtol=0, atol=0)
    for k in (1, 5, 50):
        torch.testing.assert_close(apply_top_k(scores, k), TopKLogitsWarper(k)(ids, scores), rtol=0, atol=0)
    for p in (0.1, 0.5, 0.9, 0.99):
        torch.testing.assert_close(apply_top_p(scores, p), TopPLogitsWarper(p)(ids, scores), rtol=0, atol=0)
    for m in (0.05, 0.15, 0.5):
        torch.testing.assert_close(apply_min_p(scores, m), MinPLogitsWarper(m)(ids, scores), rtol=0, atol=0)


def test_sampler_composition_matches_transformers_chain():
    """Penalty -> temperature -> top_k -> top_p -> min_p, as transformers' generate orders them."""
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(1, 300, generator=g) * 2
    prompt = torch.randint(0, 300, (1, 30), generator=g)
    params = SamplingParams(temperature=0.8, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.2, seed=0)
    ours = Sampler(params, 300, prompt[0]).process(scores[0])
    ref = scores.clone()
    for proc in (RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.8), TopKLogitsWarper(40),
                 TopPLogitsWarper(0.9), MinPLogitsWarper(0.05)):
        ref = proc(prompt, ref)
    torch.testing.assert_close(ours, ref[0], rtol=0, atol=0)


@pytest.mark.parametrize("params", [
    dict(temperature=0, repetition_penalty=1.3, min_p=0.0), dict(temperature=0, repetition_penalty=1.0),
    dict(), dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.0), dict(temperature=1.0, top_p=0.8, min_p=0.0),
    dict(temperature=1.3, top_k=20, min_p=0.1, presence_penalty=0.5, frequency_penalty=0.3),
    dict(temperature=1.0, min_p=0.0, repetition_penalty=1.0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_path_draws_what_the_vocabulary_filters_draw(params, dtype):
    """The CPU path (penalty on the seen tokens only, filters on a candidate list) gives, step by step and with the
    same seed, the tokens of process() over the whole vocabulary followed by argmax / sample_from_logits."""
    g = torch.Generator().manual_seed(11)
    V, prompt = 3000, torch.randint(0, 3000, (200,), generator=g)
    sp = SamplingParams(seed=5, **params)
    fast = Sampler(sp, V, prompt, eos_ids=(3, 9), min_new_tokens=4)
    ref = Sampler(sp, V, prompt, eos_ids=(3, 9), min_new_tokens=4)
    drawn = []
    for step in range(40):
        logits = (torch.randn(V, generator=g) * 4).to(dtype)
        if step < 5:
            logits[3] = 50.0  # an eos token that wins once min_new_tokens allows it
        x = ref.process(logits)
        want = x.argmax() if ref.generator is None else sample_from_logits(x, ref.generator)
        got = fast(logits)
        assert got.dtype == torch.long and got.dim() == 0
        assert int(got) == int(want), f"step {step}"
        for s in (fast, ref):
            s.observe(want, int(want))
        drawn.append(int(want))
    assert 3 not in drawn[:4] and drawn[4] == 3  # the eos suppression held, and ended on time
    assert len(set(drawn)) > 10


@pytest.mark.parametrize("params", [dict(), dict(temperature=0.7, top_k=5, min_p=0.0), dict(temperature=0)])
def test_nan_logits_give_a_token_not_an_error(params):
    s = Sampler(SamplingParams(seed=1, **params), 50)
    tok = s(torch.full((50,), float("nan")))
    assert tok.dtype == torch.long and 0 <= int(tok) < 50


def test_sampler_penalty_tracks_generated_tokens():
    s = Sampler(SamplingParams(temperature=0, repetition_penalty=2.0, min_p=0.0), 4, prompt_ids=[0])
    x = torch.tensor([3.0, 2.5, 1.0, 0.0])
    assert s(x).item() == 1  # 3.0 -> 1.5 (seen in prompt), so 2.5 wins
    s.observe(torch.tensor(1))
    assert s(x).item() == 0  # 1.5 vs 1.25 now


def test_same_seed_same_tokens_and_different_seed_differs():
    logits = torch.randn(64, generator=torch.Generator().manual_seed(0))
    def draw(seed):
        s = Sampler(SamplingParams(temperature=1.0, min_p=0.0, repetition_penalty=1.0, seed=seed), 64)
        return [s(logits).item() for _ in range(50)]
    assert draw(123) == draw(123)
    assert draw(123) != draw(124)


def test_temperature_zero_is_greedy_and_ignores_seed():
    logits = torch.randn(64, generator=torch.Generator().manual_seed(1))
    for seed in (None, 0, 99):
        s = Sampler(SamplingParams(temperature=0, seed=seed, repetition_penalty=1.0), 64)
        assert s.generator is None
        assert [s(logits).item() for _ in range(5)] == [int(logits.argmax())] * 5


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.2, 0.0])
    s = Sampler(SamplingParams(temperature=1.0, min_p=0.0, repetition_penalty=1.0, seed=7), 4)
    draws = torch.stack([s(probs.log()) for _ in range(20000)])
    freq = torch.bincount(draws, minlength=4).float() / len(draws)
    assert freq[3] == 0
    assert torch.allclose(freq, probs, atol=0.015)


def test_min_p_and_top_k_never_sample_filtered_tokens():
    logits = logits_of([0.6, 0.3, 0.05, 0.05])
    s = Sampler(SamplingParams(temperature=1.0, min_p=0.2, repetition_penalty=1.0, seed=3), 4)
    assert set(torch.stack([s(logits) for _ in range(2000)]).tolist()) == {0, 1}


def test_logprobs():
    logits = logits_of([0.5, 0.25, 0.25])
    lp, top, ids = token_logprobs(logits, torch.tensor(1), top_n=2)
    assert math.isclose(lp.item(), math.log(0.25), rel_tol=1e-5)
    assert ids.tolist()[0] == 0 and math.isclose(top[0].item(), math.log(0.5), rel_tol=1e-5)


@pytest.mark.parametrize("kw", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(min_p=2),
                                dict(top_k=-3), dict(repetition_penalty=0), dict(presence_penalty=3),
                                dict(seed="x"), dict(temperature=float("nan"))])
def test_bad_params_raise_clear_errors(kw):
    name = next(iter(kw))
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kw)


def test_numpy_scalars_are_numbers_and_bools_are_not():
    """Every numeric option takes numpy's real scalars as numbers (and hands Python numbers on); a bool, numpy's
    included, is not a number; logprobs is a bool and nothing else."""
    import numpy as np

    p = SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), seed=np.uint64(7))
    assert (p.temperature, p.top_k, p.seed) == (0.5, 3, 7) and type(p.top_k) is int and type(p.temperature) is float
    for value in (True, np.bool_(True)):
        with pytest.raises(ValueError, match="temperature=.* is invalid; expected a number >= 0"):
            SamplingParams(temperature=value)
    with pytest.raises(ValueError, match="top_k=.* is invalid; expected an integer >= 0"):
        SamplingParams(top_k=np.float32(2))
    with pytest.raises(ValueError, match="logprobs='yes' is invalid; expected True or False"):
        SamplingParams(logprobs="yes")
