"""``specialists train-specialists``: one specialist per class set, independently (section 5.2, 6.1).

Under ``accelerate launch`` with P processes, process r trains the specialists with
m mod P = r, each on its own (no gradient sync between specialists). Outputs per
specialist in ``<run_dir>/specialists/<m>/``: ``model.safetensors`` + ``model.json``;
``checkpoint.pt`` while it trains (a crash loses at most the steps since the last one).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed

from inference import active_specialists

from .bias import dustbin_bias, dustbin_correction
from .checkpoints import load_model, save_model, sidecar_path
from .config import RunConfig
from .data import ShardIndex, load_split, normalize
from .enriched import EnrichedStream, enriched_loader
from .errors import UserError
from .generalist import check_shards, generalist_weights
from .io import atomic_write_bytes, atomic_write_json
from .progress import progress
from .surgery import collapse_logits, make_specialist, map_labels, penultimate_features
from .training import build_optimizer, resolve_mixed_precision, warmup_cosine

log = logging.getLogger(__name__)


def specialists_dir(cfg: RunConfig) -> Path:
    return Path(cfg.run_dir) / "specialists"


def specialist_weights(cfg: RunConfig, m: int) -> Path:
    return specialists_dir(cfg) / f"{m:03d}" / "model.safetensors"


@dataclass
class Context:
    """What every specialist of a run shares: data, generalist, held-out split, device."""

    cfg: RunConfig
    index: ShardIndex
    generalist: torch.nn.Module
    generalist_meta: dict
    val_images: torch.Tensor  # uint8 (N, C, S, S)
    val_labels: torch.Tensor  # (N,)
    val_logits: torch.Tensor  # (N, C) generalist logits
    val_features: torch.Tensor  # (N, D) generalist penultimate features
    device: torch.device
    autocast: torch.autocast


@torch.inference_mode()
def _run_batches(model: torch.nn.Module, images: torch.Tensor, ctx: Context, *, features: bool = False,
                 batch_size: int = 1000):
    """Logits (and penultimate features) of ``model`` over uint8 ``images``, in batches."""
    outs, feats = [], []
    for start in range(0, len(images), batch_size):
        x = normalize(images[start : start + batch_size].to(ctx.device), ctx.cfg.data)
        with ctx.autocast:
            if features:
                h, z = penultimate_features(model, x)
                feats.append(h.float().cpu())
            else:
                z = model(x)
        outs.append(z.float().cpu())
    logits = torch.cat(outs)
    return (logits, torch.cat(feats)) if features else logits


def conditional_accuracy(logits: torch.Tensor, labels: torch.Tensor, classes: list[int], *, full_head: bool) -> float:
    """Accuracy on images of Sᵐ with the prediction restricted to Sᵐ (dustbin excluded)."""
    mask = torch.isin(labels, torch.tensor(classes))
    if not mask.any():
        return float("nan")
    z = logits[mask][:, classes] if full_head else logits[mask][:, : len(classes)]
    target = map_labels(labels[mask], classes, num_classes=max(int(labels.max()) + 1, max(classes) + 1))
    return (z.argmax(dim=1) == target).float().mean().item()


def fit_bias_and_temperature(logits: torch.Tensor, targets: torch.Tensor) -> tuple[float, float]:
    """(dustbin bias b, temperature T) minimising the held-out NLL of softmax(z / T + b·e_dustbin)."""
    z = logits.double()
    log_t = torch.zeros((), dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_t, b], lr=0.5, max_iter=200, line_search_fn="strong_wolfe")
    onehot = torch.zeros(z.shape[1], dtype=torch.float64)
    onehot[-1] = 1.0

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(z / log_t.exp() + b * onehot, targets)
        loss.backward()
        return loss

    opt.step(closure)
    return float(b.detach()), float(log_t.detach().exp())


def routed_mask(general_logits: torch.Tensor, classes: list[int], top_n: int) -> torch.Tensor:
    """(N,) bool: images the ensemble routes to this specialist (a class of Sᵐ in the generalist's
    top-n), by the engine's own routing."""
    return active_specialists(general_logits, [classes], top_n=min(top_n, general_logits.shape[1]))[:, 0]


