"""Native GEMV kernels (lfm2vl/cpu/kernels) and the quant module swap (lfm2vl/cpu/quant.py) against F.linear.

Every instruction-set path the CPU has (AVX512-BF16, AVX512F, AVX2, scalar) is checked against F.linear computed
in fp32; int8 against F.linear over the dequantized weight. The torch fallback (LFM2VL_NO_KERNELS=1, or no
compiler) runs in subprocesses so the switch is the real one, read at first use.
"""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lfm2vl.cpu import gemm, kernels
from lfm2vl.cpu.quant import (FastLinear, Int4Linear, Int8Linear, quantize_weight_int4, quantize_weight_int8,
                              quantize_weights, use_fast_linears)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_kernels = pytest.mark.skipif(os.environ.get("LFM2VL_NO_KERNELS", "0") not in ("", "0"),
                                   reason="kernels disabled by LFM2VL_NO_KERNELS (the fallback tests still run)")
SHAPES = [(1024, 1024), (67, 100), (515, 1056), (9, 33), (130, 4608)]


def _quantized_activations(x: torch.Tensor, bits: int) -> torch.Tensor:
    """x rounded as the integer products quantize it (gemv_avx2.cpp, gemv_vnni.cpp): int8 weights meet x in 16 bits
    per block of 256 (the last block shorter), int4 weights x in 8 bits per block of 32; per block
    d = amax / (2^(b-1) - 1) and round(x * (1 / d)) to nearest even, times d."""
    block, top = (256, 32767) if bits == 8 else (32, 127)
    out = []
    for xb in x.float().split(block, dim=-1):
        d = xb.abs().amax(-1, keepdim=True) / top
        inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
        out.append(torch.round(xb * inv) * d)
    return torch.cat(out, -1)


def _quantized_path(K: int, bits: int) -> bool:
    """Whether int8 / int4 products with rows K long take the quantized-activation path (AVX2, AVX512-VNNI)."""
    return kernels.quantizes_x(bits) and K % 32 == 0


def _tol(ref: torch.Tensor, K: int, out_dtype: torch.dtype) -> torch.Tensor:
    if out_dtype == torch.bfloat16:  # one rounding of the output to bf16 (8 significant bits)
        return ref.abs() * 2.0 ** -7 + 1e-3
    return ref.abs() * 1e-5 + 1e-6 * K


@needs_kernels
def test_kernels_build_and_detect_cpu():
    assert kernels.available(), "the kernels must build on the CI machine (g++ is there)"
    assert kernels.isa() >= 0


@needs_kernels
def test_integer_products_follow_the_cpu():
    """int8 / int4 products quantize x exactly where integer dot products exist: AVX2, and AVX512 with VNNI (read
    from /proc/cpuinfo, so a broken detection cannot silently fall back to the fp32 paths)."""
    with open("/proc/cpuinfo") as f:
        flags = next((ln.split(":", 1)[1].split() for ln in f if ln.startswith("flags")), [])
    isa = kernels.isa()
    want = isa == 1 or (isa >= 2 and "avx512_vnni" in flags)
    assert kernels.quantizes_x(8) == want and kernels.quantizes_x(4) == want
    if isa >= 2:
        kernels.set_isa(1)
        try:
            assert kernels.quantizes_x(8) and kernels.quantizes_x(4)  # the AVX2 path
        finally:
            kernels.set_isa(3)


@needs_kernels
@pytest.mark.parametrize("isa_cap", [3, 2, 1, 0], indirect=True)
@pytest.mark.parametrize("wdt,xdt", [(torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32),
                                     (torch.float32, torch.float32), (torch.float32, torch.bfloat16)])
def test_float_weights_match_fp32_linear(isa_cap, wdt, xdt):
    if kernels.isa() < isa_cap:
        pytest.skip(f"CPU lacks ISA level {isa_cap}")
    g = torch.Generator().manual_seed(isa_cap)
    for (N, K) in SHAPES:
        for M in (1, 2, 3, 5, 9, 14):  # 9 and 14: blocks of 4 x 4 rows plus 1 and 2 activation rows
            W = torch.randn(N, K, generator=g).to(wdt)
            x = torch.randn(M, K, generator=g).to(xdt)
            bias = torch.randn(N, generator=g) if N % 2 else None
            y = kernels.linear(x, W, bias)
            assert y.dtype == xdt and y.shape == (M, N)
            ref = F.linear(x.float(), W.float(), bias)
            err = (y.float() - ref).abs()
            assert (err <= _tol(ref, K, xdt)).all(), f"{(N, K, M)} max err {err.max():.3g}"


