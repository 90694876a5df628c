"""Specialist models made from the generalist (section 5.2): copy, then a new classifier.

A specialist for class set Sᵐ keeps the generalist's body and the classifier rows of
Sᵐ; one *dustbin* output stands for every other class.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from .registry import classifier


class CollapsedHead(nn.Module):
    """A full-softmax specialist seen as |Sᵐ|+1 outputs: the logits of Sᵐ, then the
    log-sum-exp of all other logits (the dustbin), so inference treats both heads alike."""

    def __init__(self, model: nn.Module, classes: Sequence[int]) -> None:
        super().__init__()
        self.model = model
        num_classes = classifier(model).out_features
        special = torch.as_tensor(list(classes), dtype=torch.long)
        other = torch.ones(num_classes, dtype=torch.bool)
        other[special] = False
        self.register_buffer("special", special, persistent=False)
        self.register_buffer("other", torch.nonzero(other).flatten(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, ...) → (B, |S|+1)
        logits = self.model(x)
        return torch.cat([logits[:, self.special], logits[:, self.other].logsumexp(dim=1, keepdim=True)], dim=1)


class WithEmptyDustbin(nn.Module):
    """A full classifier seen as a specialist over every class: C logits, then a dustbin that gets 0
    (the compute-matched control joins the ensemble this way)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, ...) → (B, C + 1)
        logits = self.model(x)
        return torch.cat([logits, torch.full_like(logits[:, :1], -1e9)], dim=1)


