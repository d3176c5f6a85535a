"""Int8 compute for products of many rows (lfm2vl/cpu/int8mm.py, kernels/int8mm.cpp, kernels/amx.cpp): activations
quantized per row, an exact int8 product (AMX tiles or torch._int_mm), one scaling pass; the int8 prefill and the
int8 vision tower built on it."""
import copy
import ctypes
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from lfm2vl.cpu import int8mm, kernels
from lfm2vl.cpu.quant import Int4Linear, Int8Linear, quantize_weight_int4, quantize_weight_int8
from lfm2vl.cpu.speed import optimize_for_cpu
from lfm2vl.generate.options import PREFILL_CHUNK

from checkpoints import tiny_model

needs_kernels = pytest.mark.skipif(os.environ.get("LFM2VL_NO_KERNELS", "0") not in ("", "0"),
                                   reason="kernels disabled by LFM2VL_NO_KERNELS")


def _rows_formula(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    amax = xf.abs().amax(1)
    s = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    return (xf / s[:, None]).round().clamp(-127, 127).to(torch.int8), s


def _inputs(M: int, K: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g) * torch.rand(M, 1, generator=g) * 10
    x[1] = 0  # an all-zero row: scale 1
    x[2, 3] = -x[2].abs().max() * 2  # a negative extreme
    return x.to(dtype)


@needs_kernels
@pytest.mark.parametrize("isa_cap", [3, 1], indirect=True)  # the AVX512 loop and the plain one
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("K", [1024, 70])
def test_quantize_rows_equals_the_torch_formula(isa_cap, dtype, K):
    x = _inputs(300, K, dtype)
    q, s = kernels.quantize_rows(x)
    want_q, want_s = _rows_formula(x)
    assert torch.equal(s, want_s) and torch.equal(q, want_q)


@needs_kernels
@pytest.mark.parametrize("isa_cap", [3, 1], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_epilogue_is_one_fp32_formula_rounded_once(isa_cap, dtype):
    """acc * xs * ws + bias + residual in fp32 in that order, one rounding to the output dtype: bit for bit."""
    g = torch.Generator().manual_seed(3)
    M, N = 37, 100
    acc = torch.randint(-2 ** 22, 2 ** 22, (M, N), generator=g, dtype=torch.int32)
    xs, ws = torch.rand(M, generator=g) / 100, torch.rand(N, generator=g) / 100
    bias, res = torch.randn(N, generator=g).to(dtype), torch.randn(M, N, generator=g).to(dtype)
    for b, r in ((None, None), (bias, None), (bias, res)):
        want = acc.float() * xs[:, None] * ws[None, :]
        want = want if b is None else want + b.float()
        want = (want if r is None else want + r.float()).to(dtype)
        assert torch.equal(kernels.int8_epilogue(acc, xs, ws, b, r, dtype), want)


@needs_kernels
@pytest.mark.parametrize("isa_cap", [3, 1], indirect=True)
def test_epilogue_gelu_matches_torch_tanh_gelu(isa_cap):
    acc = torch.arange(-4000, 4000, dtype=torch.int32).view(80, 100)
    xs, ws = torch.full((80,), 1e-2), torch.full((100,), 0.2)  # values from -8 to 8
    got = kernels.int8_epilogue(acc, xs, ws, None, None, torch.float32, gelu=True)
    want = F.gelu(acc.float() * xs[:, None] * ws[None, :], approximate="tanh")
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


@needs_kernels
@pytest.mark.parametrize("amx_on", [True, False], indirect=True)
@pytest.mark.parametrize("gelu", [None, "tanh", "none"])
def test_int8_linear_is_the_exact_integer_product_scaled(gelu, amx_on):
    """int8mm.linear = the per-row quantized x times the int8 weight, summed exactly, scaled, + bias, GELU, +
    residual (float64 products as the oracle: every partial sum is an integer below 2^53)."""
    M, K, N = 45, 130, 70
    x = _inputs(M, K, torch.float32, seed=5)
    q, ws = quantize_weight_int8(torch.randn(N, K))
    bias, res = torch.randn(N), torch.randn(M, N)
    xq, xs = _rows_formula(x)
    v = (xq.double() @ q.double().t()).float() * xs[:, None] * ws[None, :] + bias
    want = (v if gelu is None else F.gelu(v, approximate=gelu)) + res
    got = int8mm.linear(x.view(5, 9, K), q, ws, bias, gelu, res.view(5, 9, N))
    assert got.shape == (5, 9, N)
    torch.testing.assert_close(got.view(M, N), want, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="features"):
        int8mm.linear(x[:, :-1], q, ws)


@needs_kernels
@pytest.mark.parametrize("amx_on", [True, False], indirect=True)
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (16, 32, 64), (33, 17, 65), (50, 100, 200), (64, 96, 4304),
                                   (31, 33, 128), (50, 130, 8300)])
