"""The `lfm2vl` command end to end (`python -m lfm2vl` in a subprocess) on a tiny random checkpoint."""
import json
import os
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image

FAST = ["--max-new-tokens", "6", "--temperature", "0", "--dtype", "float32"]


@pytest.fixture(scope="module")
def img(tmp_path_factory):
    """A 300x200 random PNG file."""
    path = tmp_path_factory.mktemp("cli") / "pic.png"
    Image.fromarray((np.random.RandomState(0).rand(200, 300, 3) * 255).astype("uint8")).save(path)
    return path


def lfm2vl(*args, stdin=None, env=None, timeout=180):
    e = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lfm2vl", *map(str, args)], input=stdin, capture_output=True,
                          text=True, env=e, timeout=timeout)


def engine_text(engine, messages, **opts):
    """What the engine answers with the CLI's FAST options, from a fresh state like a new CLI process."""
    engine.reset()
    return engine.generate(messages, temperature=0, max_new_tokens=6, **opts)


def test_describe_streams_the_answer(tiny_checkpoint, tiny_engine, img):
    p = lfm2vl("describe", img, "--prompt", "What is this?", "--model", tiny_checkpoint, *FAST)
    assert p.returncode == 0, p.stderr
    expected = engine_text(tiny_engine, [{"role": "user", "content": [{"type": "image", "path": str(img)},
                                                                      {"type": "text", "text": "What is this?"}]}])
    assert p.stdout == expected.text + "\n"
    assert "Traceback" not in p.stderr


def test_generate_json(tiny_checkpoint, tiny_engine, img, tmp_path):
    msgs = [{"role": "user", "content": [{"type": "image", "path": str(img)}, {"type": "text", "text": "Hi"}]}]
    f = tmp_path / "m.json"
    f.write_text(json.dumps(msgs))
    p = lfm2vl("generate", "--messages", f, "--json", "--model", tiny_checkpoint, *FAST)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout)
    ref = engine_text(tiny_engine, msgs)
    assert out["token_ids"] == ref.token_ids and out["text"] == ref.text
    assert out["finish_reason"] in ("stop", "length") and out["completion_tokens"] == len(ref.token_ids)
    assert out["prompt_tokens"] == ref.prompt_tokens and out["decode_tps"] >= 0


def test_chat_through_stdin(tiny_checkpoint, tiny_engine, img):
    script = f"Hello\n/image {img}\nWhat is it?\n/reset\n/bogus\nHello\n/quit\nnever sent\n"
    p = lfm2vl("chat", "--model", tiny_checkpoint, *FAST, stdin=script)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    first = engine_text(tiny_engine, "Hello")
    assert len(lines) >= 3
    assert p.stdout.startswith(first.text + "\n")
    assert p.stdout.endswith(first.text + "\n")  # after /reset the same first turn gives the same answer
    assert "attached" in p.stderr and "reset" in p.stderr and "unknown command" in p.stderr


def test_offline_without_weights_is_one_clear_line(tmp_path, img):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    p = lfm2vl("describe", img, "--model", "LiquidAI/LFM2-VL-450M", env=env)
    assert p.returncode != 0
    assert "Traceback" not in p.stderr
    err = [line for line in p.stderr.splitlines() if line.startswith("lfm2vl: error")]
    assert len(err) == 1 and "--model" in err[0] and "LiquidAI/LFM2-VL-450M" in err[0]


def test_user_errors_exit_nonzero_without_traceback(tiny_checkpoint, tmp_path):
    p = lfm2vl("describe", tmp_path / "missing.png", "--model", tiny_checkpoint)
    assert p.returncode == 1 and "does not exist" in p.stderr and "Traceback" not in p.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    p = lfm2vl("generate", "--messages", bad, "--model", tiny_checkpoint)
    assert p.returncode == 1 and "not valid JSON" in p.stderr and "Traceback" not in p.stderr


