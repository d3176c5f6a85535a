"""Config parsing against the published LFM2-VL-450M config.json (lfm2vl/bench/configs/450M.json) and the test layouts."""
from __future__ import annotations

import pytest
import torch

from checkpoints import LAYOUTS, cached_checkpoint, hf_config
from lfm2vl.config import Lfm2VlConfig
from lfm2vl.model import Lfm2VlModel
from tokenizer_build import FIXTURE_CONFIG

# counted by hand from the published shapes (text 354,483,968 + vision 85,843,200 + projector 10,495,488);
# tied head counted once
PARAMS_450M = 450_822_656


def test_published_450m_shapes():
    c = Lfm2VlConfig.from_file(FIXTURE_CONFIG)
    t, v = c.text_config, c.vision_config
    assert c.model_type == "lfm2-vl" and c.image_token_id == 396 and c.tie_word_embeddings
    assert (t.vocab_size, t.hidden_size, t.num_hidden_layers) == (65536, 1024, 16)
    assert (t.intermediate_size, t.ff_dim) == (6656, 4608)
    assert t.attn_layers == [2, 5, 8, 10, 12, 14]
    assert (t.num_attention_heads, t.num_key_value_heads, t.head_dim) == (16, 8, 64)
    assert (t.conv_L_cache, t.rope_theta, t.norm_eps) == (3, 1e6, 1e-5)
    assert (v.hidden_size, v.intermediate_size, v.num_hidden_layers, v.num_layers_used) == (768, 3072, 12, 12)
    assert (v.num_attention_heads, v.head_dim, v.patch_size, v.num_patches) == (12, 64, 16, 256)
    assert (c.projector_hidden_size, c.projector_use_layernorm, c.downsample_factor) == (2560, True, 2)


def test_published_450m_parameter_count():
    c = Lfm2VlConfig.from_file(FIXTURE_CONFIG)
    with torch.device("meta"):
        model = Lfm2VlModel(c)
    n = sum(p.numel() for p in model.parameters())
    assert n == PARAMS_450M
    from transformers import Lfm2VlForConditionalGeneration

    with torch.device("meta"):
        hf = Lfm2VlForConditionalGeneration(hf_config("full_450m"))
    assert n == sum(p.numel() for p in hf.parameters())
    ours = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    theirs = {k: tuple(v.shape) for k, v in hf.state_dict().items()}
    assert ours == theirs  # module paths equal transformers' state-dict names


@pytest.mark.parametrize("layout", LAYOUTS)
def test_layout_configs_match_the_oracle(layout, tmp_path_factory):
    """Every written config.json (custom-code era or native) parses to the oracle's architecture."""
    folder, hf = cached_checkpoint(tmp_path_factory, layout)
    c = Lfm2VlConfig.from_file(folder)
    t, ht = c.text_config, hf.config.text_config
    assert t.layer_types == list(ht.layer_types)
    assert t.ff_dim == hf.model.language_model.layers[0].feed_forward.w1.out_features
    assert (t.vocab_size, t.hidden_size, t.num_key_value_heads) == (ht.vocab_size, ht.hidden_size,
                                                                    ht.num_key_value_heads)
    assert c.vision_config.num_layers_used == hf.config.vision_config.num_hidden_layers
    assert c.projector_use_layernorm == hf.config.projector_use_layernorm
    assert c.tie_word_embeddings == (layout != "untied")
    assert c.image_token_id == 396
