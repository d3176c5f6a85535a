"""Memory behaviour of loading, vision encoding and int8 quantization (peak RSS), with unchanged results.

- the vision tower's unit batches (`VisionTower.batch_patches`) bound temporaries without changing any output;
- int8 quantization works in row blocks (same q and scales as the whole-matrix formula, the source untouched) and
  leaves no reference to, and no resident mapped page of, the float weights it replaced;
- `release_mapped_pages` only drops pages that still equal the file (written or anonymous memory is kept);
- building the model for loading skips the random init, whose meta `normal_` would import torch._dynamo;
- low_memory: the tower's room (its weights and activations) leaves RSS from the language model's last-read weights
  while the tower runs, and the tower's pages after it, with equal results;
- the CPU layer's heap policy keeps a freed activation's pages for the next one (glibc), unless the user set their own.
- the CPU layer unmaps the libraries' startup pages after loading: only read-only mappings of `.so` files that hold
  the file's content alone (no copied-on-write page, resident or swapped out), and the code still runs.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lfm2vl.bench.data import random_checkpoint
from lfm2vl.config import VisionConfig
from lfm2vl.cpu.memory import release_mapped_pages
from lfm2vl.cpu.quant import Int8Linear, quantize_weight_int8
from lfm2vl.cpu.speed import optimize_for_cpu
from lfm2vl.loading import load_model
from lfm2vl.model.vision import VisionTower
from tokenizer_build import FIXTURE_CONFIG

PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
linux_only = pytest.mark.skipif(not Path("/proc/self/pagemap").exists(), reason="needs /proc/self/pagemap (Linux)")


def _resident_pages(ptr: int, nbytes: int) -> int:
    """How many whole pages inside [ptr, ptr + nbytes) are mapped in memory right now."""
    start, end = -(-ptr // PAGE), (ptr + nbytes) // PAGE
    if end <= start:
        return 0
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        e = np.frombuffer(os.pread(fd, 8 * (end - start), start * 8), dtype=np.uint64)
    finally:
        os.close(fd)
    return int(((e >> np.uint64(63)) & np.uint64(1)).sum())


def _vm_flags(ptr: int) -> list[str]:
    """The VmFlags of the mapping holding address ptr (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if not fields[0].endswith(":"):
                lo, hi = (int(a, 16) for a in fields[0].split("-"))
                inside = lo <= ptr < hi
            elif inside and fields[0] == "VmFlags:":
                return fields[1:]
    raise AssertionError(f"no mapping holds {ptr:#x}")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A small bf16 checkpoint written like `lfm2vl bench` writes its random ones (config from the 450M fixture)."""
    d = json.loads(FIXTURE_CONFIG.read_text())
    d["text_config"].update(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
                            num_hidden_layers=3, vocab_size=1024, layer_types=["conv", "full_attention", "conv"])
    d["vision_config"].update(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=2)
    d["projector_hidden_size"] = 96
    root = tmp_path_factory.mktemp("memory")
    (root / "tiny.json").write_text(json.dumps(d))
    return random_checkpoint(root / "tiny.json", root / "ckpt")


# ---- vision -------------------------------------------------------------------------------------------------------
def test_vision_unit_batches_do_not_change_results():
    torch.manual_seed(0)
    cfg = VisionConfig.from_hf(dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                                    patch_size=16, num_patches=256, num_channels=3, layer_norm_eps=1e-6,
                                    hidden_act="gelu_pytorch_tanh", vision_use_head=False))
    tower = VisionTower(cfg).eval()
    with torch.no_grad():
        for p in tower.parameters():
            p.normal_(0, 0.3)
    shapes = [(16, 16), (16, 16), (12, 20), (16, 16), (8, 8), (16, 16), (12, 20)]  # groups split and interleaved
    L = 256
    pv = torch.randn(len(shapes), L, 3 * 16 * 16)
    mask = torch.zeros(len(shapes), L, dtype=torch.int32)
    for i, (h, w) in enumerate(shapes):
        mask[i, :h * w] = 1
    ss = torch.tensor(shapes)
    outs = {}
    with torch.inference_mode():
        for bp in (10 ** 9, 512, 1):  # one batch per group; two 256-patch units per batch; one unit per batch
            tower.batch_patches = bp
            outs[bp] = tower(pv, mask, ss)
    for bp in (512, 1):
        assert len(outs[bp]) == len(shapes)
        for a, b in zip(outs[bp], outs[10 ** 9]):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


# ---- int8 quantization --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,K,block", [(37, 64, 1 << 10), (300, 96, 4096), (5, 16, 1 << 22)])
def test_blockwise_quantization_equals_whole_matrix(dtype, N, K, block):
    w = (torch.randn(N, K) * torch.rand(N, 1)).to(dtype)
    w[3] = 0  # an all-zero row keeps scale 1
    before = w.clone()
    q, s = quantize_weight_int8(w, block_bytes=block)
    wf = w.float()
    amax = wf.abs().amax(dim=1)
    s_ref = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    q_ref = torch.round(wf / s_ref[:, None]).clamp(-127, 127).to(torch.int8)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref)
    assert q.dtype == torch.int8 and s.dtype == torch.float32 and s[3] == 1
    assert torch.equal(w, before), "the source weight must not be modified (fp32 blocks are divided in place)"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dequantize_rounds_once_like_the_fp32_formula(dtype):
    lin = Int8Linear(*quantize_weight_int8(torch.randn(300, 128)), bias=None)
    want = (lin.weight.float() * lin.scale[:, None]).to(dtype)
    got = lin.dequantize(dtype)
    assert got.dtype == dtype and torch.equal(got, want)


@linux_only
def test_int8_model_keeps_no_float_copy_of_quantized_weights(ckpt):
    model = load_model(ckpt, dtype=torch.bfloat16)[0]  # bf16 checkpoint, bf16 model: weights stay memory-mapped
    lm = model.model.language_model
    weights = [m.weight for m in lm.modules() if type(m) is nn.Linear]
    assert weights
    refs = [weakref.ref(w) for w in weights]
    spans = [(w.data_ptr(), w.numel() * w.element_size()) for w in weights]
    for w in weights:
        float(w.detach().float().sum())  # read every page, as the quantization will
    assert sum(_resident_pages(*s) for s in spans) > 0
    del weights, w
    optimize_for_cpu(model, int8=True)
    gc.collect()
    assert all(r() is None for r in refs), "an int8 model must not hold the float weights it replaced"
    q = [m for m in lm.modules() if isinstance(m, Int8Linear)]
    assert q and all(m.weight.dtype == torch.int8 for m in q)
    maps = Path("/proc/self/maps").read_text()
    assert str(ckpt / "model.safetensors") in maps, "the checkpoint is still mapped (embedding, vision tower)"
    assert sum(_resident_pages(*s) for s in spans) == 0, "the replaced weights' pages must leave the RSS"
    with torch.inference_mode():  # and the model still runs, the tied embedding re-reading its released rows
        ids = torch.tensor([[1, 6, 20, 30, 40]])
        cache = model.make_cache(1, 8)
        logits = model.forward_cached(model.embed(ids), cache, torch.tensor([0]))
    assert logits.shape == (1, 1024) and torch.isfinite(logits).all()


@linux_only
def test_release_mapped_pages_only_drops_pages_equal_to_the_file(tmp_path):
    g = torch.Generator().manual_seed(0)
    data = {k: torch.randn(256, 1024, generator=g) for k in ("a", "b")}  # 1 MiB each
    save_file(data, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        a, b = f.get_tensor("a"), f.get_tensor("b")
    nbytes = a.numel() * 4
    float(a.sum())
    assert _resident_pages(a.data_ptr(), nbytes) > 0
    assert "nh" not in _vm_flags(a.data_ptr() + PAGE)
    assert release_mapped_pages(a) > 0
    assert _resident_pages(a.data_ptr(), nbytes) == 0
    # a weight no longer used: a later touch maps 4 KB pages, not a large folio's 2 MB
    assert "nh" in _vm_flags(a.data_ptr() + PAGE)
    assert torch.equal(a, data["a"])  # read back from the file

    b[100, 0] = 5.0  # a written (copied-on-write) page: its content exists only in this process
    assert release_mapped_pages(b) == 0
    assert b[100, 0] == 5.0 and torch.equal(b[:100], data["b"][:100])

    c = torch.randn(512, 1024, generator=g)  # anonymous memory: dropping it would zero it
    c_copy = c.clone()
    assert release_mapped_pages(c) == 0 and torch.equal(c, c_copy)
    assert release_mapped_pages(torch.empty(0)) == 0


# ---- loading ------------------------------------------------------------------------------------------------------
def test_loading_does_not_import_dynamo(ckpt):
    code = ("import sys; from lfm2vl.loading import load_model; m = load_model(sys.argv[1])[0]; "
            "print(int('torch._dynamo' in sys.modules), sum(p.is_meta for p in m.parameters()))")
    out = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["0", "0"], out.stdout


# ---- low-memory mode ----------------------------------------------------------------------------------------------
def _span_pages(weights) -> int:
    return sum(_resident_pages(w.data_ptr(), w.numel() * w.element_size()) for w in weights)


@linux_only
def test_low_memory_makes_room_for_the_tower_from_the_language_models_tail_with_equal_results(ckpt):
    import lfm2vl
    from PIL import Image

    img = Image.fromarray((np.random.RandomState(0).rand(300, 420, 3) * 255).astype("uint8"))
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is it?"}]}]
    opts = dict(max_new_tokens=6, temperature=0, logprobs=True)
    outs, seen = {}, {}
    for low in (False, True):
        engine = lfm2vl.load(ckpt, low_memory=low, bf16_packed=False)  # both with the weights memory-mapped
        m = engine.model
        tower = m.model.vision_tower
        order = m._lm_weights_in_use_order()  # layers, final norm, output head (the tied embedding)
        first, head = list(m.model.language_model.layers[0].parameters()), [m.lm_head.weight]
        during = []  # resident language-model bytes, first layer's pages, head's pages while the tower runs
        tower.post_layernorm.register_forward_hook(
            lambda *_: during.append((_span_pages(order) * PAGE, _span_pages(first), _span_pages(head))))
        outs[low] = [engine.generate(msgs, **opts) for _ in range(2)]  # the second request starts with all resident
        engine.reset()
        seen[low] = dict(during=during, vision_after=_span_pages(tower.parameters()), lm_after=_span_pages(order))
        assert seen[low]["lm_after"] > 0  # what a decode reads is resident again
    total = sum(t.numel() * t.element_size() for t in order)
    for a, b in zip(outs[False], outs[True]):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    assert seen[False]["during"][1][2] > 0 and seen[False]["vision_after"] > 0  # plain mapped weights stay mapped in
    room = m._tower_room()
    assert 0 < room < total  # this checkpoint: the room is part of the language model, not all of it
    for lm_bytes, first_pages, head_pages in seen[True]["during"]:
        assert lm_bytes <= total - room, "the tower's room must leave RSS while the tower runs"
        assert head_pages == 0, "the last-read weights (the output head) go first"
    assert seen[True]["during"][1][1] > 0, "the first layer, read first by the prefill, stays"
    assert seen[True]["vision_after"] == 0, "the tower's pages must leave RSS after it ran"


@linux_only
def test_release_weights_returns_only_wholly_resident_weights_for_populate(tmp_path):
    from lfm2vl.cpu.memory import populate, release_weights

    g = torch.Generator().manual_seed(0)
    save_file({"hot": torch.randn(512, 1024, generator=g), "table": torch.randn(4096, 1024, generator=g)},
              str(tmp_path / "w.safetensors"))  # 2 MiB and 16 MiB
    m = nn.Module()
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        m.register_buffer("hot", f.get_tensor("hot"))
        m.register_buffer("table", f.get_tensor("table"))
    float(m.hot.sum())  # wholly read, like a weight a decode step streams
    float(m.table[7].sum() + m.table[3000].sum())  # two rows, like an embedding lookup
    hot = release_weights(m)
    assert [t.data_ptr() for t in hot] == [m.hot.data_ptr()]
    assert _span_pages([m.hot]) == 0 and _span_pages([m.table]) == 0
    populate(hot)
    if tuple(int(x) for x in os.uname().release.split(".")[:2]) >= (5, 14):  # MADV_POPULATE_READ exists
        assert _span_pages([m.hot]) == m.hot.numel() * 4 // PAGE - (m.hot.data_ptr() % PAGE > 0)
    assert _span_pages([m.table]) == 0, "a table read a few rows at a time must not be mapped in whole"


@linux_only
def test_release_tail_drops_the_last_read_weights_until_the_room_is_made(tmp_path):
    from lfm2vl.cpu.memory import release_tail

    g = torch.Generator().manual_seed(1)
    save_file({f"w{i}": torch.randn(256, 1024, generator=g) for i in range(4)}, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        ws = [f.get_tensor(f"w{i}") for i in range(4)]  # 1 MiB each, in use order
    for w in ws:
        float(w.sum())
    hot = release_tail(ws, 3 * 2 ** 19)  # 1.5 MiB: the last two weights go, the first two stay
    assert [t.data_ptr() for t in hot] == [ws[2].data_ptr(), ws[3].data_ptr()]  # use order, for populate
    assert [_span_pages([w]) > 0 for w in ws] == [True, True, False, False]
    assert release_tail(ws, 0) == [] and _span_pages(ws[:2]) > 0


@linux_only
def test_encoder_layers_and_projector_drop_their_pages_after_use_with_equal_results(ckpt, monkeypatch):
    """With release on (the default), every encoder layer's and the projector's pages leave RSS after the image ran,
    the answers are unchanged, and the next image maps them back; off (RELEASE_PAGES False) they stay."""
    import lfm2vl
    from PIL import Image
    from lfm2vl.cpu import vision as cpu_vision

    img = Image.fromarray((np.random.RandomState(1).rand(200, 260, 3) * 255).astype("uint8"))
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "What is it?"}]}]
    opts = dict(max_new_tokens=6, temperature=0, logprobs=True)
    outs, resident = {}, {}
    for on in (False, True):
        monkeypatch.setattr(cpu_vision, "RELEASE_PAGES", on)
        engine = lfm2vl.load(ckpt)
        layers = engine.model.model.vision_tower.encoder.layers
        projector = engine.model.model.multi_modal_projector
        assert all(type(layer) is cpu_vision.FastEncoderLayer for layer in layers)
        assert type(projector) is cpu_vision.FastProjector
        outs[on] = [engine.generate(msgs, **opts) for _ in range(2)]
        resident[on] = (_span_pages(layers.parameters()), _span_pages(projector.parameters()))
    for a, b in zip(outs[False], outs[True]):
        assert a.token_ids == b.token_ids and a.logprobs == b.logprobs
    assert min(resident[False]) > 0 and resident[True] == (0, 0)


@linux_only
def test_the_towers_pages_leave_rss_in_optimize_for_cpu(ckpt, monkeypatch):
    """What loading read of the tower (with large folios a touch maps 2 MB) does not stay until the first image."""
    from lfm2vl.cpu import vision as cpu_vision

    monkeypatch.setattr(cpu_vision, "RELEASE_PAGES", True)
    model = load_model(ckpt)[0]
    tower = model.model.vision_tower.encoder.layers
    for p in tower.parameters():
        float(p.detach().float().sum())
    assert _span_pages(tower.parameters()) > 0
    optimize_for_cpu(model)
    assert _span_pages(tower.parameters()) == 0


@linux_only
def test_optimize_for_cpu_starts_by_dropping_what_loading_touched(ckpt, monkeypatch):
    """The weights' pages that loading (or anything before) mapped leave RSS before quantization adds its output:
    at quantization time no float weight is resident that the quantizer has not read yet."""
    from lfm2vl.cpu import speed

    model = load_model(ckpt)[0]
    lm = model.model.language_model
    for p in lm.parameters():
        float(p.detach().float().sum())
    assert _span_pages(lm.parameters()) > 0
    seen = []
    real = speed.quantize_weights
    monkeypatch.setattr(speed, "quantize_weights", lambda m, **kw: seen.append(_span_pages(lm.parameters()))
                        or real(m, **kw))
    optimize_for_cpu(model, int8=True)
    assert seen == [0]


@linux_only
def test_release_span_drops_back_to_back_weights_at_once_and_nothing_else(tmp_path):
    from lfm2vl.cpu.memory import release_span

    g = torch.Generator().manual_seed(0)
    data = {k: torch.randn(256, 1024, generator=g) for k in ("a", "b", "c")}  # 1 MiB each, stored a, b, c
    save_file(data, str(tmp_path / "w.safetensors"))
    with safe_open(str(tmp_path / "w.safetensors"), framework="pt") as f:
        a, b, c = (f.get_tensor(k) for k in "abc")
    for t in (a, b, c):
        float(t.sum())
    assert release_span([a, c]) == 0  # b lies between them: not one span of these tensors alone
    assert release_span([b, a]) >= 2 * 256 * 1024 * 4 - 2 * PAGE
    assert _resident_pages(a.data_ptr(), 2 * 256 * 1024 * 4) == 0 and _resident_pages(c.data_ptr(), 1 << 20) > 0
    assert "nh" not in _vm_flags(a.data_ptr() + PAGE)  # weights used again: their next read may map 2 MB at once
    assert torch.equal(a, data["a"]) and torch.equal(b, data["b"])  # read back from the file


_HEAP_PROBE = """
import sys, torch
from lfm2vl.cpu.memory import keep_heap_pages
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024
kept = keep_heap_pages() if sys.argv[1] == 'keep' else False
base = rss()
t = torch.ones(4 << 20)  # a 16 MB activation, written
grown = rss() - base
del t
print(kept, grown, rss() - base)
"""


def _heap_probe(mode: str, **env) -> tuple[str, int, int]:
    out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True, check=True,
                         env={**os.environ, **env}).stdout.split()
    return out[0], int(out[1]), int(out[2])


@linux_only
def test_heap_policy_keeps_a_freed_activations_pages_for_the_next_one():
    """By default glibc unmaps a freed 16 MB block at once (the next one faults its pages in again); after
    keep_heap_pages the block came from the heap and its pages stay resident, ready for reuse."""
    kept, grown, left = _heap_probe("default")
    assert grown >= 15 and left <= 2, (grown, left)
    kept, grown, left = _heap_probe("keep")
    assert kept == "True" and grown >= 15 and left >= 15, (kept, grown, left)


@linux_only
def test_heap_policy_leaves_the_users_malloc_settings_alone():
    kept, _, left = _heap_probe("keep", MALLOC_TRIM_THRESHOLD_="131072")
    assert kept == "False" and left <= 2, left
    kept, _, _ = _heap_probe("keep", GLIBC_TUNABLES="glibc.malloc.mmap_threshold=65536")
    assert kept == "False"


_TRIM_PROBE = """
import sys, torch
from lfm2vl.cpu.memory import free_heap_bytes, keep_heap_pages, trim_heap
def rss():
    return int(next(l for l in open('/proc/self/status') if l.startswith('VmRSS')).split()[1]) // 1024
keep_heap_pages()
ts = [torch.ones(4 << 20) for _ in range(4)]  # 4 x 16 MB of activations, written, then freed into the heap
del ts
free, before = free_heap_bytes() >> 20, rss()
trim_heap(above=100 << 20)
kept = rss()
trim_heap(above=32 << 20)
print(free, before - kept, before - rss())
"""


@linux_only
def test_trim_heap_returns_the_free_heap_only_above_the_threshold():
    """64 MB freed into the heap: left for reuse when 100 MB may stay free, returned when 32 MB may."""
    out = subprocess.run([sys.executable, "-c", _TRIM_PROBE], capture_output=True, text=True, check=True).stdout
    free, first, second = map(int, out.split())
    assert free >= 60 and first <= 2 and second >= 60, (free, first, second)


def test_an_image_pass_first_trims_a_large_free_heap(ckpt, monkeypatch):
    """Before the vision tower runs (on the CPU, at inference) the heap a long prompt left free goes back to the
    OS, above memory.TRIM_ABOVE: it would sit in RSS beside the tower's weights and activations."""
    from lfm2vl.cpu import memory

    calls = []
    monkeypatch.setattr("lfm2vl.cpu.speed.trim_heap", lambda above=0: calls.append(above))
    model = optimize_for_cpu(load_model(ckpt, dtype=torch.float32)[0])
    pixels = torch.randn(1, 16, 3 * 16 * 16)
    args = (pixels, torch.ones(1, 16, dtype=torch.int32), torch.tensor([[4, 4]]))
    with torch.inference_mode():
        model.image_features(*args)
    assert calls == [memory.TRIM_ABOVE]
    model.image_features(*args)  # training-style call (grad enabled): no trim
    assert calls == [memory.TRIM_ABOVE]


def test_optimize_for_cpu_sets_the_heap_policy(ckpt, monkeypatch):
    calls = []
    monkeypatch.setattr("lfm2vl.cpu.speed.keep_heap_pages", lambda: calls.append(1) or True)
    optimize_for_cpu(load_model(ckpt, dtype=torch.float32)[0])
    assert calls == [1]


_LIBRARY_PROBE = """
import torch
from lfm2vl.cpu.memory import release_library_pages
def code_kb():  # resident pages of libtorch_cpu's code
    kb, on = 0, False
    for line in open('/proc/self/smaps'):
        f = line.split()
        if not f[0].endswith(':'):
            on = len(f) > 5 and f[1] == 'r-xp' and f[5].endswith('libtorch_cpu.so')
        elif on and f[0] == 'Rss:':
            kb += int(f[1])
    return kb
x = torch.randn(64, 64)
expected = x @ x
before = code_kb()
released = release_library_pages()
after = code_kb()
same = torch.equal(x @ x, expected)  # the product's code maps back in and computes the same values
print(before, released >> 20, after, code_kb(), same)
"""


@linux_only
def test_release_library_pages_unmaps_the_startups_code_and_torch_still_runs():
    """Importing torch leaves tens of MB of libtorch's code resident; release_library_pages unmaps it, and the code a
    later op runs maps back in."""
    out = subprocess.run([sys.executable, "-c", _LIBRARY_PROBE], capture_output=True, text=True, check=True).stdout
    before, released_mb, after, rerun, same = out.split()
    assert int(before) > 10_000 and int(released_mb) > 100, out
    assert int(after) < int(before) // 10 and int(rerun) > int(after), out
    assert same == "True"


@linux_only
def test_release_library_pages_keeps_private_pages_and_file_content(tmp_path):
    """A read-only private mapping of a .so file leaves the resident set and still reads the file's bytes; one with a
    copied-on-write page (relocated data made read-only) is left alone, its written byte kept."""
    import ctypes
    import mmap

    from lfm2vl.cpu.memory import release_library_pages

    lib = tmp_path / "libprobe.so"
    content = np.random.default_rng(0).integers(0, 256, 16 * PAGE, dtype=np.uint8)
    lib.write_bytes(content.tobytes())
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    with open(lib, "rb") as f:
        plain = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ)
        relro = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
    a, b = np.frombuffer(plain, dtype=np.uint8), np.frombuffer(relro, dtype=np.uint8)
    b[5] = content[5] ^ 0xFF  # one copied-on-write page
    assert libc.mprotect(b.ctypes.data, len(b), mmap.PROT_READ) == 0
    assert int(a.sum()) == int(content.sum()) and _resident_pages(a.ctypes.data, len(a)) == 16
    release_library_pages()
    assert _resident_pages(a.ctypes.data, len(a)) == 0
    assert np.array_equal(a, content)  # read back from the file
    assert b[5] == content[5] ^ 0xFF and np.array_equal(b[6:], content[6:])
    del a, b
    plain.close()
    relro.close()


