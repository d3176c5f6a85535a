"""Grammar engines for constrained decoding, measured on LFM2-VL's vocabulary size: llguidance and xgrammar.

    OMP_NUM_THREADS=1 python scripts/bench_grammar.py [--steps-json out.json]

A byte-level BPE tokenizer of 65,536 tokens (LFM2-VL's control tokens at ids 0..500, as in lfm2vl/bench/data.py)
is trained on generated English and JSON text; a JSON schema of ten fields (nested object, enum, array, number
ranges, pattern, nullable) is compiled by each engine (first time and again, cached), then the token mask is
computed at every step along a valid answer's tokens. The "lfm2vl row" line is what a constrained row costs in
lfm2vl's loop (generate/constraints.py: mask, masking the logits, sampling, advancing). Printed: a table and the
same figures as JSON.
Timings are wall-clock on this machine and move with its load.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import time

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "pattern": "^[a-z0-9.]+@[a-z0-9]+\\.[a-z]{2,4}$"},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
        "address": {"type": "object", "properties": {
            "street": {"type": "string"}, "city": {"type": "string"},
            "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["street", "city", "zip"], "additionalProperties": False},
        "active": {"type": "boolean"},
        "rating": {"type": "integer", "minimum": 1, "maximum": 5},
        "notes": {"anyOf": [{"type": "string"}, {"type": "null"}]},
    },
    "required": ["name", "age", "email", "role", "score", "tags", "address", "active", "rating", "notes"],
    "additionalProperties": False,
}
ANSWER = {"name": "Ada Lovelace", "age": 36, "email": "ada.lovelace@example.org", "role": "editor", "score": 0.875,
          "tags": ["math", "engines", "poetry"],
          "address": {"street": "12 St James's Square", "city": "London", "zip": "10001"},
          "active": True, "rating": 5, "notes": "Wrote the first published program for the Analytical Engine."}
VOCAB = 65536
SYLLABLES = ("ka ri to an en er in on th he re st ou al it is or ed ng le ve co de mi la na pe ro sa ti vo ze bu "
             "ch sh qu ph gr bl tr pl fr wh").split()


def corpus(n_lines: int, seed: int = 0) -> list[str]:
    """Pseudo-English sentences with many distinct words, numbers, and JSON documents (so the BPE reaches 65k)."""
    rng = random.Random(seed)
    words = ["".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 4))) for _ in range(60000)]
    common = "the a of and to in is was for on with as by at from that this it are be".split()
    out = []
    for i in range(n_lines):
        if i % 5 == 0:
            doc = {rng.choice(words): rng.choice([rng.randint(-999, 99999), round(rng.random(), 3), rng.choice(words),
                                                  [rng.choice(words) for _ in range(3)], None, True, False])
                   for _ in range(rng.randint(2, 6))}
            out.append(json.dumps(doc, separators=(",", ":") if i % 2 else (", ", ": ")))
        else:
            ws = [rng.choice(common) if rng.random() < 0.3 else rng.choice(words) for _ in range(rng.randint(8, 25))]
            ws[0] = ws[0].capitalize()
            out.append(" ".join(ws) + rng.choice([".", "!", "?", ",", ";"]) + f" {rng.randint(0, 3000)}")
    return out


def build_tokenizer():
    from lfm2vl.bench.data import build_tokenizer as build

    return build(VOCAB, tuple(corpus(60000)))


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def bench_llguidance(tok, answer_ids: list[int]) -> dict:
    import llguidance
    import llguidance.torch as llt

    t0 = time.perf_counter()
    lt = llguidance.LLTokenizer(tok.to_str(), n_vocab=VOCAB, eos_token=7)
    tokenizer_s = time.perf_counter() - t0
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults={"whitespace_flexible": False})

    def compile_once():
        t = time.perf_counter()
        m = llguidance.LLMatcher(lt, grammar)
        assert not m.is_error(), m.get_error()
        return m, time.perf_counter() - t

    _, first = compile_once()
    cache: dict[str, str] = {}  # llguidance has no compile cache of its own: a dict of validated grammars
    t = time.perf_counter()
    key = json.dumps(SCHEMA, sort_keys=True)
    cache[key] = grammar
    m = llguidance.LLMatcher(lt, cache[key])
    cached = time.perf_counter() - t
    mask = llt.allocate_token_bitmask(1, VOCAB)
    steps = []
    for tid in answer_ids:
        t = time.perf_counter()
        llt.fill_next_token_bitmask(m, mask, 0)
        steps.append(time.perf_counter() - t)
        assert m.consume_token(tid), m.get_error()
    assert m.is_accepting()
    return dict(tokenizer_s=tokenizer_s, compile_first_s=first, compile_cached_s=cached, steps=steps)


def bench_xgrammar(tok, answer_ids: list[int]) -> dict:
    import xgrammar as xgr

    vocab = tok.get_vocab(with_added_tokens=True)
    encoded = [""] * VOCAB
    for s, i in vocab.items():
        encoded[i] = s
    t0 = time.perf_counter()
    info = xgr.TokenizerInfo(encoded, xgr.VocabType.BYTE_LEVEL, vocab_size=VOCAB, stop_token_ids=[7])
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=True)
    tokenizer_s = time.perf_counter() - t0
    schema = json.dumps(SCHEMA)
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
    first = time.perf_counter() - t
    t = time.perf_counter()
    compiled = compiler.compile_json_schema(schema, any_whitespace=False, separators=(",", ":"))
    m = xgr.GrammarMatcher(compiled)
    cached = time.perf_counter() - t
    mask = xgr.allocate_token_bitmask(1, VOCAB)
    steps = []
    for tid in answer_ids:
        t = time.perf_counter()
        m.fill_next_token_bitmask(mask, 0)
        steps.append(time.perf_counter() - t)
        assert m.accept_token(tid), f"xgrammar rejects token {tid}"
    return dict(tokenizer_s=tokenizer_s, compile_first_s=first, compile_cached_s=cached, steps=steps)


def bench_lfm2vl(tok, answer_ids: list[int]) -> dict:
    """What a constrained row adds per step in lfm2vl's loop: TokenMatcher's mask, masking a float32 row of 65,536
    logits and sampling from it (temperature 0.7), and advancing; against the same sampling of a free row."""
    import torch

    from lfm2vl.generate.constraints import Constraint, TokenMatcher
    from lfm2vl.generate.sampling import Sampler, SamplingParams

    t = time.perf_counter()
    TokenMatcher(Constraint.from_options(regex="a"), tok, VOCAB, (7,))  # builds the tokenizer's LLTokenizer once
    tokenizer_s = time.perf_counter() - t
    t = time.perf_counter()
    c = Constraint.from_options(json_schema=SCHEMA)
    m = TokenMatcher(c, tok, VOCAB, (7,))
    first = time.perf_counter() - t
    t = time.perf_counter()
    c = Constraint.from_options(json_schema=SCHEMA)
    m = TokenMatcher(c, tok, VOCAB, (7,))
    cached = time.perf_counter() - t
    logits = torch.randn(VOCAB)
    params = SamplingParams(temperature=0.7, seed=0)
    free, constrained = Sampler(params, VOCAB), Sampler(params, VOCAB, matcher=m)
    steps, base = [], []
    for tid in answer_ids:
        t = time.perf_counter()
        free(logits)
        base.append(time.perf_counter() - t)
        t = time.perf_counter()
        constrained(logits)
        m.advance(tid)  # along the valid answer, whatever was drawn
        steps.append(time.perf_counter() - t)
    return dict(tokenizer_s=tokenizer_s, compile_first_s=first, compile_cached_s=cached, steps=steps,
                free_sampling_median_ms=1e3 * statistics.median(base))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    t = time.perf_counter()
    tok = build_tokenizer()
    print(f"tokenizer: {tok.get_vocab_size(with_added_tokens=True)} tokens, trained in {time.perf_counter() - t:.1f} s")
    text = json.dumps(ANSWER, separators=(",", ":"))
    ids = tok.encode(text, add_special_tokens=False).ids + [7]
    print(f"answer: {len(ids) - 1} tokens + eos")
    rows = {}
    for name, fn in (("llguidance", bench_llguidance), ("xgrammar", bench_xgrammar),
                     ("lfm2vl row", bench_lfm2vl)):
        try:
            r = fn(tok, ids)
        except ImportError as e:  # xgrammar is not a dependency: `pip install xgrammar` to compare
            print(f"{name}: not installed ({e.name}); skipped")
            continue
        st = r.pop("steps")
        rows[name] = {**r, "mask_median_ms": 1e3 * statistics.median(st), "mask_p90_ms": 1e3 * pct(st, 0.9),
                      "mask_max_ms": 1e3 * max(st), "steps": len(st)}
    print(f"{'engine':<12}{'tokenizer ms':>14}{'compile ms':>12}{'cached ms':>11}{'mask med ms':>13}"
          f"{'mask p90 ms':>13}{'mask max ms':>13}")
    for name, r in rows.items():
        print(f"{name:<12}{1e3 * r['tokenizer_s']:>14.1f}{1e3 * r['compile_first_s']:>12.2f}"
              f"{1e3 * r['compile_cached_s']:>11.3f}{r['mask_median_ms']:>13.3f}{r['mask_p90_ms']:>13.3f}"
              f"{r['mask_max_ms']:>13.3f}")
    print("lfm2vl row: its mask columns time a whole constrained step (TokenMatcher mask, masking, sampling a 65,536 "
          "row; forced tokens skip sampling), compile = Constraint + "
          f"TokenMatcher; a free row's sampling alone: "
          f"{rows['lfm2vl row']['free_sampling_median_ms']:.3f} ms")
    print(json.dumps(rows, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
