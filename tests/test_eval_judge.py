"""MM-IFEval with `--judge URL`: the constraints no rule checks are asked of an OpenAI-compatible judge.

The judge here is a tiny HTTP server the test starts on 127.0.0.1: it answers "yes" when the response it is shown
contains "please" and "no" otherwise, except for the constraint "be mysterious", where it answers "perhaps"
(a malformed verdict).
"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from lfm2vl.cli import main
from lfm2vl.eval.judge import parse_verdict
from lfm2vl.eval.tsv import Row, write_predictions
from server_util import free_port


def rule(key, func, *params):
    return {"key": key, "value": key, "judge": {"method": "rule_based",
                                                "verify_funcs": [{"func": func, "params": list(params)}]}}


CONSTRAINTS = [rule("three words", "check_whether_response_word_count_in_range", 3, 3),
               {"key": "tone", "value": "be polite", "judge": {"method": "direct_gpt"}},
               {"key": "style", "value": "be mysterious", "judge": {"method": "cmp_gpt"}}]
# (prediction, rule verdict, judge verdict on "be polite"); "be mysterious" is always malformed (unsatisfied)
PREDICTIONS = [("please sit down", True, True), ("sit down now", True, False), ("please sit down now", False, True)]


class FakeJudge(BaseHTTPRequestHandler):
    prompts: list[str] = []

    def _send(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):  # /v1/models
        self._send({"object": "list", "data": [{"id": "fake-judge", "object": "model"}]})

    def do_POST(self):  # /v1/chat/completions
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        prompt = body["messages"][-1]["content"]
        FakeJudge.prompts.append(prompt)
        response = prompt.split("<<<", 1)[1].split(">>>", 1)[0]
        if "be mysterious" in prompt:
            answer = "perhaps"
        else:
            answer = "Yes." if "please" in response else "no"
        assert body["temperature"] == 0 and body["model"] == "fake-judge"
        self._send({"choices": [{"index": 0, "message": {"role": "assistant", "content": answer}}]})

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def judge_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeJudge)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def pred_file(tmp_path):
    rows, preds = [], []
    for i, (p, _, _) in enumerate(PREDICTIONS):
        raw = {"index": str(i), "question": f"What to do {i}?", "constraints": json.dumps(CONSTRAINTS),
               "infer_type": "main"}
        rows.append(Row(index=str(i), images=[], question=raw["question"], options={}, hint=None, category=None,
                        split=None, answer=None, raw=raw, source="MM-IFEval.tsv"))
        preds.append(p)
    path = tmp_path / "MM-IFEval.tsv"
    write_predictions(path, rows, preds)
    return str(path)


def scores(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["eval", "score", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_verdicts_are_parsed_from_the_first_word():
    assert [parse_verdict(t) for t in ["Yes.", "**no**", " NO, it does not", "perhaps", "", None, "yesno"]] == \
        [True, False, False, None, None, None, None]


def test_without_a_judge_only_rules_count_and_the_score_is_partial(pred_file, capsys):
    res = scores(capsys, pred_file)
    assert res["partial"] is True and res["judge"] is None
    assert (res["constraints_checked"], res["constraints_judged"], res["constraints_unchecked"]) == (3, 0, 6)
    assert res["overall"] == pytest.approx(100 * 2 / 3)


def test_judged_constraints_change_the_score_as_the_judge_says(pred_file, judge_url, capsys):
    FakeJudge.prompts.clear()
    res = scores(capsys, pred_file, "--judge", judge_url)
    per_row = [(r + j + 0) / 3 for _, r, j in PREDICTIONS]  # the malformed "be mysterious" verdict counts as 0
    assert res["overall"] == pytest.approx(100 * sum(per_row) / len(per_row))
    assert (res["constraints_checked"], res["constraints_judged"], res["constraints_unchecked"]) == (3, 6, 0)
    assert res["judge_failures"] == 3 and res["partial"] is False
    assert res["judge"] == {"url": judge_url, "model": "fake-judge"}
    assert len(FakeJudge.prompts) == 6 and all("What to do" in p for p in FakeJudge.prompts)


def test_a_failed_prediction_is_not_sent_to_the_judge(tmp_path, judge_url, capsys):
    from lfm2vl.eval.tsv import FAILED_PREFIX

    raw = {"index": "0", "question": "q", "constraints": json.dumps(CONSTRAINTS[1:2]), "infer_type": "main"}
    row = Row(index="0", images=[], question="q", options={}, hint=None, category=None, split=None, answer=None,
              raw=raw, source="MM-IFEval.tsv")
    path = tmp_path / "MM-IFEval.tsv"
    write_predictions(path, [row], [FAILED_PREFIX + "image does not decode"])
    FakeJudge.prompts.clear()
    res = scores(capsys, str(path), "--judge", judge_url)
    assert res["overall"] == 0.0 and res["failed"] == 1 and FakeJudge.prompts == []


def test_unreachable_judge_is_one_line(pred_file, capsys):
    capsys.readouterr()
    assert main(["eval", "score", pred_file, "--judge", f"http://127.0.0.1:{free_port()}"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lfm2vl eval: error: cannot reach the judge at http://127.0.0.1:")


@pytest.mark.parametrize("url", ["", "http://[::1", "http://judge\n"])
def test_a_malformed_judge_url_is_an_option_error(pred_file, url, capsys):
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["eval", "score", pred_file, "--judge", url])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2
    assert err[-1].startswith(f"lfm2vl eval score: error: argument --judge: {url!r} is not a valid http(s) URL (")