def test_optimize_for_cpu_releases_the_library_pages_last(ckpt, monkeypatch):
    from lfm2vl.cpu.kernels.decode import NativeDecoder

    calls, build = [], NativeDecoder.build
    monkeypatch.setattr("lfm2vl.cpu.speed.release_library_pages", lambda: calls.append("release") or 0)
    monkeypatch.setattr("lfm2vl.cpu.speed.use_fast_vision", lambda m: calls.append("vision"))
    monkeypatch.setattr(NativeDecoder, "build", classmethod(lambda cls, *a, **k: calls.append("decoder") or
                                                            build(*a, **k)))
    optimize_for_cpu(load_model(ckpt, dtype=torch.float32)[0])
    assert calls == ["vision", "decoder", "release"]


def test_library_spans_skip_swapped_out_private_pages():
    """A mapping whose copied-on-write pages were swapped out shows Anonymous 0 but Swap > 0: not the file's content,
    so it must not be dropped; a mapping without an Anonymous line is not trusted either."""
    from lfm2vl.cpu.memory import _droppable_library_spans

    smaps = "\n".join([
        "7f0000000000-7f0000004000 r--p 00000000 fd:01 11 /usr/lib/libclean.so.6",
        "Rss:                  16 kB", "Anonymous:             0 kB", "Swap:                  0 kB",
        "VmFlags: rd mr mw me",
        "7f0000004000-7f0000008000 r--p 00004000 fd:01 12 /usr/lib/libswapped.so",
        "Rss:                   0 kB", "Anonymous:             0 kB", "Swap:                  8 kB",
        "7f0000008000-7f000000c000 r-xp 00000000 fd:01 13 /usr/lib/libold.so",
        "Rss:                  16 kB",
        "7f000000c000-7f0000010000 r--p 00000000 fd:01 14 /usr/share/data.bin",
        "Anonymous:             0 kB",
        "7f0000010000-7f0000014000 rw-p 00000000 fd:01 15 /usr/lib/libdata.so",
        "Anonymous:             0 kB",
    ])
    assert _droppable_library_spans(smaps) == [(0x7F0000000000, 0x7F0000004000)]
