"""Evaluation metrics (numpy): per-label AP, overall P/R/F1 at top-K, ZSL/GZSL, selection score.

Labels are +1 / -1 / 0; metrics are fractions in [0, 1], NaN where undefined (null in the JSON). The
filters and the `standard` and `reference` protocols: docs/design.md, sections 1 and 4; memory
(blocks of about `BLOCK` entries, never a whole copy): section 3.
"""

from __future__ import annotations

from typing import Any

import numpy as np

SETTINGS = ("zsl", "gzsl", "seen")  # unseen labels only; seen + unseen; seen only
BLOCK = 1 << 21  # entries per block
SELECTED_ON_TEST = (
    "checkpoint selected on the TEST set (reference protocol): test metrics are optimistic"
)
# what each `train.selection` maximises (and steps the plateau scheduler on)
SELECTION_SCORES = {
    "val": "mAP over the seen labels of the held-out training rows (standard protocol)",
    "test": "ZSL mAP + F1@3 + F1@5 on the test set (reference protocol), as the authors select",
}


def _label_ap(s: np.ndarray, y: np.ndarray, protocol: str) -> np.ndarray:
    """AP of each column of scores s (N, B) against labels y (N, B) +1/-1/0.

    Over each column's annotated entries only (sparse annotations cost little); NaN (standard) or 0
    (reference) without a positive.
    """
    img, lab = np.nonzero(y)  # the annotated entries, row by row
    # by label, then score descending; lexsort is stable: ties in row order
    order = np.lexsort((-s[img, lab], lab))
    img = img[order]
    lab = lab[order]
    score = s[img, lab]  # (M,)
    pos = y[img, lab] == 1  # (M,)
    del img, order
    start = np.searchsorted(lab, np.arange(s.shape[1]))  # (B,) each label's first entry
    tp = np.cumsum(pos)
    first = start[lab]  # (M,) the first entry of each entry's label
    tp -= tp[first] - pos[first]  # true positives so far, within the label
    precision = tp / (np.arange(len(lab)) - first + 1)  # (M,) at each entry's own position
    # a run of equal scores is one threshold: the precision at the end of its run
    if protocol == "standard":
        new_label = lab[1:] != lab[:-1]
        new_score = score[1:] != score[:-1]
        last = np.r_[new_label | new_score, True]  # (M,) the entries that end a run
        ends = np.where(last, np.arange(len(lab)), len(lab))
        run_end = np.minimum.accumulate(ends[::-1])[::-1]  # (M,) the end of each entry's run
        precision = precision[run_end]
    num_pos = np.bincount(lab, pos, minlength=s.shape[1])  # (B,)
    summed = np.bincount(lab, pos * precision, minlength=s.shape[1])  # (B,) over the positives
    ap = summed / np.maximum(num_pos, 1)
    return np.where(num_pos > 0, ap, np.nan if protocol == "standard" else 0.0)


