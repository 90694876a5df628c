"""``specialists train-specialists``: one specialist per class set, independently (sections 5.2, 6.1).

Under ``accelerate launch`` with P processes, process r trains the specialists with
m mod P = r, each on its own (no gradient sync between specialists). Each specialist starts
as a copy of the generalist with a dustbin head (:func:`~specialists.models.surgery.make_specialist`),
trains on the enriched stream (a fraction f of every batch from its classes), keeps the
weights of its best val conditional accuracy, and fits its dustbin corrections on val. The val
split is streamed once and kept in memory only as far as :mod:`specialists.held_out` says
(docs/MEMORY.md): memory does not grow with the number of val images.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed

from inference import active_specialists

from ..artifacts.clusters import load_clusters
from ..artifacts.deciding import check_same
from ..artifacts.model_card import (
    ModelCard,
    SpecialistHead,
    build_card,
    is_finished,
    load_model,
    read_card,
    save_model,
    write_card,
)
from ..artifacts.shard_index import ShardIndex
from ..bias import dustbin_bias, fit_bias_and_temperature
from ..config import RunConfig
from ..context import (
    TRAIN_DATA_KEYS,
    deciding_values,
    generalist_card,
    load_generalist,
    make_accelerator,
    open_shards,
)
from ..data.enriched import EnrichedStream, enriched_batches
from ..data.pipeline import normalize
from ..errors import UserError
from ..held_out import CHUNK, HeldOut, build_held_out, run_model
from ..layout import RunLayout
from ..models.surgery import collapse_logits, make_specialist, map_labels
from ..tracking import log_values, tracked
from ..train import Checkpointer, StreamSource, TrainLoop, build_optimizer, warmup_cosine
from ..train.losses import specialist_loss

log = logging.getLogger(__name__)

NAME = "train-specialists"
HELP = "train the specialists of clusters.json (works under accelerate launch)"
DESCRIPTION = ("Train one specialist per class set in <run_dir>/clusters.json, initialised from the generalist, with "
               "a dustbin class, enriched batches and a dustbin bias. Under `accelerate launch --num_processes P`, "
               "process r trains the specialists m with m mod P = r. Finished specialists are skipped; an "
               "interrupted one resumes.")
DECIDING = ("seed", *TRAIN_DATA_KEYS, "specialists")
# The correction applied at inference is chosen then (every fit is in the card); checkpoints do not change weights.
NOT_DECIDING = ("specialists.bias", "specialists.checkpoint_every")
MIN_ROUTED = 50  # fewer routed val images than this: the routed fit falls back to all of val


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--only", help="comma-separated specialist ids to train, e.g. 0,3")
    p.add_argument("--force", action="store_true", help="retrain even finished specialists")
    p.add_argument("--refit-bias", action="store_true",
                   help="only refit the dustbin bias/temperature of finished specialists on val (cards rewritten)")


def deciding(cfg: RunConfig, index: ShardIndex, generalist: ModelCard, classes: list[int]) -> dict[str, Any]:
    return deciding_values(cfg, DECIDING, drop=NOT_DECIDING, index=index, generalist=generalist.sha256,
                           classes=list(classes))


def is_done(cfg: RunConfig) -> bool:
    """Every specialist of clusters.json is trained, with this config, on these sets."""
    layout = RunLayout(cfg.run_dir)
    if not layout.clusters.is_file():
        return False
    index = ShardIndex.load(cfg.data.shards)
    clusters = load_clusters(layout.clusters, index.class_names)
    gcard = generalist_card(cfg, index)
    for m, classes in zip(clusters.ids, clusters.sets, strict=True):
        paths = layout.specialist(m)
        if not is_finished(paths):
            return False
        _check_finished(read_card(paths), paths.card, m, deciding(cfg, index, gcard, classes))
    return True


def _check_finished(card: ModelCard, where: Path, m: int, current: dict[str, Any]) -> None:
    check_same(card.deciding, current, what=where, made=f"specialist {m} trained",
               redo=f"retrain it with `specialists train-specialists --only {m} --force`")


def command(cfg: RunConfig, args: argparse.Namespace) -> int:
    only = None
    if args.only:
        try:
            only = [int(v) for v in args.only.split(",") if v.strip()]
        except ValueError:
            raise UserError(f"--only {args.only!r}: expected comma-separated specialist ids, e.g. 0,3") from None
    for path in run(cfg, only=only, force=args.force, refit=args.refit_bias):
        print(path)
    return 0


# ------------------------------------------------------------------------ what they share
@dataclass
class Context:
    """What the specialists of a run trained by this process share: data, generalist, val, device."""

    cfg: RunConfig
    index: ShardIndex
    accelerator: Accelerator
    generalist: torch.nn.Module
    generalist_card: ModelCard
    val: HeldOut  # the val split, streamed once (images on disk, a bounded sample in memory)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


def build_context(cfg: RunConfig, accelerator: Accelerator, index: ShardIndex,
                  specialists: list[tuple[int, list[int]]]) -> Context:
    """The generalist (frozen) and one pass of it over val for ``specialists`` ((id, classes) pairs)."""
    generalist, card = load_generalist(cfg, index, accelerator.device)
    for p in generalist.parameters():
        p.requires_grad_(False)
    val = build_held_out(generalist, index, cfg, accelerator, specialists, RunLayout(cfg.run_dir).specialists_dir)
    return Context(cfg, index, accelerator, generalist, card, val)


def specialist_logits(model: torch.nn.Module, ctx: Context, classes: list[int], rows: torch.Tensor, *,
                      full_head: bool) -> torch.Tensor:
    """(len(rows), |Sᵐ|+1) logits of a specialist on val ``rows`` (a full head collapsed to set + dustbin)."""
    model.eval()
    pieces = [run_model(model, x, ctx.accelerator, ctx.cfg) for x in ctx.val.images.chunks(rows, CHUNK)]
    logits = torch.cat(pieces) if pieces else torch.zeros(0, len(classes) + 1)
    return collapse_logits(logits, classes) if full_head else logits


# --------------------------------------------------------------------- held-out figures
def conditional_accuracy(logits: torch.Tensor, labels: torch.Tensor, classes: list[int], *, full_head: bool) -> float:
    """Accuracy on images of Sᵐ with the prediction restricted to Sᵐ (dustbin excluded)."""
    return mean_or_nan(_specialist_hits(logits, labels, classes, full_head=full_head))


def _specialist_hits(logits: torch.Tensor, labels: torch.Tensor, classes: list[int], *, full_head: bool) -> torch.Tensor:
    """(k,) bool over the images of Sᵐ among ``labels``: is the argmax over Sᵐ (dustbin excluded) the label?"""
    mask = torch.isin(labels, torch.tensor(classes))
    z = logits[mask][:, classes] if full_head else logits[mask][:, : len(classes)]
    return z.argmax(dim=1) == map_labels(labels[mask], classes, num_classes=max(classes) + 1)


def mean_or_nan(hits: torch.Tensor) -> float:
    """The share of True in ``hits``; NaN when there is none to count."""
    return hits.float().mean().item() if len(hits) else float("nan")


def routed_mask(general_logits: torch.Tensor, classes: list[int], top_n: int) -> torch.Tensor:
    """(N,) bool: images the ensemble routes to this specialist (a class of Sᵐ in the generalist's
    top-n), by the engine's own routing."""
    return active_specialists(general_logits, [classes], top_n=min(top_n, general_logits.shape[1]))[:, 0]


