"""The fused native decode step (cpu/kernels/decode.cpp via cpu.speed.FastLfm2VlModel) computes what the torch path computes:
fp32 within float rounding, bf16 and int8 with the same argmax and (near-)identical logits; one row, several rows,
rows decoding in place in a larger cache, every instruction-set fallback; it steps aside (torch path, same results)
when a layer is swapped after it was built; bad positions / rows are clear errors."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lfm2vl.cpu import kernels
from lfm2vl.cpu.speed import FastLfm2VlModel, optimize_for_cpu
from checkpoints import run_cached, tiny_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable on this machine")
PROMPTS = [[1, 6, 20, 30, 40, 7, 6, 50, 60], [1, 6, 99, 98, 97, 96, 95, 94, 93, 92, 91, 90, 89, 7, 6]]
CASES = [([PROMPTS[0]], None), (PROMPTS, None), ([PROMPTS[0]], [1]), (PROMPTS, [2, 0])]


def _pair(dtype, text=None, **kw):
    fast = optimize_for_cpu(tiny_model(dtype, seed=kw.pop("seed", 0), **(text or {})), **kw)
    assert isinstance(fast, FastLfm2VlModel) and fast.native_decoder is not None
    torch_path = copy.deepcopy(fast)  # a deep copy drops the decoder: the same modules on the torch path
    assert torch_path.native_decoder is None
    return fast, torch_path


def _close(got, ref, dtype):
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    else:  # same kernels and the same bf16 roundings: at most a rare last-bit flip in a norm
        assert torch.equal(got.argmax(-1), ref.argmax(-1))
        assert F.cosine_similarity(got, ref, dim=-1).min() > 0.99999
        assert (got - ref).abs().max() <= 0.05 * ref.abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_step_equals_torch_path(dtype):
    fast, torch_path = _pair(dtype)
    calls = []

    class Counting:  # records the rows of each step the decoder took (None: it left the step to torch)
        def __init__(self, dec):
            self.dec = dec

        def __call__(self, *a):
            out = self.dec(*a)
            if out is not None:
                calls.append(a[0].shape[0])
            return out

    fast.native_decoder = Counting(fast.native_decoder)
    for prompts, slots in CASES:
        _close(run_cached(fast, prompts, 6, slots), run_cached(torch_path, prompts, 6, slots), dtype)
    # every decode step of every case took the native path (6 per case), no prefill chunk did
    assert len(calls) == 6 * len(CASES) and set(calls) == {1, 2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_step_on_widths_off_the_vector_length(dtype):
    """Widths that are not multiples of 16 lanes (a head of 18, a model of 72), four conv taps and a conv bias: the
    vectorized norms, RoPE, cache writes and convolution handle their tails as the torch path computes them."""
    fast, torch_path = _pair(dtype, text=dict(hidden_size=72, num_attention_heads=4, num_key_value_heads=2,
                                               conv_L_cache=4, conv_bias=True))
    with torch.no_grad():  # a bias the random init leaves at zero would not show a missing add
        for m in fast.modules():
            if isinstance(m, nn.Conv1d) and m.bias is not None:
                m.bias.normal_(0, 0.5)
    torch_path.load_state_dict(fast.state_dict())
    for prompts, slots in CASES:
        _close(run_cached(fast, prompts, 6, slots), run_cached(torch_path, prompts, 6, slots), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_rope_far_into_the_context(dtype):
    """The step turns q and k by its own cos / sin of float32(position) * inv_freq: at position ~20000 (angles up to
    2e4 rad) the logits still match the torch path's (torch's cos / sin of the same angles)."""
    fast, torch_path = _pair(dtype)
    _close(run_cached(fast, PROMPTS, 4, start=20000), run_cached(torch_path, PROMPTS, 4, start=20000), dtype)


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_quantized_native_step_equals_quantized_torch_path(fmt):
    from lfm2vl.cpu.quant import Int4Linear, Int8Linear

    fast, torch_path = _pair(torch.bfloat16, seed=3, quantize_head=True, **{fmt: True})
    want = Int4Linear if fmt == "int4" else Int8Linear
    assert type(fast.lm_head) is want and type(fast.model.language_model.layers[0].feed_forward.w2) is want
    for prompts, slots in CASES:
        _close(run_cached(fast, prompts, 5, slots), run_cached(torch_path, prompts, 5, slots), torch.bfloat16)


@pytest.mark.parametrize("isa", [2, 1, 0])
def test_instruction_set_fallbacks(isa):
    fast, torch_path = _pair(torch.float32)
    try:
        kernels.set_isa(isa)
        _close(run_cached(fast, PROMPTS, 4, [2, 0]), run_cached(torch_path, PROMPTS, 4, [2, 0]), torch.float32)
    finally:
        kernels.set_isa(3)


def test_swapped_layer_falls_back_to_torch():
    fast, torch_path = _pair(torch.float32)

    class Wrapped(nn.Module):  # e.g. a LoRA wrapper: the decoder cannot see inside it
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return self.inner(x) * 0.5

    for m in (fast, torch_path):
        ff = m.model.language_model.layers[0].feed_forward
        ff.w2 = Wrapped(ff.w2)
    assert not fast.native_decoder.matches()
    torch.testing.assert_close(run_cached(fast, PROMPTS, 3), run_cached(torch_path, PROMPTS, 3), rtol=0, atol=0)
    # rebuilding with the wrapper in place: unsupported, so no decoder at all
    assert optimize_for_cpu(fast).native_decoder is None


def test_bad_position_and_rows_are_clear_errors():
    fast, _ = _pair(torch.float32)
    cache = fast.make_cache(2, 8)
    emb = fast.embed(torch.tensor([[5], [6]]))
    with torch.inference_mode():
        with pytest.raises(ValueError, match="outside the cache"):
            fast.forward_cached(emb, cache, torch.tensor([3, 8]))
        with pytest.raises(ValueError, match="rows"):
            fast.forward_cached(emb, cache, torch.tensor([3, 4]), rows=torch.tensor([0, 5]))
        with pytest.raises(ValueError, match="start_pos"):
            fast.forward_cached(emb, cache, torch.tensor([3]))


def test_unusable_cache_or_input_keeps_the_torch_path():
    fast, _ = _pair(torch.bfloat16)
    dec = fast.native_decoder
    emb, pos = fast.embed(torch.tensor([[5]])), torch.tensor([3])
    with torch.inference_mode():
        assert dec(emb, fast.make_cache(1, 8), pos) is not None
        assert dec(emb, fast.make_cache(1, 8, dtype=torch.float32), pos) is None  # cache in another dtype
        assert dec(emb.float(), fast.make_cache(1, 8), pos) is None  # embeddings in another dtype
        assert dec(fast.embed(torch.tensor([[5, 6]])), fast.make_cache(1, 8), pos) is None  # two tokens: prefill


def test_step_is_given_torchs_thread_count():
    """The native step (RoPE included) runs on torch's thread count and leaves it as it was."""
    fast, torch_path = _pair(torch.bfloat16)
    steps = []

    class Threads:  # the thread count the native step itself is given
        def __init__(self, lib):
            self.lib = lib

        def __getattr__(self, name):
            return getattr(self.lib, name)

        def lfm2vl_decode_step(self, *a):
            steps.append(a[-1])
            return self.lib.lfm2vl_decode_step(*a)

    fast.native_decoder._lib = Threads(fast.native_decoder._lib)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _close(run_cached(fast, PROMPTS, 3, None), run_cached(torch_path, PROMPTS, 3, None), torch.bfloat16)
        assert steps == [2, 2, 2]
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
