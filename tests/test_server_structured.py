"""Structured output and tool calls through a real `lfm2vl serve` process and the official openai client, on the
tiny random checkpoint (its free output is garbage, so every valid answer is the grammar's doing): response_format
json_schema / json_object and vLLM's guided_regex / guided_choice, the client's `parse` helper with a pydantic
class, forced tool calls (plain and streamed), a two-turn tool conversation, and 400s naming the bad field."""
from __future__ import annotations

import json
import re

import httpx
import jsonschema
import openai
import pydantic
import pytest

from server_util import ServerProcess, openai_error

MODEL = "tiny-vl"
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 8}, "age": {"type": "integer", "minimum": 0, "maximum": 99},
    "pet": {"enum": ["cat", "dog"]}}, "required": ["name", "age", "pet"], "additionalProperties": False}
RESPONSE_FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
CLOCK = {"type": "function", "function": {"name": "get_time", "description": "The time in a zone", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}, "hours24": {"type": "boolean"}},
    "required": ["zone", "hours24"], "additionalProperties": False}}}
NOTE = {"type": "function", "function": {"name": "add_note", "parameters": {
    "type": "object", "properties": {"text": {"type": "string", "maxLength": 6}, "stars": {"type": "integer"}},
    "required": ["text"]}}}
TOOLS = [CLOCK, NOTE]
PARAMS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What time is it?"}]
OPTS = dict(max_tokens=300, temperature=1.0, extra_body={"repetition_penalty": 1.0, "min_p": 0.0})


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=8)
    age: int = pydantic.Field(ge=0, le=99)
    indoor: bool


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    srv = ServerProcess(["--model", str(tiny_checkpoint), "--served-model-name", MODEL, "--dtype", "float32",
                         "--max-seq-len", "1024", "--log-level", "warning"],
                        tmp_path_factory.mktemp("serve") / "stderr.log")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=120)


def streamed(client, **kw):
    """(content, tool calls assembled from their deltas, finish_reason) of a streamed answer."""
    content, calls, finish = "", {}, None
    for chunk in client.chat.completions.create(model=MODEL, stream=True, **kw):
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for d in choice.delta.tool_calls or []:
                call = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                call["id"] = d.id or call["id"]
                call["name"] += (d.function.name or "") if d.function else ""
                call["arguments"] += (d.function.arguments or "") if d.function else ""
            finish = choice.finish_reason or finish
    return content, [calls[i] for i in sorted(calls)], finish


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_json_schema_answers_validate(client, seed):
    r = client.chat.completions.create(model=MODEL, messages=ASK, response_format=RESPONSE_FORMAT, seed=seed, **OPTS)
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), SCHEMA)


def test_json_schema_answers_validate_streamed(client):
    for seed in range(3):
        content, calls, finish = streamed(client, messages=ASK, response_format=RESPONSE_FORMAT, seed=seed, **OPTS)
        assert finish == "stop" and not calls
        jsonschema.validate(json.loads(content), SCHEMA)


def test_json_object_answers_are_objects_or_cut(client):
    """A JSON object whenever the grammar completed it; "length" (never garbage) when max_tokens cut it."""
    done = 0
    for seed in range(4):
        r = client.chat.completions.create(model=MODEL, messages=ASK, response_format={"type": "json_object"},
                                           seed=seed, **OPTS)
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)
            done += 1
        else:
            assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.startswith("{")
    assert done >= 1


def test_max_tokens_cutting_json_is_length(client):
    r = client.chat.completions.create(model=MODEL, messages=ASK, response_format=RESPONSE_FORMAT, max_tokens=4,
                                       temperature=0)
    assert r.choices[0].finish_reason == "length"


def test_guided_regex_and_choice(client):
    for seed in range(3):
        r = client.chat.completions.create(model=MODEL, messages=ASK, seed=seed, **{
            **OPTS, "extra_body": {**OPTS["extra_body"], "guided_regex": r"[0-9]{2}:[0-9]{2} (am|pm)"}})
        assert re.fullmatch(r"[0-9]{2}:[0-9]{2} (am|pm)", r.choices[0].message.content)
        r = client.chat.completions.create(model=MODEL, messages=ASK, seed=seed, **{
            **OPTS, "extra_body": {**OPTS["extra_body"], "guided_choice": ["noon", "midnight"]}})
        assert r.choices[0].message.content in ("noon", "midnight")


