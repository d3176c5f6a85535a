"""cpu/gemm.py: prefill-size products, native bf16 or widened to fp32 (CPUs without a bf16 GEMM), against torch."""
import threading

import pytest
import torch
import torch.nn.functional as F

from lfm2vl.cpu import gemm, kernels


@pytest.fixture(params=(["native", "widened"] if gemm.bf16_native() else ["widened"])
                + (["amx"] if kernels.available() and kernels.amx_bf16() else []))
def mode(request, monkeypatch):
    """Each test runs as on a CPU without a bf16 GEMM (on every CPU), natively where this one has it, and on
    lfm2vl's AMX kernel where it has AMX-BF16 tiles (every bf16 shape sent there)."""
    if request.param == "widened":
        monkeypatch.setattr(gemm, "bf16_native", lambda: False)
        monkeypatch.setattr(gemm, "_BLOCK_BYTES", 4 * 96 * 37)  # blocks of 37 rows: 300 rows end inside a block
    if request.param == "amx":
        monkeypatch.setattr(gemm, "AMX_ROWS", 1)
        monkeypatch.setattr(gemm, "AMX_COLS", 1 << 20)
    else:
        monkeypatch.setattr(gemm, "AMX_COLS", 0)
        monkeypatch.setattr(gemm, "AMX_FUSED_COLS", 0)
    return request.param


def _within_one_rounding(y: torch.Tensor, ref: torch.Tensor) -> None:
    """y (bf16) is ref (fp32) rounded once, up to fp32 summation order: at most one bf16 step away."""
    step = ref.abs() * 2.0 ** -7 + 1e-6
    assert ((y.float() - ref).abs() <= step).all(), f"max err {(y.float() - ref).abs().max():.3g}"


@pytest.mark.parametrize("gelu", [None, "tanh", "none"])
def test_bf16_linear_is_the_fp32_product_rounded_once(mode, gelu):
    """The product rounded once; a GELU applies to that bf16 product (torch's bf16 F.linear then F.gelu) and is
    rounded once more."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 19, 96, generator=g).bfloat16()
    w, b = (torch.randn(300, 96, generator=g) / 10).bfloat16(), torch.randn(300, generator=g).bfloat16()
    y = gemm.linear(x, w, b, gelu=gelu)
    ref = F.linear(x.float(), w.float(), b.float())
    if gelu is not None:
        _within_one_rounding(gemm.linear(x, w, b), ref)
        ref = F.gelu(gemm.linear(x, w, b).float(), approximate=gelu)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 19, 300)
    _within_one_rounding(y, ref)


@pytest.mark.parametrize("M,N,K", [(50, 33, 70), (17, 100, 130), (64, 32, 32), (40, 50, 700), (50, 130, 4200)])
def test_ragged_shapes_are_the_fp32_product_rounded_once(mode, M, N, K):
    """Rows, outputs and inputs off the AMX kernel's tiles (16 rows, 32 outputs, 32 inputs a step; 700 inputs: slices
    of K, the last one short; 4200 inputs over 130 outputs: K packed in two blocks, the second one short), with a
    bias, and a residual or a tanh GELU (on the rounded product)."""
    g = torch.Generator().manual_seed(M + K)
    x, r = torch.randn(M, K, generator=g).bfloat16(), torch.randn(M, N, generator=g).bfloat16()
    w, b = (torch.randn(N, K, generator=g) / 8).bfloat16(), torch.randn(N, generator=g).bfloat16()
    ref = F.linear(x.float(), w.float(), b.float())
    y = gemm.linear(x, w, b)
    _within_one_rounding(y, ref)
    _within_one_rounding(gemm.linear(x, w, b, gelu="tanh"), F.gelu(y.float(), approximate="tanh"))
    _within_one_rounding(gemm.linear(x, w, b, residual=r), ref + r.float())


def test_residual_add_is_fused_before_the_rounding(mode):
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(33, 64, generator=g).bfloat16(), torch.randn(33, 300, generator=g).bfloat16()
    w = (torch.randn(300, 64, generator=g) / 8).bfloat16()
    y = gemm.linear(x, w, None, residual=r)
    _within_one_rounding(y, F.linear(x.float(), w.float()) + r.float())


def test_an_fp32_weight_multiplies_a_bf16_x_in_fp32(mode):
    """A weight the caller widened already (a dequantized int8 one) is used as it is, without a bf16 rounding."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(40, 64, generator=g).bfloat16(), torch.randn(96, 64, generator=g) / 8
    _within_one_rounding(gemm.linear(x, w), F.linear(x.float(), w))


