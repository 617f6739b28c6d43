"""Losses against hand computations, element by element on small tensors, and the reference's."""

from __future__ import annotations

import math

import pytest
import torch

from qks_pipeline.errors import QKSError
from qks_pipeline.stage_two.losses import make_loss
from tests.qks_reference_impl import reference_asl, reference_bce

LOGITS = torch.tensor([[2.0, -1.0, 0.5, -12.0], [-0.3, 1.5, 14.0, 0.0], [0.7, -2.2, 3.0, -0.1]])
TARGETS = torch.tensor([[1, -1, 0, 1], [-1, 1, -1, 0], [0, 0, 1, -1]], dtype=torch.int8)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def test_asl_by_hand() -> None:
    total = 0.0
    for row_x, row_y in zip(LOGITS.tolist(), TARGETS.tolist(), strict=True):
        for x, y in zip(row_x, row_y, strict=True):
            p = sigmoid(x)
            if y == 1:  # gamma_pos = 0: plain log-likelihood, probability clamped at eps = 1e-5
                total += math.log(max(p, 1e-5))
            else:  # verified negatives and unknowns alike, focused with gamma_neg = 4, no clipping
                total += math.log(max(1 - p, 1e-5)) * p**4
    expected = -total * 1000 / (3 * 4)
    got = make_loss("asl")(LOGITS, TARGETS)
    assert got.ndim == 0
    assert got.item() == pytest.approx(expected, rel=1e-5)


REFERENCE = {
    "asl": reference_asl,
    "masl": lambda x, y: reference_asl(x, y, masked=True),
    "bce": reference_bce,
    "mbce": lambda x, y: reference_bce(x, y, masked=True),
}


@pytest.mark.parametrize("name", list(REFERENCE))
def test_value_and_gradient_equal_the_reference_formulas(name: str) -> None:
    """float64 logits, saturated sigmoids included; targets +1 / -1 / 0; relative tolerance 1e-6."""
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        x = torch.randn(16, 37, generator=gen, dtype=torch.float64) * 4
        y = torch.randint(-1, 2, (16, 37), generator=gen, dtype=torch.int8)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, want = make_loss(name)(a, y), REFERENCE[name](b, y)
        got.backward()
        want.backward()
        assert got.dtype == torch.float64 and abs(got.item() - want.item()) <= 1e-6 * abs(
            want.item()
        )
        assert (a.grad - b.grad).norm() <= 1e-6 * b.grad.norm()


def test_asl_focusing_weight_carries_no_gradient() -> None:
    """The reference detaches (1 - p_t)^gamma: the flowing form's value, another gradient."""
    x = LOGITS.double().requires_grad_()
    reference, flowing = make_loss("asl")(x, TARGETS), make_loss("asl_focus_grad")(x, TARGETS)
    g_ref, g_flow = torch.autograd.grad(reference, x)[0], torch.autograd.grad(flowing, x)[0]
    assert reference.item() == pytest.approx(flowing.item(), rel=1e-12)
    negative = TARGETS != 1  # gamma_pos = 0: the positives' weight is 1 either way
    assert torch.equal(g_ref[~negative], g_flow[~negative])
    assert ((g_ref - g_flow)[negative].abs() > 1e-6).any()
    # by hand for a negative: d/dx [-log(1 - p) p^4] * 1000 / 12 with p^4 constant
    p = torch.sigmoid(LOGITS.double())
    assert g_ref[0, 1].item() == pytest.approx(
        (p[0, 1] * p[0, 1] ** 4).item() * 1000 / 12, rel=1e-12
    )


def test_masked_losses_leave_unknown_out() -> None:
    changed = LOGITS.clone()
    changed[TARGETS == 0] = torch.randn(int((TARGETS == 0).sum()))
    for name in ("masl", "mbce"):
        assert make_loss(name)(changed, TARGETS).item() == pytest.approx(
            make_loss(name)(LOGITS, TARGETS).item()
        )
    # nothing unknown: masked equals plain
    full = torch.where(TARGETS == 0, -1, TARGETS).to(torch.int8)
    assert make_loss("masl")(LOGITS, full).item() == pytest.approx(
        make_loss("asl")(LOGITS, full).item()
    )
    assert make_loss("mbce")(LOGITS, full).item() == pytest.approx(
        make_loss("bce")(LOGITS, full).item()
    )