@needs_kernels
def test_one_row_products_agree_with_and_without_row_streams():
    """One activation row reads several weight rows at once on Intel CPUs and one on others (bf16 eight, int8
    four, int4 two); both run here whatever the CPU: int8 and int4 sums equal bit for bit (each row's integer blocks and
    fp32 steps in the same order), bf16 ones are the same fp32 products in another order (each within the fp32
    tolerance of F.linear). The shapes leave rows over after the last whole step and groups after the last 16."""
    if kernels.isa() < 3 or not _quantized_path(1024, 8) or not _quantized_path(1024, 4):
        pytest.skip("the several-stream rows need AVX512-BF16 and VNNI")
    g = torch.Generator().manual_seed(5)
    try:
        for (N, K) in SHAPES:
            w = torch.randn(N, K, generator=g).bfloat16()
            x = torch.randn(1, K, generator=g).bfloat16()
            q, s = quantize_weight_int8(w)
            q4, s4 = quantize_weight_int4(w) if K % 32 == 0 else (None, None)
            out = {}
            for mode in (1, 0):
                kernels.set_streams(mode)
                out[mode] = (kernels.linear(x, w, None), kernels.linear(x.float(), q, None, s),
                             kernels.linear(x.float(), q4, None, s4) if q4 is not None else None)
            ref = F.linear(x.float(), w.float())
            for mode in (1, 0):
                assert ((out[mode][0].float() - ref).abs() <= _tol(ref, K, torch.bfloat16)).all(), (N, K, mode)
            if K % 32 == 0:
                assert torch.equal(out[1][1], out[0][1]), (N, K)
                assert torch.equal(out[1][2], out[0][2]), (N, K)
    finally:
        kernels.set_streams(-1)


@needs_kernels
@pytest.mark.parametrize("isa_cap", [3, 2, 1], indirect=True)
def test_products_are_the_same_with_and_without_weight_prefetch(isa_cap):
    """The one-stream rows of bf16 and int8 weights prefetch them in software on most CPUs and not on AMD Zen 4; that
    changes when the bytes arrive, never a sum: products of 1, 3 and 9 activation rows (9: bf16 in blocks of four
    weight rows) equal bit for bit with it and without it, on each instruction set the CPU has."""
    if kernels.isa() < isa_cap:
        pytest.skip(f"CPU lacks ISA level {isa_cap}")
    g = torch.Generator().manual_seed(11)
    try:
        kernels.set_streams(0)
        for (N, K) in [(515, 1056), (130, 4608), (67, 96)]:
            w = torch.randn(N, K, generator=g).bfloat16()
            q, s = quantize_weight_int8(w)
            for M in (1, 3, 9):
                x = torch.randn(M, K, generator=g).bfloat16()
                out = {}
                for mode in (1, 0):
                    kernels.set_prefetch(mode)
                    out[mode] = (kernels.linear(x, w, None), kernels.linear(x, q, None, s))
                for a, b in zip(out[1], out[0]):
                    assert a.isfinite().all() and torch.equal(a, b), (N, K, M)
    finally:
        kernels.set_prefetch(-1)
        kernels.set_streams(-1)


