"""Chat templates and tokenization vs transformers (whose tokenizer side needs no torchvision, so this runs in
.venv directly): rendered strings and token ids identical for the fixture template and an LFM2.5-style template
with a system prompt, tools, tool calls, multi-turn and thinking; plus the training render's loss mask."""
from __future__ import annotations

import json
import re

import pytest
import torch

import processor_cases as pc
from lfm2vl.processor import Processor

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city — «quoted»",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
IMG = {"type": "image"}
CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "user", "content": [IMG, {"type": "text", "text": "What is in this image?"}]}],
    [{"role": "system", "content": "You are a helpful multimodal assistant by Liquid AI."},
     {"role": "user", "content": [{"type": "text", "text": "Compare "}, IMG, {"type": "text", "text": " and "}, IMG]},
     {"role": "assistant", "content": "The first is a cat."},
     {"role": "user", "content": "And the colors? Ünïcode 日本語 🙂"}],
    [{"role": "user", "content": [{"type": "image", "image": "<not loaded>"}, {"type": "video"},
                                  {"type": "text", "text": "odd parts"}]}],
    [{"role": "user", "content": "Weather in Paris?"},
     {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {
         "name": "get_weather", "arguments": {"city": "Paris"}}}]},
     {"role": "tool", "content": "{\"temp\": 21}"},
     {"role": "assistant", "content": "<think>It is warm.</think>It is 21 °C.", "tool_calls": None},
     {"role": "user", "content": "Thanks"}],
    [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "<think>hmm</think>A1"},
     {"role": "user", "content": "Q2"}, {"role": "assistant", "content": "<think>again</think>A2"}],
]


@pytest.fixture(scope="module", params=["fixture", "lfm25"])
def pair(request, tmp_path_factory):
    from transformers import AutoTokenizer
    template = (pc.FIXTURE / "chat_template.jinja").read_text() if request.param == "fixture" \
        else pc.LFM25_TEMPLATE.read_text()
    folder = pc.write_checkpoint(tmp_path_factory.mktemp(request.param), "v25", template)
    return Processor.from_pretrained(folder), AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False), request.param


