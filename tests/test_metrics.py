"""Metrics against scikit-learn and brute-force counts; the evaluation protocol's filters."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from qks_pipeline.metrics import average_precision, evaluate_scores, prf_at_k


def random_problem(n: int, c: int, seed: int, unknown: float = 0.3) -> tuple[np.ndarray, np.ndarray]:
    """Tie-free scores and +1/-1/0 labels, with some positive structure in the scores."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(np.array([1, -1], dtype=np.int8), size=(n, c), p=[0.3, 0.7])
    labels[rng.random((n, c)) < unknown] = 0
    scores = rng.permutation(n * c).reshape(n, c).astype(np.float64) / (n * c) + 0.3 * (labels == 1)
    return scores.astype(np.float32), labels


def sklearn_ap(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    out = []
    for c in range(scores.shape[1]):
        m = labels[:, c] != 0
        y = labels[m, c] == 1
        out.append(average_precision_score(y, scores[m, c]) if y.any() else np.nan)
    return np.array(out)


@pytest.mark.parametrize("seed", range(3))
def test_ap_matches_sklearn(seed: int) -> None:
    scores, labels = random_problem(200, 70, seed)  # more than one chunk of labels
    labels[:, 5] = np.where(labels[:, 5] == 1, -1, labels[:, 5])  # a label without positives -> NaN
    ours, ref = average_precision(scores, labels), sklearn_ap(scores, labels)
    assert np.isnan(ours[5]) and np.isnan(ref[5])
    np.testing.assert_allclose(ours, ref, rtol=1e-12, atol=1e-12)


def test_ap_with_ties_matches_sklearn() -> None:
    scores, labels = random_problem(150, 10, seed=7)
    scores = np.round(scores * 8) / 8  # many ties
    np.testing.assert_allclose(average_precision(scores, labels), sklearn_ap(scores, labels), atol=1e-12)


def brute_prf(scores: np.ndarray, labels: np.ndarray, k: int) -> tuple[float, float, float]:
    tp = 0
    for s, y in zip(scores.tolist(), labels.tolist(), strict=True):
        top = sorted(range(len(s)), key=lambda j: -s[j])[:k]
        tp += sum(1 for j in top if y[j] == 1)
    pos = int((labels == 1).sum())
    p, r = tp / (len(scores) * k), tp / pos
    return p, r, 2 * p * r / (p + r)


@pytest.mark.parametrize("k", [1, 3, 5])
def test_prf_at_k_matches_brute_force(k: int) -> None:
    scores, labels = random_problem(60, 12, seed=k)
    assert prf_at_k(scores, labels, k) == pytest.approx(brute_prf(scores, labels, k), rel=1e-12)


def test_evaluate_filters_images_and_labels() -> None:
    names = ["s0", "s1", "s2", "u0", "u1", "u2"]
    labels = np.array(
        [
            [1, -1, 0, -1, -1, 0],  # no unseen positive: out of zsl, in gzsl and seen
            [-1, 0, 0, 1, -1, 0],  # no seen positive: out of seen
            [0, -1, 0, -1, 1, 0],
            [0, 0, 0, 0, 0, 1],  # u2's only annotation is in this image
            [0, 0, 0, 0, 0, 0],  # no positive at all: out everywhere
        ],
        dtype=np.int8,
    )
    scores = np.random.default_rng(0).random(labels.shape)
    res = evaluate_scores(scores, labels, names, num_seen=3, top_k=[1, 2])
    zsl, gzsl, seen = res["zsl"], res["gzsl"], res["seen"]
    assert (zsl["num_images"], zsl["num_labels"], zsl["num_labels_with_ap"]) == (3, 3, 3)
    assert (gzsl["num_images"], gzsl["num_labels"], gzsl["num_labels_with_ap"]) == (4, 5, 4)  # s2 never annotated
    assert (seen["num_images"], seen["num_labels"], seen["num_labels_with_ap"]) == (1, 2, 1)  # only image 0
    assert set(gzsl["ap"]) == {"s0", "s1", "u0", "u1", "u2"} and np.isnan(gzsl["ap"]["s1"])
    assert seen["mAP"] == pytest.approx(1.0)  # s0: one positive, the only annotated entry among kept images
    assert set(zsl) >= {"p@1", "r@1", "f1@1", "p@2", "r@2", "f1@2"}


def test_evaluate_matches_direct_computation() -> None:
    scores, labels = random_problem(80, 9, seed=11, unknown=0.5)
    labels[:4, 6:] = np.where(labels[:4, 6:] == 1, -1, labels[:4, 6:])  # some images lack unseen positives
    res = evaluate_scores(scores, labels, [f"l{i}" for i in range(9)], num_seen=6, top_k=[3])["zsl"]
    keep = (labels[:, 6:] == 1).any(axis=1)
    s, y = scores[keep][:, 6:], labels[keep][:, 6:]
    assert res["num_images"] == int(keep.sum()) and res["num_labels"] == 3
    assert res["mAP"] == pytest.approx(np.nanmean(sklearn_ap(s, y)), rel=1e-12)
    assert (res["p@3"], res["r@3"], res["f1@3"]) == pytest.approx(brute_prf(s, y, 3), rel=1e-12)
