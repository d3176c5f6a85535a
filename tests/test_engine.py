"""Engine on a tiny random checkpoint: batch == one at a time, chunked prefill == one shot, multi-turn cache reuse ==
a fresh run (images not re-encoded), streaming, seeds, message formats, defaults, clear errors."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from lfm2vl.engine import load, to_messages
from lfm2vl.generate.sampling import SamplingParams

GREEDY = dict(temperature=0, repetition_penalty=1.0, min_new_tokens=12, max_new_tokens=12)


def picture(w, h, seed=0):
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(h, w, 3) * 255).astype("uint8"))


def count_encoded_units(engine):
    """Wrap model.image_features to count the units it encodes."""
    calls = []
    orig = engine.model.image_features

    def wrapped(pv, pm, ss):
        calls.append(pv.shape[0])
        return orig(pv, pm, ss)

    engine.model.image_features = wrapped
    return calls, lambda: delattr(engine.model, "image_features")


def conv(text, *images):
    return [{"role": "user", "content": [{"type": "image", "image": im} for im in images] +
             [{"type": "text", "text": text}]}]


def test_defaults_follow_the_model_card_and_checkpoint(tiny_engine):
    p = SamplingParams()
    assert (p.temperature, p.min_p, p.repetition_penalty) == (0.1, 0.15, 1.05)
    assert tiny_engine.eos_ids == (7,)
    assert tiny_engine.processor.settings.image.use_thumbnail is False  # from the checkpoint's processor files
    req = tiny_engine.prepare("hi")
    assert req.params.temperature == 0.1 and req.eos_ids == (7,)


def test_eos_list_from_generation_config(tiny_checkpoint, tmp_path):
    import shutil

    f = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, f)
    (f / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2], "bos_token_id": 1}))
    assert set(load(f, dtype="float32").eos_ids) == {7, 2}


def test_batch_equals_one_at_a_time(tiny_engine):
    convs = [conv("What is in this image?", picture(384, 256)), "Tell me a story.",
             conv("Compare", picture(256, 256, 1), picture(320, 200, 2)), "Short."]
    opts = [dict(GREEDY), dict(GREEDY, max_new_tokens=5), dict(temperature=0.9, seed=3, max_new_tokens=9),
            dict(GREEDY, stop=["e"])]
    batch = tiny_engine.generate(convs, **GREEDY, max_batch=3)
    for c, r in zip(convs, batch):
        tiny_engine.reset()
        alone = tiny_engine.generate(c, **GREEDY)
        assert (r.token_ids, r.text, r.finish_reason) == (alone.token_ids, alone.text, alone.finish_reason)
    # mixed options per request go through prepare + the BatchGenerator directly
    from lfm2vl.generate.batch import BatchGenerator

    gen = BatchGenerator(tiny_engine, max_batch=4)
    rids = [gen.add(tiny_engine.prepare(c, **o)) for c, o in zip(convs, opts)]
    out = gen.run(rids)
    for c, o, rid in zip(convs, opts, rids):
        tiny_engine.reset()
        assert out[rid].token_ids == tiny_engine.generate(c, **o).token_ids


def test_chunked_prefill_equals_one_shot(tiny_checkpoint):
    c = conv("What is in this image? Describe it in detail.", picture(500, 300))
    e1 = load(tiny_checkpoint, dtype="float32")
    e2 = load(tiny_checkpoint, dtype="float32")
    e2.prefill_chunk = 7  # many chunks, one crossing the image tokens
    r1, r2 = e1.generate(c, **GREEDY), e2.generate(c, **GREEDY)
    assert r1.prompt_tokens > 7 * 10
    assert r1.token_ids == r2.token_ids
    # logits agree too, not only the argmax
    from lfm2vl.generate.batch import BatchGenerator
    req = e1.prepare(c, **GREEDY, logprobs=True)
    g1, g2 = BatchGenerator(e1, max_batch=1), BatchGenerator(e2, max_batch=1, prefill_chunk=7)
    a, b = g1.run([g1.add(req)]), g2.run([g2.add(req)])
    np.testing.assert_allclose(a[0].logprobs, b[0].logprobs, atol=1e-4)


def test_second_turn_reuses_cache_and_equals_fresh_run(tiny_checkpoint):
    engine = load(tiny_checkpoint, dtype="float32")
    calls, restore = count_encoded_units(engine)
    chat = engine.chat(system="You are a helpful multimodal assistant by Liquid AI.", **GREEDY)
    r1 = chat.send("What is in this image?", images=[picture(384, 256)])
    assert sum(calls) == 1 and r1.cached_tokens == 0
    r2 = chat.send("And what colour is it?")
    assert sum(calls) == 1, "the image of turn 1 was encoded again"
    assert r2.cached_tokens >= r1.prompt_tokens  # at least the whole first prompt was reused
    restore()
    fresh = load(tiny_checkpoint, dtype="float32").generate(chat.messages[:-1], **GREEDY)
    assert r2.token_ids == fresh.token_ids and r2.prompt_tokens == fresh.prompt_tokens
    # a third turn with a new image: only the new image is encoded
    calls2, _ = count_encoded_units(engine)
    r3 = chat.send("Now this one?", images=[picture(256, 256, 5)])
    assert sum(calls2) == 1 and r3.cached_tokens >= r2.prompt_tokens
    fresh3 = load(tiny_checkpoint, dtype="float32").generate(chat.messages[:-1], **GREEDY)
    assert r3.token_ids == fresh3.token_ids


def test_chat_stream_and_reset(tiny_engine):
    chat = tiny_engine.chat(**GREEDY)
    s = chat.stream("Hello!")
    pieces = list(s)
    assert "".join(pieces) == s.result.text and chat.messages[-1] == {"role": "assistant", "content": s.result.text}
    chat.reset()
    assert chat.messages == []


def test_stream_equals_generate_and_never_splits(tiny_engine):
    c = conv("Describe.", picture(300, 300))
    tiny_engine.reset()
    res = tiny_engine.generate(c, **GREEDY)
    tiny_engine.reset()
    s = tiny_engine.stream(c, **GREEDY)
    pieces = list(s)
    assert "".join(pieces) == res.text == s.result.text
    # random weights emit invalid byte sequences (U+FFFD in the decoded text itself); splitting is tested on
    # real multi-byte text in test_detok.py. Here: the pieces add up to the one-shot decode.
    assert res.text == tiny_engine.tokenizer.decode(res.token_ids, skip_special_tokens=True)


def test_abandoned_stream_is_cancelled(tiny_engine):
    s = tiny_engine.stream("Tell me a story.", **dict(GREEDY, max_new_tokens=40, min_new_tokens=40))
    for i, _ in enumerate(s):
        if i == 2:
            break
    del s
    import gc

    gc.collect()  # closes the abandoned generator, which cancels its request
    assert not tiny_engine._single_gen().has_work()
    res = tiny_engine.generate("Hi", **GREEDY)
    assert res.completion_tokens == 12


def test_seed_reproducible_and_temperature_zero_ignores_seed(tiny_engine):
    run = lambda **o: tiny_engine.generate("Write a poem.", max_new_tokens=16, min_new_tokens=16, **o)
    a, b, c = run(temperature=1.0, seed=1), run(temperature=1.0, seed=1), run(temperature=1.0, seed=2)
    assert a.text == b.text and a.token_ids == b.token_ids and a.token_ids != c.token_ids
    assert run(temperature=0, seed=1).token_ids == run(temperature=0, seed=2).token_ids


def test_result_fields_and_timings(tiny_engine):
    r = tiny_engine.generate("Hi", **GREEDY, logprobs=True)
    assert r.finish_reason == "length" and r.completion_tokens == len(r.token_ids) == 12
    assert r.prompt_tokens == len(tiny_engine.prepare("Hi").input_ids)
    assert r.ttft_s > 0 and r.decode_s > 0 and r.decode_tps > 0 and r.prefill_tps > 0
    assert len(r.logprobs) == 12 and all(lp <= 0 for lp in r.logprobs)


def test_max_new_tokens_and_stop_string(tiny_engine):
    r = tiny_engine.generate("Hi", temperature=0, max_new_tokens=3)
    assert r.completion_tokens <= 3
    full = tiny_engine.generate("Hi", **GREEDY)
    piece = full.text[2:4]
    if piece.strip():
        r = tiny_engine.generate("Hi", **GREEDY, stop=[piece])
        assert r.finish_reason == "stop" and piece not in r.text and full.text.startswith(r.text)


def test_message_formats_give_the_same_prompt(tiny_engine, tmp_path):
    img = picture(200, 150)
    path = tmp_path / "x.png"
    img.save(path)
    forms = [
        conv("What?", img),
        [{"role": "user", "content": [{"type": "image", "path": str(path)}, {"type": "text", "text": "What?"}]}],
        [{"role": "user", "content": [{"type": "image", "url": str(path)}, "What?"]}],
        [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(path)}},
                                      {"type": "text", "text": "What?"}]}],
    ]
    reqs = [tiny_engine.prepare(f) for f in forms]
    reqs.append(tiny_engine.prepare("What?", images=[str(path)]))
    for r in reqs[1:]:
        assert r.input_ids == reqs[0].input_ids
        assert torch.equal(r.pixel_values, reqs[0].pixel_values)


def test_image_knobs_change_the_prompt(tiny_engine):
    img = picture(1024, 768)
    small = tiny_engine.prepare(conv("x", img), do_image_splitting=False, max_image_tokens=64)
    big = tiny_engine.prepare(conv("x", img))
    assert len(small.input_ids) < len(big.input_ids)


@pytest.mark.parametrize("call, match", [
    (lambda e: e.prepare("hi", temprature=1), "temprature"),
    (lambda e: e.prepare("hi", temperature=-1), "temperature"),
    (lambda e: e.prepare([{"role": "user", "content": [{"type": "audio"}]}]), "audio"),
    (lambda e: e.prepare([{"role": "user", "content": [{"type": "image"}]}]), "image"),
    (lambda e: e.prepare([{"content": "x"}]), "role"),
    (lambda e: e.prepare("hi", max_new_tokens=0), "max_new_tokens"),
    (lambda e: e.prepare("hi", max_image_tokens=0), "max_image_tokens"),
    (lambda e: e.prepare("x " * 5000), "context"),
    (lambda e: e.prepare(conv("x", picture(10, 10)), images=[picture(10, 10)]), "both"),
])
def test_bad_input_raises_clear_value_error(tiny_engine, call, match):
    with pytest.raises(ValueError, match=match):
        call(tiny_engine)


def test_to_messages_places_images_before_prompt_text():
    msgs, imgs = to_messages("Describe", images=["a.png", "b.png"])
    assert imgs == ["a.png", "b.png"]
    assert msgs == [{"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                                 {"type": "text", "text": "Describe"}]}]


def test_two_streams_interleaved_on_one_engine(tiny_engine):
    tiny_engine.reset()
    ref = [tiny_engine.generate(p, **GREEDY).text for p in ("One.", "Two.")]
    it1, it2 = iter(tiny_engine.stream("One.", **GREEDY)), iter(tiny_engine.stream("Two.", **GREEDY))
    a, b = [], []
    for x, out in ((it1, a), (it2, b), (it1, a)):
        out.append(next(x, ""))
    a += list(it1)
    b += list(it2)
    assert ["".join(a), "".join(b)] == ref


@pytest.mark.slow
def test_compiled_decode_step_gives_the_same_greedy_tokens(tiny_checkpoint):
    eager = load(tiny_checkpoint, dtype="float32", optimize=False)
    compiled = load(tiny_checkpoint, dtype="float32", optimize=False, compile=True)
    assert compiled.decode_forward is not None
    c = conv("What is in this image?", picture(384, 256))
    assert compiled.generate(c, **GREEDY).token_ids == eager.generate(c, **GREEDY).token_ids


def test_cpu_only_options_on_another_device_are_clear_errors():
    """int8 / int4 / low_memory would silently do nothing off CPU: refused before anything is loaded."""
    from lfm2vl.engine import load

    with pytest.raises(ValueError, match="int4 works on CPU only.*device='cuda'"):
        load("no/such-model", device="cuda", int4=True)
    with pytest.raises(ValueError, match="int8 and low_memory work on CPU only"):
        load("no/such-model", device="meta", int8=True, low_memory=True)
    with pytest.raises(ValueError, match="exclusive"):
        load("no/such-model", int8=True, int4=True)


def test_prepared_pixels_are_as_wide_as_the_largest_unit_not_the_budget(tiny_engine):
    req = tiny_engine.prepare(conv("hi", picture(64, 48)), max_image_tokens=256)
    assert req.pixel_values.shape[1] == int(req.pixel_attention_mask.sum(1).max()) < 256 * 4


def test_pixels_as_wide_as_the_unit_give_the_same_answer_as_the_padded_ones(tiny_engine):
    msgs = conv("hi", picture(64, 48))
    req = tiny_engine.prepare(msgs, **GREEDY)
    padded = tiny_engine.processor(text=tiny_engine.processor.apply_chat_template(msgs, add_generation_prompt=True),
                              images=[picture(64, 48)])
    assert padded["pixel_values"].shape[1] > req.pixel_values.shape[1]
    out = tiny_engine.model.image_features(req.pixel_values, req.pixel_attention_mask, req.spatial_shapes)
    ref = tiny_engine.model.image_features(padded["pixel_values"], padded["pixel_attention_mask"],
                                      padded["spatial_shapes"])
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_a_text_far_over_the_context_is_refused_before_tokenizing(tiny_engine, monkeypatch):
    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized")

    monkeypatch.setattr(tiny_engine.processor.tokenizer, "encode_batch", no_tokenizing)
    with pytest.raises(ValueError, match="3000000 characters of text, far more than the context of 512 tokens"):
        tiny_engine.prepare("abc " * 750_000, context=512)


# ---- roles, parts and option values ------------------------------------------------------------------------------
@pytest.mark.parametrize("role", [5, None, "robot"])
def test_role_outside_the_rule_is_a_value_error_naming_it(role):
    with pytest.raises(ValueError) as e:
        to_messages([{"role": "user", "content": "hi"}, {"role": role, "content": "x"}])
    assert str(e.value).startswith(f"messages[1] has role {role!r}; expected one of 'system', 'developer', 'user', "
                                   "'assistant'")


def test_developer_role_is_rendered_as_system(tiny_engine):
    as_developer = tiny_engine.prepare([{"role": "developer", "content": "Be brief."},
                                        {"role": "user", "content": "Hi"}])
    as_system = tiny_engine.prepare([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert as_developer.input_ids == as_system.input_ids


@pytest.mark.parametrize("part, says", [
    (5, "messages[0].content[0] must be a string or a dict part like {'type': 'text', 'text': ...}, got int"),
    ({"type": "text", "text": 5}, "messages[0].content[0] is a text part whose 'text' must be a string, got int"),
    ({"type": "text"}, "messages[0].content[0] is a text part whose 'text' must be a string, got NoneType"),
    ({"text": "hi"}, "messages[0].content[0] has no 'type'"),
    ({"type": "image_url", "image_url": {"url": 5}}, "messages[0].content[0] has an image_url whose url must be a "
                                                     "string, got int"),
])
def test_malformed_part_is_a_value_error_naming_it(part, says):
    with pytest.raises(ValueError) as e:
        to_messages([{"role": "user", "content": [part]}])
    assert str(e.value).startswith(says)


@pytest.mark.parametrize("name", ["temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                                  "frequency_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_float_option_must_be_a_finite_number(tiny_engine, name, value):
    with pytest.raises(ValueError, match=rf"^{name}={value!r} is invalid; must be a finite number$"):
        tiny_engine.prepare("hi", **{name: value})


@pytest.mark.parametrize("seed", [2**64, -2**63 - 1, 2**70])
def test_seed_outside_what_manual_seed_accepts_is_rejected_by_prepare(tiny_engine, seed):
    with pytest.raises(ValueError, match=r"seed=.* is invalid; expected an integer in \[-2\*\*63, 2\*\*64 - 1\]"):
        tiny_engine.prepare("hi", seed=seed)


def test_undecodable_image_is_named_by_its_position(tiny_engine):
    import io

    buf = io.BytesIO()
    picture(40, 30).save(buf, "JPEG")
    header_only = buf.getvalue()[:30]  # PIL's open raises OSError("Truncated File Read") on it
    with pytest.raises(ValueError) as e:
        tiny_engine.prepare(conv("x", picture(40, 30), header_only))
    assert str(e.value).startswith("image 2 of 2 (messages[0].content[1]): ") and " at 0x" not in str(e.value)


# ---- continuing a final assistant message ------------------------------------------------------------------------
def test_continue_final_message_prompt_is_the_transformers_rendering(tiny_engine, tiny_checkpoint):
    from transformers import AutoTokenizer

    convo = [{"role": "user", "content": "Tell me a story."}, {"role": "assistant", "content": "Once upon a"}]
    ref = AutoTokenizer.from_pretrained(str(tiny_checkpoint)).apply_chat_template(convo, continue_final_message=True,
                                                                         tokenize=True, return_dict=False)
    ids = tiny_engine.prepare(convo, continue_final_message=True).input_ids
    assert ids == list(ref)
    assert tiny_engine.tokenizer.decode(ids).endswith("<|im_start|>assistant\nOnce upon a")


def test_continue_final_message_needs_a_final_assistant_message(tiny_engine):
    with pytest.raises(ValueError, match="continue_final_message=True continues the final assistant message, but the "
                                         "conversation ends with a user message"):
        tiny_engine.prepare("hi", continue_final_message=True)


# ---- stopping early ----------------------------------------------------------------------------------------------
def test_chat_reply_stopped_early_stays_in_the_conversation(tiny_engine):
    chat = tiny_engine.chat(**dict(GREEDY, max_new_tokens=40, min_new_tokens=40))
    stream = chat.stream("Tell me a story.")
    it = iter(stream)
    shown = "".join(next(it) for _ in range(3))
    it.close()
    assert chat.messages == [{"role": "user", "content": "Tell me a story."},
                             {"role": "assistant", "content": shown}]


def test_request_after_a_step_cut_by_ctrl_c_equals_a_fresh_run(tiny_engine):
    """KeyboardInterrupt right after a decode forward (the conv state has advanced, the row's tokens not yet) while
    streaming: a request extending what the row holds still gets the tokens of a fresh run."""
    from lfm2vl.engine import Stream
    from lfm2vl.generate.batch import BatchGenerator

    opts = dict(GREEDY, max_new_tokens=20, min_new_tokens=20)
    tokens = tiny_engine.generate("Tell me a story.", **opts).token_ids
    gen = BatchGenerator(tiny_engine, max_batch=1)
    forward, calls = gen.decode_forward, []

    def interrupted(*a, **k):
        out = forward(*a, **k)
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return out

    gen.decode_forward = interrupted
    req = tiny_engine.prepare("Tell me a story.", **opts)
    with pytest.raises(KeyboardInterrupt):
        for _ in Stream(gen, req):
            pass
    gen.decode_forward = forward
    longer = dataclasses.replace(req, input_ids=req.input_ids + tokens[:8])
    fresh = BatchGenerator(tiny_engine, max_batch=1)
    assert gen.run([rid := gen.add(longer)])[rid].token_ids == fresh.run([f := fresh.add(longer)])[f].token_ids


@pytest.mark.parametrize("cap", [None, 1], ids=["one-pass", "a-pass-each"])
def test_images_of_requests_placed_together_are_encoded_in_one_vision_pass(tiny_engine, monkeypatch, cap):
    """features_from: the units of several requests (one unit, two units of other widths, none) in one vision pass,
    one request resuming 3 tokens into its first unit, give each request the features of its own units; with the
    pass capped below one request's pixel rows, each request gets a pass of its own."""
    from lfm2vl.generate import units as units_mod

    reqs = [tiny_engine.prepare(conv("a", picture(64, 48)), **GREEDY),
            tiny_engine.prepare(conv("b", picture(384, 256), picture(64, 64, 1)), **GREEDY),
            tiny_engine.prepare("no image", **GREEDY)]
    cfg, model = tiny_engine.config, tiny_engine.model
    units = [units_mod.image_units(r, cfg.image_token_id, cfg.downsample_factor) for r in reqs]
    starts = [0, units[1][0][0] + 3, 0]
    real, calls = model.image_features, []
    monkeypatch.setattr(model, "image_features", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    if cap is not None:
        monkeypatch.setattr(units_mod, "VISION_PASS_PATCHES", cap)
    got = units_mod.features_from(model, list(zip(reqs, units, starts)), cfg.downsample_factor, torch.device("cpu"))
    assert calls == ([1 + len(units[1])] if cap is None else [1, len(units[1])]) and got[2] is None
    for r, g, skip in zip(reqs, got, (0, 3)):
        want = real(r.pixel_values, r.pixel_attention_mask, r.spatial_shapes)[skip:]
        torch.testing.assert_close(g, want, rtol=0, atol=1e-5)


def test_prepared_pixels_are_in_the_towers_dtype_with_the_same_features(tiny_checkpoint):
    """A bf16 engine's requests hold bf16 pixels (half of float32's bytes while they wait) and the tower gives the
    same features as from the processor's float32 ones."""
    engine = load(tiny_checkpoint, dtype="bfloat16")
    msgs = conv("hi", picture(64, 48))
    req = engine.prepare(msgs, **GREEDY)
    assert req.pixel_values.dtype == engine.model.pixel_dtype == torch.bfloat16
    raw = engine.processor(text=engine.processor.apply_chat_template(msgs, add_generation_prompt=True),
                           images=[picture(64, 48)], pad_patches=False)
    assert raw["pixel_values"].dtype == torch.float32
    with torch.inference_mode():
        got = engine.model.image_features(req.pixel_values, req.pixel_attention_mask, req.spatial_shapes)
        want = engine.model.image_features(raw["pixel_values"], raw["pixel_attention_mask"], raw["spatial_shapes"])
    torch.testing.assert_close(got, want, rtol=0, atol=0)


# ---- bad arguments are clear ValueErrors -------------------------------------------------------------------------
@pytest.mark.parametrize("options, says", [
    ({"stop": 5}, r"^stop=5 is invalid; expected a string or a list of strings$"),
    ({"stop": ["ok", "\udcff"]}, r"^stop\[1\] has an unpaired surrogate"),
    ({"max_image_tokens": 10**9}, r"^max_image_tokens=1000000000 is out of range: this model takes 1 to 256 image "
                                  "tokens per image or tile$"),
    ({"min_image_tokens": 5000, "max_image_tokens": 10000}, r"^min_image_tokens=5000 is out of range"),
    ({"logprobs": "yes"}, r"^logprobs='yes' is invalid"),
])
def test_bad_options_are_named(tiny_engine, options, says):
    with pytest.raises(ValueError, match=says):
        tiny_engine.prepare([{"role": "user", "content": "hi"}], **options)


def test_numpy_scalars_are_accepted_as_options(tiny_engine):
    req = tiny_engine.prepare("hi", temperature=np.float32(0.5), max_new_tokens=np.int64(3),
                              max_image_tokens=np.int64(128))
    assert req.params.temperature == 0.5 and req.max_new_tokens == 3 and type(req.max_new_tokens) is int


def test_chat_refuses_a_turn_it_cannot_take_and_keeps_its_conversation(tiny_engine):
    chat = tiny_engine.chat()
    for text, says in ((None, "the message text must be a string, got NoneType"),
                       ("\udcff", "the message text has an unpaired surrogate at index 0")):
        with pytest.raises(ValueError, match=says):
            chat.send(text, max_new_tokens=2)
    with pytest.raises(ValueError, match="send_tool_result answers a tool call, but the conversation's last reply "
                                         "called no tool"):
        chat.send_tool_result("42", max_new_tokens=2)
    assert chat.messages == []


def in_threads(*calls):
    """Run each call in a thread of its own, all released at once; their results in order (the first error raised)."""
    import threading

    start, out, errors = threading.Barrier(len(calls)), [None] * len(calls), []

    def work(k, call):
        start.wait()
        try:
            out[k] = call()
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k, c), daemon=True) for k, c in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not any(t.is_alive() for t in threads), "a thread still waits"
    if errors:
        raise errors[0]
    return out