def dustbin_fits(val_logits: torch.Tensor, ctx: Context, m: int, classes: list[int]) -> dict[str, Any]:
    """Dustbin bias and temperature fitted on val's sample (all of val up to
    ``held_out.SAMPLE_ROWS`` images) two ways (card fields); ``val_logits`` are the specialist's there.

    ``fitted_*``: on every sample image — the natural distribution, as the prior formula assumes.
    ``routed_*``: on the sample images the ensemble routes to this specialist (inference.top_n) —
    the distribution it really sees, where most images *are* of Sᵐ (docs/RESULTS.md).
    """
    targets = map_labels(ctx.val.sample_labels, classes, ctx.index.num_classes)
    fitted_bias, fitted_t = fit_bias_and_temperature(val_logits, targets)
    mask = ctx.val.routed[:, ctx.val.column(m)]
    if int(mask.sum()) >= MIN_ROUTED:
        routed_bias, routed_t = fit_bias_and_temperature(val_logits[mask], targets[mask])
    else:
        routed_bias, routed_t = fitted_bias, fitted_t
    return {"fitted_bias": fitted_bias, "fitted_temperature": fitted_t, "routed_bias": routed_bias,
            "routed_temperature": routed_t, "routed_top_n": ctx.cfg.inference.top_n, "routed_val_images": int(mask.sum())}