def test_int_mm_is_the_exact_integer_product(M, N, K, amx_on):
    """kernels.int_mm = x . w^T summed exactly in int32, on AMX tiles where they run (whole and ragged 16-row
    tiles, 32-column panels and 64-byte steps of K, each padded where the shape stops short; K = 8300 over 130
    outputs packed in two blocks) and through torch._int_mm otherwise; extreme values included."""
    g = torch.Generator().manual_seed(M * 7 + K)
    x = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    w = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    x[0, :] = -127
    w[-1, :] = -127
    out = torch.full((M, N), 7, dtype=torch.int32)
    assert kernels.int_mm(x, w, out) is out
    assert torch.equal(out, (x.long() @ w.long().t()).int())


@needs_kernels
def test_amx_int8_runs_where_the_cpu_has_the_tiles():
    """The int8 (bf16) tiles are used on every CPU whose flags list AMX-INT8 (AMX-BF16), Linux granting their use,
    and nowhere else."""
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    # Linux's permission for the tile data, asked the same way (SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XTILEDATA)
    granted = "amx_tile" in flags and ctypes.CDLL(None, use_errno=True).syscall(158, 0x1023, 18) == 0
    assert kernels.amx_int8() == (granted and "amx_int8" in flags)
    assert kernels.amx_bf16() == (granted and "amx_bf16" in flags)


@needs_kernels
@pytest.mark.parametrize("amx_on", [True, False], indirect=True)
def test_int8_products_fuse_their_epilogue_on_amx_or_vnni(amx_on):
    """int8_linear and swiglu_h run on AMX-INT8 tiles at any size, or with AVX512-VNNI (and AVX512-BF16, the
    instruction set the kernels pick with it) up to a prefill chunk's rows, nowhere else; capped at AVX512F, not
    with VNNI."""
    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    vnni = kernels.isa() >= 3 and "avx512_vnni" in flags
    assert kernels.int8_fused(PREFILL_CHUNK) == (kernels.amx_int8() or vnni)
    assert kernels.int8_fused(1024) == kernels.amx_int8()  # a vision unit's rows: oneDNN's product there
    kernels.set_isa(2)
    try:
        assert kernels.int8_fused(1) == kernels.amx_int8()
    finally:
        kernels.set_isa(3)


@needs_kernels
@pytest.mark.parametrize("amx_on", [True, False], indirect=True)
@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("M,N,K", [(1, 1, 1), (6, 32, 64), (7, 200, 64), (33, 17, 65), (50, 100, 1040),
                                   (64, 96, 4304), (50, 130, 8300), (300, 40, 200), (512, 70, 130), (90, 1000, 96)])
