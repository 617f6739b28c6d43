"""Scores of a feature store's valid rows from a trained head or CLIP zero-shot, for validation
and evaluation.

Always float32 (float16 arithmetic ties labels in the ranking: docs/design.md, section 3), into one
(N, C) array.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qks_pipeline.errors import QKSError
from qks_pipeline.stage_two.loader import CacheLoader
from qks_pipeline.stage_two.model import QKS


@dataclass
class Predictions:
    scores: np.ndarray  # (N, C) float32 over the valid rows, in store order
    labels: np.ndarray  # (N, C) int8
    rows: np.ndarray  # (N,) store rows
    # (C, Q) int64: per label, how often each query gave its logit on a positive
    query_counts: np.ndarray | None = None


def _allocate(n: int, c: int, c_labels: int, into: Predictions | None) -> Predictions:
    """Arrays for n rows of c scores and c_labels labels: those of `into` when they fit."""
    if into is not None and into.scores.shape == (n, c) and into.labels.shape == (n, c_labels):
        return Predictions(into.scores, into.labels, into.rows)
    scores = np.empty((n, c), np.float32)
    labels = np.empty((n, c_labels), np.int8)
    return Predictions(scores, labels, rows=np.empty(n, np.int64))


@torch.no_grad()
def score_rows(
    score_fn: Callable[[torch.Tensor], Any],
    loader: CacheLoader,
    device: torch.device,
    num_queries: int = 0,
    into: Predictions | None = None,
) -> Predictions:
    """Run `score_fn(tokens (B, T, D) on device)` -> logits (B, C) over one in-order pass.

    With `num_queries` > 0, `score_fn` also returns the query that gave each logit (B, C), counted
    over the positives into `query_counts` (the index itself is not kept: 2 bytes per image and
    label). `into`: predictions of the same rows whose arrays are overwritten (one (N, C) score
    array for several scorers).
    """
    n = loader.num_samples
    if n == 0:
        raise QKSError(
            f"no valid rows to score in rows {loader.row_range[0]}-{loader.row_range[1]}"
        )
    start = 0
    out = None
    for batch in loader.epoch(0):
        result = score_fn(batch.tokens.to(device, non_blocking=True))
        logits, qi = result if num_queries else (result, None)
        if out is None:
            out = _allocate(n, logits.shape[1], batch.labels.shape[1], into)
            out.query_counts = (
                np.zeros((logits.shape[1], num_queries), np.int64) if num_queries else None
            )
        b = slice(start, start + len(batch.rows))
        out.scores[b] = logits.float().cpu().numpy()
        out.labels[b] = batch.labels.numpy()
        out.rows[b] = batch.rows
        if qi is not None:
            r, c = np.nonzero(out.labels[b] == 1)  # this batch's positives
            # (label, query) pairs, flattened
            pairs = c * num_queries + qi.cpu().numpy()[r, c]
            counts = np.bincount(pairs, minlength=out.query_counts.size)
            out.query_counts += counts.reshape(out.query_counts.shape)
        start = b.stop
    return out


def model_scorer(model: QKS, label_emb: torch.Tensor, query_index: bool = False) -> Callable:
    """A `score_fn` for `score_rows`: the head in eval mode, in float32."""
    model.eval()
    emb = label_emb.float()
    return lambda tokens: model(tokens.float(), emb, return_query_index=query_index)


def clip_scorer(visual_proj: torch.Tensor, label_emb: torch.Tensor) -> Callable:
    """CLIP zero-shot: the cosine of CLS token @ visual_proj with each label embedding."""
    text = torch.nn.functional.normalize(label_emb.float(), dim=-1)  # (C, E)

    def score(tokens: torch.Tensor) -> torch.Tensor:
        image = tokens[:, 0].float() @ visual_proj  # (B, D) @ (D, E) -> (B, E)
        image = torch.nn.functional.normalize(image, dim=-1)
        return image @ text.T  # (B, E) @ (E, C) -> (B, C)

    return score
