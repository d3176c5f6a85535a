"""SigLIP2 NaFlex vision tower, mirroring transformers 5.24 `Siglip2VisionModel` as LFM2-VL uses it.

Module paths equal the checkpoint keys under `model.vision_tower.`: `embeddings.{patch_embedding, position_embedding}`,
`encoder.layers.{j}.{layer_norm1, self_attn.{q,k,v,out}_proj, layer_norm2, mlp.{fc1, fc2}}`, `post_layernorm`.

Notable features:
- no wasted work on padding: units are grouped by patch count L (tiles are all 32x32, a thumbnail is its own group)
  and each group runs through the whole encoder as dense (n*L, Dv) batches of real patches only (n units at a time,
  n*L <= `VisionTower.batch_patches` where possible, which bounds peak memory), attention being one unmasked SDPA
  over (n, H, L, Dh). Nothing crosses units except inside attention, so this equals transformers'
  padded, key-masked computation (masked keys get exactly zero weight) up to float rounding.
- plain PyTorch (F.linear, SDPA): on CPU, `optimize_for_cpu` swaps in subclasses (lfm2vl/cpu/vision.py) whose
  linears fuse bias, GELU and residual add in oneDNN, whose bf16 attention runs natively where that beats torch's
  SDPA, and whose position grids are cached.
- only `num_layers_used` encoder layers are built (`vision_feature_layer`); post_layernorm still applies.
- the 16x16 position grid is resized per unit with bilinear + antialias (align_corners=False) in float32.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .linear import linear

_ACTIVATIONS = {"gelu_pytorch_tanh": "tanh", "gelu": "none"}  # hidden_act -> F.gelu(approximate=...)

class VisionEmbeddings(nn.Module):
    """Patch linear + per-unit resized position grid."""

    linear = staticmethod(linear)

    def __init__(self, config: VisionConfig):
        super().__init__()
        p = config.patch_size
        self.grid = int(config.num_patches ** 0.5)
        self.patch_embedding = nn.Linear(config.num_channels * p * p, config.hidden_size)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def _resize(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        table = self.position_embedding.weight
        grid = table.float().reshape(self.grid, self.grid, -1).permute(2, 0, 1)[None]  # (1, Dv, G, G)
        out = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False, antialias=True)
        return out[0].flatten(1).t().to(dtype)  # (h*w, Dv), row-major over (row, col)

    def positions(self, h: int, w: int, dtype: torch.dtype) -> torch.Tensor:
        """Position embeddings (h*w, Dv) for an h x w patch grid."""
        return self._resize(h, w, dtype)

    def forward(self, patches: torch.Tensor, shapes: list[tuple[int, int]]) -> torch.Tensor:
        """patches (n*L, 3*p*p): the valid patches of n units with grids `shapes` (h*w = L each) -> (n*L, Dv)."""
        dtype = self.patch_embedding.weight.dtype
        pos = [self.positions(h, w, dtype) for h, w in shapes]
        return self.linear(self.patch_embedding, patches.to(dtype), residual=pos[0] if len(pos) == 1 else torch.cat(pos))


class Attention(nn.Module):
    """Bidirectional multi-head attention within each of n units of L real patches: one dense, unmasked SDPA."""

    linear = staticmethod(linear)

    def __init__(self, config: VisionConfig):
        super().__init__()
        D = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj, self.k_proj = nn.Linear(D, D), nn.Linear(D, D)
        self.v_proj, self.out_proj = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, x: torch.Tensor, n: int, residual: torch.Tensor) -> torch.Tensor:
        """x (n*L, Dv) -> residual + out_proj(attention)."""
        q, k, v = self.project(x)  # (n*L, Dv) each
        shape = (n, x.shape[0] // n, self.num_heads, self.head_dim)
        q, k, v = (t.view(shape).transpose(1, 2) for t in (q, k, v))  # (n, H, L, Dh)
        o = self.attend(q, k, v).reshape(x.shape)
        return self.linear(self.out_proj, o, residual=residual)  # (n*L, Dv)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return tuple(self.linear(f, x) for f in (self.q_proj, self.k_proj, self.v_proj))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (n, H, L, Dh) -> attention output laid out (n, L, H, Dh) (any view that reshapes so)."""
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2)  # scale Dh^-0.5 as in SigLIP2


class MLP(nn.Module):
    linear = staticmethod(linear)

    def __init__(self, config: VisionConfig):
        super().__init__()
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"vision hidden_act {config.hidden_act!r} is not supported; "
                             f"expected one of {sorted(_ACTIVATIONS)}")
        self.approximate = _ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """Returns residual + fc2(gelu(fc1(x)))."""
        return self.linear(self.fc2, self.linear(self.fc1, x, gelu=self.approximate), residual=residual)


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        D, eps = config.hidden_size, config.layer_norm_eps
        self.layer_norm1, self.layer_norm2 = nn.LayerNorm(D, eps=eps), nn.LayerNorm(D, eps=eps)
        self.self_attn, self.mlp = Attention(config), MLP(config)

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        x = self.self_attn(self.layer_norm1(x), n, residual=x)
        return self.mlp(self.layer_norm2(x), residual=x)


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        # vision_feature_layer: layers beyond num_layers_used are never run (the loader drops their weights)
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_layers_used))

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, n)
        return x