def test_fused_products_are_the_exact_integer_sums(M, N, K, threads, amx_on):
    """int8_linear with unit scales returns x . w^T summed exactly (fp32 holds every sum here): in VNNI registers
    blocks of 6 rows and a ragged last one, pairs of panels and a lone last one, the rows cut in parts where the
    panels are few, K = 8300 in groups of two panels, ragged K read past the row (the last block from a padded
    copy), 32 panels in groups of two on 3 threads (groups of four would split them 3 : 3 : 2); one thread or three;
    extreme values included (x + 128 reaches 255 in VNNI's unsigned bytes)."""
    g = torch.Generator().manual_seed(M * 7 + K)
    top = 127 if K <= 1040 else 31  # |sum| < 2^24
    x = torch.randint(-top, top + 1, (M, K), generator=g, dtype=torch.int8)
    w = torch.randint(-top, top + 1, (N, K), generator=g, dtype=torch.int8)
    x[0, :] = -top
    w[-1, :] = -top
    ones_m, ones_n = torch.ones(M), torch.ones(N)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        got = kernels.int8_linear(x, ones_m, w, ones_n, None, None, torch.float32)
    finally:
        torch.set_num_threads(before)
    if not kernels.int8_fused(M):  # no AMX-INT8 or AVX512-VNNI here: the caller takes torch._int_mm
        assert got is None
        return
    assert torch.equal(got, (x.long() @ w.long().t()).float())


@needs_kernels
@pytest.mark.parametrize("amx_on", [True, False], indirect=True)
@pytest.mark.parametrize("isa_cap", [3, 2], indirect=True)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_keeps_the_epilogue_values(dtype, isa_cap, amx_on):
    """int8_linear = int8_epilogue over int_mm's int32 result, bit for bit (scales, bias, GELU, residual, both
    output dtypes, ragged shapes); swiglu_h = the h that swiglu_int8 quantizes; on AMX tiles and in VNNI registers.
    None where neither runs (the caller takes the unfused path)."""
    g = torch.Generator().manual_seed(11)
    M, N, K = 45, 70, 130
    xq = torch.randint(-127, 128, (M, K), generator=g, dtype=torch.int8)
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    q3 = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    xs, ws, s3 = torch.rand(M, generator=g) / 100, torch.rand(N, generator=g) / 1000, torch.rand(N, generator=g) / 1000
    bias, res = torch.randn(N, generator=g), torch.randn(M, N, generator=g).to(dtype)
    acc, acc3 = (kernels.int_mm(xq, w, torch.empty(M, N, dtype=torch.int32)) for w in (q, q3))
    for b, r, gelu in ((None, None, False), (bias, None, True), (bias, res, False), (None, res, True)):
        got = kernels.int8_linear(xq, xs, q, ws, b, r, dtype, gelu)
        if not kernels.int8_fused(M):
            assert got is None
            return
        assert torch.equal(got, kernels.int8_epilogue(acc, xs, ws, b, r, dtype, gelu))
    for b1, b3 in ((None, None), (bias, -bias)):
        h = kernels.swiglu_h(xq, xs, q, ws, b1, q3, s3, b3)
        want = kernels.swiglu(kernels.int8_epilogue(acc, xs, ws, b1, None, torch.bfloat16),
                              kernels.int8_epilogue(acc3, xs, s3, b3, None, torch.bfloat16))
        assert h.dtype == torch.bfloat16 and torch.equal(h, want)


@needs_kernels
def test_int8_prefill_runs_int8_compute_where_it_wins(monkeypatch):
    """A prefill-size input of an Int8Linear takes int8mm.linear where int8 compute wins, and the dequantized
    weight's product where it does not; both stay within int8 error of the float product."""
    torch.manual_seed(4)
    lin = nn.Linear(256, 96).bfloat16()
    q = Int8Linear.from_linear(copy.deepcopy(lin))
    x = torch.randn(40, 256).bfloat16()
    with torch.inference_mode():
        ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
        monkeypatch.setattr(int8mm, "wins", lambda: True)
        on = q(x)
        assert torch.equal(on, int8mm.linear(x, q.weight, q.scale, q.bias))
        monkeypatch.setattr(int8mm, "wins", lambda: False)
        off = q(x)
    assert not torch.equal(on, off)
    for y in (on, off):
        cos = F.cosine_similarity(y.float(), ref, dim=-1)
        assert cos.min() > 0.999, cos.min()


