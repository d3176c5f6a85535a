"""processor/messages.py is the one home of message handling: the engine, the processor, the CLI and the chat all
read image parts, `images` arguments and batches by the same rules. No model needed."""
import pytest

from lfm2vl.processor.messages import IMAGE_KEYS, collect_images, image_list, is_batch, to_messages


@pytest.mark.parametrize("key", IMAGE_KEYS)
def test_engine_and_processor_read_the_same_image_keys(key):
    """An image part under any of IMAGE_KEYS is an image to both the engine's to_messages and the processor's
    collect_images (apply_chat_template(tokenize=True), render_for_training)."""
    conv = [{"role": "user", "content": [{"type": "image", key: "pic.png"}, {"type": "text", "text": "What?"}]}]
    assert to_messages(conv)[1] == collect_images(conv) == ["pic.png"]


def test_engine_names_are_the_message_homes():
    """engine.py re-exports the message functions rather than keeping its own copies."""
    from lfm2vl import engine
    from lfm2vl.processor import messages

    for name in ("IMAGE_KEYS", "to_messages", "conversation", "is_batch", "text_chars"):
        assert getattr(engine, name) is getattr(messages, name), name


@pytest.mark.parametrize("images, expected", [(None, []), ("a.png", ["a.png"]), (("a", "b"), ["a", "b"]),
                                              (["a"], ["a"])])
def test_image_list(images, expected):
    assert image_list(images) == expected


def test_chat_turn_attaches_images_as_the_engine_does():
    """Chat's user turn puts one image or a list of them before the text, like to_messages(text, images)."""
    from lfm2vl.generate.chat import Chat

    for images in ("a.png", ["a.png", "b.png"]):
        turn = Chat._user_message("Describe", images)
        assert to_messages([turn]) == to_messages("Describe", images=images)


@pytest.mark.parametrize("messages, batch", [
    ([[{"role": "user", "content": "a"}], [{"role": "user", "content": "b"}]], True),
    (["prompt one", "prompt two"], True),
    ([[{"role": "user", "content": "a"}], "prompt"], True),
    ([{"role": "user", "content": "a"}], False),
    ("prompt", False),
    ([], False),
])
def test_is_batch(messages, batch):
    assert is_batch(messages) is batch


def test_images_fill_image_parts_without_an_image():
    """TRL's dataset layout: {"type": "image"} parts with no image take the `images` given, in order; a count
    mismatch is an error naming both counts."""
    conv = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}, {"type": "image"}]}]
    msgs, imgs = to_messages(conv, images=["x.png", "y.png"])
    assert imgs == ["x.png", "y.png"] and msgs[0]["content"][0] == {"type": "image"}
    with pytest.raises(ValueError, match="2 image parts without an image but 1 images"):
        to_messages(conv, images=["x.png"])
    with pytest.raises(ValueError, match="image part without an image"):
        to_messages(conv)


@pytest.mark.parametrize("messages, where", [
    ("\udcff", "the prompt"),
    ([{"role": "user", "content": "ok \udcff"}], r"messages\[0\].content"),
    ([{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}], r"messages\[0\].content\[0\].text"),
    ([{"role": "user", "content": ["x", "\udcff"]}], r"messages\[0\].content\[1\]"),
])
def test_text_that_is_not_valid_unicode_is_named(messages, where):
    """Lone surrogates (JSON escapes, bytes that were not UTF-8) are refused where they are, before a tokenizer
    sees them."""
    with pytest.raises(ValueError, match=f"^{where} has an unpaired surrogate at index [0-9]+ and is not valid "
                                         "Unicode"):
        to_messages(messages)


@pytest.mark.parametrize("role, ok", [("user", False), ("system", False), ("tool", False), ("assistant", True)])
def test_only_an_assistant_message_may_go_without_content(role, ok):
    """One rule for the engine, the CLI and the server's request model: a message without content is refused
    unless it is an assistant's."""
    from pydantic import ValidationError

    from lfm2vl.serve.schemas import Message

    msgs = [{"role": "user", "content": "hi"}, {"role": role}]
    if ok:
        assert to_messages(msgs)[0][1]["content"] == "" and Message(role=role).content is None
        return
    with pytest.raises(ValueError, match=rf"messages\[1\] has no content: a {role} message needs content"):
        to_messages(msgs)
    with pytest.raises(ValidationError, match=f"a {role} message needs content"):
        Message(role=role)


def test_places_name_each_image_by_its_part():
    from lfm2vl.processor.messages import normalize

    conv = [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image", "image": "x.png"}]},
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "y.png"}}]}]
    assert normalize(conv).places == ["image 1 of 2 (messages[0].content[1])", "image 2 of 2 (messages[1].content[0])"]
    assert normalize(conv[1:]).places == ["messages[0].content[0]"]
    assert normalize("Describe", images=["x.png"]).places == [None]
