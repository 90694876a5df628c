"""The trained ensemble of a run as an :class:`inference.EnsembleEngine` (section 5).

:func:`load_ensemble` reads the run's generalist, ``clusters.json`` and every specialist it
lists, checks that they belong together, and builds the engine with each specialist's dustbin
correction chosen by ``inference.bias`` (``trained``: as ``specialists.bias`` says). Every
mismatch is a one-line :class:`UserError` naming the file. All cards are checked before any
weights are loaded. Not a stage: ``evaluate`` and ``predict`` use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from inference import EnsembleEngine, EnsemblePrediction

from .artifacts.clusters import Clusters, load_clusters
from .artifacts.model_card import ModelCard, is_finished, load_model, read_card
from .bias import dustbin_correction
from .config import RunConfig
from .errors import UserError
from .layout import RunLayout
from .models.surgery import CollapsedHead, WithEmptyDustbin
from .train.precision import resolve_mixed_precision


@dataclass(frozen=True)
class LoadedEnsemble:
    """An engine and what it was built from."""

    engine: EnsembleEngine
    class_names: list[str]
    clusters: Clusters
    generalist_path: Path
    generalist_card: ModelCard
    specialist_paths: list[Path]  # in clusters.json order (= the engine's specialist order)
    specialist_cards: list[ModelCard]
    correction: str  # the dustbin correction applied: prior | fit | routed | none

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def ids(self) -> list[int]:
        return self.clusters.ids

    @property
    def sets(self) -> list[list[int]]:
        return self.clusters.sets


def correction_choice(cfg: RunConfig) -> str:
    """The dustbin correction inference applies: ``inference.bias``, where ``trained`` defers to ``specialists.bias``."""
    return cfg.specialists.bias if cfg.inference.bias == "trained" else cfg.inference.bias


def amp_setting(cfg: RunConfig, device: torch.device) -> bool | torch.dtype:
    """The engine's autocast, from the run's one mixed-precision rule."""
    precision = resolve_mixed_precision(cfg.generalist.mixed_precision, device)
    return {"no": False, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_ensemble(cfg: RunConfig, device: str | torch.device = "cpu") -> LoadedEnsemble:
    """Load the generalist and every specialist of ``clusters.json`` as an :class:`EnsembleEngine`.

    Routing and solver options come from ``cfg.inference`` (top_n, solver, tol, max_iter).
    """
    device = torch.device(device)
    layout = RunLayout(cfg.run_dir)
    gen_paths = layout.generalist
    if not is_finished(gen_paths):
        raise UserError(f"{gen_paths.weights}: no generalist; run `specialists train-generalist` "
                        "(or import-generalist) first")
    gcard = read_card(gen_paths)
    clusters = load_clusters(layout.clusters, gcard.class_names, against=f"the generalist {gen_paths.weights}")
    icfg = cfg.inference
    if icfg.top_n > gcard.num_classes:
        raise UserError(f"inference.top_n={icfg.top_n} but the generalist has {gcard.num_classes} classes")
    choice = correction_choice(cfg)
    cards = []
    for m, classes in zip(clusters.ids, clusters.sets, strict=True):
        paths = layout.specialist(m)
        if not paths.weights.is_file():
            raise UserError(f"{paths.weights}: specialist {m} of {clusters.path} is missing; "
                            "run `specialists train-specialists`")
        card = read_card(paths)
        _check_specialist(card, paths.card, m, classes, clusters.path, gcard, gen_paths.weights)
        if choice == "routed" and card.specialist.routed_top_n != icfg.top_n:
            raise UserError(f"{paths.card}: the routed dustbin fit was made for top_n={card.specialist.routed_top_n}, "
                            f"inference.top_n={icfg.top_n}; run `specialists train-specialists --refit-bias` "
                            f"with inference.top_n={icfg.top_n}")
        cards.append(card)

    generalist, _ = load_model(gen_paths, device=device, card=gcard)
    specialists = []
    for m, card in zip(clusters.ids, cards, strict=True):
        model, _ = load_model(layout.specialist(m), device=device, card=card)
        specialists.append(CollapsedHead(model, card.specialist.classes).to(device) if card.specialist.head == "full"
                           else model)
    biases, temperatures = zip(*(dustbin_correction(card.specialist, choice) for card in cards), strict=True)
    engine = EnsembleEngine(
        generalist, specialists, [torch.tensor(s) for s in clusters.sets], list(biases),
        temperatures=list(temperatures), top_n=icfg.top_n, method=icfg.solver, tol=icfg.tol,
        max_iter=icfg.max_iter, amp=amp_setting(cfg, device), channels_last=cfg.generalist.channels_last,
    )
    return LoadedEnsemble(engine, list(clusters.class_names), clusters, gen_paths.weights, gcard,
                          [layout.specialist(m).weights for m in clusters.ids], cards, choice)


def load_control_engine(cfg: RunConfig, loaded: LoadedEnsemble, copies: int = 1) -> EnsembleEngine | None:
    """The compute-matched control: the generalist with its ``copies`` fine-tuned copies, each one
    "specialist" over all classes (empty dustbin), combined by the same solver; None if not trained."""
    family = RunLayout(cfg.run_dir).control_copies(copies)
    if not all(is_finished(paths) for paths in family):
        return None
    models = []
    for paths in family:
        model, card = load_model(paths, device=loaded.engine.device)
        if card.source_generalist != loaded.generalist_card.sha256:
            raise UserError(f"{paths.weights}: the control was made from another generalist than "
                            f"{loaded.generalist_path}; retrain it with `specialists train-control --force`")
        models.append(WithEmptyDustbin(model))
    ref = loaded.engine
    return EnsembleEngine(ref.generalist, models, [torch.arange(loaded.num_classes)] * len(models),
                          [0.0] * len(models), top_n=ref.top_n, method=ref.method, tol=ref.tol,
                          max_iter=ref.max_iter, amp=amp_setting(cfg, ref.device), channels_last=ref.channels_last)


def control_name(copies: int, rule: str = "solver") -> str:
    """A control's predictor name: ``control`` (one copy), ``control-x<K>`` (K copies, the solver),
    ``control-x<K>-mean`` (K copies, the plain mean of probabilities)."""
    name = "control" if copies == 1 else f"control-x{copies}"
    return name if rule == "solver" else f"{name}-mean"


def load_controls(cfg: RunConfig, loaded: LoadedEnsemble) -> dict[str, EnsembleEngine | MeanEnsemble]:
    """Every trained control family of the run (``control/``, ``control-x<K>/``) as named predictors:
    by the solver, and for K > 1 also by the plain mean (the two agree: with every member covering
    every class, eq. 5's optimum is the mean; the mean is the independent check)."""
    found: dict[str, EnsembleEngine | MeanEnsemble] = {}
    for copies in RunLayout(cfg.run_dir).control_counts():
        engine = load_control_engine(cfg, loaded, copies)
        found[control_name(copies)] = engine
        if copies > 1:
            found[control_name(copies, "mean")] = MeanEnsemble(engine)
    return found


def load_predictors(cfg: RunConfig, loaded: LoadedEnsemble, *, controls: bool | None = None) -> dict[str, Any]:
    """Every predictor of the run by name: ``ensemble``, the controls (``inference.control``, or
    ``controls``) and every student (``student:<name>``); each has the engine's ``predict``."""
    predictors: dict[str, Any] = {"ensemble": loaded.engine}
    if cfg.inference.control if controls is None else controls:
        predictors.update(load_controls(cfg, loaded))
    predictors.update({f"student:{name}": student for name, student in load_students(cfg, loaded).items()})
    return predictors


class MeanEnsemble:
    """The plain mean of the probabilities of an engine's generalist and members, each over every class
    (a control's copies): q = (pᵍ + Σₖ pᵏ) / (1 + K), with the engine's ``predict`` interface."""

    def __init__(self, engine: EnsembleEngine) -> None:
        self.engine = engine
        self.device = engine.device

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, *, return_q: bool = False, top_k: int | None = None,
                **_: object) -> EnsemblePrediction:
        engine = self.engine
        images = images.to(self.device, non_blocking=True)
        p_general = engine.general_probs(images)  # (B, C)
        q = p_general.clone()
        for m in range(len(engine.specialists)):
            q += engine.specialist_probs(m, images)[:, :-1]  # the empty dustbin dropped
        q /= 1 + len(engine.specialists)
        probs, idx = q.topk(top_k or 1, dim=1)
        g_prob, g_top = p_general.max(dim=1)
        active = torch.ones((len(q), len(engine.specialists)), dtype=torch.bool, device=q.device)
        return EnsemblePrediction(top1=idx[:, 0], top1_prob=probs[:, 0], general_top1=g_top, general_top1_prob=g_prob,
                                  active=active, q=q if return_q else None, p_general=p_general if return_q else None,
                                  topk_indices=idx if top_k is not None else None,
                                  topk_probs=probs if top_k is not None else None)


