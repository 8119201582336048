"""The re-training loss: cross-entropy, optionally mixed with distillation from a teacher.

``ce`` is the cross-entropy with label smoothing on integer labels, or the soft-target
cross-entropy on the (already smoothed) class distributions that timm's mixup/cutmix produce.
With a teacher (the unreduced model, frozen) the loss is ``(1 - alpha) * ce + alpha * kd``:

* ``"soft"``: ``kd = tau**2 * KL(teacher || student)`` on logits softened by ``tau``;
* ``"hard"``: ``kd`` is the cross-entropy on the teacher's top class (DeiT's hard distillation;
  Vim has no distillation token, so both act on the class-token logits).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

DISTILL_TYPES = ("none", "soft", "hard")


def soft_target_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Cross-entropy of ``logits`` (B, C) against class distributions ``target`` (B, C)."""
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


def classification_loss(logits: Tensor, labels: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Soft-target cross-entropy for (B, C) ``labels`` (mixup/cutmix, smoothing included), else
    cross-entropy with ``label_smoothing`` on class indices (B,)."""
    if labels.dim() == 2:
        return soft_target_ce(logits, labels)
    return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)


def distillation_loss(logits: Tensor, teacher_logits: Tensor, kind: str, tau: float = 1.0) -> Tensor:
    """``kind`` ``"soft"`` (``tau**2 * KL(teacher || student)``) or ``"hard"`` (cross-entropy on
    the teacher's top class)."""
    if kind == "soft":
        return F.kl_div(F.log_softmax(logits / tau, -1), F.log_softmax(teacher_logits / tau, -1),
                        reduction="batchmean", log_target=True) * tau * tau
    if kind == "hard":
        return F.cross_entropy(logits, teacher_logits.argmax(-1))
    raise ValueError(f"distillation must be one of {DISTILL_TYPES[1:]}, got {kind!r}")


class RetrainLoss:
    """``loss(images, logits, labels)``: the training loss of a batch (see the module doc).

    Args:
        label_smoothing: of the cross-entropy on integer labels.
        teacher: the frozen teacher, run on ``images`` without gradient; None: no distillation.
        distill: ``"none"``, ``"soft"`` or ``"hard"`` (``"none"`` ignores ``teacher``).
        alpha: weight of the distillation term.
        tau: temperature of soft distillation.

    Logits are taken in fp32 (they may come from an autocast region).
    """

    def __init__(self, label_smoothing: float = 0.0, teacher: nn.Module | None = None,
                 distill: str = "none", alpha: float = 0.5, tau: float = 1.0):
        if distill not in DISTILL_TYPES:
            raise ValueError(f"distill must be one of {DISTILL_TYPES}, got {distill!r}")
        self.label_smoothing = label_smoothing
        self.teacher = teacher if distill != "none" else None
        self.distill, self.alpha, self.tau = distill, alpha, tau

    def __call__(self, images: Tensor, logits: Tensor, labels: Tensor) -> Tensor:
        logits = logits.float()
        ce = classification_loss(logits, labels, self.label_smoothing)
        if self.teacher is None:
            return ce
        with torch.no_grad():
            teacher_logits = self.teacher(images).float()
        kd = distillation_loss(logits, teacher_logits, self.distill, self.tau)
        return (1 - self.alpha) * ce + self.alpha * kd