def test_a_warning_while_loading_is_one_line_and_the_answer_still_comes(tiny_checkpoint, img, tmp_path):
    """A cache folder that cannot be written: one warning line (not Python's file:line format), then the answer."""
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    p = lfm2vl("describe", img, "--model", tiny_checkpoint, "--int8", "--max-new-tokens", "3", "--temperature", "0",
               env={"LFM2VL_WEIGHT_CACHE": str(blocker / "cache")})
    import lfm2vl as api
    from lfm2vl.cli import DEFAULT_PROMPT

    want = api.load(tiny_checkpoint, int8=True).generate(
        [{"role": "user", "content": [{"type": "image", "path": str(img)}, {"type": "text", "text": DEFAULT_PROMPT}]}],
        temperature=0, max_new_tokens=3).text
    assert p.returncode == 0 and p.stdout == want + "\n", p.stderr  # greedy: the engine's own answer
    lines = [ln for ln in p.stderr.splitlines() if "could not keep" in ln]
    assert len(lines) == 1 and lines[0].startswith("lfm2vl: warning: could not keep the int8-bfloat16 weights")
    assert "Traceback" not in p.stderr and "warnings.warn" not in p.stderr and ".py:" not in p.stderr


def test_help_and_delegated_subcommands():
    from lfm2vl import cli

    packed = [cli.build_parser().parse_args(["describe", "x.png", *flag]).bf16_packed
              for flag in ([], ["--bf16-packed"], ["--no-bf16-packed"], ["--int8", "--no-bf16-packed"])]
    assert packed == [None, True, False, False]  # None: lfm2vl.load's own default

    assert cli.build_parser().parse_args(["describe", "x.png", "--no-image-splitting", "--stop", "a",
                                          "--stop", "b"]).stop == ["a", "b"]
    args = cli.build_parser().parse_args(["describe", "x.png", "--no-image-splitting", "--top-k", "5"])
    assert cli.args.options(args) == {"max_new_tokens": 512, "do_image_splitting": False, "top_k": 5}
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


def test_int4_and_low_memory_flags_reach_the_engine(tiny_checkpoint, img, tmp_path):
    """--int4 / --low-memory give what lfm2vl.load(int4=True, low_memory=True) gives; --int8 with --int4 is a usage
    error."""
    from lfm2vl.engine import load

    msgs = [{"role": "user", "content": [{"type": "image", "path": str(img)}, {"type": "text", "text": "Hi"}]}]
    f = tmp_path / "m4.json"
    f.write_text(json.dumps(msgs))
    p = lfm2vl("generate", "--messages", f, "--json", "--model", tiny_checkpoint, "--int4", "--low-memory",
               "--max-new-tokens", "6", "--temperature", "0")
    assert p.returncode == 0, p.stderr
    eng = load(tiny_checkpoint, int4=True, low_memory=True)
    assert eng.model.low_memory and type(eng.model.lm_head).__name__ == "Int4Linear"
    assert json.loads(p.stdout)["token_ids"] == eng.generate(msgs, temperature=0, max_new_tokens=6).token_ids
    p = lfm2vl("generate", "--messages", f, "--model", tiny_checkpoint, "--int8", "--int4")
    assert p.returncode == 2 and "not allowed with argument" in p.stderr and "Traceback" not in p.stderr


def test_bf16_packed_flag_reaches_the_engine(tiny_checkpoint, tmp_path):
    """--bf16-packed gives what lfm2vl.load(bf16_packed=True) gives (the bf16 tokens); with --int8 a usage error."""
    from lfm2vl.engine import load

    f = tmp_path / "m.json"
    f.write_text(json.dumps([{"role": "user", "content": "Hi"}]))
    p = lfm2vl("generate", "--messages", f, "--json", "--model", tiny_checkpoint, "--bf16-packed",
               "--max-new-tokens", "6", "--temperature", "0")
    assert p.returncode == 0, p.stderr
    eng = load(tiny_checkpoint, bf16_packed=True)
    assert type(eng.model.lm_head).__name__ == "PackedLinear"
    assert json.loads(p.stdout)["token_ids"] == eng.generate("Hi", temperature=0, max_new_tokens=6).token_ids
    p = lfm2vl("generate", "--messages", f, "--model", tiny_checkpoint, "--int8", "--bf16-packed")
    assert p.returncode == 2 and "not allowed with argument" in p.stderr and "Traceback" not in p.stderr


# ---- checks before the model loads, and their wording ------------------------------------------------------------
def run_main(capsys, *argv):
    """cli.main in-process -> (status, stdout, stderr); argparse's exit becomes its status."""
    from lfm2vl import cli

    try:
        rc = cli.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.mark.parametrize("flag, value, says", [
    ("--max-new-tokens", "-1", "expected an integer >= 1"),
    ("--temperature", "nan", "must be a finite number"),
    ("--top-p", "inf", "must be a finite number"),
    ("--seed", str(2**70), "expected an integer in [-2**63, 2**64 - 1]"),
    ("--min-image-tokens", "0", "expected an integer >= 1"),
])
def test_bad_option_value_is_a_usage_error_naming_the_flag(capsys, tmp_path, img, flag, value, says):
    """Checked while parsing (the model folder does not even exist), worded with the flag the user typed."""
    rc, _, err = run_main(capsys, "describe", img, "--model", tmp_path / "no-model", flag, value)
    assert rc == 2 and f"argument {flag}: {value} is invalid; {says}" in err
    assert flag[2:].replace("-", "_") + "=" not in err  # not the Python keyword


