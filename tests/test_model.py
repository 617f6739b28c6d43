"""The QKS head against a brute-force re-computation, and its small contracts."""

from __future__ import annotations

import pytest
import torch

from qks_pipeline.config import ModelConfig
from qks_pipeline.stage_two.model import QKS
from tests.qks_reference_impl import ours_to_reference, reference_scores

CFG = ModelConfig(num_queries=3, num_layers=2, num_heads=2, ff_dim=12, dropout=0.1)
D, E, T, C, B = 8, 6, 5, 7, 2


def make_model(cfg: ModelConfig = CFG, seed: int = 0) -> QKS:
    """A model whose every parameter, LayerNorms and biases too, is random (no structured init)."""
    torch.manual_seed(seed)
    model = QKS(cfg, token_dim=D, embed_dim=E)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3 + (1.0 if p.ndim == 1 else 0.0) * torch.rand(()))
    return model.eval()


def inputs(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, T, D, generator=g), torch.randn(C, E, generator=g)


@pytest.mark.parametrize("keep_cls", [True, False])
def test_forward_matches_brute_force(keep_cls: bool) -> None:
    cfg = ModelConfig(**{**vars(CFG), "keep_cls": keep_cls})
    model = make_model(cfg)
    tokens, labels = inputs()
    expected = reference_scores(
        ours_to_reference(model.state_dict()), tokens, labels, cfg.num_heads, keep_cls
    )
    with torch.no_grad():
        logits = model(tokens, labels)
    assert logits.shape == (B, C)
    torch.testing.assert_close(logits.double(), expected.max(dim=1).values, atol=1e-5, rtol=1e-5)


def test_keep_cls_false_ignores_cls() -> None:
    model = make_model(ModelConfig(**{**vars(CFG), "keep_cls": False}))
    tokens, labels = inputs()
    changed = tokens.clone()
    changed[:, 0] = torch.randn(B, D) * 10
    with torch.no_grad():
        torch.testing.assert_close(model(changed, labels), model(tokens, labels), atol=0, rtol=0)
    keeping = make_model(CFG)  # and with keep_cls the CLS token does matter
    with torch.no_grad():
        assert not torch.allclose(keeping(changed, labels), keeping(tokens, labels))


def test_query_index_is_argmax_of_query_scores() -> None:
    model = make_model()
    tokens, labels = inputs()
    with torch.no_grad():
        logits, index = model(tokens, labels, return_query_index=True)
        scores = model.query_features(tokens) @ model.proj @ labels.T  # (B, N, C)
    assert index.dtype == torch.int64 and index.shape == (B, C)
    torch.testing.assert_close(index, scores.argmax(dim=1))
    torch.testing.assert_close(logits, scores.gather(1, index[:, None]).squeeze(1))


def test_float16_tokens_are_cast() -> None:
    model = make_model()
    tokens, labels = inputs()
    with torch.no_grad():
        out = model(tokens.half(), labels)
        ref = model(tokens.half().float(), labels)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref)


def test_init_weights_and_projection() -> None:
    model = QKS(
        ModelConfig(num_queries=4, num_layers=1, num_heads=2, ff_dim=16), token_dim=64, embed_dim=E
    )
    model.init_weights()
    lin = model.layers[0].cross_attn.key
    assert lin.weight.shape == (64, 64) and abs(lin.weight.std().item() - 0.02) < 0.004
    assert torch.all(lin.bias == 0)
    assert torch.all(model.layers[0].ffn.norm.weight == 1) and torch.all(model.embed_norm.bias == 0)
    assert model.layers[0].ffn.norm.eps == 1e-12 and model.embed_norm.eps == 1e-12
    assert abs(model.query_tokens.std().item() - 0.02) < 0.004
    clip_proj = torch.randn(64, E)
    model.init_projection(clip_proj)
    torch.testing.assert_close(model.proj.detach(), clip_proj)
    assert model.proj.requires_grad


def test_dropout_only_in_training() -> None:
    model = make_model()
    tokens, labels = inputs()
    with torch.no_grad():
        assert torch.equal(model(tokens, labels), model(tokens, labels))
        model.train()
        torch.manual_seed(0)
        a = model(tokens, labels)
        torch.manual_seed(1)
        assert not torch.equal(a, model(tokens, labels))