MIN_ROUTED = 50  # fewer routed val images than this: the routed fit falls back to all of val


def dustbin_fits(val_logits: torch.Tensor, ctx: Context, classes: list[int]) -> dict[str, float]:
    """Dustbin bias and temperature fitted on val two ways (sidecar fields).

    ``fitted_*``: on every val image — the natural distribution, as the prior formula assumes.
    ``routed_*``: on the val images the ensemble routes to this specialist (inference.top_n) —
    the distribution it really sees: most of those images *are* of Sᵐ, so the natural-distribution
    fit over-weights the dustbin there (measured on typefaces; docs/RESULTS.md).
    """
    targets = map_labels(ctx.val_labels, classes, ctx.index.num_classes)
    fitted_bias, fitted_t = fit_bias_and_temperature(val_logits, targets)
    mask = routed_mask(ctx.val_logits, classes, ctx.cfg.inference.top_n)
    if int(mask.sum()) >= MIN_ROUTED:
        routed_bias, routed_t = fit_bias_and_temperature(val_logits[mask], targets[mask])
    else:
        routed_bias, routed_t = fitted_bias, fitted_t
    return {"fitted_bias": fitted_bias, "fitted_temperature": fitted_t, "routed_bias": routed_bias,
            "routed_temperature": routed_t, "routed_top_n": ctx.cfg.inference.top_n, "routed_val_images": int(mask.sum())}


def specialist_loss(logits: torch.Tensor, general_logits: torch.Tensor | None, labels: torch.Tensor,
                    classes: list[int], num_classes: int, cfg: RunConfig) -> torch.Tensor:
    """Hard-label loss plus, optionally, the generalist's soft targets (section 6.1; × T²)."""
    scfg = cfg.specialists
    w, t = scfg.soft_target_weight, scfg.temperature
    if scfg.head == "dustbin":
        hard = F.cross_entropy(logits, map_labels(labels, classes, num_classes))
        if w == 0 or general_logits is None:
            return hard
        # Collapse the teacher's logits first (dustbin = log-sum-exp of the others), then soften:
        # softening first and summing the probabilities after gives a target that the collapsed
        # teacher itself does not match at T ≠ 1.
        soft_target = F.softmax(collapse_logits(general_logits, classes) / t, dim=1)
        soft = F.kl_div(F.log_softmax(logits / t, dim=1), soft_target, reduction="batchmean") * t * t
        return (1 - w) * hard + w * soft
    # full head: hard labels for the special classes, the generalist's soft targets for the others
    special = torch.isin(labels, torch.tensor(classes, device=labels.device))
    soft_per = F.kl_div(F.log_softmax(logits / t, dim=1), F.softmax(general_logits / t, dim=1), reduction="none").sum(1) * t * t
    hard_per = F.cross_entropy(logits, labels, reduction="none")
    per = torch.where(special, (1 - w) * hard_per + w * soft_per, soft_per)
    return per.mean()