def test_generate_from_several_threads_equals_the_sequential_calls(tiny_engine):
    prompts = ["One.", "Two.", "Three."]
    ref = [tiny_engine.generate(p, **GREEDY).text for p in prompts] + [
        [r.text for r in tiny_engine.generate(prompts[:2], **GREEDY)]]
    got = in_threads(*[lambda p=p: tiny_engine.generate(p, **GREEDY).text for p in prompts],
                     lambda: [r.text for r in tiny_engine.generate(prompts[:2], **GREEDY)])
    assert got == ref


def test_streams_and_generate_from_several_threads_equal_the_sequential_calls(tiny_engine):
    ref = [tiny_engine.generate(p, **GREEDY).text for p in ("One.", "Two.", "Three.")]
    got = in_threads(lambda: "".join(tiny_engine.stream("One.", **GREEDY)),
                     lambda: "".join(tiny_engine.stream("Two.", **GREEDY)),
                     lambda: tiny_engine.generate("Three.", **GREEDY).text)
    assert got == ref


def test_a_stream_paused_between_pieces_lets_another_thread_generate(tiny_engine):
    ref = [tiny_engine.generate(p, **GREEDY).text for p in ("One.", "Two.")]
    it = iter(tiny_engine.stream("One.", **GREEDY))
    first = next(it)
    other = in_threads(lambda: tiny_engine.generate("Two.", **GREEDY).text)  # the stream holds nothing meanwhile
    assert [first + "".join(it)] + other == ref


