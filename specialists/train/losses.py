"""Losses of the training stages that are more than cross-entropy."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..models.surgery import collapse_logits, map_labels


def specialist_loss(logits: torch.Tensor, general_logits: torch.Tensor | None, labels: torch.Tensor,
                    classes: Sequence[int], num_classes: int, *, head: str = "dustbin",
                    soft_target_weight: float = 0.0, temperature: float = 2.0) -> torch.Tensor:
    """Hard-label loss plus, optionally, the generalist's soft targets (section 6.1; × T²).

    ``head="dustbin"``: cross-entropy over |Sᵐ|+1 outputs (other classes → dustbin); the soft
    target is the generalist's distribution collapsed the same way. ``head="full"``: hard labels
    for the classes of Sᵐ, the generalist's soft targets for every other class.
    """
    w, t = soft_target_weight, temperature
    if head == "dustbin":
        hard = F.cross_entropy(logits, map_labels(labels, classes, num_classes))
        if w == 0 or general_logits is None:
            return hard
        # Collapse the teacher's logits first (dustbin = log-sum-exp of the others), then soften:
        # softening first and summing the probabilities after gives a target that the collapsed
        # teacher itself does not match at T ≠ 1.
        soft_target = F.softmax(collapse_logits(general_logits, classes) / t, dim=1)
        soft = F.kl_div(F.log_softmax(logits / t, dim=1), soft_target, reduction="batchmean") * t * t
        return (1 - w) * hard + w * soft
    special = torch.isin(labels, torch.as_tensor(list(classes), device=labels.device))
    soft_per = F.kl_div(F.log_softmax(logits / t, dim=1), F.softmax(general_logits / t, dim=1),
                        reduction="none").sum(1) * t * t
    hard_per = F.cross_entropy(logits, labels, reduction="none")
    per = torch.where(special, (1 - w) * hard_per + w * soft_per, soft_per)
    return per.mean()


def distillation_loss(student_logits: torch.Tensor, teacher_log_probs: torch.Tensor | None, labels: torch.Tensor, *,
                      alpha: float, temperature: float) -> torch.Tensor:
    """Section 2: ``alpha · T² · KL(softmax(log t / T) ‖ softmax(z / T)) + (1 − alpha) · CE(z, y)``.

    ``alpha`` weighs the *soft* term (the paper's convention; some libraries put it on the hard
    term). ``teacher_log_probs`` (B, C) is log t of a distribution t (e.g. the ensemble's q of
    eq. 5), softened at T as a teacher's logits would be: softmax(log t / T) ∝ t^(1/T). The T²
    keeps the soft term's gradients on the scale of the hard term's as T changes. Without a
    teacher (or with alpha = 0) it is the cross-entropy.
    """
    hard = F.cross_entropy(student_logits, labels)
    if teacher_log_probs is None or alpha == 0:
        return hard
    t = temperature
    target = F.softmax(teacher_log_probs / t, dim=1)
    soft = F.kl_div(F.log_softmax(student_logits / t, dim=1), target, reduction="batchmean") * t * t
    return alpha * soft + (1 - alpha) * hard