class ModelPredictor:
    """One network (a distilled student) with the engine's ``predict`` interface, so that evaluation
    and prediction treat it like an ensemble: q = its softmax, no specialist active."""

    def __init__(self, model: torch.nn.Module, device: torch.device, amp: bool | torch.dtype = False) -> None:
        self.model = model.eval()
        self.device = device
        self.amp_dtype = (amp if isinstance(amp, torch.dtype) else torch.bfloat16) if amp and device.type == "cuda" else None

    @torch.inference_mode()
    def predict(self, images: torch.Tensor, *, return_q: bool = False, top_k: int | None = None,
                **_: object) -> EnsemblePrediction:
        images = images.to(self.device, non_blocking=True)
        with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype or torch.bfloat16,
                            enabled=self.amp_dtype is not None):
            logits = self.model(images)
        q = torch.softmax(logits.float(), dim=1)
        probs, idx = q.topk(top_k or 1, dim=1)
        empty = torch.zeros((len(q), 0), dtype=torch.bool, device=q.device)
        return EnsemblePrediction(top1=idx[:, 0], top1_prob=probs[:, 0], general_top1=idx[:, 0],
                                  general_top1_prob=probs[:, 0], active=empty, q=q if return_q else None,
                                  p_general=None, topk_indices=idx if top_k is not None else None,
                                  topk_probs=probs if top_k is not None else None)