def test_chat_turns_sent_from_two_threads_each_see_the_one_before(tiny_engine):
    chat = tiny_engine.chat(**GREEDY)
    in_threads(lambda: chat.send("Hello."), lambda: chat.send("Goodbye."))
    assert [m["role"] for m in chat.messages] == ["user", "assistant"] * 2
    again = tiny_engine.chat(**GREEDY)
    for user in chat.messages[::2]:
        again.send(user["content"])
    assert again.messages == chat.messages


@pytest.mark.parametrize("flag, value", [("int8", "yes"), ("low_memory", 1), ("optimize", None), ("bf16_packed", 0)])
def test_load_names_a_switch_that_is_not_a_bool(tmp_path, flag, value):
    """Checked before the model is looked for (tmp_path holds no checkpoint: reaching it would say so)."""
    import lfm2vl

    with pytest.raises(ValueError, match=rf"^{flag}={value!r} is invalid; expected True or False"):
        lfm2vl.load(tmp_path, **{flag: value})


@pytest.mark.parametrize("switches", [{}, {"int8": True, "optimize": False}, {"int8_vision": True, "optimize": False}])
def test_compile_with_the_cpu_fast_modules_is_refused_naming_them(tmp_path, switches):
    """Checked before the model is looked for: a compiled step around native kernels recompiles and gains nothing."""
    import lfm2vl

    on = next(iter(switches), "optimize")
    with pytest.raises(ValueError, match=rf"^compile=True does not combine with {on}=True on the CPU: .* pass "
                                         r"optimize=False to compile the plain torch modules"):
        lfm2vl.load(tmp_path, compile=True, **switches)