def test_describe_a_folder_says_it_is_not_an_image_file(capsys, tmp_path):
    rc, _, err = run_main(capsys, "describe", tmp_path, "--model", tmp_path / "no-model")
    assert rc == 1 and err == f"lfm2vl: error: image {str(tmp_path)!r} is a folder, not an image file\n"


@pytest.mark.parametrize("device, cuda, says", [
    ("bogus", False, "device 'bogus' is not a known device; use cpu, cuda, cuda:N (the N-th GPU) or mps"),
    ("cuda", False, "device 'cuda': CUDA is not available"),
])
def test_device_error_is_one_line_before_loading(capsys, monkeypatch, tmp_path, img, device, cuda, says):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    rc, _, err = run_main(capsys, "describe", img, "--model", tmp_path / "no-model", "--device", device)
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith(f"lfm2vl: error: {says}")


def test_generate_checks_roles_before_loading(capsys, tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps([{"role": "robot", "content": "hi"}]))
    rc, _, err = run_main(capsys, "generate", "--messages", f, "--model", tmp_path / "no-model")
    assert rc == 1 and len(err.splitlines()) == 1
    assert "messages[0] has role 'robot'; expected one of 'system', 'developer', 'user', 'assistant'" in err


def test_generate_reads_a_batch_as_the_engine_does(capsys, tmp_path):
    """A list of prompt strings and conversations is a batch to the CLI as to engine.generate, checked conversation
    by conversation before loading."""
    f = tmp_path / "m.json"
    f.write_text(json.dumps(["Describe it.", [{"role": "robot", "content": "hi"}]]))
    rc, _, err = run_main(capsys, "generate", "--messages", f, "--model", tmp_path / "no-model")
    assert rc == 1 and len(err.splitlines()) == 1
    assert f"{f}: conversation 2: messages[0] has role 'robot'" in err


def test_flag_wording_rewrites_only_engine_option_names():
    from lfm2vl import cli
    from lfm2vl.generate.options import ENGINE_OPTIONS

    names = cli.args.FLAG_WORDED
    assert set(names) <= set(ENGINE_OPTIONS)
    assert cli.args.flag_wording("top_k=-1 is invalid") == "--top-k -1 is invalid"


def test_generate_continue_final_message(tiny_checkpoint, tiny_engine, tmp_path):
    """--continue-final-message gives what engine.generate(..., continue_final_message=True) gives."""
    msgs = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a"}]
    f = tmp_path / "cont.json"
    f.write_text(json.dumps(msgs))
    p = lfm2vl("generate", "--messages", f, "--json", "--continue-final-message", "--model", tiny_checkpoint, *FAST)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)["token_ids"] == engine_text(tiny_engine, msgs, continue_final_message=True).token_ids


def test_offline_hint_names_the_hf_command(tmp_path, img):
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"), "HF_HUB_CACHE": str(tmp_path / "hf" / "hub")}
    p = lfm2vl("describe", img, "--model", "LiquidAI/LFM2-VL-450M", env=env)
    assert p.returncode == 1 and "`hf download LiquidAI/LFM2-VL-450M --local-dir DIR`" in p.stderr


def test_version_flag(capsys):
    from importlib.metadata import version

    rc, out, _ = run_main(capsys, "--version")
    assert rc == 0 and out == f"lfm2vl {version('lfm2vl')}\n"


@pytest.mark.parametrize("command", ["describe", "bench"])
def test_an_unexpected_exception_is_one_line_naming_a_file_with_its_traceback(capsys, monkeypatch, tmp_path, command):
    import importlib

    from lfm2vl import cli

    def broken(*_):
        raise RuntimeError("a defect")

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    if command == "bench":
        monkeypatch.setattr(importlib.import_module(cli.DELEGATED["bench"]), "main", broken)
    else:
        monkeypatch.setitem(cli.COMMANDS, command, broken)
    rc, out, err = run_main(capsys, command, "x.png")
    [report] = tmp_path.glob("lfm2vl-crash-*.txt")
    assert rc == 1 and out == "" and err == f"lfm2vl: internal error: RuntimeError: a defect (a defect of lfm2vl; " \
        f"the traceback is in {report})\n"
    assert "Traceback" in report.read_text() and 'raise RuntimeError("a defect")' in report.read_text()