# ---------------------------------------------------------------------- one specialist
def train_one(ctx: Context, m: int, classes: list[int], *, force: bool = False) -> Path:
    """Train specialist ``m`` on ``classes`` (resuming its checkpoint), fit its corrections, save it."""
    cfg, scfg = ctx.cfg, ctx.cfg.specialists
    paths = RunLayout(cfg.run_dir).specialist(m)
    set_seed(cfg.seed + 1000 * (m + 1))
    model = make_specialist(ctx.generalist, classes, head=scfg.head, features=ctx.val.features,
                            target=ctx.val.targets[ctx.val.column(m)])
    optimizer = build_optimizer(model, scfg.optimizer, scfg.lr, scfg.momentum, scfg.weight_decay)
    scheduler = warmup_cosine(optimizer, scfg.warmup_steps, scfg.steps)
    decided = deciding(cfg, ctx.index, ctx.generalist_card, classes)
    checkpoints = Checkpointer(paths.checkpoints, deciding={**decided, "precision": ctx.accelerator.mixed_precision})
    loop = TrainLoop(ctx.accelerator, model, optimizer, scheduler, checkpointer=checkpoints, ddp=False,
                     checkpoint_every=scfg.checkpoint_every, desc=f"specialist {m}",
                     show_progress=ctx.accelerator.is_local_main_process, track_as=tracker_name(m),
                     track_every=cfg.tracking.every)
    loop.start(force=force)
    # The stream is seeded by (seed, m) alone: a resumed specialist replays it and skips what it used.
    stream = EnrichedStream(ctx.index, cfg.data, classes, special_fraction=scfg.special_fraction,
                            batch_size=cfg.data.batch_size, seed=hash((cfg.seed, m, 0)) % 2**31)
    source = StreamSource(lambda: enriched_batches(stream, cfg.data.num_workers, seed=cfg.seed + m))
    start = time.perf_counter()
    loop.fit(source, _loss(ctx, classes), scfg.steps, on_step=_keep_best(ctx, m, classes))
    card = _card(ctx, m, classes, loop, decided, {
        "samples_read": stream.stats.read if cfg.data.num_workers == 0 else None,
        "trained_by_rank": ctx.accelerator.process_index, "world_size": ctx.accelerator.num_processes,
        "seconds": time.perf_counter() - start})
    save_model(paths, loop.unwrapped, card)
    checkpoints.clear()
    loop.close()
    log.info("specialist %d (%d classes): val conditional accuracy %.4f (generalist %.4f), routed bias %.3f, T %.2f",
             m, len(classes), card.training["val_conditional_accuracy"],
             card.training["generalist_val_conditional_accuracy"], card.specialist.routed_bias,
             card.specialist.routed_temperature)
    return paths.weights


