"""The forced tool-call grammar enforces the JSON-schema keywords of real tool definitions (number ranges,
pattern, format, $ref, allOf, additionalProperties): texts that break them are refused token by token, answers
sampled from the random model validate (jsonschema with its format checker as the oracle), and keywords it cannot
enforce are a ValueError naming the function, the place and the keyword."""
import json

import jsonschema
import pytest

from lfm2vl.generate.callgrammar import call_grammar
from lfm2vl.generate.constraints import Constraint, TokenMatcher
from lfm2vl.processor.tools import TOOL_CALL, call_text, check_tools

GUEST = {"type": "object", "properties": {"name": {"type": "string", "pattern": "^[A-Z][a-z]{1,6}$"},
                                          "age": {"type": "integer", "minimum": 18, "maximum": 99}},
         "required": ["name", "age"]}
BOOK = {"type": "function", "function": {"name": "book_room", "parameters": {
    "type": "object", "$defs": {"guest": GUEST},
    "properties": {
        "nights": {"type": "integer", "minimum": 1, "maximum": 14},
        "price": {"type": "number", "exclusiveMinimum": 0, "maximum": 999.5},
        "temp": {"type": "number", "minimum": -5.25, "exclusiveMaximum": -1},
        "host": {"type": "string", "format": "ipv4"},
        "code": {"type": "string", "pattern": "^[A-Z]{3}-[0-9]{2}$"},
        "guest": {"$ref": "#/$defs/guest"},
        "vip": {"allOf": [{"$ref": "#/$defs/guest"}, {"properties": {"level": {"type": "boolean"}},
                                                       "required": ["level"]}]},
        "tags": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0, "maximum": 9}}},
    "required": ["nights", "price", "temp", "host", "code", "guest", "vip"]}}}