def option_helps(parser) -> dict[str, str]:
    """Each option's help text as printed by --help (wrapped lines joined)."""
    import re

    out, cur = {}, None
    for line in parser.format_help().splitlines():
        m = re.match(r"  (-\S+)", line)
        if m:
            cur = m.group(1)
            out[cur] = line
        elif cur and line.startswith("   "):
            out[cur] += " " + line.strip()
        else:
            cur = None
    return out


def test_every_option_that_takes_a_value_shows_its_default():
    from lfm2vl import cli
    from lfm2vl.bench import options as bench_options

    parsers = [bench_options.build_parser()]
    sub = next(a for a in cli.build_parser()._actions if a.dest == "command")
    parsers += [sub.choices[name] for name in ("describe", "chat", "generate")]
    for parser in parsers:
        helps = option_helps(parser)
        for action in parser._actions:
            if action.option_strings and action.nargs != 0 and not action.required:
                text = helps[action.option_strings[0]]
                assert "(default: " in text, (parser.prog, text)


def test_bench_takes_the_long_dtype_names():
    from lfm2vl.bench.options import build_parser

    parser = build_parser()
    assert [parser.parse_args(["--dtype", d]).dtype for d in ("bfloat16", "float32", "bf16", "fp32")] == [
        "bfloat16", "float32", "bfloat16", "float32"]
    assert "--dtype {bfloat16,float32}" in parser.format_help()


# ---- chat: Ctrl-C and Ctrl-D ---------------------------------------------------------------------------------------
class FakeStdin:
    """Lines for input(), then an item that is an exception to raise (KeyboardInterrupt = Ctrl-C), else EOF."""

    def __init__(self, *items, tty=False):
        self.items, self.tty = list(items), tty

    def isatty(self):
        return self.tty

    def readline(self):
        item = self.items.pop(0) if self.items else ""
        if isinstance(item, BaseException) or (isinstance(item, type) and issubclass(item, BaseException)):
            raise item
        return item


class FakeChat:
    """Streams "Hel" then a Ctrl-C for a message starting with "stop", else "ok"."""

    def __init__(self):
        self.messages, self.sent = [], []
        self.last = None  # the last finished reply (Chat.last): none here, so no tool calls to report

    def stream(self, text, images=None):
        self.sent.append(text)

        def pieces():
            yield "Hel"
            if text.startswith("stop"):
                raise KeyboardInterrupt
            yield "lo"

        return pieces()


@pytest.fixture
def fake_chat(monkeypatch):
    from lfm2vl import cli

    chat = FakeChat()
    engine = type("FakeEngine", (), {"chat": lambda self, system=None, **o: chat})()
    monkeypatch.setattr(cli.commands, "load_engine", lambda args: engine)
    monkeypatch.setattr(cli.commands, "enable_line_editing", lambda: None)
    return chat


def test_chat_ctrl_c_while_answering_returns_to_the_prompt(capsys, monkeypatch, fake_chat):
    monkeypatch.setattr(sys, "stdin", FakeStdin("stop now\n", "next\n"))
    rc, out, err = run_main(capsys, "chat")
    assert rc == 0 and fake_chat.sent == ["stop now", "next"]
    assert out == "Hel\nHello\n" and "(stopped" in err


def test_chat_ctrl_c_at_the_prompt_exits_0_on_a_fresh_line(capsys, monkeypatch, fake_chat):
    monkeypatch.setattr(sys, "stdin", FakeStdin("hi\n", KeyboardInterrupt))
    rc, out, _ = run_main(capsys, "chat")
    assert rc == 0 and out == "Hello\n\n"


def test_chat_ctrl_d_on_a_terminal_ends_the_prompt_line(capsys, monkeypatch, fake_chat):
    monkeypatch.setattr(sys, "stdin", FakeStdin(tty=True))
    rc, out, _ = run_main(capsys, "chat")
    assert rc == 0 and out == "> \n"


