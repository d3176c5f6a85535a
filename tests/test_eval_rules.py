"""Evaluation rules: benchmark names, TSV reading, predictions files, prompts and scorers (pure Python)."""
from __future__ import annotations

import base64
import csv
import io
import os

import pytest
from PIL import Image

from lfm2vl.eval.benchmarks import benchmark_for, get_benchmark, md5_warning
from lfm2vl.eval.prompts import ANSWER_DIRECTLY, build_messages, prompt_text
from lfm2vl.eval.scoring import score
from lfm2vl.eval.tsv import (FAILED_PREFIX, Row, TSVError, decode_images, read_predictions, read_rows,
                             write_predictions)


def png_b64(color=(255, 0, 0)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), color).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path, header, rows):
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, delimiter="\t", lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)
    return path


def row(index="0", question="What is it?", options=None, answer=None, hint=None, category=None, split=None,
        raw=None):
    return Row(index=str(index), images=[], question=question, options=options or {}, hint=hint,
               category=category, split=split, answer=answer, raw=raw or {"index": str(index)}, source="t.tsv")


# ---- benchmarks ----

def test_file_named_after_a_benchmark_selects_its_rules():
    assert benchmark_for("/data/MMBench_DEV_EN.tsv").kind == "mmbench"
    assert benchmark_for("/data/whatever.tsv", "POPE").kind == "pope"
    assert benchmark_for("x/MM-IFEval.tsv").suffix is False


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="MMStar.*RealWorldQA"):
        get_benchmark("MMStr")
    with pytest.raises(ValueError, match="cannot tell which benchmark mine.tsv is"):
        benchmark_for("mine.tsv")


def test_md5_mismatch_warns(tmp_path):
    p = write_tsv(tmp_path / "POPE.tsv", ["index"], [["1"]])
    assert "differs from the POPE release" in md5_warning(p, get_benchmark("POPE"))
    assert md5_warning(p, get_benchmark("easy-vqa-yesno")) is None


# ---- prompts ----

MC_ROW = dict(question="Which animal?", options={"A": "cat", "B": "dog"})


def test_mc_prompt_golden():
    text = prompt_text(get_benchmark("MMStar"), row(**MC_ROW))
    assert text == ("Question: Which animal?\nOptions:\nA. cat\nB. dog\n"
                    "Please select the correct answer from the options above. \n"
                    "\nPlease answer directly with only the final answer, do not give any explanation.")


def test_mc_prompt_with_hint_golden():
    text = prompt_text(get_benchmark("MMBench_DEV_EN"), row(hint="Look left.", **MC_ROW))
    assert text.startswith("Hint: Look left.\nQuestion: Which animal?\nOptions:\nA. cat\n")
    assert text.endswith("options above. \n" + ANSWER_DIRECTLY)


def test_yes_no_and_ocr_prompts_are_the_question_plus_suffix():
    for name in ("POPE", "OCRBench"):
        assert prompt_text(get_benchmark(name), row(question="Is there a cat?")) == (
            "Is there a cat?\nPlease answer directly with only the final answer, do not give any explanation.")


def test_ifeval_prompt_has_no_suffix_and_images_come_first():
    r = row(question="Describe it in 3 words.")
    r.images = [png_b64(), png_b64((0, 0, 255))]
    msgs = build_messages(get_benchmark("MM-IFEval"), r)
    assert len(msgs) == 1 and msgs[0]["role"] == "user"
    content = msgs[0]["content"]
    assert [p["type"] for p in content] == ["image", "image", "text"]
    assert content[0]["base64"] == r.images[0]
    assert content[2]["text"] == "Describe it in 3 words."


# ---- TSV ----

def test_tsv_images_references_lists_and_empty_options(tmp_path):
    a, b = png_b64(), png_b64((0, 255, 0))
    header = ["index", "image", "question", "A", "B", "C", "answer", "category", "l2-category"]
    p = write_tsv(tmp_path / "MMStar.tsv", header, [
        ["1", a, "q1", "x", "y", "", "A", "cat1", "l2"],
        ["2", "1", "q2", "x", "y", "z", "B", "cat2", ""],
        ["3", repr([a, b]), "q3", "x", "y", "", "A", "cat1", "l2"],
    ])
    rows = read_rows(p)
    assert rows[0].options == {"A": "x", "B": "y"}          # the empty C column is ignored
    assert rows[1].images == [a]                              # reference to row 1
    assert rows[2].images == [a, b]                           # list literal
    assert rows[0].l2_category == "l2" and rows[1].l2_category is None
    assert [im.size for im in decode_images(rows[2])] == [(4, 4), (4, 4)]


