"""A request's image units as the generation loop sees them: where their placeholder tokens sit, a digest of their
pixels (prefix reuse compares digests, so rows need not keep pixel tensors), and their features from a position on."""
from __future__ import annotations

import hashlib

import torch

from ..processor.tokens import unit_tokens
from .request import Request

Unit = tuple[int, int, tuple[int, int], bytes]  # (first token position, token count, (h, w) patches, pixel digest)


def digest(pixels: torch.Tensor) -> bytes:
    """A content hash of one unit's patch rows (dtype and shape included)."""
    t = pixels.detach().to("cpu").contiguous()
    h = hashlib.blake2b(f"{t.dtype}{tuple(t.shape)}".encode(), digest_size=16)
    h.update(t.view(torch.uint8).numpy() if t.numel() else b"")
    return h.digest()


def unit_counts(req: Request, factor: int) -> list[int]:
    """The number of <image> tokens of each unit."""
    if req.spatial_shapes is None:
        return []
    return [unit_tokens(int(h), int(w), factor) for h, w in req.spatial_shapes.tolist()]


def check_images(req: Request, image_token_id: int, factor: int) -> None:
    """ValueError when the prompt's <image> tokens and the pixel inputs' features disagree in number."""
    n_img = sum(1 for i in req.input_ids if i == image_token_id)
    counts = unit_counts(req, factor)
    if n_img != sum(counts):
        raise ValueError(f"the prompt has {n_img} <image> tokens but its pixel inputs give {sum(counts)} "
                         f"features ({len(counts)} image units); prompt and images disagree")


def image_units(req: Request, image_token_id: int, factor: int) -> list[Unit]:
    """Per image unit: (first token position, token count, (h, w) patches, digest of its valid patch rows)."""
    counts = unit_counts(req, factor)
    if not counts:
        return []
    pos = [i for i, t in enumerate(req.input_ids) if t == image_token_id]
    out, c = [], 0
    for u, (n, (h, w)) in enumerate(zip(counts, req.spatial_shapes.tolist())):
        out.append((pos[c], n, (int(h), int(w)), digest(req.pixel_values[u, :int(h) * int(w)])))
        c += n
    return out


# Pixel rows (patches) one vision pass takes at most: requests placed together are encoded together up to this
# many, so a burst of tiled images does not copy all of their pixels at once (one request always goes whole).
VISION_PASS_PATCHES = 8192


def features_from(model, wanted: list[tuple[Request, list[Unit], int]], factor: int,
                  device) -> list[torch.Tensor | None]:
    """For each (request, its units, p): the image features of its placeholder tokens at positions >= p (units
    entirely before p are not encoded). The units of several requests go through one vision pass (their pixel rows
    padded to a common length; the tower batches units of equal size whichever request they come from), up to
    VISION_PASS_PATCHES pixel rows a pass."""
    picked = []  # (request, index of its first unit to encode, tokens of its first unit to skip)
    for req, units, p in wanted:
        first = next((u for u, (s, n, _, _) in enumerate(units) if s + n > p), None)
        picked.append(None if first is None else (req, first, max(0, p - units[first][0])))
    todo = [x for x in picked if x is not None]
    parts: list[torch.Tensor] = []
    while todo:
        group, rows = [], 0
        while todo and (not group or rows + _rows(todo[0]) <= VISION_PASS_PATCHES):
            rows += _rows(todo[0])
            group.append(todo.pop(0))
        L = max(r.pixel_values.shape[1] for r, _, _ in group)
        pixels = _cat([_pad_rows(r.pixel_values[f:], L) for r, f, _ in group])
        mask = _cat([_pad_rows(r.pixel_attention_mask[f:], L) for r, f, _ in group])
        shapes = _cat([r.spatial_shapes[f:] for r, f, _ in group])
        feats = model.image_features(pixels.to(device), mask.to(device), shapes.to(device))
        parts += feats.split([sum(unit_counts(r, factor)[f:]) for r, f, _ in group])
    it = iter(parts)
    return [None if x is None else next(it)[x[2]:] for x in picked]  # a unit split by p: keep the tokens after p


def _rows(item: tuple[Request, int, int]) -> int:
    """Pixel rows of a request's units from its first one to encode."""
    req, first, _ = item
    return (req.pixel_values.shape[0] - first) * req.pixel_values.shape[1]


def _cat(ts: list[torch.Tensor]) -> torch.Tensor:
    """The tensors concatenated; one request's alone, not copied."""
    return ts[0] if len(ts) == 1 else torch.cat(ts)


def _pad_rows(t: torch.Tensor, L: int) -> torch.Tensor:
    """Units' patch rows (n, L_t, ...) padded with zeros to L rows (padding rows are masked out)."""
    return t if t.shape[1] == L else torch.nn.functional.pad(t, (0, 0) * (t.dim() - 2) + (0, L - t.shape[1]))
