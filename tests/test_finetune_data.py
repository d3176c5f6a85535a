"""Fine-tuning data: rows read from JSONL and Hugging Face datasets on disk, checked into samples, collated into
batches whose labels are exactly the assistant tokens, and ordered deterministically over epochs and ranks."""
from __future__ import annotations

import base64
import io
import json
import re

import pytest
import torch
from PIL import Image

from lfm2vl.finetune.batches import IGNORE, Order, Sample, collate
from lfm2vl.finetune.data import DataError, load_samples, read_rows
from lfm2vl.processor.processor import Processor

KNOBS = dict(min_image_tokens=4, max_image_tokens=16)


@pytest.fixture(scope="module")
def processor(tiny_checkpoint):
    return Processor.from_pretrained(tiny_checkpoint)


def png(path, size=(64, 48), color=(200, 30, 30)):
    Image.new("RGB", size, color).save(path)
    return path


def png_bytes(size=(40, 40), color=(30, 200, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def conv(*images, question="What color?", answer="Red."):
    """A one-turn conversation whose user message holds `images` (part dicts) before the question."""
    return {"messages": [{"role": "user", "content": [*images, {"type": "text", "text": question}]},
                         {"role": "assistant", "content": answer}]}


def test_labels_are_exactly_the_assistant_spans_shifted(processor, tmp_path):
    """System prompt, two user turns with an image each, two replies: the trained labels are the replies and their
    <|im_end|>, hand-counted: "Red." = R,e,d,. and "Green." = G,re,en,. in this tokenizer, +1 end token each = 10;
    each sits at the position before its token (shifted), and the last position is never trained."""
    png(tmp_path / "a.png")
    png(tmp_path / "b.png", (40, 40), (0, 255, 0))
    row = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image", "path": "a.png"}, {"type": "text", "text": "What color?"}]},
        {"role": "assistant", "content": "Red."},
        {"role": "user", "content": [{"type": "image", "path": "b.png"}, {"type": "text", "text": "And this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "Green."}]}]}
    samples, _ = load_samples(write_jsonl(tmp_path / "t.jsonl", [row]), processor, 4096, **KNOBS)
    batch = collate(samples, processor, **KNOBS)
    ids, labels = batch.input_ids[0], batch.labels[0]
    at = (labels != IGNORE).nonzero().flatten().tolist()
    assert batch.n_tokens == len(at) == 10
    assert labels[at].tolist() == ids[[t + 1 for t in at]].tolist()
    decode = processor.tokenizer.decode
    assert [decode([i]) for i in labels[at].tolist()] == ["R", "e", "d", ".", "<|im_end|>",
                                                           "G", "re", "en", ".", "<|im_end|>"]
    assert labels[-1] == IGNORE
    # the two runs of trained positions are each reply's header end ("\n" after "assistant") through its last char
    runs = [at[:5], at[5:]]
    for run in runs:
        assert run == list(range(run[0], run[0] + 5))
        assert decode(ids[:run[0] + 1].tolist()).endswith("<|im_start|>assistant\n")
    assert int((ids == processor.image_token_id).sum()) > 0 and samples[0].n_images == 2


def test_jsonl_image_sources_load(processor, tmp_path):
    """A relative path, a data: URL, raw base64 and a top-level "images" list filling payload-less parts all load,
    and give the same ids as the same image given as an absolute path."""
    png(tmp_path / "img.png", (40, 40), (30, 200, 30))
    raw = base64.b64encode(png_bytes()).decode()
    rows = [conv({"type": "image", "path": "img.png"}),
            conv({"type": "image_url", "image_url": {"url": "data:image/png;base64," + raw}}),
            conv({"type": "image", "image": raw}),
            {**conv({"type": "image"}), "images": ["img.png"]},
            conv({"type": "image", "image": str(tmp_path / "img.png")})]
    samples, skipped = load_samples(write_jsonl(tmp_path / "t.jsonl", rows), processor, 4096, **KNOBS)
    assert skipped == [] and len(samples) == 5
    for s in samples[1:]:
        assert torch.equal(s.ids, samples[0].ids) and torch.equal(s.loss_mask, samples[0].loss_mask)
    pixels = [collate([s], processor, **KNOBS).pixel_values for s in samples]
    assert all(torch.equal(p, pixels[0]) for p in pixels)


def test_http_image_is_fetched_once_and_kept_as_bytes(processor, tmp_path):
    """An http URL (a server this test starts on 127.0.0.1) is fetched while checking; the sample keeps the bytes,
    so batches never fetch again, and its pixels equal the same image read from a file."""
    import functools
    import http.server
    import threading

    png(tmp_path / "web.png", (40, 40), (30, 200, 30))
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/web.png"
        rows = [conv({"type": "image_url", "image_url": {"url": url}}), conv({"type": "image", "path": "web.png"})]
        samples, _ = load_samples(write_jsonl(tmp_path / "t.jsonl", rows), processor, 4096, **KNOBS)
    finally:
        server.shutdown()
        server.server_close()
    assert samples[0].images == ((tmp_path / "web.png").read_bytes(),)
    a, b = (collate([s], processor, **KNOBS) for s in samples)  # the server is gone: bytes, not the URL
    assert torch.equal(a.pixel_values, b.pixel_values) and torch.equal(a.input_ids, b.input_ids)


def test_unknown_image_knob_is_an_error(processor, tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [conv(answer="x")])
    with pytest.raises(ValueError, match="unknown image option"):
        load_samples(path, processor, 4096, max_image_token=16)


def test_datasets_missing_gives_the_install_hint(processor, tmp_path, monkeypatch):
    (tmp_path / "data.parquet").write_bytes(b"")
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match=r"pip install 'lfm2vl\[train\]'"):
        load_samples(tmp_path / "data.parquet", processor, 4096)


def trl_rows(tmp_path):
    """Three conversations in TRL's layout (payload-less image parts + an images list) and as JSONL."""
    images = [Image.new("RGB", (64, 48), (200, 30, 30)), Image.new("RGB", (40, 56), (30, 30, 200))]
    for k, im in enumerate(images):
        im.save(tmp_path / f"i{k}.png")
    msgs = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "Red."}]}],
        [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
         {"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Both?"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "Red, blue."}]}],
        [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
         {"role": "assistant", "content": [{"type": "text", "text": "Hello."}]}]]
    imgs = [[0], [0, 1], []]
    ds_rows = {"messages": msgs, "images": [[images[k] for k in ks] for ks in imgs]}
    jsonl = write_jsonl(tmp_path / "same.jsonl", [{"messages": m, "images": [f"i{k}.png" for k in ks]}
                                                  for m, ks in zip(msgs, imgs)])
    return ds_rows, jsonl