def test_chat_image_is_checked_before_loading(capsys, monkeypatch, tmp_path):
    from lfm2vl import cli

    def no_load(args):
        raise AssertionError("the model was loaded before the image was checked")

    monkeypatch.setattr(cli.commands, "load_engine", no_load)
    rc, _, err = run_main(capsys, "chat", "--image", tmp_path / "missing.png")
    assert rc == 1 and err == f"lfm2vl: error: image {str(tmp_path / 'missing.png')!r} does not exist\n"


# ---- structured output flags --------------------------------------------------------------------------------------
def test_constraint_flags_shape_the_answer(tiny_checkpoint, tmp_path, img):
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    f = tmp_path / "schema.json"
    f.write_text(json.dumps(schema))
    common = ["--model", tiny_checkpoint, "--max-new-tokens", "60", "--temperature", "0", "--dtype", "float32"]
    p = lfm2vl("describe", img, "--prompt", "n?", "--json-schema", f, *common)
    assert p.returncode == 0, p.stderr
    assert set(json.loads(p.stdout)) == {"n"}
    p = lfm2vl("describe", img, "--prompt", "pick", "--choice", "left", "--choice", "right", *common)
    assert p.returncode == 0 and p.stdout.strip() in ("left", "right"), p.stderr


@pytest.mark.parametrize("flag, value, says", [
    ("--regex", "a(b", "regex is invalid"),
    ("--json-schema", "SCHEMA", "json_schema is invalid: Invalid type: strin"),
    ("--json-schema", "MISSING", "cannot read"),
])
def test_bad_constraint_flag_is_a_usage_error(capsys, tmp_path, img, flag, value, says):
    (tmp_path / "bad.json").write_text('{"type": "strin"}')
    value = {"SCHEMA": tmp_path / "bad.json", "MISSING": tmp_path / "missing.json"}.get(value, value)
    rc, _, err = run_main(capsys, "describe", img, "--model", tmp_path / "no-model", flag, value)
    assert rc == 2 and f"argument {flag}: " in err and says in err, err


# ---- tools -----------------------------------------------------------------------------------------------------------
CLOCK = [{"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"],
    "additionalProperties": False}}}]


def test_chat_with_tools_reports_the_call_and_answers_a_tool_result(tiny_checkpoint, tmp_path):
    f = tmp_path / "tools.json"
    f.write_text(json.dumps(CLOCK))
    p = lfm2vl("chat", "--model", tiny_checkpoint, "--tools", f, "--tool-choice", "get_time", "--no-parallel-tool-calls", "--max-new-tokens",
               "60", "--temperature", "0", "--dtype", "float32", stdin="What time is it?\n/tool 12:00\n")
    assert p.returncode == 0, p.stderr
    calls = [ln for ln in p.stderr.splitlines() if ln.startswith("(tool call call_")]
    assert calls and "get_time" in calls[0] and "/tool RESULT" in calls[0], p.stderr
    assert "usage: /tool" not in p.stderr and "error" not in p.stderr


def test_bad_tools_file_is_a_usage_error(capsys, tmp_path, img):
    (tmp_path / "tools.json").write_text('[{"type": "function", "function": {"parameters": {}}}]')
    rc, _, err = run_main(capsys, "describe", img, "--model", tmp_path / "no-model", "--tools",
                          tmp_path / "tools.json")
    assert rc == 2 and "argument --tools: " in err and "name" in err, err


def test_a_template_that_rejects_the_messages_is_one_line(capsys, tmp_path, img):
    import shutil

    from lfm2vl.resolve import bundled_model

    folder = tmp_path / "m"
    shutil.copytree(bundled_model(), folder)
    (folder / "chat_template.jinja").write_text('{{ raise_exception("boom") }}')
    rc, _, err = run_main(capsys, "describe", img, "--model", folder, "--no-optimize")
    lines = [ln for ln in err.splitlines() if ln.strip() and "loading weights" not in ln]
    assert rc == 1 and lines == ["lfm2vl: error: the chat template rejected these messages: boom"], err


def test_prompt_that_is_not_utf8_is_named_before_loading(capsys, tmp_path, img):
    """Bytes that are not UTF-8 arrive in argv as lone surrogates; --prompt is refused by the engine's own text
    rule, naming the flag."""
    rc, _, err = run_main(capsys, "describe", img, "--prompt", "\udcff\udcfe", "--model", tmp_path / "no-model")
    assert rc == 1 and err == ("lfm2vl: error: --prompt has an unpaired surrogate at index 0 and is not valid "
                               "Unicode (text that was not UTF-8?)\n")