def _save_checkpoint(path: Path, model, optimizer, scheduler, step: int, best_acc: float, best_state,
                     history: list) -> None:
    import io

    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "step": step, "best_acc": best_acc, "best_state": best_state, "history": history}, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def train_one(ctx: Context, m: int, classes: list[int], *, rank: int, world: int, show_progress: bool) -> Path:
    cfg, scfg = ctx.cfg, ctx.cfg.specialists
    out = specialist_weights(cfg, m)
    out.parent.mkdir(parents=True, exist_ok=True)
    ckpt_path = out.parent / "checkpoint.pt"
    counts = ctx.index.class_counts("train")
    prior = float(counts[classes].sum() / counts.sum())
    full_head = scfg.head == "full"
    set_seed(cfg.seed + 1000 * (m + 1))
    model = make_specialist(ctx.generalist, classes, head=scfg.head, features=ctx.val_features,
                            logits=ctx.val_logits).to(ctx.device)
    optimizer = build_optimizer(model, scfg.optimizer, scfg.lr, scfg.momentum, scfg.weight_decay)
    scheduler = warmup_cosine(optimizer, scfg.warmup_steps, scfg.steps)
    step, best_acc, best_state, history = 0, -1.0, None, []
    if ckpt_path.is_file():
        state = torch.load(ckpt_path, map_location=ctx.device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step, best_acc, best_state = state["step"], state["best_acc"], state["best_state"]
        history = [list(h) for h in state.get("history", [])]
        log.info("specialist %d: resumed at step %d", m, step)
    stream = EnrichedStream(ctx.index, cfg.data, classes, special_fraction=scfg.special_fraction,
                            batch_size=cfg.data.batch_size, seed=hash((cfg.seed, m, step)) % 2**31)
    batches = iter(enriched_loader(stream, cfg.data.num_workers, seed=cfg.seed + m + step))
    val_mask = torch.isin(ctx.val_labels, torch.tensor(classes))
    general_cond = conditional_accuracy(ctx.val_logits, ctx.val_labels, classes, full_head=True)
    start = time.perf_counter()
    bar = progress(range(step, scfg.steps), main_process=show_progress, desc=f"specialist {m}", unit="step", leave=False,
                   initial=step, total=scfg.steps)
    for step_index in bar:
        model.train()
        images, labels, _ = next(batches)
        x = normalize(images.to(ctx.device, non_blocking=True), cfg.data)
        labels = labels.to(ctx.device)
        with ctx.autocast:
            logits = model(x)
            general = None
            if scfg.soft_target_weight > 0 or full_head:
                with torch.no_grad():
                    general = ctx.generalist(x)
        loss = specialist_loss(logits.float(), None if general is None else general.float(), labels, classes,
                               ctx.index.num_classes, cfg)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        step = step_index + 1
        if step % scfg.eval_every == 0 or step == scfg.steps:
            model.eval()
            acc = conditional_accuracy(_run_batches(model, ctx.val_images[val_mask], ctx), ctx.val_labels[val_mask],
                                       classes, full_head=full_head)
            history.append([step, acc])
            if acc > best_acc:
                best_acc, best_state = acc, {k: v.detach().clone() for k, v in model.state_dict().items()}
        if step % scfg.checkpoint_every == 0 and step < scfg.steps:
            _save_checkpoint(ckpt_path, model, optimizer, scheduler, step, best_acc, best_state, history)
    model.load_state_dict(best_state)
    model.eval()
    val_logits = _run_batches(model, ctx.val_images, ctx)
    if full_head:
        val_logits = collapse_logits(val_logits, classes)
    fits = dustbin_fits(val_logits, ctx, classes)
    prior_bias = dustbin_bias(prior, scfg.special_fraction)
    bias, temperature = dustbin_correction({"prior_bias": prior_bias, **fits}, scfg.bias)
    gmeta = ctx.generalist_meta
    meta = {
        "role": "specialist", "id": m, "classes": classes, "class_names": [ctx.index.class_names[c] for c in classes],
        "head": scfg.head, "arch": gmeta["arch"], "arch_kwargs": gmeta.get("arch_kwargs", {}),
        "num_outputs": ctx.index.num_classes if full_head else len(classes) + 1, "num_classes": ctx.index.num_classes,
        "in_channels": gmeta["in_channels"], "image_size": gmeta["image_size"], "mean": gmeta["mean"], "std": gmeta["std"],
        "dustbin_bias": bias, "temperature": temperature, "bias_method": scfg.bias,
        "prior_bias": prior_bias, **fits,
        "special_fraction": scfg.special_fraction, "special_fraction_in_data": prior,
        "soft_target_weight": scfg.soft_target_weight, "soft_target_temperature": scfg.temperature,
        "steps": scfg.steps, "lr": scfg.lr, "source_generalist": gmeta.get("sha256"),
        "val_conditional_accuracy": best_acc, "generalist_val_conditional_accuracy": general_cond,
        "val_history": history,
        "samples_read": stream.stats.read if cfg.data.num_workers == 0 else None,
        "trained_by_rank": rank, "world_size": world, "seconds": time.perf_counter() - start,
        "config_hash": cfg.hash(),
    }
    save_model(out, model, meta)
    ckpt_path.unlink(missing_ok=True)
    log.info("specialist %d (%d classes): val conditional accuracy %.4f (generalist %.4f), bias %.3f, T %.2f",
             m, len(classes), best_acc, general_cond, bias, temperature)
    return out


def build_context(cfg: RunConfig, accelerator: Accelerator) -> Context:
    index = check_shards(cfg)
    weights = generalist_weights(cfg)
    if not weights.is_file():
        raise UserError(f"{weights}: no generalist; run `specialists train-generalist` (or import-generalist) first")
    generalist, meta = load_model(weights, device=accelerator.device)
    if meta["class_names"] != index.class_names:
        raise UserError(f"{weights}: the generalist's {meta['num_classes']} classes differ from "
                        f"{index.root}/classes.json ({index.num_classes} classes)")
    for p in generalist.parameters():
        p.requires_grad_(False)
    images, labels = load_split(index, cfg.data, "val")
    device = accelerator.device
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                              enabled=resolve_mixed_precision(cfg.generalist.mixed_precision, cpu=device.type == "cpu") != "no")
    ctx = Context(cfg, index, generalist, meta, images, labels, torch.empty(0), torch.empty(0), device, autocast)
    ctx.val_logits, ctx.val_features = _run_batches(generalist, images, ctx, features=True)
    return ctx


