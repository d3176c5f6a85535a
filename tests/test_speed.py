"""lfm2vl.cpu.speed.optimize_for_cpu keeps the model's results: cached prefill + decode logits of an optimized copy equal
the plain model's (fp32 tightly, bf16 within bf16 rounding), for one row and for two rows of different lengths
(all cache rows, or a subset decoding in place),
with and without the native kernels; int8 stays close to the float model."""
import copy

import pytest
import torch
import torch.nn.functional as F

from lfm2vl.cpu import kernels
from lfm2vl.cpu.speed import (FastAttention, FastMLP, FastRMSNorm, FastShortConv, causal_depthwise_conv,
                              optimize_for_cpu)

from checkpoints import run_cached, tiny_model


@pytest.mark.parametrize("u_len,K", [(3, 3), (40, 3), (9, 4)])
def test_causal_depthwise_conv_equals_conv1d(u_len, K):
    u = torch.randn(2, 16, u_len)
    w, b = torch.randn(16, 1, K), torch.randn(16)
    torch.testing.assert_close(causal_depthwise_conv(u, w, b), F.conv1d(u, w, b, groups=16), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_optimized_model_matches_plain_model(monkeypatch, dtype):
    plain = tiny_model(dtype)
    fast = optimize_for_cpu(copy.deepcopy(plain))
    lm = fast.model.language_model
    assert isinstance(lm.layers[0].conv, FastShortConv) and isinstance(lm.layers[1].self_attn, FastAttention)
    assert isinstance(lm.layers[0].feed_forward, FastMLP) and isinstance(lm.layers[1].self_attn.q_layernorm, FastRMSNorm)
    assert set(fast.state_dict()) == set(plain.state_dict())
    prompts = [[1, 6, 20, 30, 40, 7, 6, 50, 60], [1, 6, 99, 98, 97, 96, 95, 94, 93, 92, 91, 90, 89, 7, 6]]
    for rows, slots in (([prompts[0]], None), (prompts, None), ([prompts[0]], [1]), (prompts, [2, 0])):
        ref, got = run_cached(plain, rows, 6, slots), run_cached(fast, rows, 6, slots)
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
        else:  # bf16: different summation order, one bf16 rounding apart per op
            cos = F.cosine_similarity(got, ref, dim=-1)
            assert cos.min() > 0.999, cos.min()
    # the no-cache forward of a prefill-size input (more rows than the kernel's threshold) is unchanged too
    ids = torch.tensor([prompts[1] * 3])
    with torch.inference_mode():
        ref, native = plain(ids), fast(ids)
        monkeypatch.setattr(kernels, "attention_wins", lambda: False)  # torch's attention, as on AVX2 CPUs
        torch_attn = fast(ids)
    torch.testing.assert_close(torch_attn, ref, rtol=1e-4 if dtype == torch.float32 else 2e-2,
                               atol=1e-4 if dtype == torch.float32 else 5e-2)
    if dtype == torch.float32:
        torch.testing.assert_close(native, ref, rtol=1e-4, atol=1e-4)
    else:  # on AVX512-BF16 CPUs without AMX attention is native (kernels.attn_many): rounded like torch's, not bitwise
        cos = F.cosine_similarity(native[0].float(), ref[0].float(), dim=-1)
        assert cos.min() > 0.999, cos.min()


def test_int8_model_stays_close_to_float():
    plain = tiny_model(torch.bfloat16, seed=3)
    q = optimize_for_cpu(copy.deepcopy(plain), int8=True, quantize_head=True)
    cache = q.make_cache(1, 8)  # default dtype: the activations' (bf16), not the int8 head's
    assert cache.k[1].dtype == torch.bfloat16 and cache.conv[0].dtype == torch.bfloat16
    prompts = [[1, 6, 20, 30, 40, 7, 6, 50, 60, 70, 80]]
    ref, got = run_cached(plain, prompts, 4), run_cached(q, prompts, 4)
    cos = F.cosine_similarity(got, ref, dim=-1)
    assert cos.min() > 0.99, cos


@pytest.mark.parametrize("bias", [False, True])
def test_native_short_conv_equals_the_torch_path(monkeypatch, bias):
    """The conv block's middle as one native pass (kernels.short_conv, bf16) gives the torch path's output and conv
    state bit for bit: fresh and continued rows, gathered cache rows, chunks shorter than the state, a bias, and
    right-padded rows (the state after each row's last real input)."""
    from lfm2vl.cpu import kernels

    if kernels.isa() < 2:
        pytest.skip("needs the AVX512 kernels")
    conv = optimize_for_cpu(tiny_model(torch.bfloat16)).model.language_model.layers[0].conv
    if bias:
        conv.conv.bias = torch.nn.Parameter(torch.randn(conv.conv.weight.shape[0]).bfloat16())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 40, 64, generator=g).bfloat16()
    native, calls = kernels.short_conv, []
    for T, starts, rows, n, lengths in ((40, [0, 0], None, 2, None), (1, [5, 9], None, 2, None),
                                        (2, [7, 3], [2, 0], 3, None), (40, [13, 0], [1, 2], 3, None),
                                        (40, [13, 0], [1, 2], 3, [7, 40]), (3, [5, 0], None, 2, [1, 3])):
        got = {}
        for mode in ("native", "torch"):
            monkeypatch.setattr(kernels, "short_conv",
                                (lambda *a: calls.append(1) or native(*a)) if mode == "native" else lambda *a: None)
            cache = tiny_model(torch.bfloat16).make_cache(n, 64)
            for c in cache.conv:
                if c is not None:
                    c.copy_(torch.randn(c.shape, generator=torch.Generator().manual_seed(1)))
            with torch.inference_mode():
                view = cache.view(torch.tensor(starts), T, None if rows is None else torch.tensor(rows),
                                  None if lengths is None else torch.tensor(lengths))
                got[mode] = (conv(x[:, :T], None, view, 0), cache.conv[0].clone())
        assert torch.equal(got["native"][0], got["torch"][0]) and torch.equal(got["native"][1], got["torch"][1])
    with torch.inference_mode():  # no cache: a zero state
        monkeypatch.setattr(kernels, "short_conv", lambda *a: calls.append(1) or native(*a))
        y = conv(x, None, None, 0)
        monkeypatch.setattr(kernels, "short_conv", lambda *a: None)
        assert torch.equal(y, conv(x, None, None, 0))
    assert len(calls) == 7  # every native run above took the kernel


