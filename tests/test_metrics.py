"""Metrics against scikit-learn, brute-force counts and an independent re-implementation of the
reference's formulas; the protocol's filters, the scorable-label rule and the selection score."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from qks_pipeline.stage_two import metrics
from qks_pipeline.stage_two.metrics import (
    average_precision,
    evaluate_scores,
    evaluate_setting,
    reference_scores,
    selection_score,
)


def random_problem(
    n: int, c: int, seed: int, unknown: float = 0.3, ties: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """Scores (tied in runs when `ties`) and +1/-1/0 labels with some positive structure, plus the
    edge cases: label 1 has no positive, label 2 no negative, label 3 no annotation."""
    rng = np.random.default_rng(seed)
    labels = rng.choice(np.array([1, -1], dtype=np.int8), size=(n, c), p=[0.3, 0.7])
    labels[rng.random((n, c)) < unknown] = 0
    labels[:, 1] = np.where(labels[:, 1] == 1, -1, labels[:, 1])
    labels[:, 2] = np.where(labels[:, 2] == -1, 1, labels[:, 2])
    labels[:, 3] = 0
    scores = rng.random((n, c)) + 0.3 * (labels == 1)
    return (np.round(scores * 8) / 8 if ties else scores).astype(np.float32), labels


def sklearn_ap(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    out = []
    for c in range(scores.shape[1]):
        m = labels[:, c] != 0
        y = labels[m, c] == 1
        out.append(average_precision_score(y, scores[m, c]) if y.any() else np.nan)
    return np.array(out)


def reference_ap(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The authors' compute_AP written out: annotated entries sorted by score (ties in row order),
    precision at each positive's own position, divided by the positives; 0 without a positive."""
    out = []
    for c in range(scores.shape[1]):
        entries = sorted(
            (-float(scores[i, c]), i, labels[i, c] == 1) for i in range(len(scores)) if labels[i, c]
        )
        tp = 0
        total = 0.0
        for rank, (_, _, positive) in enumerate(entries, start=1):
            tp += positive
            total += tp / rank if positive else 0.0
        out.append(total / tp if tp else 0.0)
    return np.array(out)


def brute_prf(
    scores: np.ndarray, labels: np.ndarray, k: int, reference: bool
) -> tuple[float, float, float]:
    tp = 0
    k = min(k, scores.shape[1])  # K capped at the number of labels
    for s, y in zip(scores.tolist(), labels.tolist(), strict=True):
        tp += sum(y[j] == 1 for j in sorted(range(len(s)), key=lambda j: (-s[j], j))[:k])
    p, r = tp / (len(scores) * k), tp / int((labels == 1).sum())
    return p, r, (2 * p * r / (p + r) if p + r else (math.nan if reference else 0.0))


def _same(a, b, tol: float = 1e-9) -> bool:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return a.shape == b.shape and bool(np.all((np.isnan(a) & np.isnan(b)) | (np.abs(a - b) <= tol)))


@pytest.fixture(params=[None, 7], ids=["one-block", "tiny-blocks"])
def blocks(request, monkeypatch):
    """Each test with the default block size and with tiny blocks (many blocks, one label each)."""
    if request.param:
        monkeypatch.setattr(metrics, "BLOCK", request.param)


@pytest.mark.parametrize("seed", range(3))
def test_standard_ap_equals_sklearn_per_label(seed: int, blocks) -> None:
    scores, labels = random_problem(200, 70, seed)
    ours = average_precision(scores, labels)
    assert np.isnan(ours[1]) and np.isnan(ours[3]) and ours[2] == 1.0
    assert _same(ours, sklearn_ap(scores, labels))


@pytest.mark.parametrize("seed", range(3))
def test_reference_ap_equals_the_authors_formula(seed: int, blocks) -> None:
    scores, labels = random_problem(120, 20, seed)
    assert _same(average_precision(scores, labels, "reference"), reference_ap(scores, labels))


def _kept(labels: np.ndarray, cols: slice) -> tuple[np.ndarray, np.ndarray]:
    """Independently: the images with a positive in cols, then the labels annotated in them."""
    y = labels[:, cols]
    rows = (y == 1).any(axis=1)
    annotated = (y[rows] != 0).any(axis=0)
    return rows, annotated