@pytest.mark.parametrize("i", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("tools", [None, TOOLS])
def test_template_parity(pair, i, gen, tools):
    ours, ref, _ = pair
    conv = CONVERSATIONS[i]
    kw = {"tools": tools} if tools else {}
    expect = ref.apply_chat_template(conv, add_generation_prompt=gen, tokenize=False, **kw)
    got = ours.apply_chat_template(conv, add_generation_prompt=gen, **kw)
    assert got == expect
    assert ours.tokenizer.encode(got) == ref(expect, add_special_tokens=False)["input_ids"]
    if "<image>" not in got:
        assert ours(text=got)["input_ids"][0].tolist() == ref(expect, add_special_tokens=False)["input_ids"]


def test_template_kwargs_and_batches(pair):
    ours, ref, name = pair
    convs = [CONVERSATIONS[0], CONVERSATIONS[5]]
    assert ours.apply_chat_template(convs, add_generation_prompt=True) == \
        ref.apply_chat_template(convs, add_generation_prompt=True, tokenize=False)
    if name == "lfm25":
        kw = {"keep_past_thinking": True}
        assert ours.apply_chat_template(CONVERSATIONS[5], **kw) == \
            ref.apply_chat_template(CONVERSATIONS[5], tokenize=False, **kw)
        with pytest.raises(Exception, match="Unknown role"):
            ours.apply_chat_template([{"role": "robot", "content": "x"}])


def test_sandbox_globals(tmp_path):
    """strftime_now, raise_exception, namespace, tojson without HTML escaping, trim/lstrip blocks."""
    from transformers import AutoTokenizer
    template = ("{% set ns = namespace(n=0) %}\n  {% for m in messages %}{% set ns.n = ns.n + 1 %}"
                "{{ m | tojson }}{% endfor %}\n{{ ns.n }}|{{ strftime_now('%Y') }}|{{ bos_token }}|{{ image_token }}"
                "|{{ image_thumbnail }}|{{ pad_token }}"
                "{% if messages | length > 5 %}{{ raise_exception('too long') }}{% endif %}")
    folder = pc.write_checkpoint(tmp_path, "v25", template)
    ours, ref = Processor.from_pretrained(folder), AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    conv = [{"role": "user", "content": "<b>&'\"é</b>"}]
    assert ours.apply_chat_template(conv) == ref.apply_chat_template(conv, tokenize=False)
    with pytest.raises(Exception, match="too long"):
        ours.apply_chat_template(conv * 6)


def test_render_for_training(pair):
    ours, _, name = pair
    conv = CONVERSATIONS[2] + [{"role": "assistant", "content": "Orange and white."}]
    import numpy as np
    images = [np.zeros((64, 64, 3), np.uint8), np.zeros((1000, 3000, 3), np.uint8)]
    ids, mask = ours.render_for_training(conv, images=images)
    full = ours(text=ours.apply_chat_template(conv), images=images)["input_ids"][0]
    assert ids.tolist() == full.tolist()  # same ids as inference on the full conversation
    tok = ours.tokenizer
    learned = tok.decode(ids[mask].tolist())
    assert learned == "The first is a cat.<|im_end|>Orange and white.<|im_end|>"
    assert not mask[ids == ours.image_token_id].any()
    runs = np.flatnonzero(np.diff(np.r_[0, mask.int().numpy(), 0]))  # two contiguous assistant runs
    assert len(runs) == 4
    ids2, mask2, pixels = ours.render_for_training(conv, images=images, return_pixels=True)
    assert torch.equal(ids2, ids) and torch.equal(mask2, mask)
    ref = ours(text=ours.apply_chat_template(conv), images=images)
    assert torch.equal(pixels["pixel_values"], ref["pixel_values"])
    assert torch.equal(pixels["spatial_shapes"], ref["spatial_shapes"])


def test_render_for_training_text_only(pair):
    ours, _, _ = pair
    conv = CONVERSATIONS[0] + [{"role": "assistant", "content": "Hi there."}]
    ids, mask = ours.render_for_training(conv)
    assert ours.tokenizer.decode(ids[mask].tolist()) == "Hi there.<|im_end|>"
    assert ids.tolist() == ours.tokenizer.encode(ours.apply_chat_template(conv))
    with pytest.raises(ValueError, match="sentinels"):
        ours.render_for_training(CONVERSATIONS[1] + [{"role": "assistant", "content": "x"}])


def test_apply_chat_template_tokenize_with_images(pair):
    import numpy as np
    ours, _, _ = pair
    conv = [{"role": "user", "content": [{"type": "image", "image": np.zeros((300, 200, 3), np.uint8)},
                                         {"type": "text", "text": "hi"}]}]
    out = ours.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, max_image_tokens=64)
    assert out["pixel_values"].shape[0] == 1
    assert int((out["input_ids"] == ours.image_token_id).sum()) == ours.num_image_tokens(200, 300, max_image_tokens=64)


@pytest.mark.parametrize("last", [{"role": "assistant", "content": "The answer is "},
                                  {"role": "assistant", "content": [{"type": "text", "text": "Partial"}]}])
def test_continue_final_message(pair, last):
    ours, ref, _ = pair
    conv = CONVERSATIONS[0] + [last]
    expect = ref.apply_chat_template(conv, continue_final_message=True, tokenize=False)
    assert ours.apply_chat_template(conv, continue_final_message=True) == expect
    with pytest.raises(ValueError):
        ours.apply_chat_template(conv, continue_final_message=True, add_generation_prompt=True)


def test_render_for_training_with_past_thinking(pair):
    ours, _, name = pair
    conv = CONVERSATIONS[5]
    if name == "lfm25":  # past reasoning is dropped from the prompt, so turns cannot be located one by one
        with pytest.raises(ValueError, match="growing prefix"):
            ours.render_for_training(conv)
        ids, mask = ours.render_for_training(conv, keep_past_thinking=True)
    else:
        ids, mask = ours.render_for_training(conv)
    assert ours.tokenizer.decode(ids[mask].tolist()) == "<think>hmm</think>A1<|im_end|><think>again</think>A2<|im_end|>"