@needs_kernels
def test_linears_quantize_x_once_with_the_values_of_linear():
    g = torch.Generator().manual_seed(10)
    x = torch.randn(2, 30, 64, generator=g).bfloat16()
    layers = [(torch.randint(-127, 128, (n, 64), generator=g, dtype=torch.int8), torch.rand(n, generator=g) / 100,
               torch.randn(n, generator=g)) for n in (64, 32, 48)]
    with torch.inference_mode():
        got = int8mm.linears(x, layers)
        assert all(torch.equal(y, int8mm.linear(x, *layer)) for y, layer in zip(got, layers))
    assert [tuple(y.shape) for y in got] == [(2, 30, 64), (2, 30, 32), (2, 30, 48)]


@needs_kernels
def test_swiglu_int8_is_the_three_passes_in_one():
    """The gate of an int8 SwiGLU MLP in one pass: the values of int8_epilogue (both products, bf16) -> swiglu ->
    quantize_rows, bit for bit, with biases and without (AVX512; elsewhere the three passes run)."""
    if kernels.isa() < 2:
        pytest.skip("the one-pass gate needs AVX512")
    g = torch.Generator().manual_seed(9)
    M, N = 37, 200
    a1, a3 = (torch.randint(-2 ** 20, 2 ** 20, (M, N), generator=g, dtype=torch.int32) for _ in range(2))
    xs = torch.rand(M, generator=g) / 1000
    s1, s3 = torch.rand(N, generator=g) / 100, torch.rand(N, generator=g) / 100
    b1, b3 = torch.randn(N, generator=g), torch.randn(N, generator=g)
    a1[5] = 0  # a row whose gate is all zero: silu(0) * up = 0, scale 1
    for bias in ((None, None), (b1, b3)):
        h = kernels.swiglu(kernels.int8_epilogue(a1, xs, s1, bias[0], None, torch.bfloat16),
                           kernels.int8_epilogue(a3, xs, s3, bias[1], None, torch.bfloat16))
        want_q, want_s = kernels.quantize_rows(h)
        q, s = kernels.swiglu_int8(a1, a3, xs, s1, s3, *bias)
        assert torch.equal(q, want_q) and torch.equal(s, want_s)
        if bias[0] is None:
            assert s[5] == 1 and (q[5] == 0).all()


@needs_kernels
@pytest.mark.parametrize("amx_on", [True, False], indirect=True)
@pytest.mark.parametrize("isa_cap", [3, 2, 1], indirect=True)  # AVX512F: the gate's own pass; AVX2: none
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_int8_mlp_fuses_the_gate_with_the_same_values(monkeypatch, fmt, isa_cap, amx_on):
    """An int8 / int4 MLP in int8 compute runs the fused gate (x quantized once for w1 and w3) where the CPU has
    AVX512: into the products' blocks on AMX tiles or with VNNI, else one pass after them; and returns exactly what
    w2(swiglu(w1 x, w3 x)) through three int8 products returns."""
    monkeypatch.setattr(int8mm, "wins", lambda: True)
    fast = optimize_for_cpu(tiny_model(torch.bfloat16, seed=8), **{fmt: True})
    mlp = fast.model.language_model.layers[0].feed_forward
    calls = []
    for name in ("swiglu_int8", "swiglu_h"):
        monkeypatch.setattr(kernels, name, lambda *a, real=getattr(kernels, name), name=name:
                            calls.append(name) or real(*a))
    x = torch.randn(3, 50, mlp.w1.in_features).bfloat16()  # past the layers' few-row kernel
    with torch.inference_mode():
        got = mlp(x)
        gate, up = mlp.w1(x), mlp.w3(x)
        avx512 = kernels.isa() >= 2  # the capped level, at most the CPU's own
        want = mlp.w2(kernels.swiglu(gate, up) if avx512 else F.silu(gate) * up)
    fused = "swiglu_h" if kernels.int8_fused(150) else "swiglu_int8"
    assert calls == ([fused] if avx512 else [])
    assert torch.equal(got, want)