def test_tsv_image_path_relative_to_the_file(tmp_path):
    Image.new("RGB", (3, 2)).save(tmp_path / "pic.png")
    p = write_tsv(tmp_path / "POPE.tsv", ["index", "image_path", "question", "answer"], [["7", "pic.png", "q", "Yes"]])
    (r,) = read_rows(p)
    assert r.images_are_paths and r.images == [str(tmp_path / "pic.png")]
    assert build_messages(get_benchmark("POPE"), r)[0]["content"][0] == {"type": "image", "path": r.images[0]}
    assert decode_images(r)[0].size == (3, 2)


def test_tsv_reference_to_missing_row_names_the_row(tmp_path):
    p = write_tsv(tmp_path / "MMStar.tsv", ["index", "image", "question"], [["1", png_b64(), "q"], ["12", "99", "q"]])
    with pytest.raises(TSVError, match=r"MMStar.tsv row index 12: image refers to row index 99"):
        read_rows(p)


@pytest.mark.parametrize("cells, says", [(["1", "q", "x"], "line 2: 3 cells but 4 columns"),
                                         (["1", "q", "x", "y", "z"], "line 2: 5 cells but 4 columns")])
def test_tsv_row_without_one_cell_per_column_names_its_line_and_count(tmp_path, cells, says):
    p = write_tsv(tmp_path / "MMStar.tsv", ["index", "question", "A", "answer"], [cells])
    with pytest.raises(TSVError, match=f"MMStar.tsv {says}"):
        read_rows(p)


def test_tsv_line_numbers_count_the_lines_of_quoted_multi_line_cells(tmp_path):
    p = write_tsv(tmp_path / "MMStar.tsv", ["index", "question", "A", "answer"],
                  [["1", "a question\nover\nthree lines", "x", "A"], ["2", "q\ntwo", "x"]])
    with pytest.raises(TSVError, match="MMStar.tsv lines 5-6: 3 cells but 4 columns"):
        read_rows(p)


def test_tsv_undecodable_image_names_the_row(tmp_path):
    bad = base64.b64encode(b"not an image at all, just some bytes" * 3).decode()
    p = write_tsv(tmp_path / "MMStar.tsv", ["index", "image", "question"], [["5", bad, "q"]])
    (r,) = read_rows(p)
    with pytest.raises(TSVError, match=r"MMStar.tsv row index 5: image 1 of 1: undecodable image"):
        decode_images(r)


def test_predictions_round_trip_atomically(tmp_path):
    p = write_tsv(tmp_path / "MMStar.tsv", ["index", "image", "question", "A", "B", "answer"],
                  [["1", png_b64(), "q\twith tab", "x", "y", "A"], ["2", "1", "q2", "x", "y", "B"]])
    rows = read_rows(p)
    out = tmp_path / "pred.tsv"
    write_predictions(out, rows, ["A", 'say "B"\nthen'])
    assert [f for f in os.listdir(tmp_path) if f.startswith(".tmp")] == []
    back, preds = read_predictions(out)
    assert preds == ["A", 'say "B"\nthen']
    assert [r.raw for r in back] == [r.raw for r in rows]
    assert back[0].question == "q\twith tab" and back[1].answer == "B"
    # rewriting over an existing file replaces it whole
    write_predictions(out, rows[:1], ["B"])
    assert read_predictions(out)[1] == ["B"]


def test_scoring_without_answer_column_is_a_clear_error(tmp_path):
    p = write_tsv(tmp_path / "MMStar.tsv", ["index", "question", "A", "B"], [["1", "q", "x", "y"]])
    with pytest.raises(ValueError, match="no 'answer' column"):
        score(get_benchmark("MMStar"), read_rows(p), ["A"])


# ---- multiple choice ----

