"""Constrained decoding on the tiny random checkpoint, whose free output is garbage: every constrained answer still
follows its constraint (jsonschema is the schema oracle, re.fullmatch the regex one), across temperatures and seeds,
batched next to a free row, streamed or not; bad constraints are a ValueError naming the option."""
import contextlib
import json
import re

import jsonschema
import pytest
import torch

from lfm2vl.generate.batch import BatchGenerator
from lfm2vl.generate.constraints import Constraint, TokenMatcher

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "role": {"enum": ["admin", "editor", "viewer"]},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "place": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"},
                                                   "floor": {"type": "integer", "minimum": -2, "maximum": 99}},
                  "required": ["zip", "floor"], "additionalProperties": False},
        "active": {"type": "boolean"},
        "note": {"anyOf": [{"type": "string", "maxLength": 8}, {"type": "null"}]},
    },
    "required": ["name", "age", "role", "tags", "place", "active", "note"],
    "additionalProperties": False,
}
REGEX = r"[0-9]{3}-[a-z]{2,6}( (yes|no))?"
CHOICES = ["red apple", "green pear", "blue plum"]
OPTS = dict(max_new_tokens=400, repetition_penalty=1.0, min_p=0.0)


@contextlib.contextmanager
def biased_towards(engine, chars: str, bias: float = 6.0):
    """The model prefers tokens whose text holds one of `chars` (its free output: runs of those characters), so
    open-ended grammars (any JSON object) close within a few dozen tokens."""
    tok, V = engine.tokenizer, engine.config.text_config.vocab_size
    b = torch.tensor([bias if any(c in tok.decode([i]) for c in chars) else 0.0 for i in range(V)])
    orig = engine.model.forward_cached

    def forward(*a, **k):
        return orig(*a, **k) + b.to(engine.dtype)

    engine.model.forward_cached = forward
    engine.reset()  # the warm generator holds the decode forward it started with
    try:
        yield
    finally:
        del engine.model.forward_cached
        engine.reset()


def is_json_object(text: str) -> bool:
    try:
        return isinstance(json.loads(text), dict)
    except ValueError:
        return False


@pytest.mark.parametrize("temperature", [0, 0.7, 1.5])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_schema_answers_validate(tiny_engine, temperature, seed):
    r = tiny_engine.generate("Describe a user.", json_schema=SCHEMA, temperature=temperature, seed=seed, **OPTS)
    assert r.finish_reason == "stop"
    jsonschema.validate(json.loads(r.text), SCHEMA)
    assert r.parsed == json.loads(r.text)


@pytest.mark.parametrize("temperature", [0, 0.7, 1.5])
def test_regex_answers_match(tiny_engine, temperature):
    for seed in range(3):
        r = tiny_engine.generate("Code?", regex=REGEX, temperature=temperature, seed=seed, **OPTS)
        assert r.finish_reason == "stop" and re.fullmatch(REGEX, r.text), r.text


@pytest.mark.parametrize("temperature", [0, 0.7, 1.5])
def test_choice_answers_are_one_of_them(tiny_engine, temperature):
    for seed in range(3):
        r = tiny_engine.generate("Fruit?", choices=CHOICES, temperature=temperature, seed=seed, **OPTS)
        assert r.finish_reason == "stop" and r.text in CHOICES, r.text


def test_lark_grammar_answers_match(tiny_engine):
    grammar = 'start: greeting " " NAME\ngreeting: "hi" | "hello"\nNAME: /[a-z]{2,5}/'
    for seed in range(3):
        r = tiny_engine.generate("Greet", grammar=grammar, temperature=1.0, seed=seed, **OPTS)
        assert r.finish_reason == "stop" and re.fullmatch(r"(hi|hello) [a-z]{2,5}", r.text), r.text


def test_json_object_answers_parse_to_a_dict(tiny_engine):
    with biased_towards(tiny_engine, '"}]'):
        free = tiny_engine.generate("Any JSON", temperature=0, **OPTS)
        for seed in range(3):
            r = tiny_engine.generate("Any JSON", json_object=True, temperature=0.7, seed=seed, max_new_tokens=300)
            assert r.finish_reason == "stop" and is_json_object(r.text), r.text
    assert not is_json_object(free.text)  # unconstrained, the biased model writes no JSON object