class VisionTower(nn.Module):
    """SigLIP2 NaFlex encoder: forward(pixel_values, pixel_attention_mask, spatial_shapes) -> list of (h*w, Dv)."""

    # Units per encoder batch: as many as fit in this many patch rows (at least one). Results do not depend on it;
    # it bounds the temporaries (the MLP's (rows, intermediate) activation is 4x the hidden state) and so peak memory.
    # 1024 rows hold one 512x512 tile (the largest unit the processor makes): a tiled image's batches then cost a
    # few % more vision time than batches of two tiles (each batch reads every layer's weights once more) for a
    # lower and steadier peak.
    batch_patches = 1024

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = VisionEmbeddings(config)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, pixel_values: torch.Tensor, pixel_attention_mask: torch.Tensor,
                spatial_shapes: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values (N, L, 3*p*p); pixel_attention_mask (N, L), 1 = real patch; spatial_shapes (N, 2) = (h, w).

        Returns one (h*w, Dv) tensor per unit, in unit order: post_layernorm output of its valid patches, row-major.
        """
        shapes = self.check(pixel_values, pixel_attention_mask, spatial_shapes)
        out: list[torch.Tensor] = [None] * len(shapes)  # type: ignore[list-item]
        for units in self.batches(shapes):
            for u, piece in zip(units, self.encode(pixel_values, units, shapes)):
                out[u] = piece
        return out

    def batches(self, shapes: list[tuple[int, int]]) -> list[list[int]]:
        """The units of each encoder batch, in run order: units grouped by patch count (each group runs dense, no
        padding), as many to a batch as fit in `batch_patches` rows (at least one)."""
        groups: dict[int, list[int]] = {}
        for u, (h, w) in enumerate(shapes):
            groups.setdefault(h * w, []).append(u)
        out = []
        for L, group in groups.items():
            step = max(1, self.batch_patches // L)
            out += [group[i:i + step] for i in range(0, len(group), step)]
        return out

    def encode(self, pixel_values: torch.Tensor, units: list[int], shapes: list[tuple[int, int]]) -> torch.Tensor:
        """One batch of units with the same patch count L -> (n, L, Dv) post_layernorm outputs (pixels are cast to
        the weights' dtype here, one batch at a time)."""
        n, L = len(units), shapes[units[0]][0] * shapes[units[0]][1]
        if units[-1] - units[0] == n - 1:  # adjacent units (tiles): a view, no gather
            patches = pixel_values[units[0]:units[-1] + 1, :L]
        else:
            patches = pixel_values[units, :L]
        x = self.embeddings(patches.reshape(n * L, -1), [shapes[u] for u in units])  # (n*L, Dv)
        return self.post_layernorm(self.encoder(x, n)).view(n, L, -1)

    def check(self, pixel_values: torch.Tensor, mask: torch.Tensor, spatial_shapes: torch.Tensor) -> list[tuple]:
        """The units' (h, w) grids; a clear error when the three inputs disagree with each other or the config."""
        p, c = self.config.patch_size, self.config.num_channels
        if pixel_values.dim() != 3 or pixel_values.shape[-1] != c * p * p:
            raise ValueError(f"pixel_values must be (units, patches, {c * p * p}); got {tuple(pixel_values.shape)}")
        N, L = pixel_values.shape[:2]
        if N == 0:
            raise ValueError("pixel_values holds no image units")
        if tuple(mask.shape) != (N, L):
            raise ValueError(f"pixel_attention_mask must be {(N, L)} to match pixel_values; got {tuple(mask.shape)}")
        if tuple(spatial_shapes.shape) != (N, 2):
            raise ValueError(f"spatial_shapes must be {(N, 2)}; got {tuple(spatial_shapes.shape)}")
        shapes = [(int(h), int(w)) for h, w in spatial_shapes.tolist()]
        for u, (h, w) in enumerate(shapes):
            if h <= 0 or w <= 0 or h * w > L:
                raise ValueError(f"unit {u}: spatial_shapes ({h}, {w}) needs 1..{L} patches, got {h * w}")
        # The valid patches must be exactly the first h*w rows (the processor's layout).
        n = spatial_shapes.to(mask.device).prod(-1)
        expected = torch.arange(L, device=mask.device)[None] < n[:, None]
        if not torch.equal(mask.bool(), expected):
            bad = (mask.bool() != expected).any(-1).nonzero()[0].item()
            raise ValueError(f"pixel_attention_mask of unit {bad} does not mark exactly its first h*w="
                             f"{shapes[bad][0] * shapes[bad][1]} patches (spatial_shapes {shapes[bad]}); "
                             f"it marks {int(mask[bad].bool().sum())}")
        return shapes
