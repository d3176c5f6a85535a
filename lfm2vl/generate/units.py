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


def features_from(model, req: Request, units: list[Unit], p: int, device) -> torch.Tensor | None:
    """Image features of the placeholder tokens at positions >= p (units entirely before p are not encoded)."""
    first = next((u for u, (s, n, _, _) in enumerate(units) if s + n > p), None)
    if first is None:
        return None
    sel = slice(first, len(units))
    feats = model.image_features(req.pixel_values[sel].to(device), req.pixel_attention_mask[sel].to(device),
                                 req.spatial_shapes[sel].to(device))
    return feats[max(0, p - units[first][0]):]  # a unit split by p: keep the tokens after p
