"""The offline suites: deterministic files, answers recomputed from the stored scene descriptions, circular copies,
the easy-vqa files' counts and balance, images that decode, and the rules each file is scored by."""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest

from lfm2vl.eval import suites
from lfm2vl.eval.benchmarks import benchmark_for
from lfm2vl.eval.scenes import COLORS
from lfm2vl.eval.scoring import score
from lfm2vl.eval.tsv import decode_images, read_rows

SYNTH = ["synth-pope", "synth-mc", "synth-ocr", "synth-multi", "synth-ifeval"]
N = 24


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    paths = suites.make_suite("synth", out, seed=3, n=N)
    return {p.stem: read_rows(p) for p in paths}, out


def _present(scene, color, shape):
    return any(o["color"] == color and o["shape"] == shape for o in scene["objects"])


def _find(scene, color, shape):
    return next(o for o in scene["objects"] if o["color"] == color and o["shape"] == shape)


def test_same_seed_gives_identical_files_and_another_seed_differs(tmp_path):
    a = suites.make_suite("synth", tmp_path / "a", seed=5, n=12)
    b = suites.make_suite("synth", tmp_path / "b", seed=5, n=12)
    c = suites.make_suite("synth", tmp_path / "c", seed=6, n=12)
    assert [p.name for p in a] == [f"{s}.tsv" for s in SYNTH]
    for pa, pb, pc in zip(a, b, c):
        assert pa.read_bytes() == pb.read_bytes(), pa.name
        assert pa.read_bytes() != pc.read_bytes(), pa.name


def test_each_file_is_scored_by_the_rules_of_the_benchmark_it_imitates(synth):
    _, out = synth
    kinds = {s: benchmark_for(out / f"{s}.tsv").kind for s in SYNTH}
    assert kinds == {"synth-pope": "pope", "synth-mc": "mmbench", "synth-ocr": "ocr", "synth-multi": "mc",
                     "synth-ifeval": "ifeval"}


