"""Training losses (`LOSSES`) over logits (B, C) and targets (B, C) int8.

Targets are +1 positive, -1 verified negative, 0 unknown.

Every loss is a mean over images of a per-image term, so that distributed training can weight each
rank's share of a batch exactly (qks_pipeline/stage_two/data_parallel.py).
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor

from qks_pipeline.errors import QKSError

LossFn = Callable[[Tensor, Tensor], Tensor]


def _wide(logits: Tensor) -> Tensor:
    """At least float32: the summed loss overflows float16 (mixed precision); float64 stays."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32))


def asymmetric_loss(
    logits: Tensor, targets: Tensor, masked: bool = False, focus_grad: bool = False
) -> Tensor:
    """Asymmetric loss (Ridnik et al., 2021) as the reference trains it (docs/design.md, section 1).

    ASL's `AsymmetricLossOptimized(gamma_neg=4, gamma_pos=0, clip=0, eps=1e-5,
    disable_torch_grad_focal_loss=True)`. `masked` leaves unknown (0) entries out (`masl`);
    `focus_grad` lets gradients flow through the focusing weight (`asl_focus_grad`, this project's
    earlier form).
    """
    gamma_neg = 4.0
    gamma_pos = 0.0
    eps = 1e-5
    logits = _wide(logits)
    y = (targets == 1).to(logits.dtype)
    p_pos = torch.sigmoid(logits)
    p_neg = 1.0 - p_pos
    log_pos = torch.log(p_pos.clamp(min=eps))
    log_neg = torch.log(p_neg.clamp(min=eps))
    loss = y * log_pos + (1.0 - y) * log_neg
    with torch.set_grad_enabled(focus_grad and torch.is_grad_enabled()):
        pt = p_pos * y + p_neg * (1.0 - y)  # probability of the correct side
        focus = torch.pow(1.0 - pt, gamma_pos * y + gamma_neg * (1.0 - y))
    loss = loss * focus
    if masked:
        loss = loss * (targets != 0)
    return -loss.sum() * 1000.0 / logits.numel()


def bce_loss(logits: Tensor, targets: Tensor, masked: bool = False) -> Tensor:
    """BCE with logits (the reference's Open Images loss), summed over entries and divided by B x C.

    `masked` leaves unknown (0) entries out (`mbce`; the divisor stays B x C, so on fully annotated
    labels `mbce` equals `bce`).
    """
    logits = _wide(logits)
    y = (targets == 1).to(logits.dtype)
    loss = F.binary_cross_entropy_with_logits(logits, y, reduction="none")
    if masked:
        loss = loss * (targets != 0)
    return loss.sum() / logits.numel()


def ranking_loss(logits: Tensor, targets: Tensor, margin: float = 1.0) -> Tensor:
    """The BiAM / MKT pairwise hinge ranking loss, a mean over images.

    Per image: the sum of `max(0, margin - s_pos + s_neg)` over its (positive, verified negative)
    pairs, divided by the number of violating pairs (0 without any). Pairs come from each image's
    positives padded to the batch's most, P: (B, P, C), not (B, C, C) (Open Images: P is tens, C
    thousands).
    """
    logits = _wide(logits)
    pos = targets == 1
    neg = targets == -1
    most = int(pos.sum(dim=1).max()) if pos.numel() else 0
    if most == 0:
        return logits.sum() * 0.0  # no positive anywhere: no pair (zero, with a gradient path)
    # (B, P): each image's positive columns first, then padding
    is_pos, columns = pos.float().topk(most, dim=1)
    s_pos = logits.gather(1, columns)  # (B, P)
    # (B, P, C): margin - s_i + s_j
    hinge = (margin - s_pos[:, :, None] + logits[:, None, :]).clamp(min=0)
    # only (positive i, verified negative j) pairs
    hinge = hinge * (is_pos[:, :, None] * neg[:, None, :])
    violations = (hinge > 0).sum(dim=(1, 2))  # (B,)
    per_image = hinge.sum(dim=(1, 2)) / violations.clamp(min=1)  # (B,)
    return per_image.mean()


LOSSES: dict[str, LossFn] = {
    "asl": asymmetric_loss,
    "masl": partial(asymmetric_loss, masked=True),
    "asl_focus_grad": partial(asymmetric_loss, focus_grad=True),
    "bce": bce_loss,
    "mbce": partial(bce_loss, masked=True),
    "ranking": ranking_loss,
}


def make_loss(name: str) -> LossFn:
    """The loss called `name` (see LOSSES): (logits, targets) -> scalar."""
    if name not in LOSSES:
        raise QKSError(f"unknown loss '{name}' (choices: {', '.join(LOSSES)})")
    return LOSSES[name]
