"""The bundled demo model (lfm2vl/bundled/): a complete small checkpoint that answers offline from the README's first
command, gives transformers' answers, knows easy-vqa's test pictures, and whose training script runs end to end."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLED = ROOT / "lfm2vl" / "bundled"
FILES = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "processor_config.json",
         "chat_template.jinja", "generation_config.json", "README.md"}


def offline_env(home: Path) -> dict:
    """A newcomer's machine without network: empty HOME (no Hugging Face cache), the hub switched off."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "LFM2VL_", "XDG_"))}
    return {**env, "HOME": str(home), "HF_HUB_OFFLINE": "1"}


def easy_vqa_test(n: int) -> list[tuple[str, str, str]]:
    """The first n (image path, question, answer) of easy-vqa's test split."""
    import easy_vqa

    texts, answers, ids = easy_vqa.get_test_questions()
    paths = easy_vqa.get_test_image_paths()
    return [(paths[i], q, a) for q, a, i in list(zip(texts, answers, ids))[:n]]


def greedy_answers(engine, cases, max_new_tokens: int = 8) -> list[str]:
    convs = [[{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": q}]}]
             for img, q, *_ in cases]
    res = engine.generate(convs, max_new_tokens=max_new_tokens, temperature=0.0, repetition_penalty=1.0,
                          min_p=0.0, max_batch=16)
    return [r.text for r in res]


def test_bundled_folder_is_a_complete_checkpoint_under_25_mb():
    import lfm2vl

    assert FILES <= {p.name for p in BUNDLED.iterdir()}
    assert sum(p.stat().st_size for p in BUNDLED.iterdir()) <= 25 * 2 ** 20
    assert json.loads((BUNDLED / "config.json").read_text())["model_type"] == "lfm2_vl"
    assert lfm2vl.bundled_model().resolve() == BUNDLED.resolve()


def test_readme_first_command_answers_offline_with_the_bundled_model(tmp_path):
    first = (ROOT / "README.md").read_text().split("```bash\n", 1)[1].split("\n", 1)[0]
    m = re.search(r"lfm2vl (describe (examples/(\w+)\.png))", first)
    assert m, f"the README's first command does not describe an example image: {first}"
    color, shape = m.group(3).split("_")
    proc = subprocess.run([sys.executable, "-m", "lfm2vl", *m.group(1).split()], cwd=ROOT, env=offline_env(tmp_path),
                          capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert f"{color} {shape}" in proc.stdout.lower()
    notes = [ln for ln in proc.stderr.splitlines() if "bundled demo model" in ln]
    assert len(notes) == 1 and "hf download LiquidAI/LFM2-VL-450M" in notes[0]


def test_bundled_model_answers_easy_vqa_test_questions():
    import lfm2vl

    cases = easy_vqa_test(400)
    engine = lfm2vl.load("bundled")
    answers = greedy_answers(engine, cases)
    accuracy = sum(a.strip() == truth for a, (_, _, truth) in zip(answers, cases)) / len(cases)
    assert accuracy >= 0.85, f"easy-vqa accuracy {accuracy:.3f} on the first {len(cases)} test questions"


@pytest.mark.oracle
def test_transformers_gives_the_same_greedy_answers_on_50_test_questions(tmp_path):
    import torch

    import lfm2vl

    python = os.environ.get("LFM2VL_ORACLE_PYTHON")
    if not python:
        pytest.fail("no oracle: set LFM2VL_ORACLE_PYTHON to .venv-oracle/bin/python (scripts/test.sh does)")
    cases = easy_vqa_test(50)
    (tmp_path / "cases.json").write_text(json.dumps([{"image": img, "question": q} for img, q, _ in cases]))
    proc = subprocess.run([python, str(ROOT / "scripts" / "oracle_bundled.py"), "--model", str(BUNDLED),
                           "--cases", str(tmp_path / "cases.json")], capture_output=True, text=True, timeout=900,
                          stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    ours = greedy_answers(lfm2vl.load(str(BUNDLED), dtype=torch.float32), cases)
    assert ours == theirs
    assert sum(a.strip() == truth for a, (_, _, truth) in zip(ours, cases)) >= 40  # real answers, not garbage


def test_training_questions_follow_easy_vqa_answer_rules():
    """The training data's easy-vqa-style questions are answered by the package's own rules: the template rules
    reproduce every answer of its training split, and drawn questions agree with them."""
    import random

    sys.path.insert(0, str(ROOT / "scripts"))
    import default_model_data as D

    by_image, _ = D.easyvqa_train()
    checked = 0
    for qas in by_image.values():
        color = next((a for _, a in qas if a in D.EASY_COLORS), None)
        shape = next((a for _, a in qas if a in D.EASY_SHAPES), None)
        if color and shape:
            assert all(D.easy_answer(q, color, shape) == a for q, a in qas)
            checked += len(qas)
    assert checked > 20000
    rng = random.Random(0)
    for _ in range(500):
        color, shape = rng.choice(list(D.EASY_COLORS)), rng.choice(D.EASY_SHAPES)
        q, a = D.easy_question(rng, color, shape)
        assert D.easy_answer(q, color, shape) == a


def test_training_script_runs_end_to_end_and_writes_a_loadable_model(tmp_path):
    import lfm2vl

    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "train_default_model.py"), "--output", str(out),
                           "--scale", "0.002", "--no-eval", "--no-progress"], capture_output=True, text=True,
                          timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    model = out / "model"
    assert FILES <= {p.name for p in model.iterdir()}
    assert json.loads((model / "config.json").read_text()).keys() == \
        json.loads((BUNDLED / "config.json").read_text()).keys()
    res = lfm2vl.load(str(model)).generate(
        [{"role": "user", "content": [{"type": "image", "image": str(ROOT / "examples" / "red_circle.png")},
                                      {"type": "text", "text": "what shape is in the image?"}]}],
        max_new_tokens=4, temperature=0.0)
    assert res.completion_tokens >= 1
    metrics = [json.loads(ln) for ln in open(out / "work" / "3-sft" / "metrics.jsonl")]
    assert any("loss" in m for m in metrics)