@needs_kernels
@pytest.mark.parametrize("isa_cap", [3, 1], indirect=True)
@pytest.mark.parametrize("K", [96, 224, 1056])  # 3, 7 and 33 groups a row: whole registers and tails
def test_int4_widens_to_int8_rows_by_the_formula(isa_cap, K):
    """int4 weights as int8 rows for int8 compute: srow = 8 max|s_g| / 127, q8 = round(level * (s_g / srow)),
    bit for bit; an all-zero row gets scale 1; every widened weight within half an int8 step of the int4 one."""
    w = torch.randn(70, K) * torch.rand(70, 1)
    w[4] = 0
    w[6, 32:64] *= 50  # one group far larger than the others: the others lose precision
    q4, s = quantize_weight_int4(w)
    q8, srow = torch.empty(70, K, dtype=torch.int8), torch.empty(70)
    kernels.int4_to_int8(q4, s, q8, srow)
    lin = Int4Linear(q4, s, None)
    level = lin.dequantize().view(70, K // 32, 32) / s.float()[..., None]  # the int4 levels, -8..7
    sf = s.float()
    want_s = sf.abs().amax(1) * 8 / 127
    want_s = torch.where(want_s > 0, want_s, torch.ones_like(want_s))
    want_q = (level * (sf / want_s[:, None])[..., None]).round().clamp(-127, 127).view(70, K).to(torch.int8)
    assert torch.equal(srow, want_s) and torch.equal(q8, want_q)
    err = (q8.float() * srow[:, None] - lin.dequantize()).abs()
    assert (err <= srow[:, None] / 2 + 1e-6).all()


@needs_kernels
def test_int4_prefill_runs_int8_compute_where_it_wins(monkeypatch):
    torch.manual_seed(6)
    lin = nn.Linear(256, 96).bfloat16()
    q = Int4Linear.from_linear(copy.deepcopy(lin))
    x = torch.randn(40, 256).bfloat16()
    monkeypatch.setattr(int8mm, "wins", lambda: True)
    with torch.inference_mode():
        got = q(x)
        q8, srow = q.int8_rows()
        assert torch.equal(got, int8mm.linear(x, q8, srow, q.bias))
        cos = F.cosine_similarity(got.float(), F.linear(x.float(), q.dequantize(), q.bias.float()), dim=-1)
    assert cos.min() > 0.995, cos.min()


@needs_kernels
def test_int8_vision_quantizes_the_encoder_and_keeps_features_close(monkeypatch):
    """int8_vision: every encoder linear becomes Int8Linear (the patch embedding and projector stay float), runs
    int8 compute with the fusions (q, k and v from one quantized x), and the image features stay close to the float
    tower's."""
    plain = tiny_model(torch.bfloat16, seed=7)
    fast = optimize_for_cpu(copy.deepcopy(plain), int8_vision=True)
    tower = fast.model.vision_tower
    enc = [m for m in tower.encoder.modules() if isinstance(m, (nn.Linear, Int8Linear))]
    assert enc and all(type(m) is Int8Linear for m in enc)
    assert type(tower.embeddings.patch_embedding) is nn.Linear
    assert all(type(m) is nn.Linear for m in fast.model.multi_modal_projector.modules() if isinstance(m, nn.Linear))
    calls = []
    real, real_many = int8mm.linear, int8mm.linears
    monkeypatch.setattr(int8mm, "wins", lambda: True)
    monkeypatch.setattr(int8mm, "linear", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(int8mm, "linears", lambda x, layers: calls.extend([1] * len(layers)) or real_many(x, layers))
    g = torch.Generator().manual_seed(0)
    p = fast.config.vision_config.patch_size
    pix = torch.randn(2, 64, 3 * p * p, generator=g).bfloat16()
    mask = torch.ones(2, 64, dtype=torch.long)
    shapes = torch.tensor([[8, 8], [8, 8]])
    with torch.inference_mode():
        want, got = plain.image_features(pix, mask, shapes), fast.image_features(pix, mask, shapes)
    assert len(calls) == len(enc)
    cos = F.cosine_similarity(got.float(), want.float(), dim=-1)
    assert cos.min() > 0.99, cos.min()


@needs_kernels
@pytest.mark.parametrize("int8_vision", [True, False])
def test_only_an_int8_tower_asks_for_int8_attention_scores(monkeypatch, int8_vision):
    """The vision attention passes int8_scores to the native attention exactly when its projections are int8."""
    fast = optimize_for_cpu(tiny_model(torch.bfloat16, seed=7), int8_vision=int8_vision)
    asked = []
    monkeypatch.setattr(kernels, "attention_wins", lambda: True)
    monkeypatch.setattr(kernels, "attn_many", lambda *a, **k: asked.append(k.get("int8_scores")))  # None: torch's
    p = fast.config.vision_config.patch_size
    pix = torch.randn(1, 64, 3 * p * p, generator=torch.Generator().manual_seed(0)).bfloat16()
    with torch.inference_mode():
        fast.image_features(pix, torch.ones(1, 64, dtype=torch.long), torch.tensor([[8, 8]]))
    assert asked and set(asked) == {int8_vision}


def test_wins_needs_the_kernels_and_int8_tiles_where_the_cpu_has_amx(monkeypatch):
    int8mm.wins.cache_clear()
    try:
        monkeypatch.setattr(kernels, "available", lambda: True)
        monkeypatch.setattr(kernels, "int8_dots", lambda: True)
        monkeypatch.setattr(kernels, "amx", lambda: True)
        monkeypatch.setattr(kernels, "amx_int8", lambda: False)  # AMX-BF16 tiles, but the int8 ones do not run
        assert not int8mm.wins()
        int8mm.wins.cache_clear()
        monkeypatch.setattr(kernels, "amx_int8", lambda: True)
        assert int8mm.wins()
        int8mm.wins.cache_clear()
        monkeypatch.setattr(kernels, "amx", lambda: False)
        monkeypatch.setattr(kernels, "amx_int8", lambda: False)
        assert int8mm.wins()
        int8mm.wins.cache_clear()
        monkeypatch.setattr(kernels, "available", lambda: False)
        assert not int8mm.wins()
    finally:
        int8mm.wins.cache_clear()


@pytest.mark.parametrize("flags, dots", [({"avx2", "fma", "f16c"}, False), ({"avx2", "avx512f", "avx512_bf16"}, False),
                                         ({"avx2", "avx_vnni"}, True), ({"avx512f", "avx512_vnni"}, True),
                                         ({"amx_bf16", "amx_int8"}, True)])
def test_int8_compute_needs_int8_dot_products(monkeypatch, flags, dots):
    """Without VNNI or AMX-INT8, torch._int_mm is a plain loop: int8 prefill keeps the fp32 product there."""
    int8mm.wins.cache_clear()
    try:
        monkeypatch.setattr(kernels, "cpu_flags", lambda: frozenset(flags))
        monkeypatch.setattr(kernels, "available", lambda: True)
        monkeypatch.setattr(kernels, "amx_int8", lambda: True)
        assert kernels.int8_dots() == dots and int8mm.wins() == dots
    finally:
        int8mm.wins.cache_clear()


def test_the_cpu_flags_are_those_of_proc_cpuinfo():
    try:
        with open("/proc/cpuinfo") as f:
            line = next(ln for ln in f if ln.startswith("flags"))
    except (OSError, StopIteration):
        pytest.skip("no /proc/cpuinfo flags line on this system")
    assert kernels.cpu_flags() == frozenset(line.split(":", 1)[1].split()) and "fpu" in kernels.cpu_flags()


def test_int8_vision_is_cpu_only():
    """lfm2vl.load(int8_vision=True) refuses a non-CPU device like the other CPU formats."""
    from lfm2vl import load

    with pytest.raises(ValueError, match="int8_vision"):
        load("no/such-model", device="meta", int8_vision=True)
