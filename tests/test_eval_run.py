"""`lfm2vl eval` end to end on the tiny random checkpoint: predictions and scores, resuming, a bad row, shards,
`--server` against `lfm2vl serve`, and `eval score --json`.

The data is a small multiple-choice file in VLMEvalKit's TSV layout (named MMStar.tsv, so its name selects the
rules), with random images as base64 PNG.
"""
from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lfm2vl.cli import main
from lfm2vl.eval.tsv import FAILED_PREFIX as FAILED
from server_util import ServerProcess

ROWS = 5
FAST = ["--dtype", "float32", "--max-new-tokens", "6", "--no-progress", "--batch-size", "3"]


def png_b64(seed: int) -> str:
    rng = np.random.RandomState(seed)
    img = Image.fromarray((rng.rand(40 + 8 * seed, 56, 3) * 255).astype("uint8"))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path, rows: int = ROWS, bad: set[int] = frozenset()) -> str:
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter="\t")
        w.writerow(["index", "question", "A", "B", "C", "D", "answer", "category", "image"])
        for i in range(rows):
            image = base64.b64encode(b"not an image at all " * 8).decode() if i in bad else png_b64(i)
            w.writerow([str(100 + i), f"What colour is shape {i}?", "red", "green", "blue", "grey", "ABCD"[i % 4],
                        "colour" if i % 2 else "shape", image])
    return str(path)