def test_tokenizer_wrapper_matches_transformers(pair):
    ours, ref, _ = pair
    tok = ours.tokenizer
    text = ours.apply_chat_template(CONVERSATIONS[2], add_generation_prompt=True) + "Héllo 日本語 🙂 done."
    ids = tok.encode(text)
    assert ids == ref(text, add_special_tokens=False)["input_ids"]
    for skip in (False, True):
        assert tok.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip)
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (ref.bos_token_id, ref.eos_token_id,
                                                                      ref.pad_token_id)
    assert tok.special_tokens == ref.special_tokens_map
    assert tok.eos_token_ids == [7] and tok.vocab_size == len(ref)


def test_named_templates_in_tokenizer_config(tmp_path):
    """tokenizer_config.json may carry [{name, template}, ...]: 'tool_use' with tools, else 'default'."""
    from transformers import AutoTokenizer
    folder = pc.write_checkpoint(tmp_path, "v25")
    (folder / "chat_template.jinja").unlink()
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "default", "template": "D{{ messages[0]['content'] }}"},
                            {"name": "tool_use", "template": "T{{ tools | length }}{{ messages[0]['content'] }}"}]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, ref = Processor.from_pretrained(folder), AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    conv = [{"role": "user", "content": "x"}]
    for kw in ({}, {"tools": TOOLS}):
        assert ours.apply_chat_template(conv, **kw) == ref.apply_chat_template(conv, tokenize=False, **kw)
    assert ours.apply_chat_template(conv, tools=TOOLS) == "T1x"


@pytest.mark.parametrize("where", ["chat_template.jinja", "tokenizer_config.json"])
def test_a_template_syntax_error_is_a_load_error_naming_the_file_and_line(tmp_path, where):
    from lfm2vl.loading import LoadError
    folder = pc.write_checkpoint(tmp_path, "v25")
    bad = "{{ bos_token }}\n{% for x in %}{% endfor %}"
    if where == "chat_template.jinja":
        (folder / where).write_text(bad)
    else:
        (folder / "chat_template.jinja").unlink()
        cfg = json.loads((folder / where).read_text())
        (folder / where).write_text(json.dumps({**cfg, "chat_template": [{"name": "default", "template": bad}]}))
    with pytest.raises(LoadError, match=rf"^{re.escape(str(folder / where))}: the chat template has a Jinja syntax "
                                        r"error at line 2: Expected an expression"):
        Processor.from_pretrained(folder)


@pytest.mark.parametrize("template,says", [
    ('{{ raise_exception("boom") }}', "boom"),
    ("{{ nothing_here.field }}", "'nothing_here' is undefined"),
])
def test_what_a_template_raises_is_a_value_error_about_the_messages(tmp_path, template, says):
    folder = pc.write_checkpoint(tmp_path, "v25")
    (folder / "chat_template.jinja").write_text(template)
    proc = Processor.from_pretrained(folder)
    with pytest.raises(ValueError) as e:
        proc.apply_chat_template([{"role": "user", "content": "hi"}])
    assert str(e.value) == f"the chat template rejected these messages: {says}"


def test_template_data_nested_past_the_bound_is_a_value_error_not_a_recursion_error():
    """plain() walks the messages, tools and documents before anything else recurses over them: data deeper than
    PLAIN_DEPTH (a caller that skipped the message and tool checks) is a ValueError; data at the checks' own bound
    (jsontext.MAX_DEPTH per field) renders."""
    from lfm2vl.files import jsontext
    from lfm2vl.processor.chat import PLAIN_DEPTH, render

    template = "{% for m in messages %}{{ m.content }}{% endfor %}"

    def nested(n):  # n levels of lists, built without recursion
        value = []
        for _ in range(n - 1):
            value = [value]
        return value

    assert render(template, [{"role": "user", "content": "hi", "x": nested(jsontext.MAX_DEPTH)}], {}) == "hi"
    for depth in (PLAIN_DEPTH, 5000):
        with pytest.raises(ValueError, match=r"^the chat template's data .* is nested too deeply"):
            render(template, [{"role": "user", "content": "hi", "x": nested(depth)}], {})