SCHEMA = BOOK["function"]["parameters"]
TREE = {"type": "function", "function": {"name": "plant", "parameters": {
    "type": "object", "$defs": {"node": {"type": "object", "properties": {
        "v": {"type": "integer", "minimum": 0}, "kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}},
        "required": ["v"]}},
    "properties": {"root": {"$ref": "#/$defs/node"}}, "required": ["root"]}}}
VALID = ('book_room(nights=3, price=0.5, temp=-1.5, host="10.0.0.1", code="ABC-12", guest={"name": "Ann", '
         '"age": 18}, vip={"name": "Bo", "age": 99, "level": True}, tags={"a": 0})')


def accepts(engine, tools, body: str) -> bool:
    """Whether the forced grammar of `tools` takes `<|tool_call_start|>[body]<|tool_call_end|>`, token by token."""
    fns = check_tools(tools)
    m = TokenMatcher(Constraint.from_options(grammar=call_grammar(fns, [f["name"] for f in fns])),
                     engine.tokenizer, engine.model.config.text_config.vocab_size, tuple(engine.eos_ids))
    start, end = (engine.tokenizer.token_to_id(t) for t in TOOL_CALL)
    for t in [start, *engine.tokenizer.encode(f"[{body}]"), end]:
        if not m.allowed_mask()[t]:
            return False
        m.advance(t)
    return m.is_finished()


def test_a_valid_call_is_accepted(tiny_engine):
    assert accepts(tiny_engine, [BOOK], VALID)


@pytest.mark.parametrize("old, new", [
    ("nights=3", "nights=0"), ("nights=3", "nights=15"), ("nights=3", "nights=2.5"),
    ("price=0.5", "price=0"), ("price=0.5", "price=999.6"), ("price=0.5", "price=-3"),
    ("temp=-1.5", "temp=-1"), ("temp=-1.5", "temp=-5.3"), ("temp=-1.5", "temp=0"),
    ('"10.0.0.1"', '"10.0.0.256"'), ('"ABC-12"', '"AB-12"'), ('"ABC-12"', '"ABC-123"'),
    ('"Ann", "age": 18', '"ann", "age": 18'), ('"age": 18', '"age": 17'),
    ('"level": True}', '"level": 1}'), ('"age": 99, "level": True', '"age": 99'), ('"a": 0', '"a": 10'),
])
def test_a_value_breaking_its_keyword_is_refused(tiny_engine, old, new):
    assert old in VALID
    assert not accepts(tiny_engine, [BOOK], VALID.replace(old, new, 1))


def test_annotations_do_not_stop_an_allof_or_anyof_from_merging(tiny_engine):
    """pydantic writes a field's description beside anyOf, and a referenced model has its own title."""
    tools = fn({"type": "object", "properties": {
        "a": {"allOf": [{"type": "string", "title": "A"}, {"maxLength": 2, "title": "B"}], "description": "x"},
        "b": {"anyOf": [{"type": "integer", "description": "n"}, {"type": "null"}], "description": "maybe"}},
        "required": ["a", "b"]})
    assert accepts(tiny_engine, tools, 'f(a="ab", b=None)') and accepts(tiny_engine, tools, 'f(a="", b=3)')
    assert not accepts(tiny_engine, tools, 'f(a="abc", b=None)')  # maxLength of the second allOf part holds


def test_recursive_ref_takes_nested_values(tiny_engine):
    assert accepts(tiny_engine, [TREE], 'plant(root={"v": 1, "kids": [{"v": 2}, {"v": 3, "kids": [{"v": 0}]}]})')
    assert not accepts(tiny_engine, [TREE], 'plant(root={"v": 1, "kids": [{"v": -2}]})')


@pytest.mark.parametrize("seed", range(4))
def test_sampled_forced_calls_validate_with_formats(tiny_engine, seed):
    r = tiny_engine.generate("Book a room.", tools=[BOOK], tool_choice="required", parallel_tool_calls=False,
                             temperature=1.0, seed=seed, max_new_tokens=400, repetition_penalty=1.0, min_p=0.0)
    assert r.finish_reason == "tool_calls", r.text
    (tc,) = r.tool_calls
    jsonschema.Draft202012Validator(SCHEMA, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER).validate(
        json.loads(tc["function"]["arguments"]))
    ids = [t for t in r.token_ids if t not in tiny_engine.eos_ids]
    assert call_text(r.tool_calls) == tiny_engine.tokenizer.decode(ids, skip_special_tokens=False)  # round trip


def fn(params):
    return [{"type": "function", "function": {"name": "f", "parameters": params}}]


@pytest.mark.parametrize("params, words", [
    ({"type": "object", "properties": {"n": {"type": "integer", "multipleOf": 5}}},
     ["'f'", "parameters.n", "'multipleOf'"]),
    ({"type": "object", "properties": {"xs": {"type": "array", "uniqueItems": True}}}, ["parameters.xs", "uniqueItems"]),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}}, ["parameters.a", "#/$defs/missing"]),
    ({"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}, ["$ref", "same schema"]),
    ({"type": "object", "properties": {"a": {"allOf": [{"type": "string"}, {"type": "integer"}]}}},
     ["parameters.a.allOf[1]", "'type'"]),
    ({"type": "object", "properties": {"a": {"type": "number", "minimum": "3"}}}, ["parameters.a.minimum", "'3'"]),
    ({"type": "object", "properties": {"a": {"type": "string", "format": "no-such-format"}}}, ["no-such-format"]),
])
def test_keywords_a_forced_call_cannot_enforce_are_value_errors(tiny_engine, params, words):
    with pytest.raises(ValueError) as e:
        tiny_engine.generate("hi", tools=fn(params), tool_choice="required", max_new_tokens=2)
    assert all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("params", [
    {"type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]},
    {"properties": {"a": {"$ref": "#"}}, "required": ["a"]},  # parameters are an object, typed or not
    {"type": "object", "properties": {"a": {"type": "array", "items": {"$ref": "#/properties/a"}, "minItems": 1}},
     "required": ["a"]},
])
def test_parameters_without_a_finite_value_are_value_errors(tiny_engine, params):
    with pytest.raises(ValueError) as e:
        tiny_engine.generate("hi", tools=fn(params), tool_choice="required", max_new_tokens=2)
    assert all(w in str(e.value) for w in ["'f'", "no finite value"]), str(e.value)


def test_auto_tool_choice_takes_any_schema(tiny_engine):
    """Only a forced call is compiled: with "auto" the schema is shown to the model as it is."""
    r = tiny_engine.generate("hi", tools=fn({"type": "object", "properties": {"n": {"multipleOf": 5}}}),
                             max_new_tokens=2)
    assert r.finish_reason in ("length", "stop")
