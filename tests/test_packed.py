"""bf16 weights packed losslessly in 12 bits (cpu/kernels/packed.cpp, cpu/packed.py): unpacking gives back every bit,
products equal the bf16 kernel's bit for bit (the same sums in the same order; the scalar path within float
rounding), and a packed model prefills, decodes and generates exactly as the bf16 model does."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lfm2vl.cpu import kernels
from checkpoints import run_cached, tiny_model

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable on this machine")
ODD = [0.0, -0.0, 1e-30, -3e25, float("inf"), float("-inf"), float("nan"), 5e-39, -5e-39]  # escapes, specials


def weight(N, K, spread=False, seed=0):
    """(N, K) bf16 weights ~ N(0, 0.02) with ODD in row 0; spread: random bit patterns (most high bytes escape);
    "skewed": odd rows 1000x larger, so that a table drawn from a sample of even rows misses their high bytes."""
    g = torch.Generator().manual_seed(seed)
    if spread == "skewed":
        w = torch.randn(N, K, generator=g) * 0.02
        w[1::2] *= 1000
        return w.bfloat16()
    if spread:
        return torch.randint(-32768, 32768, (N, K), generator=g, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    w = (torch.randn(N, K, generator=g) * 0.02).bfloat16()
    w[0, :len(ODD)] = torch.tensor(ODD).bfloat16()
    return w


@pytest.fixture
def one_stream():
    """One weight stream per thread for one activation row (the order packed products keep on every CPU)."""
    kernels.set_streams(0)
    yield
    kernels.set_streams(-1)


@pytest.mark.parametrize("N,K,spread", [(3, 64, False), (300, 192, False), (64, 1024, False), (70, 256, True),
                                        (4096, 1024, "skewed")])
def test_unpacking_gives_back_every_bit(N, K, spread):
    w = weight(N, K, spread)
    packed = kernels.pack_bf16(w)
    assert torch.equal(kernels.unpack_bf16(packed, N, K).view(torch.int16), w.view(torch.int16))
    if not spread:  # 12 bits a weight, a table and row offsets (~0.5% more here)
        assert packed.numel() <= 1.52 * N * K + 64 + 4 * (N + 1) + 64


def fp32_sums(kind, w, x, N, K):
    """The kernel's fp32 sums (bf16 x, fp32 output, no rounding to bf16 that could hide another summation order)."""
    from lfm2vl.cpu.kernels.build import load

    y = torch.empty(x.shape[0], N)
    load().lfm2vl_linear(kind, w.data_ptr(), None, x.data_ptr(), y.data_ptr(), None, x.shape[0], N, K, 1, 0, 2)
    return y


def test_both_packing_paths_write_the_same_bytes():
    w = weight(130, 320, seed=4)
    fast = kernels.pack_bf16(w)
    kernels.set_isa(2)  # no AVX512-BF16: the scalar packing
    try:
        assert torch.equal(kernels.pack_bf16(w), fast)
    finally:
        kernels.set_isa(3)


