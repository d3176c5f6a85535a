"""`lfm2vl bench` smoke test on a tiny config: both engines (lfm2vl, transformers; lfm2vl also in low-memory mode,
int8 and int4) and the int8 / int4 quality checks run
in their subprocesses and the table and JSON have the expected shape. No timing assertions (speed is measured by
running the benchmark, not in tests)."""
import json

import pytest
import torch

from lfm2vl import bench
from lfm2vl.bench import pagecache, rounds
from lfm2vl.cpu import gemm, int8mm, packed
from lfm2vl.bench.data import CONFIGS, SCENARIOS, random_checkpoint, scenario_inputs
from lfm2vl.bench.work import model_work


@pytest.fixture(autouse=True)
def plain_bf16_default(monkeypatch):
    """The engines a run starts do not depend on this CPU: bf16 packing is not the load default here (the test of the
    packed row's default sets it)."""
    monkeypatch.setattr(packed, "packs_by_default", lambda: False)


def _tiny_config(path):
    d = json.loads((CONFIGS / "450M.json").read_text())
    d["text_config"].update(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2,
                            num_hidden_layers=3, layer_types=["conv", "full_attention", "conv"], vocab_size=1024)
    d["vision_config"].update(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    d["projector_hidden_size"] = 48
    path.write_text(json.dumps(d))
    return path


def test_scenarios_have_the_promised_inputs(tmp_path):
    from lfm2vl.processor import Processor

    folder = random_checkpoint(_tiny_config(tmp_path / "c.json"), tmp_path / "ckpt")
    proc = Processor.from_pretrained(folder)
    shapes = {}
    for name in SCENARIOS:
        batch, seconds = scenario_inputs(proc, name)
        assert seconds >= 0
        shapes[name] = (batch["input_ids"].shape[1], 0 if "pixel_values" not in batch else batch["pixel_values"].shape[0])
    assert shapes["text512"] == (512, 0)
    assert shapes["img512"][1] == 1 and shapes["two_images"][1] == 2
    assert shapes["img1024x768"][1] > 2  # tiles plus the thumbnail
    # the image-token budget knobs reach the processor: one unit without splitting, fewer tokens with a lower cap
    one = scenario_inputs(proc, "img1024x768", {"do_image_splitting": False})[0]
    assert one["pixel_values"].shape[0] == 1 and one["input_ids"].shape[1] < shapes["img1024x768"][0]
    small = scenario_inputs(proc, "img512", {"max_image_tokens": 64, "min_image_tokens": 32,
                                             "do_image_splitting": False})[0]
    assert small["input_ids"].shape[1] <= shapes["img512"][0] - 256 + 64
    assert scenario_inputs(proc, "text512", {"max_image_tokens": 64})[0]["input_ids"].shape[1] == 512


@pytest.mark.slow
def test_bench_smoke_table_and_json(tmp_path, capsys):
    cfg = _tiny_config(tmp_path / "tiny.json")
    out_json = tmp_path / "res.json"
    rc = bench.main(["--config", str(cfg), "--cache-dir", str(tmp_path / "cache"), "--reps", "1", "--warmup", "0",
                     "--new-tokens", "2", "--scenarios", "text512,img512", "--int8", "--int4", "--int8-vision",
                     "--bf16-packed", "--low-memory", "--torch-first",
                     "--json", str(out_json)])
    out = capsys.readouterr().out
    payload = json.loads(out_json.read_text())
    assert rc == 0, out
    res = payload["results"]
    engines = ("lfm2vl bf16", "lfm2vl bf16 torch 1st", "lfm2vl bf16 low-mem", "lfm2vl bf16 packed", "lfm2vl int8",
               "lfm2vl int4", "lfm2vl int8+vision", "transformers bf16")
    assert set(res) == {*engines, "int8 quality", "int4 quality", "int8+vision quality"}
    for label in engines:
        r = res[label]
        assert "error" not in r, r
        assert set(r["scenarios"]) == {"text512", "img512"}
        for m in r["scenarios"].values():
            assert set(m) >= {"prompt_tokens", "preprocess_s", "vision_s", "prefill_tps", "ttft_s", "decode_tps"}
            assert m["ttft_s"] > 0 and m["decode_tps"] > 0
        assert r["peak_rss_mb"] > 0 and r["load_s"] > 0
    assert res["lfm2vl bf16"]["scenarios"]["text512"]["prompt_tokens"] == 512
    for fmt in ("int8", "int4"):
        assert res[f"{fmt} quality"]["format"] == fmt
        q = res[f"{fmt} quality"]["scenarios"]["img512"]
        assert -1 <= q["logit_cosine_min"] <= q["logit_cosine_mean"] <= 1 + 1e-6 and 0 <= q["greedy_agreement"] <= 1
    # the table: a header, one row per scenario and engine with both ratio columns, and the JSON line
    lines = out.splitlines()
    assert any(ln.startswith("scenario") and "TTFT x" in ln for ln in lines)
    rows = [ln for ln in lines if ln.startswith(("text512", "img512")) and "|" in ln]
    assert len(rows) == 2 * len(engines) and all(ln.count("|") == 1 for ln in rows)
    # the shares: the machine measured in the run, every timed scenario as GB/s and GFLOP/s and shares of it
    machine = payload["machine"]
    assert machine["read_gbps"] > 0 and machine["gemm_gflops"] > 0
    assert machine["gemm_dtype"] == ("bf16" if gemm.bf16_native() else "fp32")  # the dtype prefill multiplies in
    lo, hi = machine["read_gbps_range"]
    assert lo <= machine["read_gbps"] <= hi  # the mean of the probes before and after the round
    assert any(ln.startswith("machine: read bandwidth") for ln in lines)
    for label in engines:
        for sc, m in res[label]["scenarios"].items():
            assert m["decode_gbps"] > 0 and m["decode_bw_pct"] == pytest.approx(
                100 * m["decode_gbps"] / machine["read_gbps"])
            assert m["prefill_gflops"] > 0 and m["prefill_gemm_pct"] > 0
            assert (m["vision_gflops"] is None) == (sc == "text512") and m["patches"] == (0 if sc == "text512" else 1024)
    assert any(ln.startswith("int4 vs bf16 img512") for ln in lines)
    vq = res["int8+vision quality"]["scenarios"]["img512"]  # int8 vision: the image features compared too
    assert 0.9 < vq["feature_cosine_min"] <= vq["feature_cosine_mean"] <= 1 + 1e-6
    assert "feature_cosine_mean" not in res["int8 quality"]["scenarios"]["img512"]
    assert (machine["int8_gops"] is not None) == int8mm.wins()
    assert json.loads(lines[-1])["results"].keys() == res.keys()


def test_rounds_merge_into_medians_and_per_round_ratios():
    """--rounds: each metric is the median over the rounds, the peak RSS the largest, and the ratio to transformers
    the median of each round's own ratio (a slow round slows both engines and cancels out)."""
    def result(engine, ttft, tps, rss):
        return {"engine": engine, "load_s": 1.0, "rss_after_load_mb": 10.0, "peak_rss_mb": rss,
                "scenarios": {"img512": {"prompt_tokens": 286, "ttft_s": ttft, "decode_tps": tps}}}

    speeds = [1.0, 2.0, 1.1]  # the machine's slowdown in each round
    per_round = [{"ours": result("ours", 0.5 * f, 40 / f, 100 + i),
                  "transformers bf16": result("transformers", f, 10 / f, 200),
                  "int8 quality": {"engine": "quality", "scenarios": {}}} for i, f in enumerate(speeds)]
    merged = rounds.merge(per_round)
    m = merged["ours"]["scenarios"]["img512"]
    assert m["ttft_s"] == 0.5 * 1.1 and m["decode_tps"] == pytest.approx(40 / 1.1)
    assert m["prompt_tokens"] == 286 and isinstance(m["prompt_tokens"], int)
    assert rounds.merge(per_round[:2])["ours"]["scenarios"]["img512"]["prompt_tokens"] == 286  # even count: no .5
    assert m["ttft_x"] == pytest.approx(2.0) and m["decode_x"] == pytest.approx(4.0)
    assert merged["ours"]["peak_rss_mb"] == 102 and merged["ours"]["rounds"] == 3
    assert merged["int8 quality"] is per_round[0]["int8 quality"]
    for later in per_round[1:]:  # the bench runs such deterministic checks in the first round only
        del later["int8 quality"]
    assert rounds.merge(per_round)["int8 quality"] is per_round[0]["int8 quality"]
    assert rounds.merge(per_round[:1]) is per_round[0]


def test_each_rounds_shares_are_against_the_probes_around_that_round(tmp_path, monkeypatch, capsys):
    """The machine is probed before the first round and after each one; a round's decode share of the read bandwidth
    uses the mean of the probes around it, and the reported share is the median of the rounds' shares (here the
    bandwidth doubles from round to round while decode keeps pace: 100% in every round)."""
    cfg = _tiny_config(tmp_path / "tiny.json")
    probes = iter([10.0, 30.0, 70.0])
    monkeypatch.setattr(bench, "_probe_machine", lambda args, short: {
        "engine": "machine", "read_gbps": next(probes), "gemm_gflops": 100.0, "gemm_dtype": "bf16",
        "int8_gops": None, "threads": 1})
    bw = iter([20.0, 50.0])  # GB/s each round's decode reads: the mean of the probes around it
    work = model_work(random_checkpoint(cfg, tmp_path / "ckpt"))

    def worker(spec, timeout):
        tps = next(bw) * 1e9 / work.decode_bytes("bf16")
        return {"engine": "ours", "load_s": 1.0, "rss_after_load_mb": 1.0, "peak_rss_mb": 1.0, "scenarios": {
            "text512": {"prompt_tokens": 512, "patches": 0, "patch_sq": 0, "preprocess_s": 0.0, "vision_s": 0.0,
                        "prefill_s": 1.0, "prefill_tps": 512.0, "ttft_s": 1.0, "decode_tps": tps}}}

    monkeypatch.setattr(bench, "run_worker", worker)
    out_json = tmp_path / "res.json"
    assert bench.main(["--config", str(cfg), "--cache-dir", str(tmp_path / "cache"), "--engines", "ours",
                       "--rounds", "2", "--scenarios", "text512", "--json", str(out_json)]) == 0
    payload = json.loads(out_json.read_text())
    m = payload["results"]["lfm2vl bf16"]["scenarios"]["text512"]
    assert m["decode_bw_pct"] == pytest.approx(100.0)  # against the whole run's mean probe it would be 35 / 36.7
    assert payload["machine"]["read_gbps_range"] == [10.0, 70.0]
    capsys.readouterr()


@pytest.mark.parametrize("default", [False, True])
def test_the_packed_format_runs_where_it_is_the_load_default(tmp_path, monkeypatch, capsys, default):
    """Where lfm2vl.load packs bf16 weights by default, a plain run also measures that format beside plain bf16."""
    monkeypatch.setattr(packed, "packs_by_default", lambda: default)
    monkeypatch.setattr(bench.pagecache, "reread", lambda paths: None)
    monkeypatch.setattr(bench, "_probe_machine", lambda args, short: None)
    specs = []
    monkeypatch.setattr(bench, "run_worker", lambda spec, timeout: specs.append(spec) or {
        "engine": spec["engine"], "error": "not run"})
    bench.main(["--config", str(_tiny_config(tmp_path / "tiny.json")), "--cache-dir", str(tmp_path / "cache"),
                "--engines", "ours", "--scenarios", "text512"])
    capsys.readouterr()
    assert [bool(s.get("bf16_packed")) for s in specs] == ([False, True] if default else [False])


@pytest.mark.parametrize("keep", [False, True])
def test_weight_files_are_read_afresh_before_the_engines_start(tmp_path, monkeypatch, capsys, keep):
    """Every engine starts from the page-cache state a fresh read from disk leaves: the checkpoint's safetensors
    files are evicted and read back before the first engine runs, unless --keep-page-cache."""
    cfg = _tiny_config(tmp_path / "tiny.json")
    events = []
    monkeypatch.setattr(bench.pagecache, "reread", lambda paths: events.append(("reread", sorted(map(str, paths)))))
    monkeypatch.setattr(bench, "_probe_machine", lambda args, short: None)
    monkeypatch.setattr(bench, "run_worker", lambda spec, timeout: events.append(("run", spec["engine"])) or {
        "engine": spec["engine"], "error": "not run"})
    bench.main(["--config", str(cfg), "--cache-dir", str(tmp_path / "cache"), "--engines", "ours",
                "--scenarios", "text512"] + (["--keep-page-cache"] if keep else []))
    capsys.readouterr()
    files = sorted(str(f) for f in (tmp_path / "cache").rglob("*.safetensors"))
    assert files and events[-1] == ("run", "ours")
    assert events[:-1] == ([] if keep else [("reread", files)])


def test_reread_reads_each_file_whole_and_leaves_it_unchanged(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(bytes(range(256)) * 40000)
    b.write_bytes(b"x" * 12345)
    assert pagecache.reread([a, b]) == 256 * 40000 + 12345
    assert a.read_bytes() == bytes(range(256)) * 40000 and b.read_bytes() == b"x" * 12345
    # best effort: a file it cannot open or read is skipped (the engine loading it reports the problem)
    assert pagecache.reread([tmp_path / "missing.safetensors", tmp_path, b]) == 12345


def test_bad_image_budget_is_a_clear_error(capsys):
    with pytest.raises(SystemExit):
        bench.main(["--max-image-tokens", "0"])
    assert "--max-image-tokens must be >= 1, got 0" in capsys.readouterr().err


def test_unusable_device_is_a_clear_error(capsys):
    import torch

    for device in ["nonsense"] + ([] if torch.cuda.is_available() else ["cuda"]):
        with pytest.raises(SystemExit):
            bench.main(["--device", device])
        assert f"--device '{device}'" in capsys.readouterr().err


def _captured_env(monkeypatch, module, call):
    """The `env` a subprocess.run call inside `call()` was given (None: the parent's environment, unchanged)."""
    seen = {}

    def fake_run(cmd, **kwargs):
        seen["env"] = kwargs.get("env")
        raise SystemExit("stop here")

    monkeypatch.setattr(module.subprocess, "run", fake_run)
    with pytest.raises(SystemExit):
        call()
    return seen


def test_other_engines_start_with_the_users_environment(monkeypatch):
    import os

    import lfm2vl.engine  # noqa: F401  (whatever importing lfm2vl does has happened)

    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    seen = _captured_env(monkeypatch, bench, lambda: bench.run_worker({"engine": "transformers", "threads": 2}, 10))
    assert seen == {"env": None} and os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def _llamacpp_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "bench_vs_llamacpp.py"
    spec = importlib.util.spec_from_file_location("bench_vs_llamacpp", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_llama_cpp_starts_with_the_users_environment(monkeypatch):
    script = _llamacpp_script()
    seen = _captured_env(monkeypatch, script, lambda: script.llama("llama-bench", "m.gguf", 8, 2, depth=0))
    assert seen == {"env": None}


@pytest.mark.parametrize("depths", ["0,x", "-1", ""])
def test_llama_cpp_comparison_names_a_bad_depth(tmp_path, capsys, depths):
    script = _llamacpp_script()
    for name in ("llama-bench", "lm.gguf"):
        (tmp_path / name).write_text("")
    with pytest.raises(SystemExit):
        script.main(["--llama-bench", str(tmp_path / "llama-bench"), "--gguf-bf16", str(tmp_path / "lm.gguf"),
                     "--model", str(tmp_path), "--depths", depths])
    err = capsys.readouterr().err
    assert "--depths must" in err and repr(depths) in err, err


@pytest.mark.slow
def test_bench_train_smoke_table_and_json(tmp_path, capsys):
    """--train: both engines train the same LoRA on the same batch (same trainable parameter count, same first loss:
    the same model, inputs and loss); the table has one row per engine with both ratio columns."""
    cfg = _tiny_config(tmp_path / "tiny.json")
    out_json = tmp_path / "res.json"
    rc = bench.main(["--config", str(cfg), "--cache-dir", str(tmp_path / "cache"), "--train", "--reps", "1",
                     "--warmup", "1", "--batch-size", "2", "--image-size", "128", "--answer-tokens", "8",
                     "--json", str(out_json)])
    out = capsys.readouterr().out
    payload = json.loads(out_json.read_text())
    assert rc == 0, out
    res = payload["results"]
    assert set(res) == {"lfm2vl bf16", "transformers+peft bf16"}
    ours, hf = res["lfm2vl bf16"], res["transformers+peft bf16"]
    for r in (ours, hf):
        assert r["samples_per_s"] > 0 and r["peak_rss_mb"] > 0 and len(r["step_times"]) == 1
        assert len(r["losses"]) == 2 and r["trained_tokens"] == 2 * 9  # 8 answer tokens + the end-of-turn token
    assert ours["trainable_params"] == hf["trainable_params"] > 0
    assert ours["seq_len"] == hf["seq_len"]
    assert abs(ours["losses"][0] - hf["losses"][0]) < 0.05 * hf["losses"][0]  # bf16: the same loss up to rounding
    rows = [ln for ln in out.splitlines() if ln.startswith(("lfm2vl bf16", "transformers+peft bf16"))]
    assert len(rows) == 2 and all(ln.count("|") == 1 for ln in rows)
    assert json.loads(out.splitlines()[-1])["mode"] == "train"


@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_decode_bytes_equal_the_weights_a_decode_step_reads(tiny_checkpoint, fmt):
    """work.py's count against the tensors of the loaded (and quantized) model: the language model without its
    embedding table, plus the output head."""
    from lfm2vl.bench.work import model_work
    from lfm2vl.cpu.speed import optimize_for_cpu
    from lfm2vl.loading import load_model

    model = load_model(tiny_checkpoint, dtype="bfloat16")[0]
    if fmt != "bf16":
        optimize_for_cpu(model, **{fmt: True})
    lm = model.model.language_model
    seen, total = set(), 0
    for mod in (lm, model.lm_head):
        for name, t in list(mod.named_parameters()) + list(mod.named_buffers()):
            if (mod is lm and name.startswith("embed_tokens")) or t.data_ptr() in seen:
                continue
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    if fmt == "bf16":  # tied: the head is the embedding matrix, counted once through lm_head
        assert model.lm_head.weight.data_ptr() in seen
    assert model_work(tiny_checkpoint).decode_bytes(fmt) == pytest.approx(total, rel=1e-9)


def test_vision_flops_equal_torchs_flop_counter(tiny_checkpoint):
    from PIL import Image
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from lfm2vl.bench.work import model_work
    from lfm2vl.loading import load_model
    from lfm2vl.processor import Processor

    model = load_model(tiny_checkpoint, dtype="float32")[0]
    proc = Processor.from_pretrained(tiny_checkpoint)
    batch = proc(text="<image>", images=[Image.new("RGB", (64, 64), (10, 200, 30))], do_image_splitting=False)
    mask = batch["pixel_attention_mask"]
    per_unit = mask.sum(1).long()
    # the math attention backend runs as matmuls the counter sees (the fused CPU kernel is not counted)
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model.image_features(batch["pixel_values"], mask, batch["spatial_shapes"])
    want = model_work(tiny_checkpoint).vision_flops(int(per_unit.sum()), int((per_unit ** 2).sum()))
    assert counter.get_total_flops() == want


@pytest.mark.parametrize("argv, message", [
    (["--config", "{t}/nothere.json"], "--config {t}/nothere.json: no such file"),
    (["--config", "{t}/bad.json"], "--config: {t}/bad.json is not valid JSON"),
    (["--json", "{t}/missing/x.json"], "--json {t}/missing/x.json: folder {t}/missing does not exist"),
    (["--json", "{t}/bad.json/x.json"], "--json {t}/bad.json/x.json: {t}/bad.json is a file, not a folder"),
    (["--timeout", "0"], "--timeout: 0 is invalid; expected a number of seconds > 0"),
    (["--timeout", "-5"], "--timeout: -5 is invalid; expected a number of seconds > 0"),
    (["--scenarios", ""], "--scenarios is empty"),
])
def test_bad_option_is_one_line_before_any_work(tmp_path, monkeypatch, capsys, argv, message):
    (tmp_path / "bad.json").write_text("{bad")
    monkeypatch.setattr(bench, "_folder", lambda args: pytest.fail("the benchmark started"))
    with pytest.raises(SystemExit) as e:
        bench.main([a.format(t=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message.format(t=tmp_path) in err and "Traceback" not in err


def test_json_is_written_atomically_and_a_failed_write_is_one_line(tmp_path, unwritable, capsys):
    assert bench._write_json(str(tmp_path / "r.json"), {"a": 1}) == 0
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "r.json"]  # no temporary left
    assert bench._write_json(str(unwritable), {"a": 2}) == 1
    assert capsys.readouterr().err == f"lfm2vl bench: error: --json {unwritable}: cannot write it (Not a directory)\n"