@needs_kernels
@pytest.mark.parametrize("isa_cap", [3, 2, 1, 0], indirect=True)
@pytest.mark.parametrize("xdt", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("cls", [Int8Linear, Int4Linear])
def test_quantized_matches_dequantized_linear(isa_cap, xdt, cls):
    """int8 and int4 products equal F.linear over the dequantized weight (on AVX2: of x quantized as that path does);
    prefill's native dequantization gives the same values as the torch formula."""
    if kernels.isa() < isa_cap:
        pytest.skip(f"CPU lacks ISA level {isa_cap}")
    g = torch.Generator().manual_seed(10 + isa_cap)
    # int4: K % 32 == 0; rows of 17 and 19 groups cross a block of 16 scales and end inside the next
    shapes = SHAPES if cls is Int8Linear else [(1, 32), (37, 64), (300, 96), (65, 1024), (9, 544), (5, 608)]
    for (N, K) in shapes:
        lin = cls(*cls.quantize_weight(torch.randn(N, K, generator=g)), bias=None)
        W = lin.dequantize(torch.float32)
        bias = torch.randn(N, generator=g)
        for M in (1, 4, 7):
            x = torch.randn(M, K, generator=g).to(xdt)
            y = kernels.linear(x, lin.weight, bias, lin.scale)
            bits = 8 if cls is Int8Linear else 4
            ref = F.linear(_quantized_activations(x, bits) if _quantized_path(K, bits) else x.float(), W, bias)
            err = (y.float() - ref).abs()
            assert (err <= _tol(ref, K, xdt)).all(), f"{(N, K, M)} max err {err.max():.3g}"
        for dt in (torch.float32, torch.bfloat16):
            assert torch.equal(lin._native_dequantize(torch.empty(N, K, dtype=dt)), W.to(dt))


def test_quantize_weight_int4_format():
    """Q4_0's rule per group of 32: d = extreme / -8, q = clamp(round(w / d), -8, 7) stored as q + 8, d kept in fp16
    (rounded to nearest even); byte j of a group packs element j (low nibble) and element 16 + j (high nibble)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(5, 96, generator=g)
    w[1, 32:64] = 0.0  # an all-zero group keeps scale 1
    w[2, 5] = 9.0  # a positive extreme maps to -8 with a negative scale
    w[3, 64:96] *= 1e-5  # a scale below fp16's normal range: stored as a subnormal, rounded like torch
    packed, scale = quantize_weight_int4(w)
    assert packed.shape == (5, 48) and packed.dtype == torch.uint8 and scale.shape == (5, 3)
    assert scale.dtype == torch.float16
    assert scale[1, 1] == 1 and scale[2, 0] == -9.0 / 8
    b = packed.view(5, 3, 16).long()  # (row, group, byte j)
    q = torch.cat((b & 15, b >> 4), dim=-1) - 8  # (row, group, 32): elements j, then 16 + j
    for r in range(5):
        for grp in range(3):
            chunk = w[r, 32 * grp:32 * grp + 32]
            ext = chunk[chunk.abs().argmax()]
            d = ext / -8 if ext != 0 else torch.tensor(1.0)
            assert scale[r, grp] == d.half()  # the levels come from the fp32 d, the stored scale is its fp16
            assert torch.equal(q[r, grp], torch.round(chunk / d).clamp(-8, 7).long())
    lin = Int4Linear(packed, scale, None)
    assert lin.in_features == 96 and lin.out_features == 5
    assert torch.equal(lin.dequantize(), (q.float() * scale.float()[..., None]).view(5, 96))
    assert (lin.dequantize() - w).abs().max() <= scale.float().abs().max() * (0.5 + 8 * 2 ** -11)  # half a step off
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_weight_int4(torch.randn(4, 40))


@needs_kernels
def test_bf16_close_to_torch_bf16_linear_and_batched_shapes():
    """Against torch's own bf16 F.linear: at most one bf16 rounding step apart; (B, T, K) inputs keep their shape."""
    W = torch.randn(3072, 1024).bfloat16()
    x = torch.randn(2, 1, 1024).bfloat16()
    y = kernels.linear(x, W)
    ref = F.linear(x, W)
    assert y.shape == ref.shape == (2, 1, 3072)
    assert ((y.float() - ref.float()).abs() <= ref.float().abs() * 2.0 ** -7 + 1e-3).all()
    x_nc = torch.randn(1024, 3).bfloat16().t()[:1]  # non-contiguous input
    assert torch.allclose(kernels.linear(x_nc, W).float(), F.linear(x_nc.float(), W.float()), rtol=1e-2, atol=1e-1)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B", [1, 3])
@pytest.mark.parametrize("n,H,Hkv,Dh", [(17, 12, 4, 64), (40, 32, 8, 64), (35, 8, 4, 128), (20, 4, 2, 32)])
def test_attn_decode_matches_sdpa(dtype, B, n, H, Hkv, Dh):
    """One-query attention over a slice of a static cache (strided k/v), GQA, per-row key masks; key counts across
    and between blocks of 16, 1-4 query heads per key head, head sizes with their own register layouts."""
    g = torch.Generator().manual_seed(B)
    S = 48
    q = torch.randn(B, H, 1, Dh, generator=g).to(dtype)
    kc, vc = (torch.randn(B, Hkv, S, Dh, generator=g).to(dtype) for _ in range(2))
    k, v = kc[:, :, :n], vc[:, :, :n]
    last = torch.tensor([16, 5, 0])[:B]
    mask = None if B == 1 else (torch.arange(n)[None, :] <= last[:, None])[:, None, None]
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    out = kernels.attn_decode(q, k, v, mask)
    assert out.dtype == dtype and out.shape == (B, H, 1, Dh)
    torch.testing.assert_close(out.float(), ref, **({} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)))
    with pytest.raises(ValueError, match="attn_decode"):
        kernels.attn_decode(q, k, v.contiguous(), mask)
    # rows: query row b reads cache row rows[b] in place (a 5-row cache, rows in any order)
    big_k, big_v = (torch.randn(5, Hkv, S, Dh, generator=g).to(dtype) for _ in range(2))
    rows = torch.tensor([4, 0, 2])[:B]
    ref = F.scaled_dot_product_attention(q.float(), big_k[rows, :, :n].float(), big_v[rows, :, :n].float(),
                                         attn_mask=mask, enable_gqa=True)
    out = kernels.attn_decode(q, big_k[:, :, :n], big_v[:, :, :n], mask, rows)
    torch.testing.assert_close(out.float(), ref, **({} if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)))
    with pytest.raises(ValueError, match="rows"):
        kernels.attn_decode(q, big_k[:, :, :n], big_v[:, :, :n], mask, rows + 5)