def load_students(cfg: RunConfig, loaded: LoadedEnsemble) -> dict[str, ModelPredictor]:
    """Every finished student of the run (``students/<name>``), checked against the generalist."""
    layout = RunLayout(cfg.run_dir)
    students = {}
    for name in layout.student_names():
        paths = layout.student(name)
        model, card = load_model(paths, device=loaded.engine.device)
        if card.class_names != loaded.class_names:
            raise UserError(f"{paths.card}: the student's classes differ from the generalist's {loaded.generalist_path}")
        students[name] = ModelPredictor(model, loaded.engine.device, amp_setting(cfg, loaded.engine.device))
    return students


def _check_specialist(card: ModelCard, where: Path, m: int, classes: list[int], cpath: Path, gcard: ModelCard,
                      gen_path: Path) -> None:
    head = card.specialist
    if card.role != "specialist" or head is None:
        raise UserError(f"{where}: not a specialist's card (role {card.role!r})")
    if card.num_classes != gcard.num_classes:
        raise UserError(f"{where}: specialist {m} was trained on {card.num_classes} classes but the generalist "
                        f"{gen_path} has {gcard.num_classes}")
    if head.classes != list(classes):
        raise UserError(f"{where}: specialist {m}'s classes {head.classes} differ from {cpath} "
                        f"({list(classes)}); retrain it with `specialists train-specialists --only {m} --force`")
    expected = {"dustbin": len(classes) + 1, "full": gcard.num_classes}.get(head.head)
    if expected is None:
        raise UserError(f"{where}: unknown head {head.head!r} (expected dustbin or full)")
    if card.num_outputs != expected:
        raise UserError(f"{where}: a {head.head} head over {len(classes)} classes should have {expected} outputs, "
                        f"the card says {card.num_outputs}")
    if card.source_generalist != gcard.sha256:
        raise UserError(f"{where}: specialist {m} was made from another generalist (sha256 "
                        f"{str(card.source_generalist)[:12]}…, {gen_path} is {gcard.sha256[:12]}…); "
                        "retrain it with `specialists train-specialists --force`")
