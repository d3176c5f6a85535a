"""Top LFM2-VL module: vision tower -> pixel-unshuffle projector -> scatter at <image> -> LFM2 backbone -> lm_head.

Mirrors transformers 5.24 `Lfm2VlForConditionalGeneration`; children are named so that the state dict equals the
checkpoint keys: `model.language_model`, `model.vision_tower`, `model.multi_modal_projector`, `lm_head`.
Two entry points:
- `forward(input_ids, pixel_values, pixel_attention_mask, spatial_shapes, attention_mask)`: no cache, logits of the
  whole sequence (B, T, V); inputs as transformers' Lfm2VlProcessor returns them; left or right padding via
  attention_mask (positions = cumsum(mask)-1, padded inputs zeroed before the convs, causal + padding mask).
  `hidden_states(...)` is the same without the output head.
- `forward_cached(inputs_embeds, cache, start_pos, rows, last_only, lengths)`: explicit positions into a HybridCache
  (prefill in chunks, several right-padded prompts at once, or one static-shape decode step); the caller advances
  `cache.lengths`.
"""
from __future__ import annotations

import torch
from torch import nn

from ..config import Lfm2VlConfig
from .cache import HybridCache
from .projector import Projector, image_features
from .text import TextModel, padded_inputs
from .vision import VisionTower


class _Inner(nn.Module):
    def __init__(self, config: Lfm2VlConfig):
        super().__init__()
        self.language_model = TextModel(config.text_config)
        self.vision_tower = VisionTower(config.vision_config)
        self.multi_modal_projector = Projector(config)


class Lfm2VlModel(nn.Module):
    def __init__(self, config: Lfm2VlConfig):
        super().__init__()
        self.config = config
        self.model = _Inner(config)
        tc = config.text_config
        self.lm_head = nn.Linear(tc.hidden_size, tc.vocab_size, bias=False)
        self.tie_weights()

    def tie_weights(self) -> None:
        """Share lm_head with the token embedding when tie_word_embeddings (call again after assign-loading)."""
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.language_model.embed_tokens.weight

    # ---- pieces -------------------------------------------------------------------------------------------------
    @property
    def pixel_dtype(self) -> torch.dtype:
        """The dtype the vision tower takes pixels in (its patch embedding's): pixels cast to it up front give the
        same features and, below float32, hold less memory while a request waits."""
        return self.model.vision_tower.embeddings.patch_embedding.weight.dtype

    def image_features(self, pixel_values, pixel_attention_mask, spatial_shapes) -> torch.Tensor:
        """(units, L, 3*p*p) pixels -> (sum over units of h/2*w/2, D_text), concatenated in unit order."""
        tower, projector = self.model.vision_tower, self.model.multi_modal_projector
        return image_features(tower, projector, pixel_values, pixel_attention_mask, spatial_shapes,
                              self.config.downsample_factor)

    def embed(self, input_ids: torch.Tensor, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) ids -> (B, T, D) embeddings, image features scattered at image_token_id in batch-major order."""
        emb = self.model.language_model.embed_tokens(input_ids)
        if image_features is None:
            return emb
        is_image = input_ids == self.config.image_token_id
        n_tokens, n_feats = int(is_image.sum()), image_features.shape[0]
        if n_tokens != n_feats:
            raise ValueError(f"the prompt has {n_tokens} <image> tokens (id {self.config.image_token_id}) but the "
                             f"images give {n_feats} features; the placeholder expansion and the pixel inputs "
                             f"disagree")
        return emb.masked_scatter(is_image[..., None], image_features.to(emb.dtype))

    # ---- no-cache forward (public) ------------------------------------------------------------------------------
    def forward(self, input_ids, pixel_values=None, pixel_attention_mask=None, spatial_shapes=None,
                attention_mask=None) -> torch.Tensor:
        """Logits (B, T, V) of the whole sequence, no cache."""
        return self.lm_head(self.hidden_states(input_ids, pixel_values, pixel_attention_mask, spatial_shapes,
                                               attention_mask))

    def hidden_states(self, input_ids, pixel_values=None, pixel_attention_mask=None, spatial_shapes=None,
                      attention_mask=None) -> torch.Tensor:
        """Final hidden states (B, T, D) of the whole sequence, no cache: `forward` without the output head, so a
        caller (the training loss) can apply the head at the positions it needs only."""
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq_len); got shape {tuple(input_ids.shape)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids "
                             f"shape {tuple(input_ids.shape)}")
        feats = None
        if pixel_values is not None:
            if pixel_attention_mask is None or spatial_shapes is None:
                raise ValueError("pixel_values needs pixel_attention_mask and spatial_shapes as well")
            feats = self.image_features(pixel_values, pixel_attention_mask, spatial_shapes)
        h = self.embed(input_ids, feats)
        B, T = input_ids.shape
        if attention_mask is None or bool(attention_mask.all()):  # no padding: plain causal attention
            positions = torch.arange(T, device=h.device).expand(B, T)
            mask = pad_mask = None
        else:
            positions, mask = padded_inputs(attention_mask)
            pad_mask = attention_mask
        return self.model.language_model(h, positions, mask=mask, pad_mask=pad_mask)

    # ---- cached path --------------------------------------------------------------------------------------------
    def make_cache(self, batch_size: int, max_seq_len: int, dtype=None, device=None) -> HybridCache:
        w = self.model.language_model.embed_tokens.weight  # the activation dtype (an int8 head is not)
        return HybridCache(self.config.text_config, batch_size, max_seq_len,
                           dtype=dtype or w.dtype, device=device or w.device)

    def forward_cached(self, inputs_embeds: torch.Tensor, cache: HybridCache, start_pos: torch.Tensor,
                       rows: torch.Tensor | None = None, last_only: bool = True,
                       lengths: torch.Tensor | None = None) -> torch.Tensor:
        """inputs_embeds (b, T, D) for cache rows `rows` (default all), first positions start_pos (b,); lengths (b,):
        real inputs per row when shorter prompts are right-padded to T (default: all T). Returns (b, V) logits of
        each row's last real position if last_only (the layers after the last attention layer then run on a few last
        rows: TextModel.forward), else (b, T, V). Does not touch cache.lengths."""
        T = inputs_embeds.shape[1]
        view = cache.view(start_pos, T, rows, lengths)
        h = self.model.language_model(inputs_embeds, view.positions, mask=view.mask, cache=view, last_only=last_only)
        return self.lm_head(h)