def _loss(ctx: Context, classes: list[int]):
    """The loss of an enriched batch: hard labels (other classes → dustbin), and the generalist's
    soft targets when ``specialists.soft_target_weight`` > 0 or the head is full."""
    cfg, scfg = ctx.cfg, ctx.cfg.specialists
    need_teacher = scfg.soft_target_weight > 0 or scfg.head == "full"

    def loss_fn(model: torch.nn.Module, batch) -> tuple[torch.Tensor, int]:
        images, labels, _ = batch
        x = normalize(images.to(ctx.device, non_blocking=True), cfg.data)
        labels = labels.to(ctx.device)
        logits = model(x)
        general = None
        if need_teacher:
            with torch.no_grad():
                general = ctx.generalist(x).float()
        return specialist_loss(logits.float(), general, labels, classes, ctx.index.num_classes, head=scfg.head,
                               soft_target_weight=scfg.soft_target_weight, temperature=scfg.temperature), len(labels)

    return loss_fn


def tracker_name(m: int) -> str:
    """Specialist ``m``'s prefix in the experiment trackers (sorted by id)."""
    return f"specialist-{m:03d}"


def _keep_best(ctx: Context, m: int, classes: list[int]):
    """The ``on_step`` hook: every ``eval_every`` steps (and at the last), the val conditional accuracy
    (also to the trackers); the weights of the best so far are kept (in the checkpoints too)."""
    scfg = ctx.cfg.specialists
    rows = ctx.val.rows_of(classes)  # read from disk at every evaluation, CHUNK images at a time
    labels = ctx.val.labels[rows]

    def on_step(loop: TrainLoop) -> None:
        st = loop.state
        if st.step % scfg.eval_every and st.step != scfg.steps:
            return
        loop.model.eval()
        hits = [_specialist_hits(run_model(loop.model, x, ctx.accelerator, ctx.cfg), labels[i : i + len(x)], classes,
                                 full_head=scfg.head == "full")
                for i, x in zip(range(0, len(rows), CHUNK), ctx.val.images.chunks(rows, CHUNK), strict=True)]
        acc = mean_or_nan(torch.cat(hits) if hits else torch.zeros(0, dtype=torch.bool))
        st.log.setdefault("history", []).append([st.step, acc])
        log_values(ctx.accelerator, {f"{tracker_name(m)}/val/conditional_accuracy": acc}, step=st.step)
        if acc > st.log.get("best_acc", -1.0):
            st.log["best_acc"] = acc
            loop.extra_weights["best"] = {k: v.detach().clone() for k, v in loop.unwrapped.state_dict().items()}

    return on_step


def _card(ctx: Context, m: int, classes: list[int], loop: TrainLoop, decided: dict[str, Any],
          facts: dict[str, Any]) -> ModelCard:
    """Load the best weights into the loop's model, fit the dustbin corrections on val, describe it."""
    cfg, scfg = ctx.cfg, ctx.cfg.specialists
    model = loop.unwrapped
    model.load_state_dict(loop.extra_weights["best"])
    val_logits = specialist_logits(model, ctx, classes, ctx.val.sample, full_head=scfg.head == "full")
    counts = ctx.index.class_counts("train")
    prior = float(counts[classes].sum() / counts.sum())
    head = SpecialistHead(id=m, classes=list(classes), head=scfg.head, special_fraction=scfg.special_fraction,
                          special_fraction_in_data=prior, prior_bias=dustbin_bias(prior, scfg.special_fraction),
                          **dustbin_fits(val_logits, ctx, m, classes))
    gcard = ctx.generalist_card
    general_cond = mean_or_nan(ctx.val.general_hits[ctx.val.column(m)])
    return build_card("specialist", arch=gcard.arch, arch_kwargs=gcard.arch_kwargs,
                      num_outputs=ctx.index.num_classes if scfg.head == "full" else len(classes) + 1,
                      class_names=ctx.index.class_names, data_cfg=cfg.data, data=ctx.index.root, deciding=decided,
                      source_generalist=gcard.sha256, specialist=head,
                      training={"steps": scfg.steps, "lr": scfg.lr, "bias_method": scfg.bias,
                                "soft_target_weight": scfg.soft_target_weight, "temperature": scfg.temperature,
                                "val_conditional_accuracy": loop.state.log["best_acc"],
                                "generalist_val_conditional_accuracy": general_cond,
                                "val_history": loop.state.log["history"], **facts})