@needs_kernels
def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match="features"):
        kernels.linear(torch.randn(1, 10), torch.randn(4, 12))
    with pytest.raises(ValueError, match="scale"):
        kernels.linear(torch.randn(1, 12), torch.zeros(4, 12, dtype=torch.int8))
    with pytest.raises(ValueError, match="int4 .* 8 values"):  # int4 (4, 64) needs (4, 2) group scales
        kernels.linear(torch.randn(1, 64), torch.zeros(4, 32, dtype=torch.uint8), None, torch.ones(4))
    with pytest.raises(ValueError, match="dequantize_int4"):
        kernels.dequantize_int4(torch.zeros(4, 32, dtype=torch.uint8), torch.ones(4, 2), torch.empty(4, 32))


def test_quantize_weight_int8_roundtrip():
    w = torch.randn(33, 70)
    w[3] = 0.0  # an all-zero row must not divide by zero
    q, s = quantize_weight_int8(w)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and q.abs().max() <= 127
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()
    assert (q[3] == 0).all()


class _Toy(nn.Module):
    """The module layout quant.py expects: model.{language_model, vision_tower}, lm_head tied to embed."""

    def __init__(self, dtype):
        super().__init__()
        self.model = nn.Module()
        self.model.language_model = nn.Module()
        lm = self.model.language_model
        lm.embed_tokens = nn.Embedding(300, 64)
        lm.layers = nn.ModuleList([nn.Sequential(nn.Linear(64, 192, bias=False), nn.SiLU(),
                                                 nn.Linear(192, 64, bias=False)) for _ in range(2)])
        self.model.vision_tower = nn.Sequential(nn.Linear(64, 64))
        self.lm_head = nn.Linear(64, 300, bias=False)
        self.lm_head.weight = lm.embed_tokens.weight
        self.to(dtype)

    def forward(self, ids):
        h = self.model.language_model.embed_tokens(ids)
        for layer in self.model.language_model.layers:
            h = h + layer(h)
        return self.lm_head(h)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fast_linears_keep_results_and_tying(dtype):
    torch.manual_seed(0)
    model = _Toy(dtype).eval()
    ids_decode, ids_prefill = torch.tensor([[5]]), torch.randint(0, 300, (1, 40))
    with torch.inference_mode():
        ref_d, ref_p = model(ids_decode), model(ids_prefill)
    keys = set(model.state_dict())
    use_fast_linears(model)
    assert set(model.state_dict()) == keys
    assert type(model.model.vision_tower[0]) is nn.Linear  # the vision tower is never touched
    if kernels.available():
        assert isinstance(model.lm_head, FastLinear)
        assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    with torch.inference_mode():
        out_d, out_p = model(ids_decode), model(ids_prefill)
    tol = dict(rtol=2e-2, atol=2e-2) if dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out_d, ref_d, **tol)
    # prefill-size inputs: gemm.linear (oneDNN; fp32 where the CPU has no bf16 GEMM), the same product within rounding
    torch.testing.assert_close(out_p, ref_p, **tol)
    # autograd still works (the kernel has no backward; training falls back to F.linear)
    model(ids_decode).float().sum().backward()
    assert model.model.language_model.layers[0][0].weight.grad is not None


def test_quantize_weights_int8_decode_and_prefill_agree():
    torch.manual_seed(1)
    model = _Toy(torch.bfloat16).eval()
    n = quantize_weights(model, quantize_head=True)
    assert n == 5 and isinstance(model.lm_head, Int8Linear)
    assert type(model.model.vision_tower[0]) is nn.Linear
    lin = model.model.language_model.layers[0][0]
    x = torch.randn(1, 64).bfloat16()
    with torch.inference_mode():
        dec = lin(x)                          # kernel path (or torch without kernels)
        pre = lin(x.expand(20, 64))[:1]       # F.linear over the dequantized weight
    ref = F.linear(x.float(), lin.dequantize())
    if kernels.available():  # the kernel: fp32 math on the exact int8 * scale weight, one bf16 output rounding
        want = F.linear(_quantized_activations(x, 8), lin.dequantize()) if _quantized_path(64, 8) else ref
        assert ((dec.float() - want).abs() <= want.abs() * 2.0 ** -7 + 1e-3).all()
    else:  # plain torch: F.linear over the weight dequantized to bf16
        assert torch.equal(dec, F.linear(x, lin.dequantize(torch.bfloat16)))
    # prefill dequantizes to its GEMM's dtype (bf16: one more rounding per weight): bf16-level agreement
    torch.testing.assert_close(pre.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())


def _run(code: str, **env) -> subprocess.CompletedProcess:
    e = dict(os.environ, PYTHONPATH=REPO, **env)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=e,
                          timeout=300)