def test_batch_mixes_constrained_and_free_rows(tiny_engine):
    e = tiny_engine
    free_opts = dict(temperature=0, **OPTS)
    alone = e.generate("Tell me a story.", **free_opts)
    reqs = [e.prepare("Describe a user.", json_schema=SCHEMA, temperature=0.7, seed=1, **OPTS),
            e.prepare("Tell me a story.", **free_opts),
            e.prepare("Code?", regex=REGEX, temperature=1.5, seed=2, **OPTS),
            e.prepare("Fruit?", choices=CHOICES, temperature=0, **OPTS)]
    gen = BatchGenerator(e, max_batch=4)
    rids = [gen.add(r) for r in reqs]
    out = gen.run(rids)
    schema_row, free_row, regex_row, choice_row = (out[r] for r in rids)
    jsonschema.validate(json.loads(schema_row.text), SCHEMA)
    assert re.fullmatch(REGEX, regex_row.text) and choice_row.text in CHOICES
    assert free_row.token_ids == alone.token_ids  # the free row is what it is without constrained neighbours


def test_batched_generate_answers_validate(tiny_engine):
    rs = tiny_engine.generate(["Describe a user.", "Another one.", "A third."], json_schema=SCHEMA,
                              temperature=1.0, seed=5, **OPTS)
    for r in rs:
        jsonschema.validate(json.loads(r.text), SCHEMA)


def test_stream_equals_generate(tiny_engine):
    opts = dict(json_schema=SCHEMA, temperature=0.7, seed=4, **OPTS)
    s = tiny_engine.stream("Describe a user.", **opts)
    pieces = "".join(s)
    r = tiny_engine.generate("Describe a user.", **opts)
    assert pieces == r.text == s.result.text
    jsonschema.validate(json.loads(pieces), SCHEMA)


def test_max_new_tokens_cutting_json_is_length(tiny_engine):
    r = tiny_engine.generate("Describe a user.", json_schema=SCHEMA, temperature=0, max_new_tokens=5)
    assert r.finish_reason == "length" and r.completion_tokens == 5 and r.parsed is None


def test_complete_grammar_forces_eos_over_min_new_tokens(tiny_engine):
    r = tiny_engine.generate("Fruit?", choices=["red apple"], temperature=1.0, min_new_tokens=20, **OPTS)
    assert r.text == "red apple" and r.finish_reason == "stop" and r.token_ids[-1] in tiny_engine.eos_ids


