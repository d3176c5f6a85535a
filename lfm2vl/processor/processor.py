"""`Processor`: prompts and images -> the tensors LFM2-VL takes, exactly as transformers' Lfm2VlProcessor.

    proc = Processor.from_pretrained("LiquidAI/LFM2-VL-450M")          # or a local folder
    text = proc.apply_chat_template(messages, add_generation_prompt=True)
    batch = proc(text=text, images=[image], max_image_tokens=256)       # knobs per call
    batch["input_ids"], batch["pixel_values"], ...

Outputs (same names, shapes and dtypes as transformers): input_ids / attention_mask (B, T) int64, padded with the
pad id on the tokenizer's padding side (right, as in transformers); pixel_values (N, max_num_patches, 3*p*p) float32,
pixel_attention_mask (N, max_num_patches) int32 and spatial_shapes (N, 2) int64 over all units of all images.

Deliberate differences, where transformers raises or produces inputs its own model rejects: batches are padded
without asking (transformers needs padding=True), nothing is ever truncated (a cut prompt would lose image tokens
its pixel inputs still carry, so truncation=True and a prompt longer than max_length are errors), a flat image list
is shared out over the prompts by their sentinel counts (transformers expects one nested list per prompt), the
min_tiles=1 placeholder count (tokens.py), and the input conversions listed in io.py. Everything else is
bit-identical (tests/test_processor_parity.py).
"""
from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from lfm2vl.processor import chat
from lfm2vl.processor.config import KNOBS, ProcessorSettings, load_settings
from lfm2vl.processor.escape import Escaper
from lfm2vl.processor.image import ImageLayout, image_units, patchify_into, plan_image
from lfm2vl.processor.io import load_image
from lfm2vl.processor.messages import check_text, collect_images
from lfm2vl.processor.tokenizer import Tokenizer, pick_template
from lfm2vl.processor.tokens import ImageTokens, expand_image, layout_token_counts

CONFIG_PATTERNS = ["*.json", "*.jinja", "*.txt", "*.model"]


