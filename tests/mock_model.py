"""A weightless stand-in for Lfm2VlModel (nanochat-style MockModel) to test generation logic in milliseconds.

Logits depend only on the position of the last input token: seeded noise (the same in every run) plus a peak at
`script[pos + 1 - prompt_len]`, so greedy decoding spells out `script` (then eos) right after a prompt of
`prompt_len` tokens. With peak=0 the model is pure noise, for sampling tests. Image features are counted so tests
can check which units were encoded.
"""
from types import SimpleNamespace

import torch
from torch import nn

from lfm2vl.config import TextConfig
from lfm2vl.model.cache import HybridCache
from tokenizer_build import build_tokenizer

EOS = 7


class MockModel(nn.Module):
    def __init__(self, vocab_size=1024, prompt_len=4, script=(), peak=20.0, noise=1.0, eos=EOS):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.V, self.prompt_len, self.script, self.peak, self.noise, self.eos = \
            vocab_size, prompt_len, list(script), peak, noise, eos
        self.cfg = TextConfig(vocab_size=vocab_size, hidden_size=4, intermediate_size=8, num_hidden_layers=2,
                              num_attention_heads=1, num_key_value_heads=1, layer_types=["conv", "full_attention"],
                              max_position_embeddings=256)
        self.encoded_units = 0
        self.forward_calls = []  # (rows, T) per call
        self.call_lengths = []  # real tokens per row of each call (None: all T)

    def make_cache(self, batch_size, max_seq_len, dtype=None, device=None):
        return HybridCache(self.cfg, batch_size, max_seq_len)

    def embed(self, input_ids, image_features=None):
        emb = input_ids[..., None].float()
        if image_features is not None:
            emb = emb.masked_scatter((input_ids == 396)[..., None], image_features[:, :1].float())
        return emb

    def image_features(self, pixel_values, pixel_attention_mask, spatial_shapes):
        self.encoded_units += pixel_values.shape[0]
        n = sum(((h + 1) // 2) * ((w + 1) // 2) for h, w in spatial_shapes.tolist())
        return torch.ones(n, 4)

    def logits_at(self, pos):
        x = torch.randn(self.V, generator=torch.Generator().manual_seed(pos)) * self.noise
        k = pos + 1 - self.prompt_len
        if self.peak and k >= 0:
            x[self.script[k] if k < len(self.script) else self.eos] += self.peak
        return x

    def forward_cached(self, inputs_embeds, cache, start_pos, rows=None, last_only=True, lengths=None):
        T = inputs_embeds.shape[1]
        self.forward_calls.append((None if rows is None else rows.tolist(), T))
        self.call_lengths.append(None if lengths is None else lengths.tolist())
        n = [T] * len(start_pos) if lengths is None else lengths.tolist()
        return torch.stack([self.logits_at(p + k - 1) for p, k in zip(start_pos.tolist(), n)])


def mock_engine(**kw):
    model = MockModel(**kw)
    config = SimpleNamespace(text_config=model.cfg, image_token_id=396, downsample_factor=2)
    return SimpleNamespace(model=model, config=config, tokenizer=build_tokenizer())