def test_fallback_without_kernels_is_plain_torch():
    code = """
        import torch, torch.nn as nn, torch.nn.functional as F
        from lfm2vl.cpu import kernels
        from lfm2vl.cpu.quant import use_fast_linears, quantize_weights, Int8Linear
        assert not kernels.available() and kernels.isa() == -1
        m = nn.Module(); m.model = nn.Module(); m.model.language_model = nn.Sequential(nn.Linear(16, 32))
        m.lm_head = nn.Linear(32, 8)
        x = torch.randn(1, 16)
        ref = m.lm_head(m.model.language_model(x))
        use_fast_linears(m)
        assert type(m.lm_head) is nn.Linear and type(m.model.language_model[0]) is nn.Linear
        assert torch.equal(m.lm_head(m.model.language_model(x)), ref)
        quantize_weights(m)
        assert isinstance(m.model.language_model[0], Int8Linear)
        y = m.model.language_model(x)
        assert torch.allclose(y, F.linear(x, m.model.language_model[0].dequantize(), m.model.language_model[0].bias))
        print("OK")
    """
    r = _run(code, LFM2VL_NO_KERNELS="1")
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr


def test_missing_compiler_falls_back_with_a_warning(tmp_path):
    code = """
        import warnings
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            from lfm2vl.cpu import kernels
            assert not kernels.available()
        assert any("native kernels unavailable" in str(x.message) for x in w), [str(x.message) for x in w]
        print("OK")
    """
    r = _run(code, LFM2VL_CACHE=str(tmp_path), CXX="/nonexistent/g++", LFM2VL_NO_KERNELS="0")
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr


@needs_kernels
def test_fresh_build_into_empty_cache(tmp_path):
    code = """
        import torch
        from lfm2vl.cpu import kernels
        assert kernels.available()
        W = torch.randn(64, 96).bfloat16(); x = torch.randn(1, 96).bfloat16()
        assert torch.allclose(kernels.linear(x, W).float(), (x.float() @ W.float().T), rtol=1e-2, atol=1e-1)
        print("OK")
    """
    r = _run(code, LFM2VL_CACHE=str(tmp_path))
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr
    assert list(tmp_path.glob("kernels/*/libgemv.so"))


@needs_kernels
def test_process_exits_with_helpers_asleep():
    """The pool's helper threads must not keep the interpreter from exiting (a destroyed condition variable with
    sleeping waiters used to hang the exit)."""
    code = """
        import time, torch
        from lfm2vl.cpu import kernels
        torch.set_num_threads(2)
        W = torch.randn(4096, 1024).bfloat16(); x = torch.randn(1, 1024).bfloat16()
        for _ in range(5):
            kernels.linear(x, W)
        time.sleep(0.05)  # the helpers go to sleep on the condition variable
        print("OK")
    """
    r = _run(code)
    assert r.returncode == 0 and "OK" in r.stdout, r.stderr


def test_int8_prefill_dequantizes_into_a_reused_buffer_with_the_same_values(monkeypatch):
    """Where int8 compute does not win (AMX CPUs; forced here), the prefill multiplies the dequantized weight."""
    from lfm2vl.cpu import int8mm

    monkeypatch.setattr(int8mm, "wins", lambda: False)
    torch.manual_seed(2)
    a = Int8Linear.from_linear(nn.Linear(64, 96).bfloat16())
    b = Int8Linear.from_linear(nn.Linear(64, 96).bfloat16())  # same shape: shares the scratch buffer
    x = torch.randn(40, 64).bfloat16()
    dt = gemm.compute_dtype(torch.bfloat16)  # the GEMM's dtype on this CPU (fp32 without a bf16 GEMM)
    with torch.inference_mode():
        ya, yb = a(x), b(x)  # the second product reuses the buffer the first one read
        want_a = gemm.linear(x, a.dequantize(dt), a.bias.bfloat16())
        want_b = gemm.linear(x, b.dequantize(dt), b.bias.bfloat16())
    assert torch.equal(ya, want_a) and torch.equal(yb, want_b)
    if kernels.available():
        out = torch.empty(96, 64)
        assert torch.equal(kernels.dequantize_int8(a.weight, a.scale, out), a.dequantize(torch.float32))
        with pytest.raises(ValueError, match="dequantize_int8"):
            kernels.dequantize_int8(a.weight, a.scale, torch.empty(3, 3))
    # with autograd on, the product never reads the shared buffer (backward would see it overwritten)
    xg = torch.randn(40, 64, requires_grad=True)
    a(xg).sum().backward()
    assert xg.grad is not None


