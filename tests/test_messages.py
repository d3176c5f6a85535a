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
