"""Which model answers (lfm2vl/resolve.py): explicit, $LFM2VL_MODEL, the cached or reachable hub model, else bundled.

The bundled folder is resolve.BUNDLED, pointed at the tiny random checkpoint in-process; subprocesses name their
model through LFM2VL_MODEL. No test touches the network: "the hub" is a socket on 127.0.0.1 or a closed port there.
"""
import os
import shutil
import socket
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from PIL import Image

from lfm2vl import resolve
from lfm2vl.loading import LoadError

NOTE = "answering with the bundled demo model"
REAL_PROBE = resolve.hub_reachable


@pytest.fixture
def env(monkeypatch, tmp_path, tiny_checkpoint):
    """A clean environment: no LFM2VL_MODEL, not offline, an empty Hugging Face cache, the bundled folder = the tiny
    checkpoint, and a hub probe that fails the test if it is called (tests that want the probe put it back)."""
    for name in ("LFM2VL_MODEL", "HF_HUB_OFFLINE", "HF_HUB_CACHE", "HF_ENDPOINT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setattr(resolve, "BUNDLED", tiny_checkpoint)

    def no_probe(*args, **kwargs):
        raise AssertionError("the hub was probed")

    monkeypatch.setattr(resolve, "hub_reachable", no_probe)
    return monkeypatch


@pytest.fixture(scope="module")
def img(tmp_path_factory):
    path = tmp_path_factory.mktemp("resolve") / "pic.png"
    Image.fromarray((np.random.RandomState(0).rand(40, 60, 3) * 255).astype("uint8")).save(path)
    return path


def fake_cache(hf_home, source, files=None):
    """A Hugging Face cache under hf_home holding LiquidAI/LFM2-VL-450M's main revision: source's files (or only
    `files` of them) in snapshots/<commit>/, and refs/main naming the commit."""
    repo = hf_home / "hub" / "models--LiquidAI--LFM2-VL-450M"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in source.iterdir():
        if files is None or f.name in files:
            shutil.copy(f, snap / f.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    return snap


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_explicit_model_wins_over_env(env, tmp_path):
    env.setenv("LFM2VL_MODEL", str(tmp_path / "from-env"))
    assert resolve.resolve_model(str(tmp_path / "explicit")) == str(tmp_path / "explicit")


def test_env_wins_over_the_default(env, tmp_path, tiny_checkpoint):
    fake_cache(tmp_path / "hf", tiny_checkpoint)  # the default is cached, and still the environment decides
    env.setenv("LFM2VL_MODEL", "someone/other-model")
    assert resolve.resolve_model(None) == "someone/other-model"


def test_the_name_bundled_selects_the_bundled_folder(env, tiny_checkpoint):
    assert resolve.resolve_model("bundled") == tiny_checkpoint
    env.setenv("LFM2VL_MODEL", "bundled")
    assert resolve.resolve_model(None) == tiny_checkpoint


def test_cached_default_is_chosen_without_network(env, tmp_path, tiny_checkpoint):
    fake_cache(tmp_path / "hf", tiny_checkpoint)
    assert resolve.resolve_model(None) == "LiquidAI/LFM2-VL-450M"  # env's probe raises if the hub is asked


def test_a_snapshot_without_weights_is_not_cached(env, tmp_path, tiny_checkpoint):
    fake_cache(tmp_path / "hf", tiny_checkpoint, files={"config.json"})
    env.setenv("HF_HUB_OFFLINE", "1")
    with pytest.warns(resolve.BundledModelWarning):
        assert resolve.resolve_model(None) == tiny_checkpoint


def test_offline_and_not_cached_answers_with_bundled_without_probing_and_says_so_once(env, img, capsys):
    """`lfm2vl describe` without --model, HF_HUB_OFFLINE set and nothing cached: the bundled model answers, the hub
    is not probed, and the note is one line on stderr."""
    from lfm2vl.cli import main

    env.setenv("HF_HUB_OFFLINE", "1")
    assert main(["describe", str(img), "--max-new-tokens", "2", "--temperature", "0"]) == 0
    err = capsys.readouterr().err
    notes = [line for line in err.splitlines() if NOTE in line]
    assert len(notes) == 1 and notes[0].startswith("lfm2vl: LiquidAI/LFM2-VL-450M is not cached and HF_HUB_OFFLINE")
    assert "hf download LiquidAI/LFM2-VL-450M" in notes[0] and err.count(NOTE) == 1


def test_load_without_a_model_warns_once_when_bundled_answers(env, tiny_checkpoint):
    import lfm2vl

    env.setenv("HF_HUB_OFFLINE", "1")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        engine = lfm2vl.load(dtype="float32")
    notes = [w for w in caught if issubclass(w.category, resolve.BundledModelWarning)]
    assert len(notes) == 1 and NOTE in str(notes[0].message)
    assert engine.config.text_config.hidden_size == 64  # the tiny checkpoint answered


def test_unreachable_hub_falls_back_to_bundled_quickly(env, tiny_checkpoint):
    env.setattr(resolve, "hub_reachable", REAL_PROBE)
    env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    t0 = time.monotonic()
    with pytest.warns(resolve.BundledModelWarning, match="unreachable"):
        assert resolve.resolve_model(None) == tiny_checkpoint
    assert time.monotonic() - t0 < 10


def test_a_hub_that_answers_keeps_the_hub_default(env):
    env.setattr(resolve, "hub_reachable", REAL_PROBE)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        env.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert resolve.resolve_model(None) == "LiquidAI/LFM2-VL-450M"


def test_describe_without_model_uses_the_env_variable(tiny_checkpoint, img, tmp_path):
    """A fresh process, offline, with an empty HOME and no --model: LFM2VL_MODEL's folder answers, without a note."""
    home = tmp_path / "home"
    home.mkdir()
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "XDG_", "LFM2VL_"))}
    e.update(HOME=str(home), HF_HUB_OFFLINE="1", LFM2VL_MODEL=str(tiny_checkpoint))
    p = subprocess.run([sys.executable, "-m", "lfm2vl", "describe", str(img), "--max-new-tokens", "3",
                        "--temperature", "0"], capture_output=True, text=True, env=e, timeout=180)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() and NOTE not in p.stderr


def test_serve_names_the_bundled_model_bundled(tiny_checkpoint, monkeypatch):
    from lfm2vl.serve.cli import served_names

    monkeypatch.setattr(resolve, "BUNDLED", tiny_checkpoint)
    assert served_names(resolve.model_label(resolve.bundled_model()), None) == ("bundled", ())


def test_serve_without_model_serves_the_env_variable_model(tiny_checkpoint, tmp_path, monkeypatch):
    import httpx
    from server_util import ServerProcess

    monkeypatch.setenv("LFM2VL_MODEL", str(tiny_checkpoint))  # the server process inherits it
    server = ServerProcess(["--max-batch", "1", "--log-level", "warning"], tmp_path / "server.log")
    try:
        ids = [m["id"] for m in httpx.get(server.url + "/v1/models", timeout=30).json()["data"]]
    finally:
        server.stop()
    assert ids == [tiny_checkpoint.name]


def test_bundled_model_names_the_problem_when_the_folder_is_empty(monkeypatch, tmp_path):
    import lfm2vl

    monkeypatch.setattr(resolve, "BUNDLED", tmp_path)
    with pytest.raises(LoadError, match="the bundled model is missing from this installation"):
        lfm2vl.bundled_model()


def test_a_model_argument_of_the_wrong_type_is_named():
    with pytest.raises(LoadError, match=r"^model=5 is invalid: expected a checkpoint folder, a hub id .*got int"):
        resolve.resolve_model(5)