def test_int4_keeps_int8_for_rows_that_do_not_fill_whole_groups():
    """bits=4 quantizes a layer whose rows are a multiple of 32 long to Int4Linear and any other to Int8Linear."""
    m = nn.Module()
    m.model = nn.Module()
    m.model.language_model = nn.Sequential(nn.Linear(64, 8), nn.Linear(40, 8))
    m.lm_head = nn.Linear(64, 100, bias=False)
    assert quantize_weights(m, bits=4, quantize_head=True) == 3
    assert [type(x) for x in m.model.language_model] == [Int4Linear, Int8Linear] and type(m.lm_head) is Int4Linear
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        quantize_weights(m, bits=3)


@needs_kernels
@pytest.mark.parametrize("isa_cap", [3, 1, 0], indirect=True)  # the AVX512 rows, the AVX2 ones, the scalar ones
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fn", [quantize_weight_int8, quantize_weight_int4])
def test_native_quantization_equals_the_torch_formula(monkeypatch, isa_cap, dtype, fn):
    """Loading quantizes natively; the torch formula (no kernels) must give the very same q and scales: ties between
    extremes (the first wins), zero rows and groups, negative extremes, several row blocks, rows not a multiple of
    16 long (int8; the scalar rows)."""
    if kernels.isa() < isa_cap:
        pytest.skip(f"CPU lacks ISA level {isa_cap}")
    from lfm2vl.cpu import quant

    g = torch.Generator().manual_seed(1)
    for K in ([1024, 70] if fn is quantize_weight_int8 else [1024, 96]):
        w = (torch.randn(300, K, generator=g) * torch.rand(300, 1, generator=g)).to(dtype)
        w[3] = 0
        w[5, :64] = 0
        w[7, 0], w[7, 1] = 4.0, -4.0  # a tie in magnitude: argmax's first index
        w[9, 40] = -50.0
        native = fn(w, block_bytes=1 << 18)
        with monkeypatch.context() as mp:
            mp.setattr(quant.kernels, "available", lambda: False)
            reference = fn(w, block_bytes=1 << 18)
        assert all(torch.equal(a, b) for a, b in zip(native, reference)), K


@needs_kernels
@pytest.mark.parametrize("amx_on", [True, False], indirect=True)  # AMX-BF16 tiles where the CPU has them, or not
@pytest.mark.parametrize("n,H,L,Dh", [(1, 12, 1024, 64), (2, 4, 100, 72), (3, 2, 37, 64), (1, 3, 1, 16),
                                      (1, 2, 40, 112)])
