"""cpu/wcache.py: a checkpoint's packed bf16 weights are written once to a cache file and mapped at later loads (the
same bytes, the same tokens), a changed checkpoint gets a new file, a damaged file is rebuilt, an unwritable folder
falls back to memory, and `off` keeps nothing on disk."""
import shutil
import warnings

import pytest
import torch

from lfm2vl.cpu import kernels
from lfm2vl.cpu.packed import PackedLinear

pytestmark = pytest.mark.skipif(not kernels.available(), reason="native kernels unavailable on this machine")
MSGS = [{"role": "user", "content": "Tell me about the sea."}]


@pytest.fixture
def folder(tiny_checkpoint, tmp_path, monkeypatch):
    """A copy of the tiny checkpoint (its files' times may change) and an empty cache folder for this test."""
    monkeypatch.setenv("LFM2VL_WEIGHT_CACHE", str(tmp_path / "cache"))
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")


def load(folder, **kw):
    from lfm2vl.engine import load as engine_load

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "bf16_packed: this CPU lacks", RuntimeWarning)  # the scalar path, if so
        return engine_load(folder, bf16_packed=True, **kw)


def packed_buffers(engine):
    return {n: m.packed for n, m in engine.model.named_modules() if type(m) is PackedLinear}


def files(tmp_path):
    return sorted((tmp_path / "cache").glob("*.safetensors"))


def test_a_second_load_maps_the_packed_weights_from_the_file(folder, tmp_path, monkeypatch):
    first = load(folder)
    assert len(files(tmp_path)) == 1
    want = {n: t.clone() for n, t in packed_buffers(first).items()}
    tokens = first.generate(MSGS, temperature=0, max_new_tokens=8).token_ids

    def no_packing(*a, **k):
        raise AssertionError("packed again although the cache holds the weights")

    monkeypatch.setattr(kernels, "pack_bf16", no_packing)
    second = load(folder)
    got = packed_buffers(second)
    assert got.keys() == want.keys() and "lm_head" in got
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert second.generate(MSGS, temperature=0, max_new_tokens=8).token_ids == tokens


def test_a_changed_checkpoint_gets_a_new_file_and_its_old_one_goes(folder, tmp_path):
    load(folder)
    old = files(tmp_path)
    cfg = folder / "config.json"
    cfg.write_text(cfg.read_text() + "\n")  # a new size and time: another checkpoint as far as the cache knows
    load(folder)
    new = files(tmp_path)
    assert len(old) == len(new) == 1 and old != new


def test_a_damaged_file_is_rebuilt_with_a_warning(folder, tmp_path):
    tokens = load(folder).generate(MSGS, temperature=0, max_new_tokens=8).token_ids
    (path,) = files(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])  # truncated
    with pytest.warns(RuntimeWarning, match="does not hold the expected converted weights.*rebuilding it"):
        engine = load(folder)
    assert engine.generate(MSGS, temperature=0, max_new_tokens=8).token_ids == tokens
    assert files(tmp_path) == [path] and path.stat().st_size == len(data)


def test_a_folder_that_cannot_be_written_falls_back_to_memory(folder, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LFM2VL_WEIGHT_CACHE", str(blocker / "cache"))  # a folder below a file cannot be made
    with pytest.warns(RuntimeWarning, match="could not keep the bf16_packed weights in .*LFM2VL_WEIGHT_CACHE"):
        engine = load(folder)
    assert packed_buffers(engine) and not any(tmp_path.rglob("*.safetensors.tmp"))


def test_off_keeps_nothing_on_disk(folder, tmp_path, monkeypatch):
    from lfm2vl.cpu.wcache import cache_dir

    monkeypatch.setenv("LFM2VL_WEIGHT_CACHE", "off")
    assert cache_dir() is None
    assert packed_buffers(load(folder)) and not (tmp_path / "cache").exists()


def test_weights_merged_with_an_adapter_stay_out_of_the_cache(folder, tmp_path):
    """Merged weights are not the checkpoint's: they are packed in memory only."""
    from finetune_util import make_adapter

    adapter = make_adapter(tmp_path / "adapter", folder)
    assert packed_buffers(load(folder, adapter=adapter)) and files(tmp_path) == []


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
