"""Constrained decoding: a JSON schema, any JSON object, a regular expression, a choice among strings or a Lark
grammar limits which tokens a row may sample, so its answer always follows the constraint.

The grammar engine is llguidance (PyPI `llguidance`, a dependency; imported only when a constraint is used).
Measured against xgrammar with scripts/bench_grammar.py on a 65,536-token byte-level BPE vocabulary: both compute a
token mask in microseconds per step (xgrammar's precomputed masks are a few microseconds faster, far below 1% of a
450M decode step either way), but llguidance compiles a ten-field schema about 20x faster (no per-grammar mask
precomputation; well under the 50 ms budget without a cache), takes LFM2-VL's tokenizer.json as it is (special
tokens never match grammar text), covers every kind here (JSON schema, regex, Lark/EBNF, choices) with error
messages that say what is wrong, and depends on nothing: `import xgrammar` imports transformers (never imported by
lfm2vl's runtime code) and pulls triton and a TVM runtime.

- `Constraint` is the checked spec of one request (`Constraint.from_options(json_schema=..., regex=..., ...)`);
  its llguidance grammar is compiled and validated once per spec (`grammar_for`, an LRU cache), so bad input is a
  ValueError naming the option before anything runs; a JSON schema that admits no finite value (finite.py) is
  one too.
- `TokenMatcher` follows one row: `allowed_mask()` (bool over the model's vocabulary), `forced()` (the one token
  the grammar leaves, eos when it is complete, or eos at a dead end), `advance(token_id)`, `dead_end()` (why the
  grammar allows no further token while the answer is unfinished: the row then ends as an error, never as a
  finished answer). The engine's view of the tokenizer (LLTokenizer) is built once per tokenizer and kept.
- JSON is generated compactly on one line with ", " and ": " separators (json.dumps' style), without free
  whitespace: a model cannot wander off into newlines and the answer stays short.
Computing the next mask while the model runs its step does not pay: a mask costs microseconds against a decode step
of tens of milliseconds, less than a thread hand-off.
"""
from __future__ import annotations

import json
import re
import weakref
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from ..files import jsontext
from .finite import why_infinite

CONSTRAINT_OPTIONS = ("json_schema", "json_object", "regex", "choices", "grammar")
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
INSTALL_HINT = "constrained decoding needs the llguidance package: pip install llguidance"


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ValueError(INSTALL_HINT) from None
    return llguidance


@dataclass(frozen=True)
class Constraint:
    """One request's constraint: `kind` (one of CONSTRAINT_OPTIONS) and its text (a schema as JSON in its own key
    order, a regex, a JSON list of choices, a Lark grammar). `model`: the pydantic class a json_schema came from."""

    kind: str
    text: str
    model: Any = field(default=None, compare=False, hash=False)

    @classmethod
    def from_options(cls, json_schema=None, json_object=None, regex=None, choices=None,
                     grammar=None) -> "Constraint | None":
        """The constraint the options ask for (None: none); ValueError naming the option when one is malformed, the
        engine rejects it, or several are given."""
        given = [k for k, v in (("json_schema", json_schema), ("json_object", json_object), ("regex", regex),
                                ("choices", choices), ("grammar", grammar)) if v is not None and v is not False]
        if not given:
            return None
        if len(given) > 1:
            raise ValueError(f"{' and '.join(given)} are exclusive: give one constraint per request")
        model = None
        if json_schema is not None:
            schema = json_schema
            if isinstance(schema, type) and hasattr(schema, "model_json_schema"):
                model, schema = schema, schema.model_json_schema()
            elif isinstance(schema, str):
                try:
                    schema = jsontext.loads(schema)
                except json.JSONDecodeError as e:
                    raise ValueError(f"json_schema is not valid JSON: {e}") from None
            if not isinstance(schema, dict):
                raise ValueError(f"json_schema={json_schema!r} is invalid; expected a JSON schema object (a dict, its "
                                 "JSON text, or a pydantic model class)")
            jsontext.check_depth(schema, "json_schema")  # the checks and the compiler below recurse per level
            c = cls("json_schema", json.dumps(schema), model)  # key order kept: it is the answer's order
        elif json_object is not None:
            if json_object is not True:
                raise ValueError(f"json_object={json_object!r} is invalid; expected True")
            c = cls("json_object", json.dumps({"type": "object"}))
        elif regex is not None:
            if not isinstance(regex, str) or not regex:
                raise ValueError(f"regex={regex!r} is invalid; expected a non-empty regular expression string")
            c = cls("regex", regex)
        elif choices is not None:
            if isinstance(choices, str) or not isinstance(choices, (list, tuple)) or not choices:
                raise ValueError(f"choices={choices!r} is invalid; expected a non-empty list of strings")
            bad = [x for x in choices if not isinstance(x, str) or not x]
            if bad:
                raise ValueError(f"choices has {bad[0]!r}; every choice must be a non-empty string")
            c = cls("choices", json.dumps(list(dict.fromkeys(choices))))
        else:
            if not isinstance(grammar, str) or not grammar.strip():
                raise ValueError(f"grammar={grammar!r} is invalid; expected a Lark or GBNF grammar string")
            c = cls("grammar", grammar)
        grammar_for(c.kind, c.text)  # compiled and checked now: bad input fails before the request runs
        return c

    def parse(self, text: str):
        """The answer as an object: the pydantic instance or the JSON value for the JSON kinds, the text itself
        otherwise. ValueError when it does not parse (an answer cut by max_new_tokens)."""
        if self.kind not in ("json_schema", "json_object"):
            return text
        if self.model is not None:
            return self.model.model_validate_json(text)
        return jsontext.loads(text)


