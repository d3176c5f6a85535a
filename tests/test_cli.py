"""The `lfm2vl` command end to end (`python -m lfm2vl` in a subprocess) on a tiny random checkpoint."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from checkpoints import cached_checkpoint

FAST = ["--max-new-tokens", "6", "--temperature", "0", "--dtype", "float32"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    folder = cached_checkpoint(tmp_path_factory, "450m")[0]
    d = tmp_path_factory.mktemp("cli")
    img = d / "pic.png"
    Image.fromarray((np.random.RandomState(0).rand(200, 300, 3) * 255).astype("uint8")).save(img)
    return folder, img, d


def lfm2vl(*args, stdin=None, env=None, timeout=180):
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lfm2vl", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=e, timeout=timeout)


def engine_text(folder, messages, **opts):
    from lfm2vl.engine import load

    return load(folder, dtype="float32").generate(messages, temperature=0, max_new_tokens=6, **opts)


def test_describe_streams_the_answer(setup):
    folder, img, _ = setup
    p = lfm2vl("describe", img, "--prompt", "What is this?", "--model", folder, *FAST)
    assert p.returncode == 0, p.stderr
    expected = engine_text(folder, [{"role": "user", "content": [{"type": "image", "path": str(img)},
                                                                 {"type": "text", "text": "What is this?"}]}])
    assert p.stdout == expected.text + "\n"
    assert "Traceback" not in p.stderr


def test_generate_json(setup):
    folder, img, d = setup
    msgs = [{"role": "user", "content": [{"type": "image", "path": str(img)}, {"type": "text", "text": "Hi"}]}]
    f = d / "m.json"
    f.write_text(json.dumps(msgs))
    p = lfm2vl("generate", "--messages", f, "--json", "--model", folder, *FAST)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    ref = engine_text(folder, msgs)
    assert out["token_ids"] == ref.token_ids and out["text"] == ref.text
    assert out["finish_reason"] in ("stop", "length") and out["completion_tokens"] == len(ref.token_ids)
    assert out["prompt_tokens"] == ref.prompt_tokens and out["decode_tps"] >= 0


def test_chat_through_stdin(setup):
    folder, img, _ = setup
    script = f"Hello\n/image {img}\nWhat is it?\n/reset\n/bogus\nHello\n/quit\nnever sent\n"
    p = lfm2vl("chat", "--model", folder, *FAST, stdin=script)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    first = engine_text(folder, "Hello")
    assert len(lines) >= 3
    assert p.stdout.startswith(first.text + "\n")
    assert p.stdout.endswith(first.text + "\n")  # after /reset the same first turn gives the same answer
    assert "attached" in p.stderr and "reset" in p.stderr and "unknown command" in p.stderr


def test_offline_without_weights_is_one_clear_line(tmp_path, setup):
    _, img, _ = setup
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    p = lfm2vl("describe", img, env=env)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    err = [line for line in p.stderr.splitlines() if line.startswith("lfm2vl: error")]
    assert len(err) == 1 and "--model" in err[0] and "LiquidAI/LFM2-VL-450M" in err[0]


def test_user_errors_exit_nonzero_without_traceback(setup):
    folder, _, d = setup
    p = lfm2vl("describe", d / "missing.png", "--model", folder)
    assert p.returncode == 1 and "does not exist" in p.stderr and "Traceback" not in p.stderr
    bad = d / "bad.json"
    bad.write_text("{not json")
    p = lfm2vl("generate", "--messages", bad, "--model", folder)
    assert p.returncode == 1 and "not valid JSON" in p.stderr and "Traceback" not in p.stderr


def test_help_and_delegated_subcommands():
    from lfm2vl import cli

    assert cli.build_parser().parse_args(["describe", "x.png", "--no-image-splitting", "--stop", "a",
                                          "--stop", "b"]).stop == ["a", "b"]
    args = cli.build_parser().parse_args(["describe", "x.png", "--no-image-splitting", "--top-k", "5"])
    assert cli.options(args) == {"max_new_tokens": 512, "do_image_splitting": False, "top_k": 5}
    called = {}
    import types
    fake = types.ModuleType("fake_serve")
    fake.main = lambda argv: called.setdefault("argv", argv) and 0
    saved = sys.modules.get("lfm2vl.serve.cli")
    sys.modules["lfm2vl.serve.cli"] = fake
    try:
        assert cli.main(["serve", "--port", "1"]) == 0 and called["argv"] == ["--port", "1"]
    finally:
        if saved is None:
            del sys.modules["lfm2vl.serve.cli"]
        else:
            sys.modules["lfm2vl.serve.cli"] = saved


def test_int4_and_low_memory_flags_reach_the_engine(setup):
    """--int4 / --low-memory give what lfm2vl.load(int4=True, low_memory=True) gives; --int8 with --int4 is a usage
    error."""
    from lfm2vl.engine import load

    folder, img, d = setup
    msgs = [{"role": "user", "content": [{"type": "image", "path": str(img)}, {"type": "text", "text": "Hi"}]}]
    f = d / "m4.json"
    f.write_text(json.dumps(msgs))
    p = lfm2vl("generate", "--messages", f, "--json", "--model", folder, "--int4", "--low-memory",
               "--max-new-tokens", "6", "--temperature", "0")
    assert p.returncode == 0, p.stderr
    eng = load(folder, int4=True, low_memory=True)
    assert eng.model.low_memory and type(eng.model.lm_head).__name__ == "Int4Linear"
    assert json.loads(p.stdout)["token_ids"] == eng.generate(msgs, temperature=0, max_new_tokens=6).token_ids
    p = lfm2vl("generate", "--messages", f, "--model", folder, "--int8", "--int4")
    assert p.returncode == 2 and "not allowed with argument" in p.stderr and "Traceback" not in p.stderr