@pytest.mark.parametrize("M", [1, 2, 3, 4, 5, 8, 11, 16])
@pytest.mark.parametrize("N,K,spread", [(96, 192, False), (40, 1024, False), (33, 128, True)])
def test_products_equal_the_bf16_kernel(one_stream, M, N, K, spread):
    w = weight(N, K, spread, seed=M)
    if spread:  # finite weights of every exponent range, small enough that the sums stay finite
        w = torch.where(w.float().abs() < 1e3, w, torch.zeros_like(w))
    else:
        w[0, :len(ODD)] = 0.5
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(7)).bfloat16()
    bias = torch.randn(N)
    got = kernels.packed_linear(x, kernels.pack_bf16(w), N, K, bias)
    if kernels.packed_fast():
        assert torch.equal(got, kernels.linear(x, w, bias))
        assert torch.equal(fp32_sums(4, kernels.pack_bf16(w), x, N, K), fp32_sums(0, w, x, N, K))
    else:  # the scalar path: fp32 sums in another order
        torch.testing.assert_close(got.float(), F.linear(x.float(), w.float(), bias), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("isa_cap", [2], indirect=True)
def test_scalar_path_unpacks_and_multiplies_the_same_weights(isa_cap):
    assert not kernels.packed_fast()
    w = weight(50, 192)
    packed = kernels.pack_bf16(w)
    assert torch.equal(kernels.unpack_bf16(packed, 50, 192).view(torch.int16), w.view(torch.int16))
    w[0, :len(ODD)] = 0.5
    packed = kernels.pack_bf16(w)
    for M, dt in ((1, torch.bfloat16), (3, torch.float32)):
        x = torch.randn(M, 192).to(dt)
        torch.testing.assert_close(kernels.packed_linear(x, packed, 50, 192).float(),
                                   F.linear(x.float(), w.float()), rtol=2e-2, atol=2e-2)


def test_bad_input_is_a_clear_error():
    with pytest.raises(ValueError, match=r"bfloat16 CPU tensor with K a multiple of 64 .*got \(4, 64\) torch.float32"):
        kernels.pack_bf16(torch.zeros(4, 64))
    with pytest.raises(ValueError, match=r"K a multiple of 64 and fewer than 2\^31 weights, got \(4, 100\)"):
        kernels.pack_bf16(torch.zeros(4, 100, dtype=torch.bfloat16))
    packed = kernels.pack_bf16(torch.zeros(4, 64, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="cannot hold a packed 40x64 weight"):
        kernels.unpack_bf16(packed, 40, 64)
    with pytest.raises(ValueError, match=r"out must be a contiguous \(4, 64\) bfloat16"):
        kernels.unpack_bf16(packed, 4, 64, torch.empty(4, 64))
    with pytest.raises(ValueError, match="x has 32 features, the weight 64"):
        kernels.packed_linear(torch.zeros(1, 32, dtype=torch.bfloat16), packed, 4, 64)


def test_packed_linear_module_computes_what_the_bf16_linear_computes(one_stream):
    from lfm2vl.cpu.packed import PackedLinear
    from lfm2vl.cpu.quant import FastLinear

    lin = nn.Linear(256, 96, bias=True).bfloat16()
    fast, packed = FastLinear.from_linear(lin), PackedLinear.from_linear(lin)
    assert torch.equal(packed.unpack(), lin.weight.detach())
    for rows in (1, 4, 40):  # the kernel up to max_rows, then the prefill path (unpacked weight, torch's GEMM)
        x = torch.randn(2, rows, 256).bfloat16()
        with torch.no_grad():
            want, got = fast(x), packed(x)
        assert got.shape == want.shape == (2, rows, 96)
        if kernels.packed_fast() or rows * 2 > packed.max_rows:
            assert torch.equal(got, want)
        else:
            torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("M,N,K", [(7, 96, 192), (37, 100, 320), (300, 33, 1024), (13, 70, 4480), (1, 64, 64)])
def test_many_row_products_unpack_in_panels_to_the_plain_weights_bits(M, N, K):
    """packed_mm (the weight unpacked a panel at a time inside the product) gives bf16_mm's bits with the plain weight,
    at ragged rows and columns and at a K long enough for single panels; None where they do not run."""
    w = weight(N, K, seed=M)
    x = (torch.randn(M, K, generator=torch.Generator().manual_seed(N)) * 0.5).bfloat16()
    got, want = kernels.packed_mm(x, kernels.pack_bf16(w), N, K), kernels.bf16_mm(x, w)
    if not kernels.packed_fast():
        assert got is None and want is None
        return
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))


def _models():
    from lfm2vl.cpu.packed import PackedLinear
    from lfm2vl.cpu.speed import optimize_for_cpu

    bf16 = optimize_for_cpu(tiny_model(torch.bfloat16, seed=5))
    packed = optimize_for_cpu(tiny_model(torch.bfloat16, seed=5), bf16_packed=True)
    lm = packed.model.language_model
    assert type(packed.lm_head) is PackedLinear and type(lm.layers[0].feed_forward.w2) is PackedLinear
    assert packed.native_decoder is not None and bf16.native_decoder is not None
    return bf16, packed


def test_packed_model_prefills_and_decodes_as_the_bf16_model(one_stream):
    bf16, packed = _models()
    prompts = [[1, 6, 20, 30, 40, 7, 6, 50, 60], [1, 6, 99, 98, 97, 96, 95, 94, 93, 92, 91, 90, 89, 7, 6]]
    for slots in (None, [2, 0]):
        got, want = run_cached(packed, prompts, 6, slots), run_cached(bf16, prompts, 6, slots)
        if kernels.packed_fast():
            assert torch.equal(got, want)
        else:
            assert torch.equal(got.argmax(-1), want.argmax(-1))


@pytest.mark.parametrize("isa_cap", [2], indirect=True)
def test_a_cpu_without_the_fast_path_is_warned_and_gets_the_same_tokens(isa_cap):
    from lfm2vl.cpu.speed import optimize_for_cpu

    bf16 = optimize_for_cpu(tiny_model(torch.bfloat16, seed=6))
    with pytest.warns(RuntimeWarning, match="scalar path, slower than plain bf16"):
        packed = optimize_for_cpu(tiny_model(torch.bfloat16, seed=6), bf16_packed=True)
    prompts = [[1, 6, 20, 30, 40, 7, 6, 50, 60]]
    assert torch.equal(run_cached(packed, prompts, 4).argmax(-1), run_cached(bf16, prompts, 4).argmax(-1))


