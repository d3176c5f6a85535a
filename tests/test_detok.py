"""Streaming detokenizer and stop strings."""
import pytest

from lfm2vl.generate.detok import REPLACEMENT, StreamDetokenizer
from lfm2vl.generate.stops import StopMatcher
from tokenizer_build import build_tokenizer

TEXTS = ["日本語 🙂", "Héllo wörld! 🚀 café, naïve façade", "plain ascii text 123", "🙂🙂🙂 日本語のテキスト。"]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.mark.parametrize("text", TEXTS)
def test_stream_pieces_never_split_a_character(tok, text):
    ids = tok.encode(text, add_special_tokens=False).ids
    d = StreamDetokenizer(tok)
    pieces = [d.add(i) for i in ids]
    tail = d.flush()
    assert "".join(pieces) + tail == tok.decode(ids) == text
    assert all(REPLACEMENT not in p for p in pieces)
    assert tail == ""


def test_multibyte_case_actually_splits_characters(tok):
    """Guard: the test text really has tokens that end inside a character."""
    ids = tok.encode("日本語 🙂", add_special_tokens=False).ids
    assert any(REPLACEMENT in tok.decode([i]) for i in ids)
    d = StreamDetokenizer(tok)
    assert "" in [d.add(i) for i in ids]  # some token had to wait for the rest of its character


def test_special_tokens_are_skipped(tok):
    ids = tok.encode("<|im_start|>assistant\nhi there<|im_end|>", add_special_tokens=False).ids
    d = StreamDetokenizer(tok)
    assert "".join(d.add(i) for i in ids) + d.flush() == "assistant\nhi there"


def test_flush_reports_an_incomplete_character(tok):
    ids = tok.encode("🙂", add_special_tokens=False).ids
    assert len(ids) > 1
    d = StreamDetokenizer(tok)
    assert d.add(ids[0]) == ""
    assert d.flush() == REPLACEMENT * len(tok.decode(ids[:1]))


def run_stops(stops, pieces):
    m = StopMatcher(stops)
    out, hit = [], False
    for p in pieces:
        text, hit = m.feed(p)
        out.append(text)
        if hit:
            break
    if not hit:
        out.append(m.flush())
    return out, hit


def test_stop_string_not_included_and_spans_pieces():
    out, hit = run_stops(["END"], ["hello E", "N", "D and more"])
    assert hit and "".join(out) == "hello "
    assert out[0] == "hello "  # "E" is held back


def test_partial_stop_released_when_it_does_not_match():
    out, hit = run_stops(["END"], ["hello E", "NX", " bye"])
    assert not hit and "".join(out) == "hello ENX bye"
    assert out == ["hello ", "ENX", " bye", ""]


def test_earliest_of_several_stops_wins():
    out, hit = run_stops(["cd", "b"], ["abcd"])
    assert hit and "".join(out) == "a"


def test_no_stops_passes_through():
    out, hit = run_stops(None, ["a", "b"])
    assert out == ["a", "b", ""] and not hit


def test_held_back_text_released_at_end():
    out, hit = run_stops(["</s>"], ["the end <"])
    assert not hit and out == ["the end ", "<"]


def test_bad_stop_raises():
    with pytest.raises(ValueError, match="stop"):
        StopMatcher([""])
