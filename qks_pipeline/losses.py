"""Training losses over logits (B, C) and targets (B, C) int8: +1 positive, -1 verified negative, 0 unknown.

`asl` (NUS-WIDE) and `bce` (Open Images) are the reference's losses; `ranking` is the ablation's ranking loss.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from qks_pipeline.errors import QKSError

LossFn = Callable[[Tensor, Tensor], Tensor]


def asymmetric_loss(
    logits: Tensor,
    targets: Tensor,
    gamma_neg: float = 4.0,
    gamma_pos: float = 0.0,
    clip: float = 0.0,
    eps: float = 1e-5,
) -> Tensor:
    """Asymmetric loss (Ridnik et al., 2021) as the reference computes it.

    Positives are the entries labelled +1; every other entry (verified negative or unknown) is a negative. Per entry:
    `y log(max(p, eps)) (1 - p)^gamma_pos + (1 - y) log(max(p_neg, eps)) p_neg'^gamma_neg` with `p = sigmoid(logit)`,
    `p_neg = min(1 - p + clip, 1)` (no clipping when `clip` is 0), and the focusing weight computed from the same
    probabilities (gradients flow through it). The negated sum is scaled by 1000 / (B x C).
    """
    logits = logits.float()  # the summed loss overflows float16 (mixed precision)
    y = (targets == 1).to(logits.dtype)
    p_pos = torch.sigmoid(logits)
    p_neg = 1.0 - p_pos
    if clip > 0:
        p_neg = (p_neg + clip).clamp(max=1.0)
    loss = y * torch.log(p_pos.clamp(min=eps)) + (1.0 - y) * torch.log(p_neg.clamp(min=eps))
    if gamma_neg > 0 or gamma_pos > 0:
        pt = p_pos * y + p_neg * (1.0 - y)  # probability of the correct side
        loss = loss * torch.pow(1.0 - pt, gamma_pos * y + gamma_neg * (1.0 - y))
    return -loss.sum() * 1000.0 / logits.numel()


def bce_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Binary cross-entropy with logits, mean over all entries; unknown (0) counts as negative, as in the reference."""
    logits = logits.float()
    return F.binary_cross_entropy_with_logits(logits, (targets == 1).to(logits.dtype))


def ranking_loss(logits: Tensor, targets: Tensor, margin: float = 1.0) -> Tensor:
    """Pairwise hinge ranking loss over annotated entries (the BiAM / MKT ranking loss).

    For each image, every (positive, verified negative) pair contributes `max(0, margin - s_pos + s_neg)`; unknown
    entries (0) take part in no pair. An image's loss is the sum over its pairs divided by the number of violating
    pairs (those with a positive hinge); an image without violations contributes 0. The loss is the mean over images.

    Pairs are formed from each image's positives only, padded to the batch's largest positive count P: (B, P, C)
    rather than (B, C, C), which matters at Open Images' 7,586 labels (P is tens, C thousands).
    """
    logits = logits.float()
    pos, neg = targets == 1, targets == -1
    most = int(pos.sum(dim=1).max()) if pos.numel() else 0
    if most == 0:
        return logits.sum() * 0.0  # no positive anywhere: no pair (zero, with a gradient path)
    is_pos, columns = pos.float().topk(most, dim=1)  # (B, P): each image's positive columns first, then padding
    s_pos = logits.gather(1, columns)  # (B, P)
    hinge = (margin - s_pos[:, :, None] + logits[:, None, :]).clamp(min=0)  # (B, P, C): margin - s_i + s_j
    hinge = hinge * (is_pos[:, :, None] * neg[:, None, :])  # only (positive i, verified negative j) pairs
    violations = (hinge > 0).sum(dim=(1, 2))  # (B,)
    per_image = hinge.sum(dim=(1, 2)) / violations.clamp(min=1)  # (B,)
    return per_image.mean()


LOSSES: dict[str, LossFn] = {"asl": asymmetric_loss, "bce": bce_loss, "ranking": ranking_loss}


def make_loss(name: str) -> LossFn:
    """The loss called `name` (`asl`, `bce` or `ranking`), as a function of (logits, targets) -> scalar."""
    if name not in LOSSES:
        raise QKSError(f"unknown loss '{name}' (choices: {', '.join(LOSSES)})")
    return LOSSES[name]