def collapse_logits(logits: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """(B, C) logits → (B, |Sᵐ|+1): the logits of Sᵐ, then log-sum-exp of the others (the dustbin)."""
    other = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
    special = torch.as_tensor(list(classes), dtype=torch.long, device=logits.device)
    other[special] = False
    return torch.cat([logits[:, special], logits[:, other].logsumexp(dim=1, keepdim=True)], dim=1)


def penultimate_features(model: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features entering ``model.fc`` (N, D), logits (N, C)) for a batch of images."""
    captured: list[torch.Tensor] = []
    handle = classifier(model).register_forward_hook(lambda _m, inputs, _out: captured.append(inputs[0]))
    try:
        logits = model(images)
    finally:
        handle.remove()
    return captured[0], logits


def other_classes(num_classes: int, classes: Sequence[int]) -> torch.Tensor:
    """(C,) bool: the classes outside Sᵐ (those the dustbin stands for)."""
    other = torch.ones(num_classes, dtype=torch.bool)
    other[torch.as_tensor(list(classes), dtype=torch.long)] = False
    return other


def dustbin_target(logits: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """(N,) float64 log Σ_{j∉Sᵐ} exp z_j of generalist logits (N, C): what the dustbin row should give.

    Row by row, so that it can be computed a batch at a time and kept instead of the logits.
    """
    return logits[:, other_classes(logits.shape[1], classes).to(logits.device)].double().logsumexp(dim=1)


EXACT_TARGET_CLASSES = 4096  # up to this many classes, dustbin_targets takes every complement's log-sum-exp


def dustbin_targets(logits: torch.Tensor, sets: Sequence[torch.Tensor], *, rows: int = 256) -> torch.Tensor:
    """(M, N) float64 :func:`dustbin_target` of each class set for generalist logits (N, C).

    Up to ``EXACT_TARGET_CLASSES`` classes, each set's own complement, exactly as
    :func:`dustbin_target`. Above, one exponential of the logits serves every set:
    log(Σ_j e^{z_j − m} − Σ_{j∈Sᵐ} e^{z_j − m}) + m — at the JFT shape the M complements'
    exponentials (61 × 15,000 per image) were the specialists stage's largest cost; rows whose mass
    outside Sᵐ is under 1e-10 of the whole, where the difference would lose digits, are taken exactly.
    """
    out = torch.empty(len(sets), len(logits), dtype=torch.float64)
    if logits.shape[1] <= EXACT_TARGET_CLASSES:
        for k, s in enumerate(sets):
            out[k] = dustbin_target(logits, s.tolist())
        return out
    for start in range(0, len(logits), rows):
        z = logits[start : start + rows].double()
        top = z.amax(dim=1)
        e = (z - top[:, None]).exp_()  # (rows, C)
        total = e.sum(dim=1)
        for k, s in enumerate(sets):
            others = total - e[:, s].sum(dim=1)
            target = others.log() + top
            lost = others <= total * 1e-10
            if lost.any():
                target[lost] = dustbin_target(logits[start : start + rows][lost], s.tolist())
            out[k, start : start + rows] = target
    return out


def make_specialist(generalist: nn.Module, classes: Sequence[int], *, head: str = "dustbin",
                    features: torch.Tensor | None = None, logits: torch.Tensor | None = None,
                    target: torch.Tensor | None = None, ridge: float = 1e-3) -> nn.Module:
    """A specialist for ``classes``, initialised from ``generalist`` (which is not modified).

    ``head="dustbin"``: the classifier gets |Sᵐ|+1 rows; the |Sᵐ| rows are the generalist's,
    so the specialist's probabilities *within* Sᵐ start equal to the generalist's. The dustbin
    row should give log Σ_{j∉Sᵐ} exp(z_j), a log-sum-exp of linear functions of the features h,
    which no single linear row equals. Given a sample of the generalist's ``features`` (N, D)
    and ``logits`` (N, C) — or, instead of the logits, their ``target`` (N,) =
    :func:`dustbin_target` — the row is the ridge least-squares fit of that log-sum-exp on h, so
    the dustbin probability starts close to the generalist's mass outside Sᵐ. Without a sample,
    it falls back to the mean of the other rows plus log(C − |Sᵐ|) (Jensen's lower bound).

    ``head="full"``: an unchanged copy (all C outputs); train it with soft targets for the
    non-special classes and wrap it in :class:`CollapsedHead` for inference.
    """
    model = copy.deepcopy(generalist).requires_grad_(True)  # the whole net trains, even from a frozen generalist
    if head == "full":
        return model
    if head != "dustbin":
        raise ValueError(f"head={head!r}: expected 'dustbin' or 'full'")
    fc = classifier(model)
    special = torch.as_tensor(list(classes), dtype=torch.long)
    other = other_classes(fc.out_features, classes)
    new = nn.Linear(fc.in_features, len(special) + 1, bias=True).to(fc.weight.device, fc.weight.dtype)
    with torch.no_grad():
        new.weight[:-1] = fc.weight[special]
        new.bias[:-1] = fc.bias[special] if fc.bias is not None else 0.0
        if features is not None and (target is not None or logits is not None):
            target = dustbin_target(logits, classes) if target is None else target
            w, b = _fit_dustbin_row(features.double(), target, ridge)
        else:
            w = fc.weight[other].double().mean(dim=0)
            b = (fc.bias[other].double().mean() if fc.bias is not None else 0.0) + torch.log(other.sum().double())
        new.weight[-1] = w.to(new.weight.dtype)
        new.bias[-1] = torch.as_tensor(b, dtype=new.bias.dtype)
    model.fc = new
    return model


def _fit_dustbin_row(h: torch.Tensor, target: torch.Tensor, ridge: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression of ``target`` (N,) on ``h`` (N, D) with an unpenalised intercept."""
    mean_h, mean_t = h.mean(dim=0), target.mean()
    hc, tc = h - mean_h, target - mean_t
    gram = hc.T @ hc / len(h)
    scale = gram.diagonal().mean().clamp_min(1e-12)
    w = torch.linalg.solve(gram + ridge * scale * torch.eye(h.shape[1], dtype=h.dtype, device=h.device), hc.T @ tc / len(h))
    return w, mean_t - mean_h @ w


def map_labels(labels: torch.Tensor, classes: Sequence[int], num_classes: int) -> torch.Tensor:
    """Generalist labels → specialist outputs: class ``classes[i]`` → i, any other class → |Sᵐ| (dustbin)."""
    table = torch.full((num_classes,), len(classes), dtype=torch.long, device=labels.device)
    table[torch.as_tensor(list(classes), dtype=torch.long, device=labels.device)] = torch.arange(len(classes), device=labels.device)
    return table[labels]


def collapse_probs(probs: torch.Tensor, classes: Sequence[int]) -> torch.Tensor:
    """(B, C) distribution → (B, |Sᵐ|+1): the probabilities of Sᵐ, then the mass outside Sᵐ."""
    special = probs[:, list(classes)]
    return torch.cat([special, (1.0 - special.sum(dim=1, keepdim=True)).clamp_min(0.0)], dim=1)