def refit_dustbin(ctx: Context, m: int, classes: list[int]) -> Path:
    """Recompute a finished specialist's val fits (:func:`dustbin_fits`) and rewrite its card; the
    weights are not touched. For another ``inference.top_n`` than the one it was fitted for."""
    paths = RunLayout(ctx.cfg.run_dir).specialist(m)
    if not is_finished(paths):
        raise UserError(f"{paths.weights}: specialist {m} is not trained; --refit-bias needs finished specialists")
    model, card = load_model(paths, device=ctx.device)
    logits = specialist_logits(model, ctx, classes, ctx.val.sample, full_head=card.specialist.head == "full")
    fits = dustbin_fits(logits, ctx, m, classes)
    head = SpecialistHead(**{**card.specialist.__dict__, **fits})
    write_card(paths, ModelCard(**{**card.__dict__, "specialist": head}))
    log.info("specialist %d: routed bias %.3f, T %.2f on %d val images (all of val: %.3f, %.2f)", m,
             head.routed_bias, head.routed_temperature, head.routed_val_images, head.fitted_bias,
             head.fitted_temperature)
    return paths.weights


# ----------------------------------------------------------------------------- the stage
def run(cfg: RunConfig, *, only: list[int] | None = None, force: bool = False, refit: bool = False) -> list[Path]:
    """Train every specialist of ``clusters.json`` (or ``only`` those ids) not trained yet; with
    ``refit``, only refit the dustbin corrections of finished ones."""
    accelerator = make_accelerator(cfg)
    with tracked(accelerator, cfg, NAME):
        return _run(cfg, accelerator, only=only, force=force, refit=refit)


def _run(cfg: RunConfig, accelerator: Accelerator, *, only: list[int] | None, force: bool, refit: bool) -> list[Path]:
    layout = RunLayout(cfg.run_dir)
    rank, world = accelerator.process_index, accelerator.num_processes
    index = open_shards(cfg)
    clusters = load_clusters(layout.clusters, index.class_names)
    if only is not None:
        unknown = sorted(set(only) - set(clusters.ids))
        if unknown:
            raise UserError(f"--only {unknown}: no such specialist in {layout.clusters} "
                            f"(ids {clusters.ids[0]}..{clusters.ids[-1]})")
    mine = [(m, list(classes)) for m, classes in zip(clusters.ids, clusters.sets, strict=True)
            if m % world == rank and (only is None or m in only)]
    paths = {m: layout.specialist(m).weights for m, _ in mine}
    todo = [(m, classes) for m, classes in mine if refit or force or not _finished(cfg, index, m, classes)]
    if todo:  # one generalist pass over val serves them all
        ctx = build_context(cfg, accelerator, index, todo)
        try:
            for m, classes in todo:
                paths[m] = refit_dustbin(ctx, m, classes) if refit else train_one(ctx, m, classes, force=force)
        finally:
            ctx.val.close()
    accelerator.wait_for_everyone()
    return [paths[m] for m, _ in mine]


def _finished(cfg: RunConfig, index: ShardIndex, m: int, classes: list[int]) -> bool:
    """Specialist ``m`` is trained, with this config's deciding values (else: one line saying which differs)."""
    spec = RunLayout(cfg.run_dir).specialist(m)
    if not is_finished(spec):
        return False
    _check_finished(read_card(spec), spec.card, m, deciding(cfg, index, generalist_card(cfg, index), classes))
    log.info("specialist %d already trained: %s", m, spec.weights)
    return True