def test_describe_a_bad_data_uri_is_named_before_loading(capsys, tmp_path):
    """A data: URI is decoded with the other checks before loading (no model at --model: reaching it would say so)."""
    rc, _, err = run_main(capsys, "describe", "data:image/png;base64,@@@", "--model", tmp_path / "no-model")
    assert rc == 1 and err.startswith("lfm2vl: error: ") and "base64" in err and "no-model" not in err, err


def test_a_batch_whose_conversations_fail_says_so_and_exits_1(capsys, tiny_checkpoint, tmp_path):
    """Each failed conversation (here: a constraint no text satisfies) keeps its empty line on stdout and gets one
    line on stderr; the status says the batch did not all succeed."""
    f = tmp_path / "m.json"
    f.write_text(json.dumps([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]]))
    rc, out, err = run_main(capsys, "generate", "--messages", f, "--model", tiny_checkpoint, "--no-optimize",
                            "--regex", r"[^\x00-\x{10FFFF}]", *FAST)
    lines = [ln for ln in err.splitlines() if ln.startswith("lfm2vl:")]
    assert rc == 1 and out == "\n\n" and [ln[:38] for ln in lines] == [
        "lfm2vl: error: conversation 1: the reg", "lfm2vl: error: conversation 2: the reg"], err
    assert all("constraint reached a dead end" in ln for ln in lines)


def test_describe_a_path_too_long_for_a_file_name_is_one_line(capsys, tmp_path):
    rc, _, err = run_main(capsys, "describe", "a" * 300, "--model", tmp_path / "no-model")
    assert rc == 1 and err == f"lfm2vl: error: image {'a' * 77 + '...'!r} cannot name a file (File name too long)\n"


def test_generate_a_string_too_long_for_a_file_name_is_named_as_an_image_string(capsys, tmp_path):
    f = tmp_path / "m.json"
    f.write_text(json.dumps([{"role": "user", "content": [{"type": "image", "image": "a" * 300}]}]))
    rc, _, err = run_main(capsys, "generate", "--messages", f, "--model", tmp_path / "no-model")
    assert rc == 1 and err.startswith(f"lfm2vl: error: {f}: messages[0].content[0]: image string ") and \
        "is not an existing file" in err and len(err.splitlines()) == 1


def test_describe_an_empty_path_says_it_is_empty(capsys, tmp_path):
    rc, _, err = run_main(capsys, "describe", "", "--model", tmp_path / "no-model")
    assert rc == 1 and err == "lfm2vl: error: the image path is empty\n"


@pytest.mark.parametrize("content, says", [
    (b'[{"role": "user", "content": "\xff"}]', "{f} is not UTF-8 text (byte 0xff at offset 30)"),
    (b'[{"role": "user", "content": "\\udcff"}]', "{f}: messages[0].content has an unpaired surrogate at index 0"),
    (b'[{"role": "user"}]', "{f}: messages[0] has no content: a user message needs content"),
    (b'[{"role": "user", "content": [{"type": "image_url", "image_url": "notadict"}]}]',
     "{f}: messages[0].content[0]: image string 'notadict' is not an existing file, an http(s) URL or a data: URI"),
])
def test_generate_names_the_file_and_the_place_before_loading(capsys, tmp_path, content, says):
    f = tmp_path / "m.json"
    f.write_bytes(content)
    rc, _, err = run_main(capsys, "generate", "--messages", f, "--model", tmp_path / "no-model")
    assert rc == 1 and len(err.splitlines()) == 1 and err.startswith("lfm2vl: error: " + says.format(f=f))


def test_chat_reports_a_line_that_is_not_utf8_and_carries_on(capsys, monkeypatch, fake_chat):
    monkeypatch.setattr(sys, "stdin", FakeStdin(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte"),
                                                "next\n"))
    rc, out, err = run_main(capsys, "chat")
    assert rc == 0 and fake_chat.sent == ["next"] and out == "Hello\n"
    assert "(error: the line is not UTF-8 text)" in err


def test_chat_says_an_attached_image_was_not_sent_when_the_input_ends(capsys, monkeypatch, fake_chat, img):
    monkeypatch.setattr(sys, "stdin", FakeStdin(f"/image {img}\n"))
    rc, out, err = run_main(capsys, "chat")
    assert rc == 0 and fake_chat.sent == [] and "(1 attached image not sent: no message followed)" in err
