"""Greedy answers of transformers (AutoProcessor + AutoModelForImageTextToText) for a checkpoint folder: the oracle of
the bundled model's test. Runs in .venv-oracle (transformers' image processor needs torchvision).

    .venv-oracle/bin/python scripts/oracle_bundled.py --model DIR --cases cases.json [--max-new-tokens 8]

cases.json: [{"image": path, "question": text}, ...]. Prints one JSON list: the decoded answers, in order.
"""
from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--cases", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    args = ap.parse_args()
    from PIL import Image
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(args.model)
    model = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
    answers = []
    for case in json.loads(open(args.cases).read()):
        image = Image.open(case["image"]).convert("RGB")
        messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                                 {"type": "text", "text": case["question"]}]}]
        inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False,
                                 repetition_penalty=1.0)
        new = out[0, inputs["input_ids"].shape[1]:]
        answers.append(processor.tokenizer.decode(new, skip_special_tokens=True))
    print(json.dumps(answers))


if __name__ == "__main__":
    main()