@pytest.mark.parametrize("protocol", ["standard", "reference"])
def test_setting_equals_independent_computation(protocol: str, blocks) -> None:
    scores, labels = random_problem(90, 12, seed=5, unknown=0.5)
    # some images lack unseen positives
    labels[:6, 8:] = np.where(labels[:6, 8:] == 1, -1, labels[:6, 8:])
    res = evaluate_scores(scores, labels, num_seen=8, top_k=[1, 3, 5], protocol=protocol)
    for setting, cols in (("zsl", slice(8, 12)), ("gzsl", slice(0, 12)), ("seen", slice(0, 8))):
        rows, annotated = _kept(labels, cols)
        s, y = scores[rows][:, cols][:, annotated], labels[rows][:, cols][:, annotated]
        pos, neg = (y == 1).sum(0), (y == -1).sum(0)
        if protocol == "standard":
            ap, scored = sklearn_ap(s, y), (pos > 0) & (neg > 0)
        else:
            ap, scored = reference_ap(s, y), np.ones(len(pos), bool)
        m = res[setting]
        assert (m["num_images"], m["num_labels"], m["num_labels_scored"]) == (
            rows.sum(),
            annotated.sum(),
            scored.sum(),
        )
        assert (m["labels_without_positive"], m["labels_without_negative"]) == (
            (pos == 0).sum(),
            (neg == 0).sum(),
        )
        assert _same(m["mAP"], ap[scored].mean())
        assert _same(m["ap"][annotated][scored], ap[scored]) and np.isnan(m["ap"][~annotated]).all()
        for k in (1, 3, 5):
            expected = brute_prf(s, y, k, protocol == "reference")
            assert _same([m[f"p@{k}"], m[f"r@{k}"], m[f"f1@{k}"]], expected)


def test_top_k_ties_go_to_the_lower_label_index() -> None:
    scores = np.array([[0.5, 0.9, 0.5, 0.5]], dtype=np.float32)
    labels = np.array([[-1, -1, -1, 1]], dtype=np.int8)
    m = evaluate_setting(scores, labels, slice(None), [2, 3, 4])
    # top 2 = labels 1, 0; top 3 adds 2; top 4 adds 3
    assert (m["p@2"], m["p@3"], m["p@4"]) == (0.0, 0.0, 0.25)
    assert m["f1@2"] == 0.0 and math.isnan(
        evaluate_setting(scores, labels, slice(None), [2], "reference")["f1@2"]
    )


def test_filters_and_edge_cases_are_named() -> None:
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
    res = evaluate_scores(scores, labels, num_seen=3, top_k=[1, 2])
    zsl, gzsl, seen = res["zsl"], res["gzsl"], res["seen"]
    # u2: no negative
    assert (zsl["num_images"], zsl["num_labels"], zsl["num_labels_scored"]) == (3, 3, 2)
    assert list(zsl["lacks"]) == ["", "", "negative"] and zsl["labels_without_negative"] == 1
    assert (gzsl["num_images"], gzsl["num_labels"], gzsl["num_labels_scored"]) == (4, 5, 3)
    assert list(gzsl["lacks"]) == ["", "positive", "annotation", "", "", "negative"]
    assert (
        seen["num_images"],
        seen["labels_without_positive"],
        seen["labels_without_negative"],
    ) == (1, 1, 1)
    # s0 alone, without a negative: not AP 1.0
    assert math.isnan(seen["mAP"]) and seen["num_labels_scored"] == 0
    ref = evaluate_scores(scores, labels, num_seen=3, top_k=[1], protocol="reference")
    # the reference's: s0 AP 1 (no negative), s1 AP 0 (no positive)
    assert ref["seen"]["mAP"] == pytest.approx(0.5)


def test_empty_negatives_give_no_ap_of_one() -> None:
    """All negatives missing: nothing is scorable, every label is counted, no AP of 1.0 anywhere."""
    scores, labels = random_problem(60, 10, seed=3)
    labels[labels == -1] = 0
    res = evaluate_scores(scores, labels, num_seen=6, top_k=[3])
    for m in res.values():
        assert math.isnan(m["mAP"]) and not (m["ap"] == 1.0).any()
        assert m["labels_without_negative"] == m["num_labels"] > 0 and m["num_labels_scored"] == 0


def test_reference_scores_saturate_like_fp32_sigmoid() -> None:
    logits = np.array([-200.0, -1.0, 0.0, 2.0, 16.0, 17.0, 40.0, 200.0], dtype=np.float32)
    expected = (1 / (1 + np.exp(-logits.astype(np.float64)))).astype(np.float32)
    got = reference_scores(logits.copy())
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=0)
    assert got.dtype == np.float32 and got[5] == got[6] == got[7] == 1.0 and got[4] < 1.0


def test_selection_score() -> None:
    scores, labels = random_problem(80, 9, seed=2, ties=False)
    val = selection_score(scores[:, :6].copy(), labels[:, :6], 6, "val")
    assert val["score"] == val["val_mAP"] == evaluate_scores(scores, labels, 6, [])["seen"]["mAP"]
    test = selection_score(scores.copy() * 40 - 20, labels, 6, "test")
    ref = evaluate_scores(reference_scores(scores * 40 - 20), labels, 6, [3, 5], "reference")["zsl"]
    assert test["test_zsl_mAP"] == ref["mAP"] and test["test_zsl_f1@5"] == ref["f1@5"]
    assert test["score"] == pytest.approx(ref["mAP"] + ref["f1@3"] + ref["f1@5"], rel=1e-12)
