"""Tool calls in LFM2's format on the tiny random checkpoint: the tool list in the prompt (by the template or by
lfm2vl), forced calls that follow the tools' schemas whatever the random weights sample, the Pythonic call list
parsed safely and written back exactly, and bad tools / tool_choice refused with the field named."""
import json
from pathlib import Path

import jsonschema
import pytest

from lfm2vl.generate.toolcall import split_answer
from lfm2vl.processor.tools import call_text, parse_calls

FIXTURES = Path(__file__).parent / "fixtures"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather of a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
        "days": {"type": "integer"},
        "hourly": {"type": "boolean"},
        "spots": {"type": "array", "items": {"type": "number"}, "maxItems": 3},
        "where": {"type": "object", "properties": {"lat": {"type": "number"}, "note": {"type": ["string", "null"],
                                                                                      "maxLength": 5}},
                  "required": ["lat", "note"], "additionalProperties": False}},
        "required": ["city", "days", "where"], "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}
TOOLS = [WEATHER, CLOCK]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
OPTS = dict(max_new_tokens=300, repetition_penalty=1.0, min_p=0.0)
ASK = [{"role": "user", "content": "Weather in Paris?"}]


def check_calls(result, names):
    assert result.finish_reason == "tool_calls" and result.tool_calls, (result.finish_reason, result.text)
    for tc in result.tool_calls:
        assert tc["type"] == "function" and tc["id"].startswith("call_")
        assert tc["function"]["name"] in names
        jsonschema.validate(json.loads(tc["function"]["arguments"]), SCHEMAS[tc["function"]["name"]])


def model_text(engine, result) -> str:
    """What the model wrote, its special tokens included (the final eos left out)."""
    ids = [t for t in result.token_ids if t not in engine.eos_ids]
    return engine.tokenizer.decode(ids, skip_special_tokens=False)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_required_tool_choice_gives_a_schema_valid_call(tiny_engine, seed):
    r = tiny_engine.generate(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0,
                             seed=seed, **OPTS)
    check_calls(r, {"get_weather", "get_time"})
    assert len(r.tool_calls) == 1


def test_required_parallel_calls_are_each_schema_valid(tiny_engine):
    got = [tiny_engine.generate(ASK, tools=[CLOCK], tool_choice="required", temperature=1.0, seed=s, **OPTS)
           for s in range(8)]
    for r in got:
        check_calls(r, {"get_time"})
    assert max(len(r.tool_calls) for r in got) > 1  # the grammar lets the model call several times


@pytest.mark.parametrize("seed", [0, 1])
def test_named_tool_choice_calls_only_that_function(tiny_engine, seed):
    r = tiny_engine.generate(ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                             parallel_tool_calls=False, temperature=1.0, seed=seed, **OPTS)
    check_calls(r, {"get_weather"})


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_forced_call_round_trips_into_the_next_prompt(tiny_engine, seed):
    """The call text the model wrote == the text rendered from its OpenAI tool_calls in the next turn's prompt."""
    r = tiny_engine.generate(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0,
                             seed=seed, **OPTS)
    written = model_text(tiny_engine, r)
    assert call_text(r.tool_calls) == written
    nxt = ASK + [{"role": "assistant", "content": r.text, "tool_calls": r.tool_calls},
                 {"role": "tool", "tool_call_id": r.tool_calls[0]["id"], "content": "sunny"}]
    prompt = tiny_engine.processor.apply_chat_template(nxt, add_generation_prompt=True, tools=TOOLS,
                                                         tool_format=True)
    assert "<|im_start|>assistant\n" + written + "<|im_end|>" in prompt


def test_split_answer_reads_text_around_a_free_call(tiny_engine):
    tok = tiny_engine.tokenizer
    ids = tok.encode("Let me look.") + [10] + tok.encode('[get_time(zone="UTC"), f(a=[1, -2.5], b=None)]') + [11, 7]
    content, calls = split_answer(ids, tok, (7,))
    assert content == "Let me look."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_time", {"zone": "UTC"}), ("f", {"a": [1, -2.5], "b": None})]


@pytest.mark.parametrize("text", ['[os.system("ls")]', '[f(__import__("os"))]', '[f(1)]', '[f(a=x)]',
                                  '[f(a={1, 2})]', '[f(a=1e999)]', '[f(**k)]', 'f(a=1) + g()', '[f(a=(1, 2))]'])
def test_anything_but_literal_keyword_calls_is_not_a_call(text):
    assert parse_calls(text) is None


def test_auto_leaves_free_text_and_none_parses_nothing(tiny_engine):
    r = tiny_engine.generate(ASK, tools=TOOLS, temperature=0, max_new_tokens=8)
    assert r.tool_calls is None and r.finish_reason in ("stop", "length")
    free = tiny_engine.generate(ASK, tools=TOOLS, tool_choice="none", temperature=0, max_new_tokens=8)
    assert free.tool_calls is None and free.text == r.text