def test_fp32_is_plain_fp32():
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(40, 64, generator=g), torch.randn(96, 64, generator=g), torch.randn(96, generator=g)
    torch.testing.assert_close(gemm.linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    assert gemm.compute_dtype(torch.float32) == torch.float32


def test_compute_dtype_follows_the_cpu(monkeypatch):
    assert gemm.compute_dtype(torch.bfloat16) == (torch.bfloat16 if gemm.bf16_native() else torch.float32)
    monkeypatch.setattr(gemm, "bf16_native", lambda: False)
    assert gemm.compute_dtype(torch.bfloat16) == torch.float32


def test_the_reused_buffer_works_in_and_out_of_inference_mode(mode, monkeypatch):
    """The widened-weight buffer first made inside torch.inference_mode() is written again outside it (an inference
    tensor there would refuse the in-place copy)."""
    monkeypatch.setattr(gemm, "_SCRATCH", threading.local())
    x, w = torch.randn(40, 96).bfloat16(), torch.randn(300, 96).bfloat16()
    with torch.inference_mode():
        a = gemm.linear(x, w)
    with torch.no_grad():
        b = gemm.linear(x, w)
    assert torch.equal(a, b)


@pytest.mark.parametrize("rows,cols,gelu,tiles,takes", [
    (1024, 768, None, True, True), (2048, 1024, "tanh", True, True),  # the vision tower's projections and fc2
    (512, 768, None, True, True), (1024, 3072, "tanh", True, True),  # a prefill chunk; fc1, its GELU fused
    (1024, 3072, None, True, False),  # a wide output without a GELU to fuse
    (64, 768, None, True, False),  # a few rows (a short prompt's chunk)
    (1024, 768, "none", True, True), (1024, 768, None, False, False)])  # erf GELU; no AMX-BF16 tiles
def test_bf16_products_take_the_amx_kernel_by_shape(monkeypatch, rows, cols, gelu, tiles, takes):
    """Many rows and at most AMX_COLS outputs (where oneDNN's own choice is slow) go to kernels.bf16_linear_amx on
    CPUs whose AMX-BF16 tiles run, and so does a product with its tanh GELU fused at any width; everything else to
    oneDNN."""
    calls = []

    def fake(x, w, bias, residual, gelu=False):
        calls.append((tuple(x.shape), gelu))
        return torch.zeros(x.shape[0], w.shape[0], dtype=torch.bfloat16)

    monkeypatch.setattr(kernels, "amx_bf16", lambda: tiles)
    monkeypatch.setattr(kernels, "bf16_linear_amx", fake)
    x, w = torch.randn(rows, 64).bfloat16(), torch.randn(cols, 64).bfloat16()
    y = gemm.linear(x.view(2, rows // 2, 64), w, gelu=gelu)
    assert y.shape == (2, rows // 2, cols)
    assert calls == ([((rows, 64), gelu == "tanh")] if takes and kernels.available() else [])


def test_a_fused_gelu_equals_the_product_then_the_gelu_pass(mode):
    """The tanh GELU fused into a product's epilogue gives the bits of the product rounded to bf16 and then GELU'd
    (the native pass where it runs)."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(150, 96, generator=g).bfloat16()
    w, b = (torch.randn(200, 96, generator=g) / 8).bfloat16(), torch.randn(200, generator=g).bfloat16()
    assert torch.equal(gemm.linear(x, w, b, gelu="tanh"), gemm._gelu(gemm.linear(x, w, b), "tanh"))


@pytest.mark.parametrize("K", [96, 2100])
def test_a_fused_swiglu_gate_equals_the_products_then_the_pass(mode, K):
    """gemm.swiglu_gate, where the AMX kernel takes the products, gives the bits of the two products rounded to bf16
    and then kernels.swiglu; elsewhere it declines (None) and the caller runs those. At K = 2100 the gate's kernel
    packs K in two blocks (two weights' panels) where each product alone packs it at once."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(150, K, generator=g).bfloat16()
    w1, w3 = ((torch.randn(200, K, generator=g) / 8).bfloat16() for _ in range(2))
    b1, b3 = (torch.randn(200, generator=g).bfloat16() for _ in range(2))
    h = gemm.swiglu_gate(x.view(3, 50, K), w1, b1, w3, b3)
    assert (h is not None) == (mode == "amx")
    if h is not None:
        assert h.shape == (3, 50, 200)
        assert torch.equal(h.view(150, 200), kernels.swiglu(gemm.linear(x, w1, b1), gemm.linear(x, w3, b3)))


@pytest.mark.parametrize("M,N,K", [(7, 96, 192), (37, 100, 320), (300, 33, 1024), (13, 70, 4480)])
def test_panel_products_are_onednns_sums_within_a_rounding(M, N, K):
    """bf16_mm sums as oneDNN's bf16 GEMM does (fp32 over K, rounded once): its outputs are those within one bf16
    step (an fp32 sum's last bits, where oneDNN cuts K in blocks, can round the other way: ~0.02% of a prefill's
    outputs) and within one step of the exact product; None where it does not run."""
    g = torch.Generator().manual_seed(M)
    x = (torch.randn(M, K, generator=g) * 0.5).bfloat16()
    w = (torch.randn(N, K, generator=g) * 0.02).bfloat16()
    got = kernels.bf16_mm(x, w)
    if not kernels.packed_fast():
        assert got is None
        return
    with torch.inference_mode():
        onednn = torch.mm(x, w.t())
    steps = (got.view(torch.int16).int() - onednn.view(torch.int16).int()).abs()
    assert int(steps.max()) <= 1 and int((steps > 0).sum()) <= max(1, M * N // 1000), int(steps.sum())
    exact = (x.double() @ w.double().t()).bfloat16()
    assert (got.view(torch.int16).int() - exact.view(torch.int16).int()).abs().max() <= 1


def test_bf16_products_without_a_bias_take_the_panel_kernel_where_it_runs():
    """linear sends a bf16 product with nothing to fuse to bf16_mm (its bits) wherever the kernel runs and the CPU has
    no AMX tiles, and one with a bias to oneDNN."""
    g = torch.Generator().manual_seed(9)
    x = torch.randn(40, 128, generator=g).bfloat16()
    w = (torch.randn(96, 128, generator=g) * 0.1).bfloat16()
    b = torch.randn(96, generator=g).bfloat16()
    with torch.inference_mode():
        panel = kernels.bf16_mm(x, w)
        assert gemm.panels_take(x, w) == (panel is not None and not kernels.amx_bf16())
        if panel is not None and gemm.panels_take(x, w):
            assert torch.equal(gemm.linear(x, w), panel)
        assert torch.equal(gemm.linear(x, w, b), torch.addmm(b, x, w.t()))


@pytest.mark.parametrize("bias", [False, True])
def test_a_weight_made_in_blocks_multiplies_to_linears_bits(mode, monkeypatch, bias):
    """linear_by_blocks asks for every row once, in blocks (300 rows in blocks of 100 here), and gives linear's bits
    for the whole weight; where linear would not run oneDNN's bf16 GEMM it returns None (the caller's whole-weight
    path)."""
    monkeypatch.setattr(gemm, "_BLOCK_BYTES", 2 * 96 * 100)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 150, 96, generator=g).bfloat16()
    w = (torch.randn(300, 96, generator=g) * 0.1).bfloat16()
    b = torch.randn(300, generator=g).bfloat16() if bias else None
    asked = []

    def fill(n0, n1, out):
        asked.append((n0, n1))
        out.copy_(w[n0:n1])

    with torch.inference_mode():
        y = gemm.linear_by_blocks(x, 300, fill, b)
        if mode != "native" or gemm.panels_take(x, None, b):
            assert y is None and asked == []  # the caller's whole weight goes to linear (or the panel kernel)
            return
        assert asked == [(0, 100), (100, 200), (200, 300)]
        assert torch.equal(y, gemm.linear(x, w, b))
