"""Vision tower + projector parity against transformers 5.24 (`Siglip2VisionModel`, `Lfm2VlModel.get_image_features`).

Tiny random towers with non-trivial weights; our modules load the oracle's state dict with strict=True.
The oracle runs every unit padded to 1024 patches with a key mask; ours packs the valid patches and attends per
group of equal-length units, so these tests also prove that skipping the padding changes nothing.
"""
from __future__ import annotations

import pytest
import torch

from transformers import Lfm2VlConfig as HfLfm2VlConfig
from transformers import Lfm2VlModel as HfLfm2VlModel
from transformers import Siglip2VisionConfig, Siglip2VisionModel

from lfm2vl.config import Lfm2VlConfig, VisionConfig
from lfm2vl.model.projector import Projector, image_features, pixel_unshuffle
from lfm2vl.cpu.vision import FastVisionEmbeddings, fast_linear, use_fast_vision
from lfm2vl.model.vision import VisionTower

TOL = 1e-5
VISION = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, patch_size=16,
              num_patches=256, num_channels=3, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
              vision_use_head=False)
MIXED = [(32, 32), (32, 32), (32, 32), (26, 36), (16, 24), (4, 202), (54, 18), (32, 32)]


def _randomize(module: torch.nn.Module, seed: int) -> None:
    """Non-trivial weights everywhere (default init zeroes biases and sets LayerNorm to identity)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("layer_norm1.weight") or name.endswith("layer_norm2.weight") or "layernorm.weight" in name \
                    or name.endswith("layer_norm.weight"):
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif p.dim() == 2 and "position_embedding" not in name:
                p.copy_(torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5)
            else:
                p.copy_(0.3 * torch.randn(p.shape, generator=g))


def _oracle(num_layers: int = 3, seed: int = 0) -> Siglip2VisionModel:
    m = Siglip2VisionModel(Siglip2VisionConfig(**{**VISION, "num_hidden_layers": num_layers})).eval()
    _randomize(m, seed)
    return m


def _ours(oracle: torch.nn.Module, fast: bool = True, **overrides) -> VisionTower:
    """Our tower with the oracle's weights; fast: with the CPU layer's modules (what lfm2vl.load runs on CPU)."""
    tower = VisionTower(VisionConfig.from_hf({**VISION, **overrides})).eval()
    tower.load_state_dict(oracle.state_dict(), strict=True)
    if fast:
        assert use_fast_vision(tower) > 0 and type(tower.embeddings) is FastVisionEmbeddings
    return tower


def _inputs(shapes, L: int = 1024, seed: int = 1, garbage: bool = True):
    g = torch.Generator().manual_seed(seed)
    pv = torch.randn(len(shapes), L, 3 * 16 * 16, generator=g)
    mask = torch.zeros(len(shapes), L, dtype=torch.int32)
    for i, (h, w) in enumerate(shapes):
        mask[i, : h * w] = 1
        if garbage:  # padding rows must not matter: fill them with large junk
            pv[i, h * w:] = 50 * torch.randn(L - h * w, pv.shape[-1], generator=g)
        else:
            pv[i, h * w:] = 0
    return pv, mask, torch.tensor(shapes, dtype=torch.long)


def _max_diff(ref_last_hidden, ours_list, shapes) -> float:
    return max((ref_last_hidden[i, : h * w] - ours_list[i]).abs().max().item() for i, (h, w) in enumerate(shapes))


@pytest.fixture(scope="module")
def pair():
    ref = _oracle()
    return ref, _ours(ref)


@pytest.mark.parametrize("shapes", [[(32, 32)], MIXED], ids=["one-tile", "mixed"])
def test_tower_matches_padded_reference(pair, shapes):
    ref, ours = pair
    pv, mask, ss = _inputs(shapes)
    with torch.no_grad():
        want = ref(pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=ss).last_hidden_state
        got = ours(pv, mask, ss)
    assert [tuple(t.shape) for t in got] == [(h * w, VISION["hidden_size"]) for h, w in shapes]
    assert _max_diff(want, got, shapes) <= TOL
    assert want[0, :1].abs().max() > 0.1  # the comparison is not between near-zero tensors


def test_padding_content_is_ignored(pair):
    _, ours = pair
    shapes = [(26, 36), (32, 32), (4, 202)]
    a, mask, ss = _inputs(shapes, seed=3, garbage=True)
    b = a.clone()
    for i, (h, w) in enumerate(shapes):
        b[i, h * w:] = -7.0
    with torch.no_grad():
        ga, gb = ours(a, mask, ss), ours(b, mask, ss)
    assert all(torch.equal(x, y) for x, y in zip(ga, gb))


def test_reference_tower_matches_transformers():
    """The plain PyTorch tower (model/vision.py, no CPU layer swapped in) matches transformers as well."""
    ref = _oracle(seed=9)
    ours = _ours(ref, fast=False)
    assert type(ours.embeddings).__module__ == "lfm2vl.model.vision"
    shapes = [(26, 36), (16, 16)]
    pv, mask, ss = _inputs(shapes, seed=9)
    with torch.no_grad():
        want = ref(pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=ss).last_hidden_state
        got = ours(pv, mask, ss)
    assert _max_diff(want, got, shapes) <= TOL


def test_shorter_padded_length_and_unit_order(pair):
    """L_max below 1024 and units in any order: results per unit do not depend on their neighbours."""
    ref, ours = pair
    shapes = [(16, 24), (10, 20), (16, 24), (2, 8)]
    pv, mask, ss = _inputs(shapes, L=400, seed=5)
    with torch.no_grad():
        want = ref(pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=ss).last_hidden_state
        got = ours(pv, mask, ss)
        alone = ours(pv[1:2], mask[1:2], ss[1:2])[0]
    assert _max_diff(want, got, shapes) <= TOL
    assert (alone - got[1]).abs().max().item() <= TOL


@pytest.mark.parametrize("hw", [(16, 16), (32, 32), (26, 36), (6, 100), (54, 18), (8, 12), (38, 26), (1, 1)])
def test_position_resize_matches_transformers(pair, hw):
    ref, ours = pair
    h, w = hw
    grid = ref.embeddings.position_embedding.weight.reshape(16, 16, -1)
    with torch.no_grad():
        want = ref.embeddings.resize_positional_embeddings(grid, torch.tensor([[h, w]]), max_length=h * w)[0]
        got = ours.embeddings.positions(h, w, torch.float32)
    assert got.shape == (h * w, VISION["hidden_size"])
    assert (want - got).abs().max().item() <= TOL


def test_position_cache_follows_weight_changes():
    ref = _oracle(seed=7)
    ours = _ours(ref)
    emb = ours.embeddings
    with torch.no_grad():
        first = emb.positions(26, 36, torch.float32)
        assert emb.positions(26, 36, torch.float32) is first  # served from the cache
        emb.position_embedding.weight.mul_(2)  # in-place change: the cache must not serve stale grids
        assert torch.allclose(emb.positions(26, 36, torch.float32), 2 * first, atol=1e-6)
        fresh = torch.randn_like(emb.position_embedding.weight)
        ours.load_state_dict({**ours.state_dict(), "embeddings.position_embedding.weight": fresh}, assign=True)
        table = fresh.reshape(16, 16, -1)
        want = ref.embeddings.resize_positional_embeddings(table, torch.tensor([[26, 36]]), max_length=936)[0]
        assert (emb.positions(26, 36, torch.float32) - want).abs().max().item() <= TOL
        assert emb.positions(26, 36, torch.bfloat16).dtype == torch.bfloat16


def test_position_embedding_gets_gradients():
    """Training a tower (e.g. LoRA runs) must never reuse a cached, graph-less grid."""
    ours = _ours(_oracle(seed=8))
    pv, mask, ss = _inputs([(4, 6)], L=24)
    for _ in range(2):
        ours.zero_grad()
        ours(pv, mask, ss)[0].sum().backward()
        assert ours.embeddings.position_embedding.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("gelu", [None, "tanh", "none"])
@pytest.mark.parametrize("with_residual", [False, True])
def test_fast_linear_matches_plain_torch(gelu, with_residual):
    g = torch.Generator().manual_seed(41)
    layer = torch.nn.Linear(48, 96)
    x, r = torch.randn(37, 48, generator=g), torch.randn(37, 96, generator=g)
    want = layer(x)
    want = want if gelu is None else torch.nn.functional.gelu(want, approximate=gelu)
    want = want + r if with_residual else want
    with torch.no_grad():
        got = fast_linear(layer, x, gelu=gelu, residual=r if with_residual else None)
    assert (got - want).abs().max().item() <= TOL

    class Wrapped(torch.nn.Linear):  # e.g. a LoRA or int8 layer: its own forward must run
        def forward(self, x):
            return super().forward(x) + 1.0

    wrapped = Wrapped(48, 96)
    wrapped.load_state_dict(layer.state_dict())
    with torch.no_grad():
        got = fast_linear(wrapped, x, gelu=gelu, residual=r if with_residual else None)
    plain = wrapped(x)
    plain = plain if gelu is None else torch.nn.functional.gelu(plain, approximate=gelu)
    assert (got - (plain + r if with_residual else plain)).abs().max().item() <= TOL


def test_autograd_path_equals_inference_path(pair):
    """With gradients on, the tower runs plain torch ops; both paths must agree."""
    _, ours = pair
    pv, mask, ss = _inputs([(26, 36), (4, 6)], seed=42)
    with torch.no_grad():
        fast = ours(pv, mask, ss)
    slow = ours(pv, mask, ss)
    assert slow[0].requires_grad
    assert max((a - b).abs().max().item() for a, b in zip(fast, slow)) <= TOL


def test_float16_runs(pair):
    ref, _ = pair
    ours = _ours(ref).to(torch.float16)
    pv, mask, ss = _inputs([(26, 36)], seed=43)
    with torch.no_grad():
        want = ref(pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=ss).last_hidden_state
        got = ours(pv.half(), mask, ss)
    assert got[0].dtype == torch.float16
    assert _max_diff(want, [t.float() for t in got], [(26, 36)]) <= 0.05


def test_vision_feature_layer_drops_last_layer():
    full = _oracle(num_layers=3, seed=11)
    oracle = _oracle(num_layers=2, seed=99)
    kept = {k: v for k, v in full.state_dict().items() if not k.startswith("encoder.layers.2.")}
    oracle.load_state_dict(kept, strict=True)
    ours = VisionTower(VisionConfig.from_hf(VISION, vision_feature_layer=-2)).eval()
    assert len(ours.encoder.layers) == 2
    with pytest.raises(RuntimeError, match="encoder.layers.2"):
        ours.load_state_dict(full.state_dict(), strict=True)  # the loader must drop the extra layer's keys
    ours.load_state_dict(kept, strict=True)
    pv, mask, ss = _inputs(MIXED[2:5], seed=12)
    with torch.no_grad():
        want = oracle(pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=ss).last_hidden_state
        got = ours(pv, mask, ss)
        all3 = full(pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=ss).last_hidden_state
    assert _max_diff(want, got, MIXED[2:5]) <= TOL
    assert _max_diff(all3, got, MIXED[2:5]) > 1e-2  # the dropped layer really mattered


def test_bfloat16_stays_close(pair):
    ref, ours32 = pair
    ours = _ours(ref).to(torch.bfloat16)
    ref16 = _oracle()
    ref16.load_state_dict(ref.state_dict())
    ref16.to(torch.bfloat16)
    shapes = [(32, 32), (26, 36), (4, 202)]
    pv, mask, ss = _inputs(shapes, seed=13)
    with torch.no_grad():
        exact = ref(pixel_values=pv, pixel_attention_mask=mask, spatial_shapes=ss).last_hidden_state
        hf16 = ref16(pixel_values=pv.bfloat16(), pixel_attention_mask=mask, spatial_shapes=ss).last_hidden_state
        got = ours(pv.bfloat16(), mask, ss)
    assert all(t.dtype == torch.bfloat16 for t in got)
    ours_err = _max_diff(exact, [t.float() for t in got], shapes)
    hf_err = _max_diff(exact, [hf16[i, : h * w].float() for i, (h, w) in enumerate(shapes)], shapes)
    print(f"bf16 max abs error vs fp32 oracle: lfm2vl {ours_err:.4f}, transformers {hf_err:.4f}")
    assert ours_err <= 0.1, ours_err  # values are O(1): bf16 keeps ~3 significant digits
    assert ours_err <= 2 * hf_err + 0.02, (ours_err, hf_err)  # no worse than transformers' own bf16 run


def test_bad_inputs_raise_clear_errors(pair):
    _, ours = pair
    pv, mask, ss = _inputs([(4, 5)], L=24)
    with pytest.raises(ValueError, match="pixel_values must be"):
        ours(pv[..., :100], mask, ss)
    with pytest.raises(ValueError, match="spatial_shapes \\(5, 6\\)"):
        ours(pv, mask, torch.tensor([[5, 6]]))
    with pytest.raises(ValueError, match="spatial_shapes must be"):
        ours(pv, mask, ss[0])
    with pytest.raises(ValueError, match="pixel_attention_mask of unit 0"):
        ours(pv, mask.roll(1, dims=1), ss)
    with pytest.raises(ValueError, match="pixel_attention_mask must be"):
        ours(pv, mask[:, :10], ss)


# ---------------------------------------------------------------------------------------------- projector


def test_pixel_unshuffle_order():
    h, w, D = 4, 6, 3
    grid = torch.arange(h * w * D, dtype=torch.float32).reshape(h, w, D)
    out = pixel_unshuffle(grid.reshape(h * w, D), h, w, 2)
    assert out.shape == (h // 2 * w // 2, 4 * D)
    for i in range(h // 2):
        for j in range(w // 2):
            want = torch.cat([grid[2 * i, 2 * j], grid[2 * i, 2 * j + 1], grid[2 * i + 1, 2 * j],
                              grid[2 * i + 1, 2 * j + 1]])
            assert torch.equal(out[i * (w // 2) + j], want)
    with pytest.raises(ValueError, match="5x6 is not divisible by downsample_factor 2"):
        pixel_unshuffle(torch.zeros(30, D), 5, 6, 2)


def _hf_vl(use_layernorm: bool, seed: int):
    cfg = HfLfm2VlConfig(
        text_config=dict(model_type="lfm2", vocab_size=512, hidden_size=64, intermediate_size=192,
                         num_hidden_layers=2, layer_types=["conv", "full_attention"], num_attention_heads=4,
                         num_key_value_heads=2),
        vision_config=dict(model_type="siglip2_vision_model", **VISION),
        image_token_id=396, projector_hidden_size=40, projector_use_layernorm=use_layernorm, downsample_factor=2)
    hf = HfLfm2VlModel(cfg).eval()
    _randomize(hf.vision_tower, seed)
    _randomize(hf.multi_modal_projector, seed + 1)
    return hf


@pytest.mark.parametrize("use_layernorm", [True, False], ids=["projector-ln", "no-projector-ln"])
def test_image_features_match_transformers(use_layernorm):
    hf = _hf_vl(use_layernorm, seed=21)
    config = Lfm2VlConfig.from_hf(hf.config.to_dict())
    assert config.projector_use_layernorm is use_layernorm
    tower = VisionTower(config.vision_config).eval()
    tower.load_state_dict(hf.vision_tower.state_dict(), strict=True)
    projector = Projector(config).eval()
    projector.load_state_dict(hf.multi_modal_projector.state_dict(), strict=True)
    assert (projector.layer_norm is not None) is use_layernorm
    for shapes in ([(32, 32)], MIXED):
        pv, mask, ss = _inputs(shapes, seed=22)
        with torch.no_grad():
            want = torch.cat(hf.get_image_features(pixel_values=pv, spatial_shapes=ss,
                                                   pixel_attention_mask=mask).pooler_output)
            got = image_features(tower, projector, pv, mask, ss, config.downsample_factor)
        assert got.shape == want.shape == (sum(h * w // 4 for h, w in shapes), 64)
        assert (want - got).abs().max().item() <= TOL
        assert want.abs().max() > 0.1


def test_image_features_projected_per_encoder_batch_equal_one_projection():
    """image_features projects each encoder batch as the tower finishes it; with one unit per batch or all units of
    a patch count in one, the features equal the whole tower output unshuffled and projected at once."""
    hf = _hf_vl(True, seed=23)
    config = Lfm2VlConfig.from_hf(hf.config.to_dict())
    tower = VisionTower(config.vision_config).eval()
    tower.load_state_dict(hf.vision_tower.state_dict(), strict=True)
    projector = Projector(config).eval()
    projector.load_state_dict(hf.multi_modal_projector.state_dict(), strict=True)
    shapes = MIXED  # units of one patch count apart from each other: batches out of unit order
    pv, mask, ss = _inputs(shapes, seed=24)
    with torch.no_grad():
        units = tower(pv, mask, ss)
        want = projector(torch.cat([pixel_unshuffle(u, h, w, 2) for u, (h, w) in zip(units, shapes)]))
        for bp in (1, 10 ** 9):
            tower.batch_patches = bp
            assert len(tower.batches([tuple(s) for s in shapes])) == (len(shapes) if bp == 1 else len(set(
                h * w for h, w in shapes)))
            got = image_features(tower, projector, pv, mask, ss, config.downsample_factor)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_image_features_rejects_odd_grid_before_running_tower():
    hf = _hf_vl(True, seed=31)
    config = Lfm2VlConfig.from_hf(hf.config.to_dict())

    def tower(*args):
        raise AssertionError("the tower ran before the grid check")

    pv, mask, ss = _inputs([(32, 32), (5, 6)], seed=32)
    with pytest.raises(ValueError, match="unit 1: patch grid 5x6"):
        image_features(tower, Projector(config), pv, mask, ss, 2)