OPTS = {"A": "a red cube", "B": "a blue ball", "C": "a green cone", "D": "a yellow star"}


def test_mc_extraction_cases():
    cases = [("B", True), ("The answer is B", True), ("The answer is B because the ball is round and blue", True),
             ("a blue ball", True),                 # option text
             ("B or C", False),                      # two letters
             ("Cannot determine the answer", False),  # refusal -> Z
             ("no idea", False), (FAILED_PREFIX + "bad image", False)]
    rows = [row(i, options=OPTS, answer="B") for i in range(len(cases))]
    res = score(get_benchmark("MMStar"), rows, [c for c, _ in cases])
    assert res["overall"] == pytest.approx(100 * 4 / 8)
    assert res["failed"] == 1 and res["n"] == 8


def test_mc_breakdowns_by_category_and_split():
    rows = [row(0, options=OPTS, answer="A", category="x", split="dev"),
            row(1, options=OPTS, answer="A", category="y", split="dev")]
    res = score(get_benchmark("RealWorldQA"), rows, ["A", "B"])
    assert res["categories"] == {"x": 100.0, "y": 0.0} and res["splits"] == {"dev": 50.0}


def rotated_group(base: int, answer_text="a blue ball"):
    texts = list(OPTS.values())
    rows = []
    for k in range(4):
        rot = texts[k:] + texts[:k]
        opts = dict(zip("ABCD", rot))
        ans = next(l for l, t in opts.items() if t == answer_text)
        rows.append(row(base + k * 1_000_000, options=opts, answer=ans, category="c"))
    return rows


def test_mmbench_circular_group_with_one_wrong_copy_fails():
    good, bad = rotated_group(1), rotated_group(2)
    preds = [r.answer for r in good] + [r.answer for r in bad[:3]] + ["A" if bad[3].answer != "A" else "B"]
    res = score(get_benchmark("MMBench_DEV_EN"), good + bad, preds)
    assert res["overall"] == 50.0 and res["groups"] == 2
    assert res["vanilla"] == pytest.approx(100 * 7 / 8)
    assert score(get_benchmark("MMBench_DEV_EN"), good + bad, preds, circular=False)["overall"] == \
        pytest.approx(100 * 7 / 8)


def test_mmbench_unreadable_copy_fails_its_group():
    g = rotated_group(3)
    preds = [r.answer for r in g[:3]] + ["I am not sure"]
    assert score(get_benchmark("MMBench_DEV_EN"), g, preds)["overall"] == 0.0


def test_always_a_on_rotated_options_baseline():
    rows = [r for base in range(1, 101) for r in rotated_group(base)]
    circ = score(get_benchmark("MMBench_DEV_EN"), rows, ["A"] * len(rows))
    assert circ["vanilla"] == 25.0 and circ["overall"] == 0.0


# ---- POPE ----

def test_pope_unknowns_and_comma_joined_categories():
    rows = [row(0, answer="Yes", category="random,popular"), row(1, answer="No", category="adversarial"),
            row(2, answer="Yes", category="random"), row(3, answer="No", category="popular")]
    preds = ["Yes, there is.", "No.", "yes and no", "Maybe"]    # last two are Unknown
    res = score(get_benchmark("POPE"), rows, preds)
    assert res["unknown"] == 2
    # exploded: (Y,Y) x2 [random, popular], (N,N) adversarial, (Y,U) random, (N,U) popular
    assert res["category_details"]["random"]["n"] == 2 and res["category_details"]["popular"]["n"] == 2
    assert res["accuracy"] == pytest.approx(100 * 3 / 5)
    assert res["precision"] == 100.0 and res["recall"] == pytest.approx(100 * 2 / 3)
    assert res["overall"] == pytest.approx(100 * 2 * (2 / 3) / (1 + 2 / 3))
    assert res["categories"]["adversarial"] == 0.0   # no true "Yes" there: F1 0


def test_always_yes_on_balanced_pope_baseline():
    rows = [row(i, answer="Yes" if i % 2 else "No", category="random") for i in range(200)]
    res = score(get_benchmark("POPE"), rows, ["Yes"] * 200)
    assert res["overall"] == pytest.approx(200 / 3) and res["accuracy"] == 50.0


