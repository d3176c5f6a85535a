"""cpu/wcache.py: a checkpoint's packed bf16 or int8 / int4 weights are written once to a cache file and mapped at
later loads (the same bytes, the same tokens), a changed checkpoint gets a new file, a damaged file is rebuilt, an
unwritable folder falls back to memory, and `off` keeps nothing on disk."""
import shutil
import warnings

import pytest
import torch

from lfm2vl.cpu import kernels, quant
from lfm2vl.cpu.packed import PackedLinear
from lfm2vl.cpu.quant import Int8Linear

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable on this machine")
MSGS = [{"role": "user", "content": "Tell me about the sea."}]
FORMATS = {"bf16_packed": {"bf16_packed": True}, "int8": {"int8": True}, "int4": {"int4": True}}


@pytest.fixture
def folder(tiny_checkpoint, tmp_path, monkeypatch):
    """A copy of the tiny checkpoint (its files' times may change) and an empty cache folder for this test."""
    monkeypatch.setenv("LFM2VL_WEIGHT_CACHE", str(tmp_path / "cache"))
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")


def load(folder, fmt="bf16_packed", **kw):
    from lfm2vl.engine import load as engine_load

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "bf16_packed: this CPU lacks", RuntimeWarning)  # the scalar path, if so
        return engine_load(folder, **FORMATS[fmt], **kw)


def converted(engine):
    """Every converted tensor of the engine's model by name."""
    out = {}
    for name, m in engine.model.named_modules():
        if type(m) is PackedLinear:
            out[f"{name}.packed"] = m.packed
        elif isinstance(m, Int8Linear) and name.startswith(("model.language_model.", "lm_head")):
            out.update({f"{name}.weight": m.weight, f"{name}.scale": m.scale})
    return out


def files(tmp_path):
    return sorted((tmp_path / "cache").glob("*.safetensors"))


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_second_load_maps_the_converted_weights_from_the_file(folder, tmp_path, monkeypatch, fmt):
    first = load(folder, fmt)
    assert len(files(tmp_path)) == 1 and fmt in files(tmp_path)[0].name
    want = {n: t.clone() for n, t in converted(first).items()}
    tokens = first.generate(MSGS, temperature=0, max_new_tokens=8).token_ids

    def no_conversion(*a, **k):
        raise AssertionError("converted again although the cache holds the weights")

    monkeypatch.setattr(kernels, "pack_bf16", no_conversion)
    monkeypatch.setattr(quant, "_quantized", no_conversion)
    second = load(folder, fmt)
    got = converted(second)
    assert got.keys() == want.keys() and any(n.startswith("lm_head.") for n in got)
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert second.generate(MSGS, temperature=0, max_new_tokens=8).token_ids == tokens


def test_each_format_and_float_dtype_has_its_own_file(folder, tmp_path):
    """int8 quantized from float32 weights is not int8 quantized from their bf16 rounding: separate files."""
    for fmt in FORMATS:
        load(folder, fmt)
    load(folder, "int8", dtype="float32")
    names = [f.name for f in files(tmp_path)]
    assert len(names) == 4
    for part in ("-bf16_packed-", "-int8-bfloat16-", "-int4-bfloat16-", "-int8-float32-"):
        assert sum(part in n for n in names) == 1, (part, names)


def test_a_changed_checkpoint_gets_a_new_file_and_its_old_one_goes(folder, tmp_path):
    load(folder)
    old = files(tmp_path)
    cfg = folder / "config.json"
    cfg.write_text(cfg.read_text() + "\n")  # a new size and time: another checkpoint as far as the cache knows
    load(folder)
    new = files(tmp_path)
    assert len(old) == len(new) == 1 and old != new