def test_using_lfm2vl_leaves_the_environment_as_it_found_it(tiny_checkpoint):
    """Loading and running a model (kernels, OpenMP team and all) changes no environment variable, so programs that
    lfm2vl starts (other engines in benchmarks) see the user's environment."""
    import os
    import subprocess
    import sys

    code = ("import os, json; before = dict(os.environ); import lfm2vl\n"
            f"e = lfm2vl.load({str(tiny_checkpoint)!r}); e.generate('hi', max_new_tokens=2)\n"
            "print(json.dumps([before == dict(os.environ), before.get('OMP_WAIT_POLICY')]))")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.stdout.strip().splitlines()[-1] == "[true, null]", out.stderr[-2000:]


@pytest.mark.parametrize("amx,tiles,wins", [(False, False, True), (True, False, False), (True, True, True)])
def test_native_attention_wins_by_cpu(monkeypatch, amx, tiles, wins):
    """attn_many's AVX512-BF16 products lose to torch's attention on AMX tiles; on an AMX CPU it wins on its own
    tiles; without AMX it wins."""
    from lfm2vl.cpu import kernels

    monkeypatch.setattr(kernels, "isa", lambda: 3)
    monkeypatch.setattr(kernels, "amx", lambda: amx)
    monkeypatch.setattr(kernels, "amx_bf16", lambda: tiles)
    assert kernels.attention_wins() == wins


@pytest.mark.parametrize("wins", [True, False])
def test_bf16_attention_over_many_queries_is_native_where_it_wins(monkeypatch, wins):
    """The prefill and the vision tower take attn_many where it wins, torch's SDPA elsewhere."""
    from lfm2vl.cpu import kernels

    calls = []  # whether each call computed the attention (None: the CPU lacks AVX512-BF16, torch's SDPA runs)
    native = kernels.attn_many

    def counted(*a, **k):
        out = native(*a, **k)
        calls.append(out is not None)
        return out
    monkeypatch.setattr(kernels, "attention_wins", lambda: wins)
    monkeypatch.setattr(kernels, "attn_many", counted)
    model = optimize_for_cpu(tiny_model(torch.bfloat16))
    run_cached(model, [list(range(5, 25))], steps=0)
    with torch.inference_mode():
        model.model.vision_tower(torch.randn(1, 16, 3 * 16 * 16).bfloat16(), torch.ones(1, 16, dtype=torch.int32),
                                 torch.tensor([[4, 4]]))
    assert len(calls) == (3 if wins else 0)  # asked where it wins: 2 attention layers, 1 vision layer
    assert sum(calls) == (3 if wins and kernels.isa() >= 3 else 0)  # and computed where the CPU runs it


def test_bf16_mlp_fuses_the_gate_into_its_products_where_the_amx_kernel_takes_them(monkeypatch):
    """A bf16 MLP over a prefill's rows has its gate fused into the w1 and w3 products on AMX-BF16 tiles
    (gemm.swiglu_gate) and returns exactly w2(swiglu(w1 x, w3 x)) through the same products; elsewhere it runs the
    two products and the pass."""
    from lfm2vl.cpu import gemm

    mlp = optimize_for_cpu(tiny_model(torch.bfloat16, seed=9)).model.language_model.layers[0].feed_forward
    calls = []
    monkeypatch.setattr(kernels, "swiglu_h_bf16_amx", lambda *a, real=kernels.swiglu_h_bf16_amx:
                        calls.append(a[0].shape) or real(*a))
    x = torch.randn(2, 75, mlp.w1.in_features).bfloat16()  # 150 rows: at least gemm.AMX_ROWS
    with torch.inference_mode():
        got = mlp(x)
        gate, up = mlp.w1(x), mlp.w3(x)
        want = mlp.w2(kernels.swiglu(gate, up) if kernels.available() and kernels.isa() >= 2 else F.silu(gate) * up)
    takes = kernels.available() and kernels.amx_bf16() and gemm.bf16_native()
    assert calls == ([(150, mlp.w1.in_features)] if takes else [])
    assert torch.equal(got, want)