class BatchFeature(dict):
    """A dict of tensors with `.to(device)` and attribute access."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as e:
            raise AttributeError(name) from e

    def to(self, device=None, dtype=None) -> "BatchFeature":
        out = BatchFeature()
        for k, v in self.items():
            if isinstance(v, torch.Tensor):
                v = v.to(device=device, dtype=dtype if (dtype is not None and v.is_floating_point()) else None)
            out[k] = v
        return out


def resolve_folder(name_or_path: str | os.PathLike, revision: str | None = None, cache_dir: str | None = None,
                   local_files_only: bool = False) -> Path:
    """A local folder as is; otherwise a hub id fetched (config and tokenizer files only) via huggingface_hub's
    cache. Offline with nothing cached raises a ValueError saying so."""
    p = Path(name_or_path)
    if p.is_dir():
        return p
    if p.exists() or str(name_or_path).startswith((".", "/", "~")) or str(name_or_path).count("/") != 1:
        raise ValueError(f"{name_or_path!r} is neither a checkpoint folder nor a hub id like 'LiquidAI/LFM2-VL-450M'")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=CONFIG_PATTERNS,
                                      cache_dir=cache_dir, local_files_only=True))
    except Exception as e:
        if local_files_only:
            raise ValueError(f"{name_or_path!r} is not in the local huggingface_hub cache "
                             f"(local_files_only=True): {type(e).__name__}") from e
    try:
        return Path(snapshot_download(str(name_or_path), revision=revision, allow_patterns=CONFIG_PATTERNS,
                                      cache_dir=cache_dir))
    except Exception as e:
        raise ValueError(f"could not get {name_or_path!r}: it is not in the local huggingface_hub cache and "
                         f"downloading failed ({type(e).__name__}: {e}). Offline, pass a local folder or "
                         "download it first.") from e


PAD_LONGEST = (True, "longest")
PAD_NONE = (False, "do_not_pad")
NO_TRUNCATION = (False, None, "do_not_truncate")


def _one_of(value, options) -> bool:
    """value is one of options: bools and None by identity (so 1 is not True), strings by equality (which also
    admits transformers' str enums such as PaddingStrategy.LONGEST)."""
    return any(value is o or (isinstance(o, str) and isinstance(value, str) and value == o) for o in options)


def check_text_options(padding, truncation, max_length) -> None:
    """transformers' padding / truncation / max_length arguments: a ValueError for what lfm2vl cannot honour."""
    if not _one_of(padding, (*PAD_LONGEST, *PAD_NONE, "max_length")):
        raise ValueError(f"padding={padding!r}: expected True or 'longest' (pad to the longest prompt), False or "
                         "'do_not_pad', or 'max_length' (with max_length)")
    if not _one_of(truncation, NO_TRUNCATION):
        raise ValueError(f"truncation={truncation!r} is not supported: cutting a prompt would drop image tokens "
                         "that its pixel inputs still carry; shorten the prompt or lower max_image_tokens instead")
    if _one_of(padding, ("max_length",)):
        if max_length is None:
            raise ValueError("padding='max_length' needs max_length (the length to pad every prompt to)")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 1:
            raise ValueError(f"max_length={max_length!r}: expected an int >= 1")
    elif max_length is not None:
        raise ValueError(f"max_length={max_length!r} applies only with padding='max_length' (lfm2vl never "
                         f"truncates); got padding={padding!r}")


def padded_length(ids: list[list[int]], padding, max_length: int | None) -> int:
    """The common length of the padded rows, for options that passed check_text_options."""
    lengths = [len(x) for x in ids]
    if _one_of(padding, ("max_length",)):
        if max(lengths) > max_length:
            raise ValueError(f"a prompt is {max(lengths)} tokens long, over max_length={max_length} (lfm2vl never "
                             "truncates: raise max_length or shorten the prompt)")
        return max_length
    if _one_of(padding, PAD_NONE) and len(set(lengths)) > 1:
        raise ValueError(f"padding={padding!r}: the prompts are {lengths} tokens long and tensors need equal "
                         "lengths; pass padding=True to pad them to the longest")
    return max(lengths)


class Processor:
    """Tokenizer + chat template + image processing of one checkpoint. `settings.image` holds the default knobs;
    every call may override them: min_image_tokens, max_image_tokens, do_image_splitting, min_tiles, max_tiles,
    use_thumbnail, max_pixels_tolerance, tile_size, resample."""

    def __init__(self, tokenizer: Tokenizer, settings: ProcessorSettings | None = None,
                 chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.settings = settings or ProcessorSettings()
        self.settings.image.validate()
        self.chat_template = chat_template if chat_template is not None else tokenizer.chat_template
        t = tokenizer
        self.marks = ImageTokens(
            image=t.attr_token("image_token", "<image>"),
            start=t.attr_token("image_start_token", "<|image_start|>"),
            end=t.attr_token("image_end_token", "<|image_end|>"),
            thumbnail=t.attr_token("image_thumbnail_token", "<|img_thumbnail|>"))
        self.image_token_id = t.token_to_id(self.marks.image)
        if self.image_token_id is None:
            raise ValueError(f"the tokenizer has no image token {self.marks.image!r}")
        special = t.special_ids
        marks = (self.marks.image, self.marks.start, self.marks.end, self.marks.thumbnail)
        self.escaper = Escaper([*special, *marks], special)
        self.padding_side = t.padding_side

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, revision: str | None = None,
                        cache_dir: str | None = None, local_files_only: bool = False, **knobs) -> "Processor":
        """Load from a checkpoint folder or a hub id (only config/tokenizer files are fetched). Knobs given here
        become this processor's defaults."""
        folder = resolve_folder(name_or_path, revision, cache_dir, local_files_only)
        settings = load_settings(folder)
        if knobs:
            settings = replace(settings, image=settings.image.with_knobs(**knobs))
        return cls(Tokenizer.from_folder(folder), settings)

    # ---- image side -------------------------------------------------------------------------------------------
    def options(self, **knobs):
        return self.settings.image.with_knobs(**knobs) if knobs else self.settings.image

    def image_layout(self, width: int, height: int, **knobs) -> ImageLayout:
        if width < 1 or height < 1:
            raise ValueError(f"zero-sized image ({width}x{height} pixels)")
        return plan_image(height, width, self.options(**knobs))

    def num_image_tokens(self, width: int, height: int, include_markers: bool = False, **knobs) -> int:
        """`<image>` placeholders (= vision features) an image of width x height takes; with include_markers, the
        total ids its expansion takes (start/end, tile and thumbnail markers)."""
        o = self.options(**knobs)
        layout = plan_image(height, width, o) if width >= 1 and height >= 1 else self.image_layout(width, height)
        n = sum(layout_token_counts(layout, o.encoder_patch_size, o.downsample_factor))
        if include_markers:
            text = expand_image(layout, o.encoder_patch_size, o.downsample_factor, self.marks,
                                self.settings.use_image_special_tokens)
            n = len(self.tokenizer.encode(text))
        return n

    def process_images(self, images: list, special: bool | None = None, pad_patches: bool = True,
                       **knobs) -> tuple[dict, list[ImageLayout]]:
        """Flat list of images -> pixel tensors over all their units, and each image's layout. The patch axis is
        max_num_patches long (transformers' shape), or with pad_patches=False as long as the largest unit needs."""
        o = self.options(**knobs)
        mean = torch.tensor(o.image_mean, dtype=torch.float32)
        std = torch.tensor(o.image_std, dtype=torch.float32)
        if o.do_rescale and o.do_normalize:  # the reference folds 1/rescale_factor into mean and std
            mean, std = mean * (1.0 / o.rescale_factor), std * (1.0 / o.rescale_factor)
        scale = None if o.do_normalize else (o.rescale_factor if o.do_rescale else 1.0)
        loaded = [load_image(img) for img in images]
        layouts = [plan_image(x.shape[1], x.shape[2], o) for x in loaded]
        for layout in layouts:
            self._check_markers(layout, special)
        p = o.encoder_patch_size
        sizes = [hw for layout in layouts for hw in layout.unit_sizes()]
        width = o.max_num_patches
        if not pad_patches:  # an oversized unit still meets patchify's check against max_num_patches
            width = min(width, max((h // p) * (w // p) for h, w in sizes))
        pv = torch.zeros(len(sizes), width, 3 * p * p, dtype=torch.float32)
        mask = torch.zeros(len(sizes), width, dtype=torch.int32)
        shapes, i = [], 0
        for x, layout in zip(loaded, layouts):
            for k, piece in enumerate(image_units(x, layout, o.resample)):
                tiles = (layout.rows, layout.cols) if layout.tiled and k == 0 else None
                grids = patchify_into(pv[i:], mask[i:], piece, tiles, p, mean, std, scale)
                shapes += grids
                i += len(grids)
        return {"pixel_values": pv, "pixel_attention_mask": mask,
                "spatial_shapes": torch.tensor(shapes, dtype=torch.int64).reshape(-1, 2)}, layouts

    # ---- text side --------------------------------------------------------------------------------------------
    def apply_chat_template(self, messages, add_generation_prompt: bool = False, tokenize: bool = False,
                            tools=None, documents=None, chat_template: str | None = None,
                            continue_final_message: bool = False, escape_special: bool = False,
                            tool_format: bool = False, **kwargs):
        """The rendered prompt (a string), as transformers renders it. A list of conversations gives a list.
        tokenize=True returns the processor output for the prompt and the conversation's images instead.

        escape_special=True keeps special-token strings (<|im_start|>, <image>, ...) inside the messages, tools and
        documents plain text: they are replaced by private-use placeholders (escape.py), so the rendered string is
        meant for `processor(text=..., escaped=True)`, which tokenizes them as ordinary text; only the template's
        own markers and the image expansion become control tokens. Use it for untrusted (client) content.
        tool_format=True applies LFM2's tool format (tools.py) as the engine does; by default the template alone
        renders tools and tool calls, as in transformers."""
        knobs = {k: kwargs.pop(k) for k in list(kwargs) if k in KNOBS}
        template = pick_template(chat_template or self.chat_template, tools)
        batched = isinstance(messages, (list, tuple)) and messages and isinstance(messages[0], (list, tuple))
        convs = list(messages) if batched else [messages]
        escape = self.escaper.escape_data if escape_special else None
        texts = [chat.render(template, c, self.tokenizer.special_tokens, add_generation_prompt, tools, documents,
                             continue_final_message, escape=escape, tool_format=tool_format, **kwargs)
                 for c in convs]
        if not tokenize:
            return texts if batched else texts[0]
        images = [collect_images(c) for c in convs]
        return self(text=texts, images=images if any(images) else None, escaped=escape_special, **knobs)

    def expand(self, text: str, layouts: list[ImageLayout], special: bool | None = None, **knobs) -> str:
        """Replace each image sentinel of `text` by its expansion, in order."""
        o = self.options(**knobs)
        pieces = text.split(self.marks.image)
        if len(pieces) - 1 != len(layouts):
            raise ValueError(f"the prompt has {len(pieces) - 1} {self.marks.image} sentinels but {len(layouts)} "
                             "images were given for it")
        out = [pieces[0]]
        for layout, piece in zip(layouts, pieces[1:]):
            out.append(self._expansion(layout, o, special))
            out.append(piece)
        return "".join(out)

    def _check_markers(self, layout: ImageLayout, special: bool | None = None) -> None:
        if (self.settings.use_image_special_tokens if special is None else special) and layout.tiled:
            for r in range(1, layout.rows + 1):
                for c in range(1, layout.cols + 1):
                    if self.tokenizer.token_to_id(self.marks.tile(r, c)) is None:
                        raise ValueError(f"a {layout.rows}x{layout.cols} tile grid needs the marker "
                                         f"{self.marks.tile(r, c)!r}, which the vocabulary lacks; lower max_tiles")

    def _expansion(self, layout: ImageLayout, o, special: bool | None = None) -> str:
        special = self.settings.use_image_special_tokens if special is None else special
        self._check_markers(layout, special)
        return expand_image(layout, o.encoder_patch_size, o.downsample_factor, self.marks, special)

    def __call__(self, images=None, text=None, return_tensors: str | None = "pt", padding_side: str | None = None,
                 use_image_special_tokens: bool | None = None, escaped: bool = False, pad_patches: bool = True,
                 padding: bool | str = True, truncation: bool | str | None = None, max_length: int | None = None,
                 **knobs) -> BatchFeature:
        """Prompts (a string or list of strings with image sentinels) and their images (one, a flat list, or one
        list per prompt) -> BatchFeature. The argument order is transformers' (images first); pass keywords.
        As in transformers, special-token strings in the text are control tokens; escaped=True is for prompts
        from apply_chat_template(escape_special=True), whose escaped strings are tokenized as ordinary text.
        pad_patches=False sizes pixel_values by the largest image unit instead of the token budget (the model
        reads only real patches, so its output is the same).

        transformers' text arguments: padding True / "longest" (the default here) pads to the longest prompt,
        False / "do_not_pad" leaves prompts as they are (prompts of different lengths are then an error, since
        tensors need equal lengths), "max_length" pads to `max_length`. truncation may only be off (False, None,
        "do_not_truncate"). return_tensors "pt" (or None) gives torch tensors, "np" numpy arrays."""
        if return_tensors not in ("pt", "np", None):
            raise ValueError(f"return_tensors={return_tensors!r}: expected 'pt' (torch tensors) or 'np' (numpy "
                             "arrays)")
        check_text_options(padding, truncation, max_length)
        if text is None:
            raise ValueError("text is required (minimal text for an image is the sentinel " + self.marks.image +
                             "); as in transformers the first positional argument is `images`, so pass text=...")
        texts = [text] if isinstance(text, str) else list(text)
        if not texts or not all(isinstance(t, str) for t in texts):
            raise ValueError("text must be a string or a non-empty list of strings")
        for k, t in enumerate(texts):
            check_text(t, "text" if isinstance(text, str) else f"text[{k}]")
        per_sample = self._group_images(texts, images)
        out = BatchFeature()
        flat = [im for group in per_sample for im in group]
        layouts: list[ImageLayout] = []
        if flat:
            pixels, layouts = self.process_images(flat, use_image_special_tokens, pad_patches, **knobs)
        else:
            self.options(**knobs)  # validate knobs even without images
        it = iter(layouts)
        expanded = [self.expand(t, [next(it) for _ in group], use_image_special_tokens, **knobs)
                    for t, group in zip(texts, per_sample)]
        if escaped:
            tok = self.tokenizer
            ids = [self.escaper.encode(t, tok.encode, tok.encode_plain) for t in expanded]
        else:
            ids = self.tokenizer.encode_batch(expanded)
        out.update(self._pad(ids, padding_side or self.padding_side, padded_length(ids, padding, max_length)))
        if flat:
            out.update(pixels)
        if return_tensors == "np":
            for k, v in out.items():
                out[k] = v.numpy()
        return out

    def _group_images(self, texts: list[str], images) -> list[list]:
        counts = [t.count(self.marks.image) for t in texts]
        if images is None:
            if any(counts):
                raise ValueError(f"the prompts have {counts} {self.marks.image} sentinels but no images were given")
            return [[] for _ in texts]
        if isinstance(images, (list, tuple)) and images and all(isinstance(g, (list, tuple)) for g in images):
            groups = [list(g) for g in images]
            if len(groups) != len(texts):
                raise ValueError(f"got {len(groups)} image lists for {len(texts)} prompts")
        else:
            flat = list(images) if isinstance(images, (list, tuple)) else [images]
            if len(flat) != sum(counts):
                raise ValueError(f"the prompts have {sum(counts)} {self.marks.image} sentinels in total but "
                                 f"{len(flat)} images were given")
            groups, i = [], 0
            for c in counts:
                groups.append(flat[i:i + c])
                i += c
        for n, (c, g) in enumerate(zip(counts, groups)):
            if c != len(g):
                raise ValueError(f"prompt {n} has {c} {self.marks.image} sentinels but {len(g)} images were given")
        return groups

    def _pad(self, ids: list[list[int]], side: str, n: int) -> dict:
        """Rows of ids -> (B, n) input_ids and attention_mask, padded with the pad id on `side`."""
        if side not in ("left", "right"):
            raise ValueError(f"padding_side={side!r}: expected 'left' or 'right'")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        input_ids = torch.full((len(ids), n), pad, dtype=torch.int64)
        mask = torch.zeros((len(ids), n), dtype=torch.int64)
        for i, x in enumerate(ids):
            sl = slice(0, len(x)) if side == "right" else slice(n - len(x), n)
            input_ids[i, sl] = torch.tensor(x, dtype=torch.int64)
            mask[i, sl] = 1
        return {"input_ids": input_ids, "attention_mask": mask}

    # ---- training ---------------------------------------------------------------------------------------------
    def render_for_training(self, messages, images=None, tools=None, return_pixels: bool = False, **kwargs):
        """(ids, loss_mask) for one conversation: 1-D int64 ids of the rendered conversation (images expanded; the
        images come from the messages' image parts unless given) and a bool mask, True exactly on the tokens of
        the assistant turns (reply and end-of-turn token; not the role header, not other roles). Image knobs and
        template variables (e.g. keep_past_thinking=True for templates that drop past reasoning, which otherwise
        cannot be located turn by turn) may be passed. return_pixels=True adds a third item: the dict of
        pixel_values / pixel_attention_mask / spatial_shapes for the conversation's images (None without images)."""
        knobs = {k: kwargs.pop(k) for k in list(kwargs) if k in KNOBS}
        text, spans = chat.assistant_spans(pick_template(self.chat_template, tools), messages,
                                           self.tokenizer.special_tokens,
                                           tools=tools, **kwargs)
        imgs = collect_images(messages) if images is None else list(images)
        if text.count(self.marks.image) != len(imgs):
            raise ValueError(f"the conversation renders {text.count(self.marks.image)} {self.marks.image} sentinels "
                             f"but has {len(imgs)} images")
        o = self.options(**knobs)
        pixels = None
        if imgs and return_pixels:
            pixels, layouts = self.process_images(imgs, **knobs)
        else:
            layouts = [plan_image(x.shape[1], x.shape[2], o) for x in map(load_image, imgs)]
        # Expand piecewise, moving span boundaries by the length each expansion adds before them.
        pieces = text.split(self.marks.image)
        out, shifts, pos = [pieces[0]], [], len(pieces[0])
        for layout, piece in zip(layouts, pieces[1:]):
            e = self._expansion(layout, o)
            shifts.append((pos, len(e) - len(self.marks.image)))
            out += [e, piece]
            pos += len(self.marks.image) + len(piece)
        full = "".join(out)

        def moved(p):
            return p + sum(d for at, d in shifts if at < p)
        spans = [(moved(a), moved(b)) for a, b in spans]
        enc = self.tokenizer.backend.encode(full, add_special_tokens=False)
        mask = [any(s < e and a < b and s < b and e > a for a, b in spans) for s, e in enc.offsets]
        ids, mask = torch.tensor(enc.ids, dtype=torch.int64), torch.tensor(mask, dtype=torch.bool)
        return (ids, mask, pixels) if return_pixels else (ids, mask)