@lru_cache(maxsize=256)
def grammar_for(kind: str, text: str) -> str:
    """The llguidance grammar of a constraint, validated (cached per spec). ValueError names the option."""
    llg = _llguidance()
    M = llg.LLMatcher
    try:
        if kind in ("json_schema", "json_object"):
            g = M.grammar_from_json_schema(text, defaults=JSON_OPTIONS)
        elif kind == "regex":
            g = M.grammar_from_regex(text)
        elif kind == "choices":
            g = M.grammar_from_lark("start: " + " | ".join(json.dumps(x) for x in json.loads(text)))
        else:
            g = llg.grammar_from("grammar", text)  # Lark, or GBNF converted to Lark
    except ValueError as e:
        raise ValueError(f"{kind} is invalid: {e}") from None
    problem = M.validate_grammar(g)
    if problem:
        raise ValueError(f"{kind} is invalid: {_one_line(problem)}")
    if kind == "json_schema":
        endless = why_infinite(json.loads(text))  # llguidance compiles such a schema and dead-ends on it
        if endless:
            raise ValueError(f"json_schema admits no finite value: {endless}")
    return g


def _one_line(msg: str) -> str:
    """llguidance's message on one line, without the grammar excerpt and caret lines it quotes."""
    lines = [ln.strip() for ln in msg.strip().splitlines()]
    keep = [ln for ln in lines if ln and set(ln) != {"^"} and not re.match(r"\d+ \|", ln)]
    return re.sub(r"^at \d+\(\d+\): ", "", " ".join(keep))


_LLTOK: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


def ll_tokenizer(tokenizer, vocab_size: int, eos_ids: tuple[int, ...]):
    """llguidance's view of an lfm2vl Tokenizer (its tokenizer.json; ~0.3 s for 65k tokens), built once per
    (tokenizer, vocabulary size, eos ids) and kept while the tokenizer lives."""
    per = _LLTOK.setdefault(tokenizer, {})
    key = (vocab_size, eos_ids)
    if key not in per:
        backend = getattr(tokenizer, "backend", tokenizer)  # lfm2vl's wrapper, or a tokenizers.Tokenizer
        per[key] = _llguidance().LLTokenizer(backend.to_str(), n_vocab=vocab_size, eos_token=list(eos_ids))
    return per[key]


class TokenMatcher:
    """Where one row stands in its constraint. The mask covers the model's vocabulary (`vocab_size`); eos is allowed
    when the grammar accepts, and is the only choice when nothing else can follow or nothing at all can (a dead
    end: the answer is unfinished, and `dead_end()` says why)."""

    def __init__(self, constraint: Constraint, tokenizer, vocab_size: int, eos_ids: tuple[int, ...]):
        if not eos_ids:
            raise ValueError("constrained decoding needs an end-of-sequence token id; the tokenizer has none")
        llg = _llguidance()
        self.constraint, self.vocab_size, self.eos = constraint, vocab_size, int(eos_ids[0])
        self.matcher = llg.LLMatcher(ll_tokenizer(tokenizer, vocab_size, tuple(eos_ids)),
                                     grammar_for(constraint.kind, constraint.text), log_level=0)
        if self.matcher.is_error():
            raise ValueError(f"{constraint.kind} is invalid: {_one_line(self.matcher.get_error())}")
        self._bits = np.zeros((vocab_size + 31) // 32, dtype=np.int32)
        self._allowed: torch.Tensor | None = None  # this step's mask, computed once
        self._forced: int | None = None
        self._stuck = False  # no token allowed while the grammar is not complete

    def _compute(self) -> None:
        if self._allowed is not None:
            return
        m = self.matcher
        if m.is_stopped() or m.is_error():
            self._bits[:] = 0
        else:
            m.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        allowed = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[:self.vocab_size].view(bool)
        n = int(np.count_nonzero(allowed))
        if n == 0:  # complete, or a dead end: the answer ends here
            self._stuck = not m.is_stopped()
            allowed = np.zeros(self.vocab_size, dtype=bool)
            allowed[self.eos] = True
            n = 1
        self._forced = int(np.argmax(allowed)) if n == 1 else None
        self._allowed = torch.from_numpy(allowed.copy())

    def allowed_mask(self) -> torch.Tensor:
        """Bool (vocab_size,) on the CPU: the tokens the row may sample next."""
        self._compute()
        return self._allowed

    def forced(self) -> int | None:
        """The only token the row may take next, or None when there is a choice."""
        self._compute()
        return self._forced

    def advance(self, token_id: int) -> None:
        """Record the sampled token (always one the mask allowed)."""
        self._allowed = self._forced = None
        self.matcher.consume_token(int(token_id))

    def is_finished(self) -> bool:
        """The grammar is complete: only eos can follow."""
        return self.matcher.is_stopped() and not self.matcher.is_error()

    def is_dead(self) -> bool:
        """The grammar allows no further token while the answer is unfinished (a dead end)."""
        return self._stuck or self.matcher.is_error()

    def dead_end(self) -> str | None:
        """Why the answer cannot go on, when it is at a dead end (None otherwise): the constraint allows no token
        after the text so far, or llguidance gave up on it (its message)."""
        if not self.is_dead():
            return None
        why = _one_line(self.matcher.get_error()) if self.matcher.is_error() else ""
        why = re.sub(r"\s*<state>.*", "", why)
        return (f"the {self.constraint.kind} constraint reached a dead end: it allows no token after the answer so "
                "far, which it does not accept as complete" + (f" (llguidance: {why})" if why else ""))

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits (V,) with every token the grammar forbids at -inf."""
        mask = self.allowed_mask().to(logits.device, non_blocking=True)
        return logits.masked_fill(~mask, float("-inf"))
