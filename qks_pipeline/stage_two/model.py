"""The QKS head, as the reference builds it (docs/design.md, section 1).

N learnable queries pass a LayerNorm and dropout, then L post-LayerNorm BERT layers (self-attention
over the queries, cross-attention to the frozen CLIP visual tokens, feed-forward). The query
outputs, projected by a trainable copy of CLIP's visual projection, meet the label embeddings; a
label's logit is its best match over the queries (knowledge sharing), neither normalised nor scaled.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from qks_pipeline.config import ModelConfig

LN_EPS = 1e-12  # BERT's LayerNorm epsilon, used everywhere in the Q-Former


class AttentionBlock(nn.Module):
    """Multi-head attention, dense, dropout, add & LayerNorm (BERT's attention + self-output)."""

    def __init__(self, dim: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads = num_heads
        self.dropout = dropout
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def _heads(self, x: Tensor) -> Tensor:
        # (B, L, D) -> (B, H, L, D/H)
        return x.unflatten(-1, (self.num_heads, -1)).transpose(1, 2)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        """Attend from `x` (B, N, D) to `context` (B, T, D); returns (B, N, D)."""
        q = self._heads(self.query(x))  # (B, H, N, D/H)
        k = self._heads(self.key(context))  # (B, H, T, D/H)
        v = self._heads(self.value(context))  # (B, H, T, D/H)
        p = self.dropout if self.training else 0.0  # dropout on the attention probabilities
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=p)  # (B, H, N, D/H)
        out = out.transpose(1, 2).flatten(2)  # (B, N, D)
        return self.norm(x + F.dropout(self.dense(out), self.dropout, self.training))


class FeedForward(nn.Module):
    """dim -> ff_dim -> dim, exact GELU, dropout, add & LayerNorm (BERT's intermediate + output)."""

    def __init__(self, dim: int, ff_dim: int, dropout: float):
        super().__init__()
        self.dropout = dropout
        self.fc1 = nn.Linear(dim, ff_dim)
        self.fc2 = nn.Linear(ff_dim, dim)
        self.norm = nn.LayerNorm(dim, eps=LN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc2(F.gelu(self.fc1(x), approximate="none"))
        return self.norm(x + F.dropout(h, self.dropout, self.training))


class QFormerLayer(nn.Module):
    """A post-LayerNorm layer: self-attention, cross-attention to the image tokens, feed-forward."""

    def __init__(self, dim: int, cfg: ModelConfig):
        super().__init__()
        self.self_attn = AttentionBlock(dim, cfg.num_heads, cfg.dropout)
        self.cross_attn = AttentionBlock(dim, cfg.num_heads, cfg.dropout)
        self.ffn = FeedForward(dim, cfg.ff_dim, cfg.dropout)

    def forward(self, queries: Tensor, tokens: Tensor) -> Tensor:
        """queries (B, N, D), tokens (B, T, D) -> (B, N, D)."""
        queries = self.self_attn(queries, queries)
        queries = self.cross_attn(queries, tokens)
        return self.ffn(queries)


class QKS(nn.Module):
    """Query-based knowledge sharing over cached CLIP visual tokens (B, T, D).

    The Q-Former is D wide, as in the reference; `embed_dim` E is CLIP's joint embedding width,
    where the label embeddings live.
    """

    def __init__(self, cfg: ModelConfig, token_dim: int, embed_dim: int):
        super().__init__()
        # num_heads "auto" resolved to a number for this width
        cfg = dataclasses.replace(cfg, num_heads=cfg.heads(token_dim))
        self.cfg = cfg
        self.query_tokens = nn.Parameter(torch.empty(1, cfg.num_queries, token_dim))
        self.embed_norm = nn.LayerNorm(token_dim, eps=LN_EPS)
        self.layers = nn.ModuleList(QFormerLayer(token_dim, cfg) for _ in range(cfg.num_layers))
        # applied as x @ proj, like CLIP's visual.proj
        self.proj = nn.Parameter(torch.empty(token_dim, embed_dim))
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """BERT's initialisation; the projection CLIP's (std D^-0.5) until `init_projection`."""
        nn.init.normal_(self.query_tokens, std=0.02)
        nn.init.normal_(self.proj, std=self.proj.shape[0] ** -0.5)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @torch.no_grad()
    def init_projection(self, visual_proj: Tensor) -> None:
        """Copy CLIP's visual projection (D, E) into the trainable projection."""
        assert visual_proj.shape == self.proj.shape, (
            f"projection {list(visual_proj.shape)} != {list(self.proj.shape)}"
        )
        self.proj.copy_(visual_proj)

    def query_features(self, tokens: Tensor) -> Tensor:
        """The Q-Former: tokens (B, T, D), CLS first, any float dtype -> query outputs (B, N, D)."""
        tokens = tokens.to(self.proj.dtype)
        if not self.cfg.keep_cls:
            tokens = tokens[:, 1:]  # (B, T-1, D)
        queries = self.query_tokens.expand(tokens.shape[0], -1, -1)  # (B, N, D)
        queries = F.dropout(self.embed_norm(queries), self.cfg.dropout, self.training)
        for layer in self.layers:
            queries = layer(queries, tokens)
        return queries

    def forward(
        self, tokens: Tensor, label_emb: Tensor, return_query_index: bool = False
    ) -> Tensor | tuple[Tensor, Tensor]:
        """Tokens (B, T, D), CLS first, and label embeddings (C, E) -> logits (B, C).

        With `return_query_index`, also which query gave each logit (B, C).
        """
        feats = self.query_features(tokens) @ self.proj  # (B, N, D) @ (D, E) -> (B, N, E)
        scores = feats @ label_emb.to(feats.dtype).T  # (B, N, E) @ (E, C) -> (B, N, C)
        logits, index = scores.max(dim=1)  # (B, C), (B, C)
        return (logits, index) if return_query_index else logits