@pytest.mark.parametrize("fmt", ["bf16_packed", "int4"])
def test_a_damaged_file_is_rebuilt_with_a_warning(folder, tmp_path, fmt):
    tokens = load(folder, fmt).generate(MSGS, temperature=0, max_new_tokens=8).token_ids
    (path,) = files(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # truncated
    with pytest.warns(RuntimeWarning, match="does not hold the expected converted weights.*rebuilding it"):
        engine = load(folder, fmt)
    assert engine.generate(MSGS, temperature=0, max_new_tokens=8).token_ids == tokens
    assert files(tmp_path) == [path] and path.stat().st_size == len(data)


def test_a_file_of_other_shapes_is_rebuilt(folder, tmp_path):
    """A file whose tensors have the expected names but not the expected shapes (say, written by other code) is not
    used."""
    from safetensors.torch import load_file, save_file

    load(folder, "int8")
    (path,) = files(tmp_path)
    tensors = load_file(path)
    name = next(n for n in tensors if n.endswith(".scale"))
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, path)
    with pytest.warns(RuntimeWarning, match=r"a scale of \(\d+,\) torch.float32 where \(\d+,\)"):
        load(folder, "int8")


def test_a_folder_that_cannot_be_written_falls_back_to_memory(folder, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LFM2VL_WEIGHT_CACHE", str(blocker / "cache"))  # a folder below a file cannot be made
    with pytest.warns(RuntimeWarning, match="could not keep the bf16_packed weights in .*LFM2VL_WEIGHT_CACHE"):
        engine = load(folder)
    assert converted(engine) and not any(tmp_path.rglob("*.safetensors.tmp"))


def test_a_damaged_file_in_a_folder_that_cannot_be_written_falls_back_to_memory(folder, tmp_path, monkeypatch):
    """The damaged file can be neither removed nor rebuilt (a read-only folder, simulated: root may write anywhere):
    the weights are converted in memory, with the two warnings, and the answer is the same."""
    import pathlib

    from lfm2vl.cpu import wcache

    tokens = load(folder).generate(MSGS, temperature=0, max_new_tokens=8).token_ids
    (path,) = files(tmp_path)
    path.write_bytes(b"not a safetensors file")

    def refuse(*_, **__):
        raise PermissionError(1, "Operation not permitted")

    real_unlink = pathlib.Path.unlink
    monkeypatch.setattr(pathlib.Path, "unlink", lambda p, *a, **k: refuse() if p == path else real_unlink(p, *a, **k))
    monkeypatch.setattr(wcache, "write_file", refuse)
    with pytest.warns(RuntimeWarning) as record:
        engine = load(folder)
    said = [str(w.message) for w in record]
    assert any("does not hold the expected converted weights" in m for m in said)
    assert any("could not keep the bf16_packed weights" in m for m in said)
    assert converted(engine) and engine.generate(MSGS, temperature=0, max_new_tokens=8).token_ids == tokens


def test_off_keeps_nothing_on_disk(folder, tmp_path, monkeypatch):
    from lfm2vl.cpu.wcache import cache_dir

    monkeypatch.setenv("LFM2VL_WEIGHT_CACHE", "off")
    assert cache_dir() is None
    assert converted(load(folder)) and not (tmp_path / "cache").exists()


def test_weights_merged_with_an_adapter_stay_out_of_the_cache(folder, tmp_path):
    """Merged weights are not the checkpoint's: they are converted in memory only."""
    from finetune_util import make_adapter

    adapter = make_adapter(tmp_path / "adapter", folder)
    assert converted(load(folder, adapter=adapter)) and files(tmp_path) == []


def test_check_packed_names_what_is_wrong():
    w = (torch.randn(8, 128) * 0.02).bfloat16()
    buf = kernels.pack_bf16(w)
    kernels.check_packed(buf, 8, 128)
    with pytest.raises(ValueError, match="bytes where a packed 8x128 weight"):
        kernels.check_packed(torch.cat([buf, buf[:1]]), 8, 128)
    with pytest.raises(ValueError, match="cannot hold a packed 8x128 weight"):
        kernels.check_packed(buf[:100], 8, 128)
    with pytest.raises(ValueError, match="1-D uint8"):
        kernels.check_packed(buf.view(torch.int8), 8, 128)