def refit_dustbin(ctx: Context, path: Path, classes: list[int]) -> None:
    """Recompute a finished specialist's val fits (``dustbin_fits``) and rewrite its sidecar;
    the weights are not touched. For specialists trained before a fit existed or under another
    ``inference.top_n``."""
    model, meta = load_model(path, device=ctx.device)
    logits = _run_batches(model.eval(), ctx.val_images, ctx)
    if meta.get("head") == "full":
        logits = collapse_logits(logits, classes)
    meta.update(dustbin_fits(logits, ctx, classes))
    meta["dustbin_bias"], meta["temperature"] = dustbin_correction(meta, meta.get("bias_method", "trained"))
    atomic_write_json(sidecar_path(path), meta)
    log.info("specialist at %s: routed bias %.3f, T %.2f on %d val images (all of val: %.3f, %.2f)", path,
             meta["routed_bias"], meta["routed_temperature"], meta["routed_val_images"], meta["fitted_bias"],
             meta["fitted_temperature"])


def train_specialists(cfg: RunConfig, *, only: list[int] | None = None, force: bool = False,
                      refit: bool = False) -> list[Path]:
    """Train every specialist of ``clusters.json`` (or ``only`` those ids) not trained yet; with
    ``refit``, only refit the dustbin corrections of finished ones."""
    from .cluster import load_clusters

    scfg = cfg.specialists
    if not 0.0 < scfg.special_fraction < 1.0:
        raise UserError(f"specialists.special_fraction={scfg.special_fraction}: expected a value in (0, 1)")
    accelerator = Accelerator(mixed_precision="no")
    rank, world = accelerator.process_index, accelerator.num_processes
    ctx = build_context(cfg, accelerator)
    clusters = load_clusters(Path(cfg.run_dir) / "clusters.json", ctx.index.class_names)
    ids = clusters.ids
    if only is not None:
        unknown = sorted(set(only) - set(ids))
        if unknown:
            raise UserError(f"--only {unknown}: no such specialist in clusters.json (ids {ids[0]}..{ids[-1]})")
    paths = []
    for m, classes in zip(clusters.ids, clusters.sets, strict=True):
        if m % world != rank or (only is not None and m not in only):
            continue
        path = specialist_weights(cfg, m)
        if refit:
            if not path.is_file():
                raise UserError(f"{path}: specialist {m} is not trained; --refit-bias needs finished specialists")
            refit_dustbin(ctx, path, list(classes))
        elif path.is_file() and not force:
            log.info("specialist %d already trained: %s", m, path)
        else:
            if force:
                (path.parent / "checkpoint.pt").unlink(missing_ok=True)
            path = train_one(ctx, m, list(classes), rank=rank, world=world,
                             show_progress=accelerator.is_local_main_process)
        paths.append(path)
    accelerator.wait_for_everyone()
    return paths