def test_bce_by_hand() -> None:
    total = 0.0
    for row_x, row_y in zip(LOGITS.tolist(), TARGETS.tolist(), strict=True):
        for x, y in zip(row_x, row_y, strict=True):
            p = sigmoid(x)
            total -= math.log(p) if y == 1 else math.log(1 - p)
    assert make_loss("bce")(LOGITS, TARGETS).item() == pytest.approx(total / 12, rel=1e-5)


def test_ranking_by_hand() -> None:
    per_image = []
    for row_x, row_y in zip(LOGITS.tolist(), TARGETS.tolist(), strict=True):
        positives = [s for s, y in zip(row_x, row_y, strict=True) if y == 1]
        negatives = [s for s, y in zip(row_x, row_y, strict=True) if y == -1]
        pairs = [(sp, sn) for sp in positives for sn in negatives]
        hinges = [max(0.0, 1 - sp + sn) for sp, sn in pairs]
        violating = [h for h in hinges if h > 0]
        per_image.append(sum(violating) / len(violating) if violating else 0.0)
    expected = sum(per_image) / len(per_image)
    # one violating pair of two, one of two, none: the divisor matters
    assert per_image == [12.0, 13.5, 0.0]
    assert make_loss("ranking")(LOGITS, TARGETS).item() == pytest.approx(expected, rel=1e-6)


def test_ranking_equals_the_all_pairs_computation_on_random_batches() -> None:
    """The (B, P, C) computation against the plain (B, C, C) one over all pairs, with gradients."""
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        x = torch.randn(8, 40, generator=gen)
        y = torch.randint(-1, 2, (8, 40), generator=gen, dtype=torch.int8)
        y[0] = -1  # an image without positives
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        got = make_loss("ranking")(a, y)
        pos, neg = (y == 1).float(), (y == -1).float()
        hinge = ((1 - b[:, :, None] + b[:, None, :]) * pos[:, :, None] * neg[:, None, :]).clamp(
            min=0
        )
        want = (hinge.sum(dim=(1, 2)) / (hinge > 0).sum(dim=(1, 2)).clamp(min=1)).mean()
        assert got.item() == pytest.approx(want.item(), rel=1e-6)
        got.backward()
        want.backward()
        torch.testing.assert_close(a.grad, b.grad)


def test_ranking_without_any_positive_is_zero() -> None:
    x = torch.randn(2, 5, requires_grad=True)
    loss = make_loss("ranking")(x, -torch.ones(2, 5, dtype=torch.int8))
    loss.backward()
    assert loss.item() == 0.0 and x.grad is not None


def test_ranking_ignores_unknown() -> None:
    changed = LOGITS.clone()
    changed[TARGETS == 0] = torch.randn(int((TARGETS == 0).sum()))
    loss = make_loss("ranking")
    assert loss(changed, TARGETS).item() == pytest.approx(loss(LOGITS, TARGETS).item())


@pytest.mark.parametrize("name", ["asl", "masl", "bce", "mbce", "ranking"])
def test_losses_have_gradients(name: str) -> None:
    x = LOGITS.clone().requires_grad_()
    make_loss(name)(x, TARGETS).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_unknown_loss_lists_choices() -> None:
    with pytest.raises(QKSError, match="asl, masl, asl_focus_grad, bce, mbce, ranking"):
        make_loss("focal")


@pytest.mark.parametrize("name", ["asl", "masl", "bce", "mbce", "ranking"])
def test_half_precision_logits(name: str) -> None:
    """Mixed precision hands float16 logits; the 1000-scaled sum must not overflow float16."""
    logits = torch.full((64, 300), -12.0)
    # every positive badly missed: a loss sum far above 65504
    targets = torch.ones(64, 300, dtype=torch.int8)
    loss = make_loss(name)
    full, half = loss(logits, targets), loss(logits.half(), targets)
    assert half.dtype == torch.float32 and torch.isfinite(half)
    assert half.item() == pytest.approx(full.item(), rel=1e-3)