def test_attn_many_unmasked_matches_sdpa(n, H, L, Dh, amx_on):
    """The vision tower's attention (no mask) within each of n units: as close to float32 math as torch's own bf16
    flash kernel is; padded keys (L not a multiple of 32) get no weight; head sizes off the tiles' 32 columns."""
    if kernels.isa() < 3:
        pytest.skip("needs AVX512-BF16")
    g = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(n * L, H * Dh, generator=g).bfloat16().view(n, L, H, Dh).transpose(1, 2) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
    flash = F.scaled_dot_product_attention(q, k, v)
    out = kernels.attn_many(q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == (n, L, H * Dh)
    err = (out.view(n, L, H, Dh).transpose(1, 2).float() - ref).abs().max()
    assert err <= 1.5 * (flash.float() - ref).abs().max() + 2e-3, err


@needs_kernels
@pytest.mark.parametrize("amx_on", [True, False], indirect=True)
@pytest.mark.parametrize("starts,T,H,Hkv,Dh", [([0], 512, 16, 8, 64), ([300], 70, 4, 2, 64), ([0, 45, 5], 33, 6, 3, 72),
                                               ([7], 1, 2, 1, 16), ([20], 17, 2, 2, 128)])
def test_attn_many_causal_prefill_matches_masked_sdpa(starts, T, H, Hkv, Dh, amx_on):
    """A prefill chunk over a KV cache: query l of row b sees keys 0..starts[b]+l, read in place from cache-shaped
    buffers (b, Hkv, S_max, Dh), GQA; as close to float32 math as torch's flash kernel with the same mask."""
    if kernels.isa() < 3:
        pytest.skip("needs AVX512-BF16")
    g = torch.Generator().manual_seed(T)
    n, S_max = len(starts), max(starts) + T + 9
    kc, vc = (torch.randn(n, Hkv, S_max, Dh, generator=g).bfloat16() for _ in range(2))
    q = torch.randn(n, T, H, Dh, generator=g).bfloat16().transpose(1, 2)  # (n, H, T, Dh), the projection's layout
    S = max(starts) + T
    k, v = kc[:, :, :S], vc[:, :, :S]  # the used prefix, as CacheView.kv_update slices it
    pos = torch.tensor(starts)[:, None] + torch.arange(T)
    mask = (torch.arange(S)[None, None, :] <= pos[:, :, None])[:, None]
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    flash = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    out = kernels.attn_many(q, k, v, [s + T for s in starts], causal=True)
    assert out.shape == (n, T, H * Dh)
    err = (out.view(n, T, H, Dh).transpose(1, 2).float() - ref).abs().max()
    assert err <= 1.5 * (flash.float() - ref).abs().max() + 2e-3, err


@needs_kernels
@pytest.mark.parametrize("amx_on", [True, False], indirect=True)
def test_attn_many_subtracts_each_rows_true_maximum(amx_on):
    """A key whose score stands ~128 above the rest (its exponential overflows fp32 unless the row's own maximum is
    subtracted) takes all of its query's weight wherever it sits among 1030 keys: in each lane group of the max's
    unrolled vectors, or in the last partial vector."""
    if kernels.isa() < 3:
        pytest.skip("needs AVX512-BF16")
    g = torch.Generator().manual_seed(7)
    L, Dh = 1030, 64
    q, k, v = (torch.randn(1, 1, L, Dh, generator=g).bfloat16() for _ in range(3))
    where = [3, 20, 37, 50, 1000, 1029]
    for i, j in enumerate(where):
        k[0, 0, j] = q[0, 0, i] * 16  # score 16 |q|^2 / sqrt(64) ~ 128
    out = kernels.attn_many(q, k, v).view(L, Dh)
    assert torch.isfinite(out).all()
    for i, j in enumerate(where):
        torch.testing.assert_close(out[i].float(), v[0, 0, j].float(), rtol=0, atol=1e-2)


@needs_kernels
@pytest.mark.parametrize("amx_on", [True, False], indirect=True)
@pytest.mark.parametrize("n,H,L,Dh,nkeys,offset", [(1, 12, 1024, 64, None, 0.0), (2, 4, 100, 72, [100, 61], 0.0),
                                                   (3, 2, 37, 66, [37, 5, 36], 0.0), (1, 4, 300, 64, None, 8.0)])
def test_attn_many_int8_scores_stay_close_to_float_math(n, H, L, Dh, nkeys, offset, amx_on):
    """The int8 tower's scores (int8_scores): within 0.03 of float32 math and a cosine of 0.999 for each output row,
    units with fewer keys than their buffer (the rest get no weight), head sizes off a multiple of 4, and keys sharing
    a large offset per head column (8 sigma: its mean is taken out before the keys are rounded). Where the CPU runs
    them in int8 the output differs from the bf16 scores'; elsewhere (AMX tiles, no VNNI) it is theirs, bit for bit."""
    if kernels.isa() < 3:
        pytest.skip("needs AVX512-BF16")
    g = torch.Generator().manual_seed(L + Dh)
    q, k, v = (torch.randn(n * L, H * Dh, generator=g).bfloat16().view(n, L, H, Dh).transpose(1, 2) for _ in range(3))
    k = (k.float() + offset * torch.randn(Dh, generator=g)).bfloat16()
    keys = nkeys or [L] * n
    visible = (torch.arange(L)[None, :] < torch.tensor(keys)[:, None])[:, None, None, :]  # (n, 1, 1, L)
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=visible)
    out = kernels.attn_many(q, k, v, nkeys, int8_scores=True)
    got = out.view(n, L, H, Dh).transpose(1, 2).float()
    assert (got - ref).abs().max() <= 0.03, (got - ref).abs().max()
    assert F.cosine_similarity(got.reshape(-1, Dh), ref.reshape(-1, Dh)).min() >= 0.999
    bf16 = kernels.attn_many(q, k, v, nkeys)
    assert torch.equal(out, bf16) != kernels.attn_int8_scores()


@needs_kernels
def test_attn_many_declines_what_it_does_not_support():
    q = torch.randn(1, 2, 8, 33).bfloat16()
    assert kernels.attn_many(q, q, q) is None  # odd head size
    with pytest.raises(ValueError, match="nkeys"):  # causal needs a key per query at least
        kernels.attn_many(q, q, q, [4], causal=True)
    with pytest.raises(ValueError, match="unsupported"):
        kernels.attn_many(q.float(), q.float(), q.float())
    try:
        kernels.set_isa(2)  # AVX512F without BF16 dot products
        x = torch.randn(1, 1, 8, 64).bfloat16()
        assert kernels.attn_many(x, x, x) is None
    finally:
        kernels.set_isa(3)