def average_precision(
    scores: np.ndarray,
    labels: np.ndarray,
    protocol: str = "standard",
    rows: np.ndarray | None = None,
    columns: np.ndarray | None = None,
) -> np.ndarray:
    """AP (float64) of each label of `columns` (default: all) over the images `rows` (default: all).

    From scores (N, C), higher = more likely, and labels (N, C) +1/-1/0 (0 ignored), by `protocol`
    (docs/design.md, section 4).
    """
    assert scores.shape == labels.shape, f"scores {scores.shape} and labels {labels.shape} differ"
    rows = np.arange(scores.shape[0]) if rows is None else rows
    columns = np.arange(scores.shape[1]) if columns is None else columns
    step = max(1, BLOCK // max(len(rows), 1))
    ap = np.empty(len(columns))
    for c0 in range(0, len(columns), step):
        block = np.ix_(rows, columns[c0 : c0 + step])  # (N_rows, B) of scores and of labels
        ap[c0 : c0 + step] = _label_ap(scores[block], labels[block], protocol)
    return ap


def _topk_hits(s: np.ndarray, y: np.ndarray, ks: list[int]) -> np.ndarray:
    """Per K, how many of each image's K best labels are positive, summed; s, y (R, C).

    Ties at the K-th score: lower label index first.
    """
    pos = y == 1
    most = max(ks)
    top = np.partition(-s, most - 1, axis=1)[:, :most]  # (R, K_max) minus the K_max best
    best = np.sort(top, axis=1)  # in order
    hits = []
    for k in ks:
        kth = -best[:, k - 1 : k]  # (R, 1) each image's K-th largest score
        above = s > kth
        tied = s == kth
        room = k - above.sum(axis=1)  # (R,) places left for the tied labels
        cut = tied.sum(axis=1) > room  # the rows whose tie does not fit whole
        tied[cut] &= np.cumsum(tied[cut], axis=1) <= room[cut, None]
        hits.append(int(((above | tied) & pos).sum()))
    return np.array(hits)


def label_counts(
    labels: np.ndarray, cols: slice = slice(None)
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows with a positive among `cols` (the protocol keeps those), and per label of `cols` its
    positives and its negatives over those rows."""
    width = labels[:0, cols].shape[1]
    step = max(1, BLOCK // max(width, 1))
    rows = [np.zeros(0, np.int64)]
    pos = np.zeros(width, np.int64)
    neg = np.zeros(width, np.int64)
    for r0 in range(0, len(labels), step):
        y = labels[r0 : r0 + step, cols]  # (R, C_cols)
        kept = (y == 1).any(axis=1)
        rows.append(r0 + np.flatnonzero(kept))
        pos = pos + (y[kept] == 1).sum(axis=0)
        neg = neg + (y[kept] == -1).sum(axis=0)
    return np.concatenate(rows), pos, neg


def _prf(hits: int, n: int, k: int, num_pos: int, protocol: str) -> tuple[float, float, float]:
    """Precision, recall and F1 at K from the hits among n images' K best labels."""
    p = hits / (n * k) if n * k else float("nan")
    r = hits / num_pos if num_pos else float("nan")
    if p + r > 0:
        return p, r, 2 * p * r / (p + r)
    return p, r, 0.0 if protocol == "standard" and p == p and r == r else float("nan")


def _lacks(annotated: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """Per label, what it lacks: '' (nothing), 'positive', 'negative' or 'annotation'."""
    lacks = np.where(neg == 0, "negative", "")
    lacks = np.where(pos == 0, "positive", lacks)
    return np.where(~annotated, "annotation", lacks)


def _metrics_at_k(
    scores: np.ndarray,
    labels: np.ndarray,
    cols: slice,
    rows: np.ndarray,
    annotated: np.ndarray,
    *,
    num_pos: int,
    top_k: list[int],
    protocol: str,
) -> dict[str, float]:
    """`p@K`, `r@K` and `f1@K` per K over the images `rows` and the annotated labels of `cols`."""
    ks = [min(k, int(annotated.sum())) for k in top_k]  # K capped at the number of labels
    hits = np.zeros(len(ks), np.int64)
    step = max(1, BLOCK // max(len(annotated), 1))
    # blocks of images (none when a K is 0)
    for r0 in range(0, len(rows) if ks and all(ks) else 0, step):
        block = rows[r0 : r0 + step]
        s = scores[block, cols][:, annotated]  # (R, C_annotated)
        y = labels[block, cols][:, annotated]  # (R, C_annotated)
        hits += _topk_hits(s, y, ks)
    out = {}
    for k, capped, h in zip(top_k, ks, hits, strict=True):
        p, r, f1 = _prf(int(h), len(rows), capped, num_pos, protocol)
        out |= {f"p@{k}": p, f"r@{k}": r, f"f1@{k}": f1}
    return out


def evaluate_setting(
    scores: np.ndarray,
    labels: np.ndarray,
    cols: slice,
    top_k: list[int],
    protocol: str = "standard",
) -> dict[str, Any]:
    """The protocol on the label columns `cols` (docs/design.md, sections 1 and 4).

    Returns `mAP`, `p@K`, `r@K`, `f1@K` per K; the counts `num_images`, `num_labels` (annotated
    labels), `num_labels_scored` (in the mean), `labels_without_positive`,
    `labels_without_negative` (among the annotated); and per label of `cols`: `ap` (NaN where not in
    the mean), `lacks` ('', 'positive', 'negative' or 'annotation'), `positives` and `negatives`
    (among the kept images).
    """
    assert scores.shape == labels.shape, f"scores {scores.shape} and labels {labels.shape} differ"
    assert protocol in ("standard", "reference"), protocol
    rows, pos, neg = label_counts(labels, cols)
    annotated = pos + neg > 0
    scored = annotated & (pos > 0) & (neg > 0) if protocol == "standard" else annotated
    ap = np.full(len(pos), np.nan)
    scored_columns = np.arange(scores.shape[1])[cols][scored]
    ap[scored] = average_precision(scores, labels, protocol, rows, scored_columns)
    out: dict[str, Any] = {
        "mAP": float(ap[scored].mean()) if scored.any() else float("nan"),
        "num_images": len(rows),
        "num_labels": int(annotated.sum()),
        "num_labels_scored": int(scored.sum()),
        "labels_without_positive": int((annotated & (pos == 0)).sum()),
        "labels_without_negative": int((annotated & (neg == 0)).sum()),
    }
    num_pos = int(pos.sum())
    out |= _metrics_at_k(
        scores, labels, cols, rows, annotated, num_pos=num_pos, top_k=top_k, protocol=protocol
    )
    per_label = {"ap": ap, "lacks": _lacks(annotated, pos, neg), "positives": pos, "negatives": neg}
    return out | per_label


def evaluate_scores(
    scores: np.ndarray,
    labels: np.ndarray,
    num_seen: int,
    top_k: list[int],
    protocol: str = "standard",
) -> dict[str, dict[str, Any]]:
    """`evaluate_setting` in each setting: `zsl` (unseen labels), `gzsl` (seen + unseen), `seen`.

    Scores and labels are (N, C) over the seen labels (the first `num_seen` columns) followed by the
    unseen labels.
    """
    assert 0 <= num_seen <= scores.shape[1]
    cols = {"zsl": slice(num_seen, None), "gzsl": slice(None), "seen": slice(0, num_seen)}
    return {
        name: evaluate_setting(scores, labels, cols[name], top_k, protocol) for name in SETTINGS
    }


def reference_scores(logits: np.ndarray) -> np.ndarray:
    """float32 sigmoids, in place, as the reference ranks them (1.0, hence tied, above ~16.6)."""
    with np.errstate(over="ignore"):
        x = np.negative(logits, out=logits)
        np.exp(x, out=x)
    x += 1
    return np.reciprocal(x, out=x)


def selection_score(
    scores: np.ndarray, labels: np.ndarray, num_seen: int, selection: str
) -> dict[str, float]:
    """The number that selects the checkpoint (`score`) and its parts, as `SELECTION_SCORES` says.

    From logits and labels (N, C): for `val` the held-out rows over the seen labels (C = num_seen),
    for `test` the test rows over the seen then unseen labels (the logits overwritten by sigmoids,
    as the reference ranks them).
    """
    if selection == "val":
        m = evaluate_setting(scores, labels, slice(0, num_seen), [])["mAP"]
        return {"val_mAP": m, "score": m}
    m = evaluate_setting(
        reference_scores(scores), labels, slice(num_seen, None), [3, 5], "reference"
    )
    out = {"test_zsl_mAP": m["mAP"], "test_zsl_f1@3": m["f1@3"], "test_zsl_f1@5": m["f1@5"]}
    return out | {"score": sum(out.values())}