def test_existence_answers_follow_the_scene_and_negatives_match_their_split(synth):
    rows = synth[0]["synth-pope"]
    assert len(rows) == N
    for r in rows:
        scene, q = json.loads(r.raw["scene"]), json.loads(r.raw["query"])
        assert r.question == f"Is there a {q['color']} {q['shape']} in the image?"
        assert r.answer == ("Yes" if _present(scene, q["color"], q["shape"]) else "No")
        assert r.category == r.split
        if r.answer == "No" and r.split == "adversarial":
            assert any(o["color"] == q["color"] or o["shape"] == q["shape"] for o in scene["objects"])
    per_split = Counter((r.split, r.answer) for r in rows)
    assert set(per_split.values()) == {N // 6} and len(per_split) == 6


def _mc_answer(q, scene):
    objs = scene["objects"]
    if q["kind"] == "count":
        key = "color" if "color" in q else "shape"
        return str(sum(o[key] == q[key] for o in objs))
    if q["kind"] == "color":
        (obj,) = [o for o in objs if o["shape"] == q["shape"]]
        return obj["color"]
    if q["kind"] == "position":
        a, b = _find(scene, *q["a"]), _find(scene, *q["b"])
        dx, dy = a["x"] - b["x"], a["y"] - b["y"]
        if abs(dx) > abs(dy):
            return "To the left" if dx < 0 else "To the right"
        return "Above" if dy < 0 else "Below"
    assert q["kind"] == "largest"
    big = max(objs, key=lambda o: o["r"])
    assert all(o["r"] * 1.5 < big["r"] for o in objs if o is not big)  # unambiguous at a glance
    return f"{big['color'].capitalize()} {big['shape']}"


def test_multiple_choice_answers_follow_the_scene(synth):
    rows = synth[0]["synth-mc"]
    assert len(rows) == 4 * N
    assert Counter(r.category for r in rows) == {k: N for k in ("counting", "color", "position", "size")}
    for r in rows:
        assert r.options[r.answer] == _mc_answer(json.loads(r.raw["query"]), json.loads(r.raw["scene"]))
        assert len(r.options) == 4 and len(set(r.options.values())) == 4


def test_circular_copies_rotate_the_options_and_keep_the_answer_text(synth):
    groups = defaultdict(list)
    for r in synth[0]["synth-mc"]:
        groups[int(r.index) % 1_000_000].append(r)
    assert len(groups) == N
    for base, copies in groups.items():
        assert sorted(int(r.index) // 1_000_000 for r in copies) == [0, 1, 2, 3]
        copies.sort(key=lambda r: int(r.index))
        first = list(copies[0].options.values())
        for k, r in enumerate(copies):
            assert list(r.options.values()) == first[k:] + first[:k]
            assert r.options[r.answer] == copies[0].options[copies[0].answer]
            assert r.images == copies[0].images and r.question == copies[0].question
        assert len({r.answer for r in copies}) == 4   # the right letter moves through A-D


def test_rendered_scenes_show_each_object_in_its_colour(synth):
    rows = synth[0]["synth-mc"][:8] + synth[0]["synth-multi"][:4]
    for r in rows:
        scenes = json.loads(r.raw["scene"])
        images = decode_images(r)
        for scene, img in zip(scenes if isinstance(scenes, list) else [scenes], images):
            assert img.size == tuple(scene["size"])
            for o in scene["objects"]:
                assert img.getpixel((o["x"], o["y"])) == COLORS[o["color"]]


def test_strings_to_read_are_the_answer_and_drawn_in_the_image(synth):
    rows = synth[0]["synth-ocr"]
    assert {r.category for r in rows} == {"Regular Text Recognition", "Digit String Recognition",
                                          "Non-Semantic Text Recognition"}
    for r in rows:
        scene = json.loads(r.raw["scene"])
        assert r.answer == scene["text"] and 3 <= len(r.answer) <= 8
        (img,) = decode_images(r)
        assert img.size == tuple(scene["size"]) and img.convert("L").getextrema()[0] < 100  # dark text drawn


def test_multi_image_answers_follow_the_scenes(synth):
    rows = synth[0]["synth-multi"]
    for r in rows:
        scenes, q = json.loads(r.raw["scene"]), json.loads(r.raw["query"])
        assert len(r.images) == len(scenes) == len(r.options)
        if q["kind"] == "more_shapes":
            counts = [len(s["objects"]) for s in scenes]
            assert counts[0] != counts[1]
            want = counts.index(max(counts))
        else:
            holds = [_present(s, q["color"], q["shape"]) for s in scenes]
            assert holds.count(True) == 1
            want = holds.index(True)
        assert r.answer == "ABCD"[want]


def test_instruction_items_answer_the_scene_and_their_rules_are_checkable(synth):
    rows = synth[0]["synth-ifeval"]
    for r in rows:
        assert r.answer == _mc_answer(json.loads(r.raw["query"]), json.loads(r.raw["scene"]))
        for c in json.loads(r.raw["constraints"]):
            assert c["judge"]["method"] == "rule_based" and c["value"] in r.question
    # A reply that follows every constraint scores 100 under the MM-IFEval rule checker, one that follows none 0.
    good, bad = [], []
    for r in rows:
        cons = {f["func"]: f["params"] for c in json.loads(r.raw["constraints"]) for f in c["judge"]["verify_funcs"]}
        words = ["word"] * 10
        if "check_whether_response_word_count_in_range" in cons:
            words = ["word"] * cons["check_whether_response_word_count_in_range"][0]
        start = cons.get("check_whether_whole_response_begin_with_certain_substring", [""])[0]
        end = cons.get("check_whether_whole_response_end_with_certain_substring", [""])[0]
        body = words[:max(0, len(words) - len((start + " " + end).split()))]
        good.append(" ".join(x for x in [start, *body, end] if x))
        bad.append("a, " * 12 + "z")
    bench = benchmark_for("synth-ifeval.tsv")
    assert score(bench, rows, good)["overall"] == pytest.approx(100.0)
    assert score(bench, rows, bad)["overall"] == pytest.approx(0.0)


def test_answers_as_predictions_score_full_marks_and_always_yes_the_pope_baseline(synth):
    sets, out = synth
    for name in ("synth-pope", "synth-mc", "synth-ocr", "synth-multi"):
        rows = sets[name]
        preds = [r.options[r.answer] if r.options else r.answer for r in rows]
        assert score(benchmark_for(out / f"{name}.tsv"), rows, preds)["overall"] == pytest.approx(
            100.0 if name != "synth-ocr" else len(rows)), name
    pope = score(benchmark_for(out / "synth-pope.tsv"), sets["synth-pope"], ["Yes"] * N)
    assert pope["overall"] == pytest.approx(200 / 3, abs=0.01)


@pytest.fixture(scope="module")
def easy(tmp_path_factory):
    out = tmp_path_factory.mktemp("easy")
    return {p.stem: (p, read_rows(p)) for p in suites.make_suite("easy-vqa", out, seed=0)}


def test_easy_vqa_yes_no_file_is_the_balanced_test_split(easy):
    import easy_vqa

    texts, answers, _ = easy_vqa.get_test_questions()
    n_no = answers.count("no")
    _, rows = easy["easy-vqa-yesno"]
    assert Counter(r.answer for r in rows) == {"Yes": n_no, "No": n_no}
    assert {c for r in rows for c in r.category.split(",")} == {"color", "shape", "negated"}
    source = {(t[0].upper() + t[1:], a.capitalize()) for t, a in zip(texts, answers)}
    assert all((r.question, r.answer) in source for r in rows)
    for r in rows[:50]:
        (img,) = decode_images(r)
        assert img.size == (64, 64)


def test_easy_vqa_multiple_choice_file_has_four_options_from_its_answer_list(easy):
    import easy_vqa

    texts, answers, image_ids = easy_vqa.get_test_questions()
    truth = {(t, i): a for t, a, i in zip(texts, answers, image_ids)}
    vocab = set(easy_vqa.get_answers()) - {"yes", "no"}
    _, rows = easy["easy-vqa-mc"]
    assert len(rows) == sum(a not in ("yes", "no") for a in answers)
    for r in rows:
        assert len(r.options) == 4 and set(r.options.values()) <= vocab
        q = r.question[0].lower() + r.question[1:]
        assert r.options[r.answer] == truth[(q, int(r.raw["image_id"]))]
    assert Counter(r.answer for r in rows).keys() == {"A", "B", "C", "D"}


def test_easy_vqa_open_file_is_every_test_question_as_the_package_asks_it(easy):
    import easy_vqa

    texts, answers, image_ids = easy_vqa.get_test_questions()
    _, rows = easy["easy-vqa-open"]
    assert [(r.question, r.answer, int(r.raw["image_id"])) for r in rows] == list(zip(texts, answers, image_ids))
    kinds = {"yes": "yes/no", "no": "yes/no", "circle": "shape", "rectangle": "shape", "triangle": "shape"}
    assert [r.category for r in rows] == [kinds.get(a, "color") for a in answers]
    assert Counter(r.category for r in rows)["yes/no"] == 7136  # the package's README: 7,136 yes/no test questions


def test_n_limits_the_easy_vqa_files_and_keeps_yes_no_balanced(tmp_path):
    open_, yes_no, mc = suites.make_suite("easy-vqa", tmp_path, seed=1, n=40)
    assert len(read_rows(open_)) == 40
    assert Counter(r.answer for r in read_rows(yes_no)) == {"Yes": 20, "No": 20}
    assert len(read_rows(mc)) == 40


def test_unknown_suite_names_the_known_ones(tmp_path):
    with pytest.raises(ValueError, match="unknown suite 'mmstar'.*synth-pope"):
        suites.make_suite("mmstar", tmp_path)


def test_command_line_writes_the_files_and_reports_bad_values(tmp_path, capsys):
    assert suites.main(["synth-ocr", "--out", str(tmp_path), "--seed", "2", "--n", "5"]) == 0
    assert capsys.readouterr().out.strip() == str(tmp_path / "synth-ocr.tsv")
    assert len(read_rows(tmp_path / "synth-ocr.tsv")) == 5
    with pytest.raises(SystemExit) as e:
        suites.main(["synth-ocr", "--out", str(tmp_path), "--n", "0"])
    assert e.value.code == 2 and "expected an integer >= 1" in capsys.readouterr().err


def test_n_over_a_synth_suites_limit_is_one_line_before_any_file_is_written(tmp_path, capsys):
    out = tmp_path / "suites"
    assert suites.main(["synth", "--out", str(out), "--n", str(suites.MAX_SYNTH + 1)]) == 1
    err = capsys.readouterr().err
    assert err == (f"lfm2vl eval make-suite: error: --n {suites.MAX_SYNTH + 1} is over synth-pope's limit of "
                   f"{suites.MAX_SYNTH} questions (more than any benchmark it imitates)\n")
    assert not out.exists()


def test_missing_easy_vqa_is_one_line_saying_how_to_install_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "easy_vqa", None)   # makes `import easy_vqa` fail
    assert suites.main(["easy-vqa-yesno", "--out", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install easy-vqa" in err


def test_out_that_is_a_file_is_named(tmp_path):
    (tmp_path / "ok.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"^--out .*ok\.png is a file, not a folder$"):
        suites.make_suite("synth-pope", tmp_path / "ok.png", n=2)