@needs_kernels
@pytest.mark.parametrize("shape", [(1024, 768), (3, 7, 33), (5, 1152)])
@pytest.mark.parametrize("bias", [True, False])
def test_layernorm_equals_torch_within_a_rounding(shape, bias):
    """The vision tower's native LayerNorm: fp32 statistics (summed in another order than torch's) and one bf16
    rounding: nearly every value equals F.layer_norm's, the rest one bf16 step apart."""
    if kernels.isa() < 2:
        pytest.skip("needs AVX512")
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(shape, generator=g) * 3 + 1).bfloat16()
    w = torch.randn(shape[-1], generator=g).bfloat16()
    b = torch.randn(shape[-1], generator=g).bfloat16() if bias else None
    got, want = kernels.layernorm(x, w, b, 1e-6), F.layer_norm(x, (shape[-1],), w, b, 1e-6)
    assert got.dtype == torch.bfloat16 and got.shape == want.shape
    assert (got != want).float().mean() <= 0.01
    torch.testing.assert_close(got, want, rtol=2 ** -7, atol=1e-2)
    assert kernels.layernorm(x.float(), w, b, 1e-6) is None and kernels.layernorm(x, w.float(), b, 1e-6) is None


@needs_kernels
def test_gelu_tanh_equals_torch_gelu_in_place():
    """The native tanh GELU after a bf16 product: torch's bf16 F.gelu(approximate="tanh") values (fp32 math, one
    rounding), in place. Only in the negative tail do they differ: torch's 0.5 v (1 + tanh(u)) cancels there, the
    kernel's v e / (1 + e) does not; where |gelu| >= 1e-4 at most 1 in 500 values one bf16 step apart, below it
    by under 1e-6."""
    if kernels.isa() < 2:
        pytest.skip("needs AVX512")
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(40_000, generator=g).mul(3), torch.tensor([0.0, -0.0, 1e-30, -1e-30, 30.0, -30.0,
                                                                       1e4, -1e4])]).bfloat16()
    want = F.gelu(x, approximate="tanh")
    y = x.clone()
    assert kernels.gelu_tanh_(y) is y
    big, tail = want.float().abs() >= 1e-2, want.float().abs() < 1e-4
    assert torch.equal(y[big], want[big]) and (y[~tail] != want[~tail]).float().mean() <= 2e-3
    torch.testing.assert_close(y[~tail], want[~tail], rtol=2 ** -7, atol=0)
    assert (y[tail].float() - want[tail].float()).abs().max() < 1e-6
    assert kernels.gelu_tanh_(x.float()) is None and kernels.gelu_tanh_(x.view(2, -1).t()) is None


@needs_kernels
@pytest.mark.parametrize("shape", [(512, 4608), (3, 7, 33), (1, 1)])
def test_swiglu_and_rmsnorm_equal_the_torch_ops(shape):
    """The prefill's fused SwiGLU and RMSNorm round where model/text.py does: bf16 results equal torch's (an exp
    1 ulp apart, or the norm's fp32 sum in another order, may flip a rare rounding: at most 1 in 10,000)."""
    from lfm2vl.model.text import RMSNorm

    if kernels.isa() < 2:
        pytest.skip("needs AVX512")
    g = torch.Generator().manual_seed(shape[-1])
    a, b = (torch.randn(shape, generator=g).mul(4).bfloat16() for _ in range(2))
    norm = RMSNorm(shape[-1], 1e-5).bfloat16()
    norm.weight.data = torch.randn(shape[-1], generator=g).bfloat16()
    with torch.no_grad():
        pairs = [(kernels.swiglu(a, b), F.silu(a) * b), (kernels.rmsnorm(a, norm.weight, norm.eps), norm(a))]
    for got, want in pairs:
        assert got.dtype == torch.bfloat16 and got.shape == want.shape
        assert (got != want).float().mean() <= 1e-4
        torch.testing.assert_close(got, want, rtol=2 ** -6, atol=1e-6)  # a flip: one bf16 step of silu, then *b
    # what they do not take, the caller runs in torch
    x = torch.randn(8, 64).bfloat16()
    assert kernels.swiglu(x.float(), x.float()) is None and kernels.swiglu(x, x[:4]) is None
    assert kernels.rmsnorm(x.t(), torch.ones(8).bfloat16(), 1e-5) is None  # not contiguous
    assert kernels.rmsnorm(x, torch.ones(64), 1e-5) is None  # fp32 weight
    try:
        kernels.set_isa(1)  # AVX2: no AVX512 version
        assert kernels.swiglu(x, x) is None and kernels.rmsnorm(x, torch.ones(64).bfloat16(), 1e-5) is None
    finally:
        kernels.set_isa(3)


@needs_kernels
@pytest.mark.parametrize("words", [0, 7, 1000, (32 << 17) * 3 // 2 + 3])
def test_stream_read_reads_every_word(words):
    """The bench's read probe visits each 8-byte word once, across chunk and eighth boundaries and the leftovers."""
    buf = torch.randint(-2 ** 62, 2 ** 62, (words,), dtype=torch.int64, generator=torch.Generator().manual_seed(words))
    want = int(np.bitwise_xor.reduce(buf.numpy().view(np.uint64))) if words else 0
    assert kernels.stream_read(buf) == want
