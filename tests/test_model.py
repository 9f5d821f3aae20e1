"""The Llama-style model: shapes, causality, norm placement, Scion init, parameter counts."""

from __future__ import annotations

import math

import pytest
import torch

from trainer.config import ModelConfig, model_from_preset
from trainer.model import Transformer, _apply_rope, rope_tables
from trainer.norms import one_to_rms_embedding, rms_to_inf, rms_to_rms

MICRO = model_from_preset("test-micro")  # d=32, 1 layer, 2 heads, vocab 256, seq 16


def _model(cfg: ModelConfig = MICRO, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg)


def test_forward_shape_and_every_parameter_is_a_matrix() -> None:
    model = _model()
    logits = model(torch.randint(0, 256, (3, 16)))
    assert logits.shape == (3, 16, 256)
    assert torch.isfinite(logits).all()
    assert all(p.ndim == 2 for p in model.parameters())  # no biases, no norm weights
    assert model.tok_embeddings.weight.data_ptr() != model.output.weight.data_ptr()  # untied


def test_attention_is_causal() -> None:
    model = _model(model_from_preset("test-micro", n_layers=2))
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_sequence_longer_than_config_is_rejected() -> None:
    with pytest.raises(ValueError, match="seq_len"):
        _model()(torch.zeros(1, 17, dtype=torch.long))


def test_gqa_forward_and_shapes() -> None:
    cfg = model_from_preset("test-micro", n_heads=4, n_kv_heads=2, d_model=64)
    model = _model(cfg)
    assert model.layers[0].attention.wk.weight.shape == (2 * 16, 64)
    assert model(torch.randint(0, 256, (2, 8))).shape == (2, 8, 256)
    assert sum(p.numel() for p in model.parameters()) == cfg.n_params()


@pytest.mark.parametrize("name", ["wq", "wk", "wv"])
def test_qkv_norms_make_attention_inputs_scale_free(name: str) -> None:
    """QK-norm and V-norm: rescaling wq, wk or wv cannot change the output."""
    model = _model()
    idx = torch.randint(0, 256, (2, 16))
    before = model(idx)
    with torch.no_grad():
        getattr(model.layers[0].attention, name).weight.mul_(7.0)
    torch.testing.assert_close(model(idx), before, rtol=1e-4, atol=1e-4)


def test_mlp_norm_makes_w3_scale_free_and_w2_scale_matters() -> None:
    model = _model()
    idx = torch.randint(0, 256, (2, 16))
    before = model(idx)
    with torch.no_grad():
        model.layers[0].feed_forward.w3.weight.mul_(5.0)
    torch.testing.assert_close(model(idx), before, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        model.layers[0].feed_forward.w2.weight.mul_(5.0)
    assert not torch.allclose(model(idx), before, atol=1e-3)


def test_final_norm_makes_logits_linear_in_output_weight() -> None:
    model = _model()
    idx = torch.randint(0, 256, (2, 16))
    before = model(idx)
    with torch.no_grad():
        model.output.weight.mul_(3.0)
    torch.testing.assert_close(model(idx), 3.0 * before, rtol=1e-5, atol=1e-5)


def test_rope_scores_depend_only_on_relative_position() -> None:
    cos, sin = rope_tables(32, 8, 10000.0)
    assert cos.shape == (32, 4)
    q, k = torch.randn(8), torch.randn(8)

    def score(m: int, n: int) -> torch.Tensor:
        qm = _apply_rope(q.view(1, 1, 1, 8), cos[m : m + 1], sin[m : m + 1])
        kn = _apply_rope(k.view(1, 1, 1, 8), cos[n : n + 1], sin[n : n + 1])
        return (qm * kn).sum()

    torch.testing.assert_close(score(5, 2), score(20, 17), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(score(5, 2), score(5, 4))
    torch.testing.assert_close(score(3, 3), (q * k).sum())  # rotation keeps lengths
    x = torch.randn(2, 32, 3, 8)
    torch.testing.assert_close(_apply_rope(x, cos, sin).norm(dim=-1), x.norm(dim=-1))


def test_init_norms_follow_scion() -> None:
    cfg = model_from_preset("cpu-tiny")  # d=64, 2 layers
    model = _model(cfg)
    assert rms_to_inf(model.output.weight) == pytest.approx(1.0, rel=1e-5)
    row_rms = model.tok_embeddings.weight.pow(2).mean(dim=1).sqrt()
    torch.testing.assert_close(row_rms, torch.ones_like(row_rms))
    assert one_to_rms_embedding(model.tok_embeddings.weight) == pytest.approx(1.0, rel=1e-5)
    residual_scale = 1 / math.sqrt(2 * cfg.n_layers)
    for layer in model.layers:
        a, f = layer.attention, layer.feed_forward
        for lin in (a.wq, a.wk, a.wv, f.w1, f.w3):
            assert rms_to_rms(lin.weight) == pytest.approx(1.0, rel=1e-5)
            # orthogonal: every singular value equals the top one
            s = torch.linalg.svdvals(lin.weight)
            assert (s.max() - s.min()) / s.max() < 1e-5
        for lin in (a.wo, f.w2):
            assert rms_to_rms(lin.weight) == pytest.approx(residual_scale, rel=1e-5)


def test_init_gate_as_residual_scales_w3() -> None:
    cfg = model_from_preset("cpu-tiny", init_gate_as_residual=True)
    model = _model(cfg)
    w3 = model.layers[1].feed_forward.w3.weight
    assert rms_to_rms(w3) == pytest.approx(1 / math.sqrt(2 * cfg.n_layers), rel=1e-5)


def test_init_is_reproducible_from_the_global_seed() -> None:
    a, b, c = _model(seed=3), _model(seed=3), _model(seed=4)
    for (name, pa), pb, pc in zip(
        a.named_parameters(), b.parameters(), c.parameters(), strict=True
    ):
        assert torch.equal(pa, pb), name
        assert not torch.equal(pa, pc), name


def test_initial_loss_is_log_vocab() -> None:
    model = _model(model_from_preset("cpu-tiny"))
    idx = torch.randint(0, 256, (4, 64))
    loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    assert loss.item() == pytest.approx(math.log(256), abs=0.05)


# The paper's model family with the Llama-3 vocabulary (spec 4.1), in millions.
PAPER_COUNTS = {
    "proxy": 68.9,
    "x4-width": 314.0,
    "x12-width": 1250.4,
    "x8-depth": 91.4,
    "x32-depth": 168.4,
}


@pytest.mark.parametrize("preset", list(PAPER_COUNTS))
def test_paper_parameter_counts_on_meta_device(preset: str) -> None:
    cfg = model_from_preset(preset)
    with torch.device("meta"):
        model = Transformer(cfg)
    assert all(p.is_meta for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert n == cfg.n_params()
    assert round(n / 1e6, 1) == PAPER_COUNTS[preset]


def test_meta_model_materialises_with_init_weights() -> None:
    cfg = model_from_preset("cpu-tiny")
    with torch.device("meta"):
        model = Transformer(cfg)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    model.init_weights()
    assert rms_to_inf(model.output.weight) == pytest.approx(1.0, rel=1e-5)
    idx = torch.randint(0, 256, (2, 64))
    loss = torch.nn.functional.cross_entropy(model(idx).flatten(0, 1), idx.flatten())
    assert loss.item() == pytest.approx(math.log(256), abs=0.05)
