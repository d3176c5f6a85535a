"""Run transformers' Lfm2VlProcessor (torchvision backend) on the processor parity cases; write digests.

Runs in .venv-oracle (torchvision does not import beside .venv's torch). The cases and input images come from
tests/processor_cases.py, which the pytest side uses too, so both sides see identical inputs.

    .venv-oracle/bin/python scripts/oracle_processor.py --out /tmp/digests.json      # all cases
    .venv-oracle/bin/python scripts/oracle_processor.py --cases cases.json --out d.json
    .venv-oracle/bin/python scripts/oracle_processor.py --write-digests              # refresh tests/data/processor_oracle.json
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]

import numpy as np  # noqa: E402

import processor_cases as pc  # noqa: E402


def build_reference(folder: Path, kind: str, template: str):
    from transformers import AutoTokenizer
    from transformers.models.lfm2_vl import Lfm2VlImageProcessor, Lfm2VlProcessor
    tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)  # no prompt about auto_map
    ip = Lfm2VlImageProcessor(**pc.reference_settings(kind))
    return Lfm2VlProcessor(ip, tok, chat_template=template)


def templates() -> dict:
    return {"fixture": (pc.FIXTURE / "chat_template.jinja").read_text(), "lfm25": pc.LFM25_TEMPLATE.read_text()}


def run_case(proc, case: dict, workdir: Path) -> dict:
    images = [[pc.make_image(s, workdir) for s in group] for group in case["images"]]
    has_images = any(images)
    if case["kind"] == "chat":
        text = proc.apply_chat_template(case["messages"], add_generation_prompt=case["add_generation_prompt"],
                                        tokenize=False)
        tok_text = proc.tokenizer.apply_chat_template(case["messages"], tokenize=False,
                                                      add_generation_prompt=case["add_generation_prompt"])
        assert text == tok_text, (text, tok_text)
        texts = [text]
    else:
        texts = case["texts"]
    kwargs = {"return_tensors": "pt", "padding": True, "do_convert_rgb": True, **case["knobs"], **case.get("call", {})}
    out = proc(text=texts, images=images if has_images else None, **kwargs)
    out = {k: np.asarray(v) for k, v in out.items()}
    return pc.digest(out, proc.image_token_id, texts)


def check_resize(n: int = 60) -> dict:
    """Our uint8 resize (torch F.interpolate, no torchvision) vs torchvision's tensor resize, as transformers calls
    it, on random sizes, all three resample modes, and both contiguous and channels-last inputs."""
    import numpy as np
    import torch
    from torchvision.transforms.v2 import functional as tvF

    from lfm2vl.processor.image import resize_u8
    modes = {0: tvF.InterpolationMode.NEAREST_EXACT, 2: tvF.InterpolationMode.BILINEAR,
             3: tvF.InterpolationMode.BICUBIC}
    rs = np.random.RandomState(0)
    bad = []
    real_capability = torch.backends.cpu.get_cpu_capability
    for i in range(n):
        # Every fourth case pretends the CPU lacks AVX2: both sides then take their float32 bilinear fallback.
        torch.backends.cpu.get_cpu_capability = real_capability if i % 4 else (lambda: "DEFAULT")
        h, w = int(rs.randint(1, 600)), int(rs.randint(1, 600))
        th, tw = int(rs.randint(1, 700)), int(rs.randint(1, 700))
        mode = [0, 2, 3][i % 3]
        img = torch.from_numpy(pc.make_array(w, h, i))  # (h, w, 3)
        chw = img.permute(2, 0, 1).contiguous()
        ref = tvF.resize(chw[None], [th, tw], interpolation=modes[mode], antialias=True)[0]
        for x in (chw, img.permute(2, 0, 1)):
            if not torch.equal(resize_u8(x, (th, tw), mode), ref):
                bad.append([h, w, th, tw, mode])
    torch.backends.cpu.get_cpu_capability = real_capability
    return {"cases": n, "mismatches": bad}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", help="JSON list of cases (default: all of tests/processor_cases.py)")
    ap.add_argument("--out", help="write digests here")
    ap.add_argument("--write-digests", action="store_true", help=f"write {pc.ORACLE_DIGESTS.relative_to(ROOT)}")
    args = ap.parse_args(argv)
    import torch
    import torchvision
    import transformers
    cases = json.loads(Path(args.cases).read_text()) if args.cases else pc.all_cases()
    tmpl = templates()
    results, t0 = {}, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        procs = {}
        for case in cases:
            key = (case["ckpt"], case.get("template", "fixture"))
            if key not in procs:
                folder = pc.write_checkpoint(tmp / f"{key[0]}_{key[1]}", key[0], tmpl[key[1]])
                procs[key] = build_reference(folder, key[0], tmpl[key[1]])
            try:
                results[case["id"]] = run_case(procs[key], case, tmp)
            except Exception as e:  # recorded: the pytest side then expects us to raise too
                results[case["id"]] = {"error": f"{type(e).__name__}: {e}"[:300]}
    doc = {"meta": {"transformers": transformers.__version__, "torch": torch.__version__,
                    "torchvision": torchvision.__version__, "cases": len(results),
                    "seconds": round(time.time() - t0, 1), "resize_check": check_resize(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability()},
           "cases": results}
    text = json.dumps(doc, indent=1, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text)
    if args.write_digests:
        pc.ORACLE_DIGESTS.parent.mkdir(parents=True, exist_ok=True)
        pc.ORACLE_DIGESTS.write_text(text)
    errors = sum("error" in r for r in results.values())
    print(f"oracle: {len(results)} cases, {errors} reference errors, {time.time() - t0:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