def test_template_without_tools_gets_the_tool_list_from_lfm2vl(tiny_engine):
    """LFM2-VL-450M's template does not render tools: lfm2vl writes LFM2's line, its markers as control tokens,
    while the same marker typed by the client stays text."""
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "<|tool_list_start|> hi"}]
    req = tiny_engine.prepare(msgs, tools=[CLOCK])
    text = tiny_engine.processor.apply_chat_template(msgs, add_generation_prompt=True, tools=[CLOCK],
                                                       tool_format=True)
    assert ("<|im_start|>system\nBe brief.\nList of tools: <|tool_list_start|>[" + json.dumps(CLOCK)
            + "]<|tool_list_end|><|im_end|>") in text
    assert req.input_ids.count(8) == 1 and req.input_ids.count(9) == 1  # only lfm2vl's markers are special


def test_template_with_tools_renders_them_itself(tiny_engine):
    """An LFM2.5-style template that renders tools and tool responses gives the same prompt as lfm2vl's rule."""
    lfm25 = (FIXTURES / "lfm25_chat_template.jinja").read_text()
    conv = ASK + [{"role": "assistant", "content": "", "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": '{"zone": "CET"}'}}]},
                  {"role": "tool", "content": "12:00"}]
    p = tiny_engine.processor
    own = p.apply_chat_template(conv, add_generation_prompt=True, tools=TOOLS, chat_template=lfm25, tool_format=True)
    rule = p.apply_chat_template(conv, add_generation_prompt=True, tools=TOOLS, tool_format=True)
    assert own == rule
    assert ('<|im_start|>assistant\n<|tool_call_start|>[get_time(zone="CET")]<|tool_call_end|><|im_end|>\n'
            '<|im_start|>tool\n<|tool_response_start|>12:00<|tool_response_end|><|im_end|>') in own


def deep_schema(levels: int) -> dict:
    """A schema of arrays nested `levels` deep (JSON schema allows any depth)."""
    schema = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "array", "items": schema}
    return schema


DEEP_SCHEMA = deep_schema(800)


@pytest.mark.parametrize("options, words", [
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "nope"}}), ["tool_choice", "nope"]),
    (dict(tools=[{"type": "function", "function": {"description": "x"}}]), ["tools[0].function.name"]),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": [1]}}]),
     ["tools[0].function.parameters"]),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"properties": {}, "required": ["a"]}}}]),
     ["tools[0].function.parameters.required", "'a'"]),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
          tool_choice="required"), ["tools[0].function.parameters.type", "'nonsense'", "'object'"]),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}],
          tool_choice="required"), ["tools[0].function.parameters.type", "'array'", "'object'"]),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": 3}}}}]),
     ["tools[0].function.parameters.properties.a", "JSON schema"]),
    (dict(tools=[{"type": "function", "function": {"name": "a-b"}}]), ["tools[0].function.name", "identifier"]),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": DEEP_SCHEMA}}}}]),
     ["tools[0].function.parameters", "nested too deeply"]),
    (dict(tools=TOOLS, tool_choice="always"), ["tool_choice", "'always'"]),
    (dict(tool_choice="required"), ["tool_choice", "needs tools"]),
    (dict(tools=TOOLS, tool_choice="required", regex="a+"), ["tool_choice", "regex"]),
])
def test_bad_tools_are_value_errors_naming_the_field(tiny_engine, options, words):
    with pytest.raises(ValueError) as e:
        tiny_engine.generate(ASK, max_new_tokens=2, **options)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_chat_keeps_tool_calls_and_answers_after_a_tool_result(tiny_engine):
    """engine.chat: the call stays in the history (rendered back as the model's call text) and a tool result turn
    leads to the next reply."""
    chat = tiny_engine.chat(tools=[WEATHER], **OPTS)
    first = chat.send("Weather in Paris?", tool_choice="required", parallel_tool_calls=False, seed=0)
    check_calls(first, {"get_weather"})
    assert chat.messages[-1]["tool_calls"] == first.tool_calls
    second = chat.send_tool_result('{"temperature": 21}', tool_call_id=first.tool_calls[0]["id"], max_new_tokens=4)
    assert second.completion_tokens >= 1
    assert [m["role"] for m in chat.messages] == ["user", "assistant", "tool", "assistant"]
    prompt = tiny_engine.tokenizer.decode(list(tiny_engine.prepare(chat.messages[:3]).input_ids),
                                          skip_special_tokens=False)
    assert model_text(tiny_engine, first) in prompt and "<|tool_response_start|>" in prompt



@pytest.mark.parametrize("arguments", ["[" * 5000 + "]" * 5000, {"a": json.loads("[" * 800 + "]" * 800)}])
def test_call_arguments_nested_too_deeply_are_a_value_error_naming_them(arguments):
    with pytest.raises(ValueError, match=r"^messages\[1\]\.tool_calls\[0\]\.function\.arguments .*nested too deeply"):
        call_text([{"function": {"name": "f", "arguments": arguments}}], "messages[1].tool_calls")
