"""Evaluation metrics (numpy): per-label average precision, overall P/R/F1 at top-K, and the ZSL/GZSL protocol.

Labels are +1 positive, -1 verified negative, 0 unknown. All metrics are fractions in [0, 1]; NaN where undefined.
Everything is vectorised over images so that it runs on 100k x 1000 score matrices: one sort per label, no Python
loop over images.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SETTINGS = ("zsl", "gzsl", "seen")  # unseen labels only; seen + unseen; seen only
_CHUNK = 64  # labels made contiguous per step in `average_precision` (column reads of a row-major matrix are slow)


def _label_ap(scores: np.ndarray, labels: np.ndarray) -> float:
    """Non-interpolated AP of one label over its annotated entries; tied scores form one threshold, as in sklearn."""
    annotated = labels != 0
    s, pos = scores[annotated], labels[annotated] == 1
    num_pos = int(pos.sum())
    if num_pos == 0:
        return float("nan")
    order = np.argsort(-s)  # order within a run of ties does not matter: only run ends are used
    s, pos = s[order], pos[order]
    ends = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last index of each run of equal scores (one threshold)
    tp = np.cumsum(pos)[ends]
    precision = tp / (ends + 1)
    recall_step = np.diff(tp, prepend=0) / num_pos
    return float(np.sum(recall_step * precision))


def average_precision(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """AP per label over the entries labelled +1/-1 (0 ignored).

    Args:
        scores: (N, C) scores, higher = more likely.
        labels: (N, C) int8 with +1/-1/0.

    Returns:
        (C,) float64: AP = sum over thresholds of (R_n - R_{n-1}) P_n, the definition of scikit-learn's
        `average_precision_score`; NaN for a label without a positive among its annotated entries.
    """
    assert scores.shape == labels.shape, f"scores {scores.shape} and labels {labels.shape} differ"
    ap = np.empty(scores.shape[1])
    for c0 in range(0, scores.shape[1], _CHUNK):
        s = np.ascontiguousarray(scores[:, c0 : c0 + _CHUNK].T)  # (chunk, N)
        y = np.ascontiguousarray(labels[:, c0 : c0 + _CHUNK].T)  # (chunk, N)
        ap[c0 : c0 + len(s)] = [_label_ap(s[i], y[i]) for i in range(len(s))]
    return ap


def prf_at_k(scores: np.ndarray, labels: np.ndarray, k: int) -> tuple[float, float, float]:
    """Overall (micro) precision, recall and F1 of each image's top-K labels.

    TP counts (image, label) pairs in the image's top K labelled +1. Precision = TP / (N x K); recall = TP / number of
    +1 entries; F1 their harmonic mean (0 when both are 0). K larger than the number of labels is capped at it.
    Ties at the K-th score are broken arbitrarily (as `torch.topk` does in the reference).
    """
    assert scores.shape == labels.shape, f"scores {scores.shape} and labels {labels.shape} differ"
    n, c = scores.shape
    k = min(k, c)
    if n == 0 or k == 0:
        return float("nan"), float("nan"), float("nan")
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]  # (N, K) indices of each image's K best labels
    tp = int((np.take_along_axis(labels, top, axis=1) == 1).sum())
    num_pos = int((labels == 1).sum())
    precision = tp / (n * k)
    recall = tp / num_pos if num_pos else float("nan")
    f1 = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return precision, recall, f1


def _setting_columns(name: str, num_labels: int, num_seen: int) -> np.ndarray:
    return {"zsl": np.arange(num_seen, num_labels), "gzsl": np.arange(num_labels), "seen": np.arange(num_seen)}[name]


def evaluate_setting(
    scores: np.ndarray, labels: np.ndarray, label_names: list[str], columns: np.ndarray, top_k: list[int]
) -> dict[str, Any]:
    """The protocol on one label set: keep images with a positive among `columns`, then labels annotated in them.

    Returns:
        `mAP` (mean over labels with a defined AP), `p@K`, `r@K`, `f1@K` per K, the counts `num_images`,
        `num_labels` (annotated labels kept) and `num_labels_with_ap`, and `ap`: {label name: AP} for the kept labels.
    """
    y = labels[:, columns]  # (N, C_set)
    images = np.flatnonzero((y == 1).any(axis=1))
    y = y[images]  # (N_kept, C_set)
    kept = (y != 0).any(axis=0)
    y = y[:, kept]  # (N_kept, C_kept)
    s = scores[np.ix_(images, columns[kept])]  # (N_kept, C_kept)
    ap = average_precision(s, y)
    defined = ~np.isnan(ap)
    out: dict[str, Any] = {
        "mAP": float(ap[defined].mean()) if defined.any() else float("nan"),
        "num_images": int(len(images)),
        "num_labels": int(kept.sum()),
        "num_labels_with_ap": int(defined.sum()),
    }
    for k in top_k:
        out[f"p@{k}"], out[f"r@{k}"], out[f"f1@{k}"] = prf_at_k(s, y, k)
    out["ap"] = {label_names[c]: float(a) for c, a in zip(columns[kept], ap, strict=True)}
    return out


def evaluate_scores(
    scores: np.ndarray, labels: np.ndarray, label_names: list[str], num_seen: int, top_k: list[int]
) -> dict[str, dict[str, Any]]:
    """Apply the evaluation protocol (DESIGN.md section 1) in each setting: `zsl`, `gzsl` and `seen`.

    Args:
        scores: (N, C) scores over the seen labels followed by the unseen labels.
        labels: (N, C) int8 with +1/-1/0, same columns.
        label_names: the C label names.
        num_seen: how many of the first columns are seen labels.
        top_k: the K values for P/R/F1@K.

    Returns:
        {setting: metrics}, the metrics as documented in `evaluate_setting`.
    """
    assert scores.shape == labels.shape, f"scores {scores.shape} and labels {labels.shape} differ"
    assert len(label_names) == scores.shape[1] and 0 <= num_seen <= scores.shape[1]
    return {
        name: evaluate_setting(scores, labels, label_names, _setting_columns(name, scores.shape[1], num_seen), top_k)
        for name in SETTINGS
    }