# ---- OCRBench ----

def test_ocrbench_case_and_formula_spaces():
    hmer = "Handwritten Mathematical Expression Recognition"
    rows = [row(0, answer="['Hello World']", category="Regular Text Recognition"),
            row(1, answer="['x ^ { 2 }']", category=hmer),
            row(2, answer="['X^{2}']", category=hmer),
            row(3, answer="['abc', 'stop']", category="Scene Text-centric VQA")]
    preds = ["the text says HELLO WORLD", "x^{2}", "x^{2}", "STOP sign"]
    res = score(get_benchmark("OCRBench"), rows, preds)
    assert res["overall"] == 3            # the formula case differs in row 2
    assert res["groups"]["Text Recognition"] == 1 and res["groups"][hmer] == 1
    assert res["groups"]["Scene Text-centric VQA"] == 1


def test_exact_scorer_ignores_case_spaces_and_a_final_full_stop_only():
    rows = [row(0, answer="circle", category="shape"), row(1, answer="yes", category="yes/no"),
            row(2, answer="teal", category="color"), row(3, answer="no", category="yes/no")]
    preds = [" Circle.", "yes, it is", "teal", FAILED_PREFIX + " timeout"]
    res = score(get_benchmark("easy-vqa-open"), rows, preds)
    assert res["overall"] == 50 and res["failed"] == 1
    assert res["categories"] == {"color": 100, "shape": 100, "yes/no": 0}


def test_open_suite_prompt_is_the_question_alone():
    assert prompt_text(get_benchmark("easy-vqa-open"), row(question="what shape is present?")) == \
        "what shape is present?"


# ---- MM-IFEval ----

def test_ifeval_rule_checked_constraints_are_partial():
    import json
    cons = [{"key": "len", "value": "in 3 words",
             "judge": {"method": "rule_based", "verify_funcs": [
                 {"func": "check_whether_response_word_count_in_range", "params": [3, 3]}]}},
            {"key": "start", "value": "start with 'A'",
             "judge": {"method": "rule_based", "verify_funcs": [
                 {"func": "check_whether_whole_response_begin_with_certain_substring", "params": ["A"]}]}},
            {"key": "tone", "value": "be polite", "judge": {"method": "direct_gpt"}}]
    raw = {"index": "0", "constraints": json.dumps(cons), "infer_type": "main"}
    rows = [row(0, raw=raw), row(1, raw=dict(raw, index="1"))]
    res = score(get_benchmark("MM-IFEval"), rows, ["A red cube", "The red cube here"])
    assert res["partial"] is True and res["constraints_unchecked"] == 2
    assert res["overall"] == pytest.approx(100 * (1 + 0) / 2)


F_WORDS = "check_whether_response_word_count_in_range"


def _rule(verify_funcs) -> list:
    return [{"key": "len", "judge": {"method": "rule_based", "verify_funcs": verify_funcs}}]


@pytest.mark.parametrize("constraints, words", [
    ([[1, 2]], "constraint 0 must be a JSON object, got a list"),
    ([{"judge": "x"}], "constraint 0: judge must be a JSON object"),
    (_rule("abc"), "constraint 0: verify_funcs must be a JSON list of objects"),
    (_rule([{"func": F_WORDS, "params": ["a", None]}]), "params of " + F_WORDS + " must be [a number, a number]"),
    (_rule([{"func": F_WORDS}]), "must be [a number, a number]; they are missing"),
    (_rule([{"func": F_WORDS, "params": {"x": 1}}]), 'must be [a number, a number]; got {"x": 1}'),
    (_rule([{"func": F_WORDS, "params": [1, 2, 3]}]), "must be [a number, a number]; got [1, 2, 3]"),
])
def test_ifeval_malformed_constraints_are_errors_naming_row_and_constraint(constraints, words):
    import json
    raw = {"index": "4", "constraints": json.dumps(constraints), "infer_type": "main"}
    with pytest.raises(ValueError) as e:
        score(get_benchmark("MM-IFEval"), [row(4, raw=raw)], ["A red cube"])
    msg = str(e.value)
    assert msg.startswith("t.tsv row index 4: constraint 0") and words in msg, msg