def same_samples(a, b, processor):
    assert [s.n_units for s in a] == [s.n_units for s in b] and [s.n_images for s in a] == [s.n_images for s in b]
    for x, y in zip(a, b):
        assert torch.equal(x.ids, y.ids) and torch.equal(x.loss_mask, y.loss_mask)
    ba, bb = collate(a, processor, **KNOBS), collate(b, processor, **KNOBS)
    for k in ("input_ids", "labels", "pixel_values", "pixel_attention_mask", "spatial_shapes"):
        assert torch.equal(getattr(ba, k), getattr(bb, k)), k


def test_trl_layout_from_datasets_equals_jsonl(processor, tmp_path):
    """A save_to_disk folder (plain and as a DatasetDict's train split) and a parquet file in TRL's layout give the
    same samples and batches as the equivalent JSONL, and name rows "<name> row i"."""
    import datasets
    ds_rows, jsonl = trl_rows(tmp_path)
    features = datasets.Features({"messages": [{"role": datasets.Value("string"), "content": [
        {"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "images": datasets.Sequence(datasets.Image())})
    ds = datasets.Dataset.from_dict(ds_rows, features=features)
    ds.save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "dict"))
    ds.to_parquet(str(tmp_path / "data.parquet"))
    (tmp_path / "pq").mkdir()
    ds.to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    want, _ = load_samples(jsonl, processor, 4096, **KNOBS)
    for source in ("saved", "dict", "data.parquet", "pq"):
        got, skipped = load_samples(tmp_path / source, processor, 4096, **KNOBS)
        assert skipped == []
        same_samples(want, got, processor)
    assert [r.where for r in read_rows(tmp_path / "data.parquet")] == [f"data.parquet row {i}" for i in range(3)]


def test_dataset_without_train_split_is_an_error(tmp_path):
    import datasets
    ds = datasets.Dataset.from_dict({"messages": [[{"role": "user", "content": "a"}]]})
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match=r"splits \['test'\] but no 'train' split"):
        list(read_rows(tmp_path / "d"))


def bad_rows(tmp_path):
    """(rows, expected reason per line) covering each kind of bad row; line 1 is good."""
    png(tmp_path / "ok.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    img = {"type": "image", "path": "ok.png"}
    rows = [
        (conv(img), None),
        ('{"messages": [', "invalid JSON"),
        ({"text": "hi"}, "no 'messages'"),
        ({"messages": [{"role": "bot", "content": "x"}, {"role": "assistant", "content": "y"}]},
         "has role 'bot'"),
        (conv({"type": "image", "path": "missing.png"}), "image 1: image file not found: .*missing.png"),
        (conv({"type": "image", "path": "broken.png"}), "image 1: .*corrupt"),
        (conv({"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/x.png"}}), "could not fetch"),
        (conv(img, question="Is <image> red?"), "renders 2 <image> sentinels but has 1 images"),
        ({**conv({"type": "image"}, {"type": "image"}), "images": ["ok.png"]},
         "2 image parts without an image but 1 images"),
        ({"messages": [{"role": "user", "content": [img, {"type": "text", "text": "hi"}]}]}, "no assistant message"),
    ]
    return rows


def test_each_bad_row_is_reported_with_its_line_and_reason(processor, tmp_path):
    rows = bad_rows(tmp_path)
    path = write_jsonl(tmp_path / "train.jsonl", [r for r, _ in rows])
    with pytest.raises(DataError) as e:
        load_samples(path, processor, 4096, **KNOBS)
    msg = str(e.value)
    assert msg.startswith(f"{len(rows) - 1} bad rows in ")
    lines = msg.splitlines()[1:]
    assert len(lines) == len(rows) - 1
    for line, (n, (_, reason)) in zip(lines, [(n, r) for n, r in enumerate(rows, 1) if r[1]]):
        assert line.startswith(f"  train.jsonl line {n}: "), line
        assert re.search(reason, line), (reason, line)


def test_skip_bad_skips_and_counts(processor, tmp_path):
    rows = bad_rows(tmp_path)
    path = write_jsonl(tmp_path / "train.jsonl", [r for r, _ in rows])
    samples, skipped = load_samples(path, processor, 4096, skip_bad=True, **KNOBS)
    assert [s.where for s in samples] == ["train.jsonl line 1"]
    assert len(skipped) == len(rows) - 1 and skipped[0].startswith("train.jsonl line 2: invalid JSON")


def test_no_valid_row_is_an_error(processor, tmp_path):
    rows = bad_rows(tmp_path)[1:4]
    path = write_jsonl(tmp_path / "train.jsonl", [r for r, _ in rows])
    with pytest.raises(DataError, match="no valid row in .*train.jsonl:\n  train.jsonl line 1: invalid JSON"):
        load_samples(path, processor, 4096, skip_bad=True, **KNOBS)
    with pytest.raises(DataError, match="no valid row .*empty"):
        load_samples(write_jsonl(tmp_path / "empty.jsonl", []), processor, 4096, skip_bad=True)


def test_a_parquet_file_without_rows_is_empty_data(processor, tmp_path):
    import datasets

    datasets.Dataset.from_dict({"messages": []}).to_parquet(str(tmp_path / "none.parquet"))
    with pytest.raises(DataError, match=r"no valid row in .*none\.parquet \(it is empty\)"):
        load_samples(tmp_path / "none.parquet", processor, 4096)


def test_a_line_that_is_not_utf8_is_that_rows_error(processor, tmp_path):
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    path = tmp_path / "train.jsonl"
    path.write_bytes(good.encode() + b"\n\xff\xfe\n")
    samples, skipped = load_samples(path, processor, 4096, skip_bad=True, **KNOBS)
    assert len(samples) == 1
    assert skipped == ["train.jsonl line 2: not UTF-8 text (byte 0xff at column 1); expected JSON Lines"]


def test_a_byte_order_mark_opening_the_file_is_read_past(processor, tmp_path):
    """Editors on Windows write UTF-8 with a BOM: the first row is still a row (a BOM is not part of the JSON)."""
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    path = tmp_path / "train.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good.encode() + b"\n" + good.encode() + b"\n")
    samples, skipped = load_samples(path, processor, 4096, **KNOBS)
    assert len(samples) == 2 and skipped == []


def test_many_bad_rows_list_the_first_20_and_count_the_rest(processor, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", ["{"] * 25)
    with pytest.raises(DataError) as e:
        load_samples(path, processor, 4096)
    lines = str(e.value).splitlines()
    assert len(lines) == 22 and lines[20].startswith("  train.jsonl line 20:") and lines[21] == "  ... and 5 more"


def test_too_long_row_reports_its_token_count(processor, tmp_path):
    png(tmp_path / "ok.png")
    path = write_jsonl(tmp_path / "t.jsonl", [conv({"type": "image", "path": "ok.png"}), conv(answer="x" * 50)])
    samples, _ = load_samples(path, processor, 4096, **KNOBS)
    n = samples[0].length
    assert samples[1].length > n  # the second row is the longer one
    limit = samples[1].length - 1
    with pytest.raises(DataError, match=rf"t.jsonl line 2: {samples[1].length} tokens, over max_seq_len={limit}"):
        load_samples(path, processor, limit, **KNOBS)
    # the image knobs count: the first row's image tokens grow with max_image_tokens
    big, _ = load_samples(path, processor, 4096, min_image_tokens=16, max_image_tokens=64)
    assert big[0].length > n


def keys_of(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(int(u), int(t)) for u, t in zip(torch.randint(1, 4, (n,), generator=g),
                                              torch.randint(20, 200, (n,), generator=g))]


def test_order_is_deterministic_and_grouped():
    keys = keys_of(103)
    a, b = Order(keys, 4, seed=1), Order(keys, 4, seed=1)
    assert a.batches(0) == b.batches(0) and a.batches(0) != a.batches(1) != Order(keys, 4, seed=2).batches(1)
    batches = a.batches(0)
    assert len(batches) == a.batches_per_epoch == 26
    assert sorted(i for bt in batches for i in bt) == list(range(103))  # world 1: every sample once
    # each n_units value has ~34 samples -> at most one mixed batch per value, the rest uniform
    mixed = [bt for bt in batches if len({keys[i][0] for i in bt}) > 1]
    assert len(mixed) <= 2


def test_order_shards_are_disjoint_equal_and_cover_the_epoch():
    keys = keys_of(103)
    ranks = [Order(keys, 4, seed=3, rank=r, world_size=2) for r in range(2)]
    shards = [o.batches(0) for o in ranks]
    assert len(shards[0]) == len(shards[1]) == ranks[0].batches_per_epoch == 13
    seen = [i for s in shards for bt in s for i in bt]
    assert len(seen) == len(set(seen)) == 103  # disjoint and complete (the short last global batch has 7 >= 2)
    # rank slices of each global batch = the batches of one process with the global batch size
    single = Order(keys, 8, seed=3).batches(0)
    assert [a + b for a, b in zip(*shards)] == single
    # a short last global batch with fewer samples than ranks is dropped on every rank alike
    few = [Order(keys[:9], 4, seed=0, rank=r, world_size=2) for r in range(2)]
    assert [len(o.batches(0)) for o in few] == [1, 1] and few[0].batches_per_epoch == 1


def test_order_state_round_trip_resumes_at_the_same_batch():
    keys = keys_of(30)
    a = Order(keys, 4, seed=5)
    run = [a.next_batch() for _ in range(12)]  # crosses into epoch 1 (8 batches per epoch)
    b = Order(keys, 4, seed=5)
    for _ in range(5):
        b.next_batch()
    state = json.loads(json.dumps(b.state_dict()))
    c = Order(keys, 4, seed=5)
    c.load_state_dict(state)
    assert [c.next_batch() for _ in range(7)] == run[5:]
    assert (c.epoch, c.position) == (1, 4)
    assert list(Order(keys, 4, seed=5)) == run[:8]  # iterating gives one epoch
    with pytest.raises(ValueError, match="batch_size=4 but this run has 2"):
        Order(keys, 2, seed=5).load_state_dict(state)


def test_collate_pixels_equal_the_processor_and_the_model_accepts_the_batch(processor, tiny_checkpoint, tmp_path):
    """Two samples, one with a tiled image (2 tiles + thumbnail), one with two small images: the batch's pixel
    inputs equal processor(...) on the same conversations (pad_patches=False), right padding with the pad id, and
    the model's forward runs on it (its image-token check passes)."""
    knobs = {**KNOBS, "use_thumbnail": True}  # this checkpoint's default is no thumbnail
    png(tmp_path / "wide.png", (400, 200))
    png(tmp_path / "s1.png", (40, 40))
    png(tmp_path / "s2.png", (30, 50), (1, 2, 3))
    rows = [conv({"type": "image", "path": "wide.png"}, answer="A long red strip, really long."),
            conv({"type": "image", "path": "s1.png"}, {"type": "image", "path": "s2.png"})]
    samples, _ = load_samples(write_jsonl(tmp_path / "t.jsonl", rows), processor, 4096, **knobs)
    assert [s.n_units for s in samples] == [3, 2]
    batch = collate(samples, processor, **knobs)
    texts = [processor.apply_chat_template(conv({"type": "image"})["messages"]),
             processor.apply_chat_template(conv({"type": "image"}, {"type": "image"})["messages"])]
    ref = processor(text=texts, images=[[str(tmp_path / "wide.png")], [str(tmp_path / "s1.png"),
                                                                        str(tmp_path / "s2.png")]],
                    pad_patches=False, **knobs)
    for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes"):
        assert torch.equal(getattr(batch, k), ref[k]), k
    short = samples[1].length
    assert batch.input_ids.shape == (2, samples[0].length) and batch.n_samples == 2
    assert torch.equal(batch.input_ids[1, :short], samples[1].ids)
    assert (batch.input_ids[1, short:] == processor.tokenizer.pad_token_id).all()
    assert batch.attention_mask.sum(1).tolist() == [samples[0].length, short]
    assert (batch.labels[1, short - 1:] == IGNORE).all()
    from lfm2vl.loading import load_model
    model = load_model(tiny_checkpoint, dtype="float32")[0]
    with torch.no_grad():
        logits = model(**batch.model_inputs())
    assert logits.shape[:2] == batch.input_ids.shape and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="image knobs the samples were made with"):
        collate(samples, processor, min_image_tokens=16, max_image_tokens=64)


def test_sample_reloads_dataset_images_lazily(processor, tmp_path):
    """A dataset row's sample keeps a reader of its row, not decoded images."""
    import datasets
    ds_rows, _ = trl_rows(tmp_path)
    datasets.Dataset.from_dict(ds_rows).save_to_disk(str(tmp_path / "saved"))
    samples, _ = load_samples(tmp_path / "saved", processor, 4096, **KNOBS)
    assert callable(samples[1].images)
    assert all(isinstance(x, bytes) for x in samples[1].load_images()) and samples[1].n_images == 2
    assert isinstance(samples[0], Sample)