def read_tsv(path) -> list[dict]:
    csv.field_size_limit(1 << 30)
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def predictions(path) -> list[tuple[str, str]]:
    return [(r["index"], r["prediction"]) for r in read_tsv(path)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_tsv(tmp_path_factory.mktemp("eval") / "MMStar.tsv")


@pytest.fixture(scope="module")
def reference(tiny_checkpoint, data, tmp_path_factory):
    """One uninterrupted local run: its predictions file."""
    out = tmp_path_factory.mktemp("ref") / "pred.tsv"
    assert main(["eval", "--model", str(tiny_checkpoint), "--data", data, "--output", str(out), *FAST]) == 0
    return out


def test_run_writes_predictions_and_scores(reference, data, capsys):
    rows, source = read_tsv(reference), read_tsv(data)
    assert [r["index"] for r in rows] == [r["index"] for r in source]
    assert all(r["image"] == s["image"] and r["answer"] == s["answer"] for r, s in zip(rows, source))
    assert not any(r["prediction"].startswith(FAILED) for r in rows) and any(r["prediction"] for r in rows)
    scores = json.loads(reference.with_name("pred.scores.json").read_text())
    assert scores["n"] == ROWS and scores["benchmark"] == "MMStar" and 0 <= scores["overall"] <= 100


def test_interrupted_run_resumes_to_the_same_file(tiny_checkpoint, data, reference, tmp_path):
    out = tmp_path / "pred.tsv"
    base = ["eval", "--model", str(tiny_checkpoint), "--data", data, "--output", str(out), *FAST]
    assert main([*base, "--limit", "2"]) == 0
    assert predictions(out) == predictions(reference)[:2]
    # Mark the saved rows: a resumed run keeps them instead of predicting them again.
    rows = read_tsv(out)
    with open(out, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows([{**r, "prediction": "kept " + r["prediction"]} for r in rows])
    assert main(base) == 0
    got, want = predictions(out), predictions(reference)
    assert got[:2] == [(i, "kept " + p) for i, p in want[:2]] and got[2:] == want[2:]


def test_bad_row_is_recorded_and_counted(tiny_checkpoint, tmp_path, reference, capsys):
    data = write_tsv(tmp_path / "MMStar.tsv", bad={1})
    out = tmp_path / "pred.tsv"
    assert main(["eval", "--model", str(tiny_checkpoint), "--data", data, "--output", str(out), *FAST]) == 0
    got = predictions(out)
    assert got[1][1].startswith(FAILED) and got[1][0] == "101"
    assert [p for k, p in enumerate(got) if k != 1] == [p for k, p in enumerate(predictions(reference)) if k != 1]
    assert "1 of 5 rows failed" in capsys.readouterr().err
    assert json.loads((tmp_path / "pred.scores.json").read_text())["failed"] == 1


def test_server_gives_the_local_predictions(tiny_checkpoint, data, reference, tmp_path):
    server = ServerProcess(["--model", str(tiny_checkpoint), "--dtype", "float32"], tmp_path / "server.log")
    try:
        out = tmp_path / "pred.tsv"
        assert main(["eval", "--server", server.url, "--data", data, "--output", str(out), *FAST]) == 0
    finally:
        server.stop()
    assert predictions(out) == predictions(reference)


def test_unreachable_server_is_one_line(data, tmp_path, capsys):
    from server_util import free_port

    out = tmp_path / "pred.tsv"
    assert main(["eval", "--server", f"http://127.0.0.1:{free_port()}", "--data", data, "--output", str(out),
                 *FAST]) == 1
    err = capsys.readouterr().err.splitlines()  # the MD5 warning (not the release file), then the error
    assert err[-1].startswith("lfm2vl eval: error: cannot reach the server") and "Traceback" not in "\n".join(err)


def test_shards_merged_equal_the_unsharded_run(tiny_checkpoint, data, reference, tmp_path):
    shards = []
    for i in range(2):
        shards.append(str(tmp_path / f"s{i}.tsv"))
        assert main(["eval", "--model", str(tiny_checkpoint), "--data", data, "--output", shards[-1],
                     "--shard", f"{i}/2", *FAST]) == 0
    assert 0 < len(read_tsv(shards[0])) < ROWS
    assert main(["eval", "merge", *shards, "--output", str(tmp_path / "all.tsv")]) == 0
    assert read_tsv(tmp_path / "all.tsv") == read_tsv(reference)


def test_score_json_prints_only_the_scores(reference, capsys):
    capsys.readouterr()
    assert main(["eval", "score", str(reference), "--benchmark", "MMStar", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out) == json.loads(reference.with_name("pred.scores.json").read_text())


@pytest.mark.parametrize("args, rc, says", [
    (["--data", "DATA", "--benchmark", "NoSuchBench"], 1, "NoSuchBench"),
    (["--data", "FOLDER", "--benchmark", "NoSuchBench"], 1, "unknown benchmark 'NoSuchBench': expected one of MMStar"),
    (["--data", "missing.tsv"], 1, "not found: missing.tsv"),
    (["--data", "DATA", "--shard", "2/2"], 2, "--shard: 2/2 is invalid"),
    (["--data", "DATA", "--server", "http://[::1"], 2, "--server: 'http://[::1' is not a valid http(s) URL ('['"),
    (["--data", "DATA", "--server", ""], 2, "--server: '' is not a valid http(s) URL (empty)"),
])
def test_bad_input_is_one_line(data, tmp_path, capsys, args, rc, says):
    args = [data if a == "DATA" else str(Path(data).parent) if a == "FOLDER" else a for a in args]
    try:
        status = main(["eval", *args, "--output", str(tmp_path / "p.tsv"), "--model", "unused"])
    except SystemExit as e:  # argparse's option errors
        status = e.code
    assert status == rc
    err = capsys.readouterr().err.strip().splitlines()
    assert says in err[-1] and "Traceback" not in "\n".join(err)


@pytest.mark.parametrize("url, reason", [
    ("", "(empty)"),
    ("http://x\n", "whitespace or a control character, '\\n'"),
    ("http://a b:8000", "whitespace or a control character, ' '"),
    ("localhost:8000", "no scheme: it starts with neither http:// nor https://)"),
    ("localhost:99999", "no scheme: it starts with neither http:// nor https://; also port 99999 is out of range"),
    ("ftp://host", "the scheme 'ftp' is not http(s)"),
    ("http://", "(no host)"),
    ("http://:8000/v1", "(no host)"),
    ("http://[::1", "'[' without a matching ']'"),
    ("http://[zz]:80", "[zz] is not an IPv6 address"),
    ("http://[::1]x", "'x' after the IPv6 address"),
    ("http://300.1.2.3", "300.1.2.3 is not an IPv4 address"),
    ("http://host:0", "port 0 is out of range 1-65535"),
    ("http://host:65536", "port 65536 is out of range 1-65535"),
    ("http://host:80x", "the port '80x' is not a number from 1 to 65535"),
    ("http://\u2603.com", "Invalid IDNA hostname"),  # the stdlib's IDNA 2003 takes it, httpx's IDNA 2008 does not
])
def test_an_endpoint_url_is_refused_with_the_reason(url, reason):
    from lfm2vl.eval.endpoint import check_url

    with pytest.raises(ValueError) as e:
        check_url(url)
    assert str(e.value).startswith(f"{url!r} is not a valid http(s) URL (") and reason in str(e.value)


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000", "HTTPS://host.example/v1/chat/completions",
                                 "http://[::1]:65535/v1", "http://user:pw@host:1"])
def test_an_http_url_with_a_host_is_an_endpoint(url):
    from lfm2vl.eval.endpoint import check_url

    assert check_url(url) == url


def test_generated_suite_end_to_end(tiny_checkpoint, tmp_path, capsys):
    """`eval make-suite` writes a suite; `eval --data DIR --benchmark NAME --json` predicts it and prints only the
    scores by its rules."""
    assert main(["eval", "make-suite", "synth-pope", "--out", str(tmp_path), "--n", "6"]) == 0
    capsys.readouterr()
    out = tmp_path / "pred.tsv"
    assert main(["eval", "--model", str(tiny_checkpoint), "--data", str(tmp_path), "--benchmark", "synth-pope",
                 "--output", str(out), "--json", *FAST]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores == json.loads((tmp_path / "pred.scores.json").read_text())
    assert scores["n"] == len(read_tsv(out)) == 6 and scores["kind"] == "pope"


def test_unwritable_output_is_said_before_the_model_loads(data, unwritable, capsys):
    assert main(["eval", "--data", data, "--output", str(unwritable), "--model", "no-such-model"]) == 1
    err = capsys.readouterr().err
    assert err == f"lfm2vl eval: error: --output {unwritable}: {unwritable.parent} is a file, not a folder\n"


def test_failed_save_is_one_line(tiny_checkpoint, data, tmp_path, monkeypatch, capsys):
    from lfm2vl.eval import run

    def full(*a):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(run, "write_predictions", full)
    out = tmp_path / "p.tsv"
    assert main(["eval", "--model", str(tiny_checkpoint), "--data", data, "--output", str(out), "--limit", "1",
                 *FAST]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"lfm2vl eval: error: cannot write {out} (No space left on device); 1 of 1 predictions are "
                       "not saved") and "Traceback" not in "\n".join(err)


def test_merge_names_a_bad_shard_in_one_line(reference, tmp_path, capsys):
    bad = tmp_path / "POPE.tsv"
    bad.write_text("question\tprediction\nq\ta\n")
    assert main(["eval", "merge", str(reference), str(bad), "--output", str(tmp_path / "m.tsv")]) == 1
    assert capsys.readouterr().err == "lfm2vl eval: error: POPE.tsv: no 'index' column\n"


def test_merge_checks_its_output_before_reading(unwritable, capsys):
    assert main(["eval", "merge", "missing.tsv", "--output", str(unwritable)]) == 1
    assert capsys.readouterr().err == (f"lfm2vl eval: error: --output {unwritable}: {unwritable.parent} is a file, "
                                       "not a folder\n")