def test_engine_generates_the_bf16_tokens_and_refuses_what_it_cannot_pack(tiny_checkpoint, one_stream):
    from lfm2vl.engine import load
    from lfm2vl.loading import LoadError

    msgs = [{"role": "user", "content": "Tell me about the sea."}]
    kw = dict(temperature=0, max_new_tokens=12)
    want = load(tiny_checkpoint).generate(msgs, **kw).token_ids
    assert load(tiny_checkpoint, bf16_packed=True).generate(msgs, **kw).token_ids == want
    with pytest.raises(ValueError, match="int4=True and bf16_packed=True are exclusive"):
        load(tiny_checkpoint, int4=True, bf16_packed=True)
    with pytest.raises(ValueError, match="bf16_packed packs bfloat16 weights; got dtype='float32'"):
        load(tiny_checkpoint, dtype="float32", bf16_packed=True)
    with pytest.raises(ValueError, match="bf16_packed works on CPU only"):
        load(tiny_checkpoint, device="cuda", bf16_packed=True)
    with pytest.raises(LoadError):
        load(tiny_checkpoint, dtype="int3", bf16_packed=True)


@pytest.mark.parametrize("M", [1, 3])
def test_products_are_the_same_with_and_without_weight_prefetch(M):
    """The packed rows prefetch their low bytes and codes on most CPUs and not on AMD Zen 4: equal sums either way."""
    if not kernels.packed_fast():
        pytest.skip("the packed kernels' AVX512 path needs AVX512-BF16, VBMI and VBMI2")
    N, K = 41, 1024
    w = weight(N, K, True, seed=N)
    w = torch.where(w.float().abs() < 1e3, w, torch.zeros_like(w))
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(4)).bfloat16()
    packed = kernels.pack_bf16(w)
    out = {}
    try:
        kernels.set_streams(0)
        for mode in (1, 0):
            kernels.set_prefetch(mode)
            out[mode] = kernels.packed_linear(x, packed, N, K, None)
    finally:
        kernels.set_prefetch(-1)
        kernels.set_streams(-1)
    assert out[0].isfinite().all() and torch.equal(out[1], out[0])


@pytest.mark.parametrize("N,K,spread", [(96, 192, False), (41, 1024, False), (7, 320, True)])
def test_one_row_products_equal_with_and_without_row_streams(N, K, spread):
    """One activation row reads two packed rows at a time on Intel CPUs (rows_p12_one<2>) and one on others; both run
    here whatever the CPU, and each row's sums are the same fp32 steps in the same order: equal bit for bit. The
    shapes leave a row over after the last pair and a block of 64 after the last step of 128."""
    if not kernels.packed_fast():
        pytest.skip("the packed kernels' AVX512 path needs AVX512-BF16, VBMI and VBMI2")
    w = weight(N, K, spread, seed=N)
    w = torch.where(w.float().abs() < 1e3, w, torch.zeros_like(w))  # finite sums; spread keeps escapes in every row
    x = torch.randn(1, K, generator=torch.Generator().manual_seed(3)).bfloat16()
    bias = torch.randn(N)
    packed = kernels.pack_bf16(w)
    out = {}
    try:
        for mode in (1, 0):
            kernels.set_streams(mode)
            out[mode] = kernels.packed_linear(x, packed, N, K, bias)
    finally:
        kernels.set_streams(-1)
    assert out[0].isfinite().all() and torch.equal(out[1], out[0])


@pytest.mark.parametrize("fast", [True, False])
def test_load_packs_bf16_by_default_only_where_fast_and_nothing_else_is_asked(tiny_checkpoint, monkeypatch, fast):
    """bf16_packed=None (the default) packs where `packs_by_default()` says the kernels are fast, and never beside
    another weight format, low_memory, a float32 dtype or optimize=False; False never packs, True always does."""
    import warnings

    from lfm2vl.cpu import packed as packed_mod
    from lfm2vl.cpu.packed import PackedLinear
    from lfm2vl.engine import load

    monkeypatch.setattr(packed_mod, "packs_by_default", lambda: fast)
    is_packed = lambda **kw: type(load(tiny_checkpoint, **kw).model.lm_head) is PackedLinear  # noqa: E731
    assert is_packed() == fast
    assert not is_packed(bf16_packed=False)
    assert not any(is_packed(**kw) for kw in ({"int8": True}, {"int4": True}, {"low_memory": True},
                                               {"dtype": "float32"}, {"optimize": False}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # this CPU's own claim: the scalar path warns where slow
        assert is_packed(bf16_packed=True)