def test_parse_helper_returns_the_pydantic_object(client):
    """openai's parse() sends a strict json_schema (additionalProperties false) and reads the answer into Person."""
    r = client.beta.chat.completions.parse(model=MODEL, messages=ASK, response_format=Person, seed=3,
                                           max_tokens=300, temperature=0.7)
    assert isinstance(r.choices[0].message.parsed, Person)


@pytest.mark.parametrize("extra, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format.json_schema.schema", ["strin"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "uniqueItems": True}}}}, "response_format.json_schema.schema", ["uniqueItems"]),
    ({"response_format": {"type": "yaml"}}, "response_format", ["yaml"]),
    ({"guided_regex": "a(b"}, "guided_regex", ["unclosed group"]),
    ({"guided_choice": []}, "guided_choice", ["non-empty"]),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", ["one of them"]),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice", ["nope"]),
    ({"tools": [{"type": "function", "function": {"parameters": {}}}]}, "tools", ["tools[0].function.name"]),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools", ["parameters"]),
    ({"tool_choice": "required"}, "tool_choice", ["needs tools"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"$ref": "#"}}, "required": ["a"]}}}},
     "response_format.json_schema.schema", ["no finite value"]),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format", ["json_schema.name"]),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
     ["json_schema.schema"]),
    ({"tools": [{"type": "function", "function": {"name": "a", "parameters": {"type": "array"}}}],
      "tool_choice": "required"}, "tools", ["parameters.type", "'array'"]),
])
def test_bad_structure_is_a_400_naming_the_field(server, extra, param, words):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, **extra}, timeout=60)
    err = openai_error(r, 400)
    assert err["param"] == param and all(w in err["message"] for w in words), err


UNENDING = {"guided_grammar": 'start: "a" start'}  # no text completes it: after "a" it dead-ends


def test_a_dead_end_is_a_400_not_a_stop(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": MODEL, "messages": ASK, **UNENDING},
                   timeout=60)
    err = openai_error(r, 400)
    assert err["param"] is None and "dead end" in err["message"], err


def test_a_dead_end_streamed_ends_with_an_error_event(server):
    body = {"model": MODEL, "messages": ASK, "stream": True, **UNENDING}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert "dead end" in events[-1]["error"]["message"]
    assert not any(c.get("finish_reason") for e in events[:-1] for c in e.get("choices", []))


def check_call(name, arguments, names):
    assert name in names
    jsonschema.validate(json.loads(arguments), PARAMS[name])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_required_tool_choice_returns_schema_valid_calls(client, seed):
    r = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, tool_choice="required", seed=seed,
                                       **OPTS)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    for tc in choice.message.tool_calls:
        assert tc.type == "function" and tc.id.startswith("call_")
        check_call(tc.function.name, tc.function.arguments, {"get_time", "add_note"})


def test_named_tool_choice_streamed_assembles_the_same_call(client):
    kw = dict(messages=ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "add_note"}},
              parallel_tool_calls=False, seed=5, **OPTS)
    plain = client.chat.completions.create(model=MODEL, **kw).choices[0]
    content, calls, finish = streamed(client, **kw)
    assert plain.finish_reason == finish == "tool_calls" and len(calls) == len(plain.message.tool_calls) == 1
    assert (calls[0]["name"], calls[0]["arguments"]) == (plain.message.tool_calls[0].function.name,
                                                         plain.message.tool_calls[0].function.arguments)
    assert calls[0]["id"].startswith("call_")
    check_call(calls[0]["name"], calls[0]["arguments"], {"add_note"})


def test_two_turn_tool_conversation(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=TOOLS, parallel_tool_calls=False,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}},
                                           seed=1, **OPTS).choices[0].message
    call = first.tool_calls[0]
    history = ASK + [first.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": call.id, "content": "It is 12:00."}]
    second = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS,
                                            response_format=RESPONSE_FORMAT, seed=2, **OPTS).choices[0]
    assert second.finish_reason == "stop" and second.message.tool_calls is None
    jsonschema.validate(json.loads(second.message.content), SCHEMA)