def test_pydantic_class_gives_a_parsed_instance(tiny_engine):
    pydantic = pytest.importorskip("pydantic")

    class Pet(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(extra="forbid")  # additionalProperties false: only these three keys
        kind: str = pydantic.Field(max_length=10)
        legs: int = pydantic.Field(ge=0, le=8)
        indoor: bool

    r = tiny_engine.generate("A pet?", json_schema=Pet, temperature=0.7, seed=0, **OPTS)
    assert isinstance(r.parsed, Pet) and r.parsed == Pet.model_validate_json(r.text)


@pytest.mark.parametrize("options, words", [
    (dict(json_schema={"type": "strin"}), ["json_schema", "strin"]),
    (dict(json_schema={"type": "array", "uniqueItems": True}), ["json_schema", "uniqueItems"]),
    (dict(json_schema={"$ref": "#/defs/missing"}), ["json_schema", "/defs/missing"]),
    (dict(json_schema="{not json"), ["json_schema", "not valid JSON"]),
    (dict(json_schema=[1, 2]), ["json_schema", "expected a JSON schema"]),
    (dict(regex="a(b"), ["regex", "unclosed group"]),
    (dict(choices=[]), ["choices", "non-empty list"]),
    (dict(choices=["a", 3]), ["choices", "3"]),
    (dict(grammar="start: missing_rule"), ["grammar", "missing_rule"]),
    (dict(json_object="yes"), ["json_object", "expected True"]),
    (dict(regex="[0-9]+", choices=["a"]), ["regex and choices", "exclusive"]),
])
def test_bad_constraints_are_value_errors_naming_the_option(tiny_engine, options, words):
    with pytest.raises(ValueError) as e:
        tiny_engine.generate("hi", **options)
    assert all(w in str(e.value) for w in words), str(e.value)


NODE = {"type": "object", "properties": {"next": {"$ref": "#/$defs/N"}}, "required": ["next"]}


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    {"type": "object", "properties": {"a": {"$ref": "#/properties/a"}}, "required": ["a"]},
    {"type": "array", "items": {"$ref": "#"}, "minItems": 1},
    {"$ref": "#"},
    {"$defs": {"N": NODE}, "type": "object", "properties": {"n": {"$ref": "#/$defs/N"}}, "required": ["n"]},
])
def test_schemas_without_a_finite_value_are_value_errors(schema):
    with pytest.raises(ValueError, match="json_schema admits no finite value"):
        Constraint.from_options(json_schema=schema)


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"$ref": "#"}}},  # {} ends it
    {"type": "object", "properties": {"a": {"anyOf": [{"$ref": "#"}, {"type": "null"}]}}, "required": ["a"]},
    {"properties": {"a": {"$ref": "#"}}, "required": ["a"]},  # no type: any scalar is a value
    {"type": "array", "items": {"$ref": "#"}},  # [] ends it
    {"$defs": {"N": NODE}, "type": "object", "properties": {"n": {"$ref": "#/$defs/N"}}},
])
def test_recursive_schemas_with_a_way_out_are_taken(schema):
    assert Constraint.from_options(json_schema=schema).kind == "json_schema"


UNENDING = 'start: "a" start'  # a Lark grammar that no text completes: after "a" it dead-ends


def test_a_dead_end_is_a_value_error_not_a_stop(tiny_engine):
    with pytest.raises(ValueError, match="grammar constraint reached a dead end"):
        tiny_engine.generate("hi", grammar=UNENDING, max_new_tokens=20)
    with pytest.raises(ValueError, match="grammar constraint reached a dead end"):
        "".join(tiny_engine.stream("hi", grammar=UNENDING, max_new_tokens=20))


def test_a_dead_end_in_a_batch_fails_its_row_only(tiny_engine):
    e = tiny_engine
    gen = BatchGenerator(e, max_batch=2)
    rids = [gen.add(e.prepare("hi", grammar=UNENDING, max_new_tokens=20)),
            gen.add(e.prepare("Fruit?", choices=CHOICES, temperature=0, **OPTS))]
    out = gen.run(rids)
    dead, fine = (out[r] for r in rids)
    assert dead.finish_reason == "error" and "dead end" in dead.error and dead.parsed is None
    assert fine.finish_reason == "stop" and fine.text in CHOICES and fine.error is None


def test_matcher_allows_eos_only_when_the_grammar_accepts(tiny_engine):
    tok = tiny_engine.tokenizer
    m = TokenMatcher(Constraint.from_options(regex="[0-9]{1,3}"), tok, 1024, (7,))
    assert not m.allowed_mask()[7]  # nothing typed yet: a digit must come first
    m.advance(tok.encode("5")[0])
    assert m.allowed_mask()[7] and m.allowed_mask()[tok.encode("6")[0]] and m.forced() is None


def test_matcher_at_a_dead_end_forces_eos(tiny_engine):
    tok = tiny_engine.tokenizer
    m = TokenMatcher(Constraint.from_options(regex="[0-9]{3}"), tok, 1024, (7,))
    m.advance(tok.encode("x")[0])  # a token the mask forbids: the grammar has no way on
    assert m.is_dead() and m.forced() == 7 and int(m.allowed_mask().sum()) == 1


def test_unconstrained_rows_keep_the_plain_greedy_path(tiny_engine):
    gen = BatchGenerator(tiny_engine, max_batch=1)
    gen.add(tiny_engine.prepare("hi", temperature=0, repetition_penalty=1.0))
    (act,) = gen.actives.values()
    assert act.sampler.matcher is None and act.sampler.plain
