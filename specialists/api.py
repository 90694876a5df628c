"""The Python API: a run's (or an exported package's) predictor in a notebook or a server.

    import specialists
    model = specialists.load("runs/fashion-mnist")              # or a package from `specialists export`
    pred = model.predict(["shirt.png", "boot.png"], top_k=3)
    pred.names, pred.prob, pred.topk_indices

Images go through the evaluation transform recorded with the models (``data.image_size``,
``channels``, ``mean``, ``std``) exactly as ``specialists predict`` applies it, so the answers are
the same to the last bit. Bad input raises ``ValueError`` with a one-line message; a run or package
that cannot be loaded raises :class:`~specialists.errors.UserError`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .artifacts.package import Package, is_package, read_package
from .config import RunConfig
from .data.pipeline import build_transform, normalize
from .errors import UserError
from .stages.export import run_config
from .stages.predict import _load, image_to_tensor, open_predictor

ImageLike = str | Path | Image.Image | torch.Tensor


@dataclass(frozen=True)
class Prediction:
    """A batch's answers, one entry per image (B of them); ``==`` compares all but ``q``."""

    top1: list[int]
    names: list[str]  # class names of top1
    prob: list[float]  # q at top1
    topk_indices: list[list[int]]  # (B, k)
    topk_probs: list[list[float]]  # (B, k)
    active: list[list[int]]  # ids of the specialists that ran (controls: the copies' indices; else empty)
    q: torch.Tensor | None = field(default=None, compare=False)  # (B, C) float32 on the CPU, with return_q


class Predictor:
    """One predictor of a run or package (``generalist``, ``ensemble``, a control, ``student:NAME``)."""

    def __init__(self, cfg: RunConfig, *, device: str | torch.device = "cpu", predictor: str = "ensemble",
                 package: Package | None = None) -> None:
        loaded, name, model = open_predictor(cfg, device, predictor, package=package)
        self._model = model
        self._data = cfg.data
        self._transform = build_transform(cfg.data, train=False)
        self.class_names: list[str] = list(loaded.class_names)
        self.predictor: str = name
        self.image_size: int = cfg.data.image_size
        self.channels: int = cfg.data.channels
        self.mean: tuple[float, ...] = tuple(cfg.data.mean)
        self.std: tuple[float, ...] = tuple(cfg.data.std)
        self.specialist_ids: list[int] = list(loaded.ids)
        self.device: torch.device = loaded.engine.device
        self._active_ids = self.specialist_ids if name == "ensemble" else None  # None: the columns' indices

    def __repr__(self) -> str:
        return (f"Predictor({self.predictor!r}, {len(self.class_names)} classes, {len(self.specialist_ids)} "
                f"specialists, input ({self.channels}, {self.image_size}, {self.image_size}), {self.device})")

    # ------------------------------------------------------------------------------ predict
    def predict(self, images: ImageLike | Sequence[ImageLike], *, top_k: int = 1,
                return_q: bool = False) -> Prediction:
        """Classify raw images: a uint8 (B, C, H, W) or (C, H, W) tensor of pixels 0..255, a PIL image, a file
        path, or a list of these."""
        return self.predict_tensor(self.preprocess(images), top_k=top_k, return_q=return_q)

    def predict_tensor(self, x: torch.Tensor, *, top_k: int = 1, return_q: bool = False) -> Prediction:
        """Classify an already preprocessed and normalised float batch (B, C, S, S) (see :meth:`preprocess`)."""
        self._check_batch(x)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= len(self.class_names):
            raise ValueError(f"top_k: expected an int in [1, {len(self.class_names)}], got {top_k!r}")
        pred = self._model.predict(x.to(self.device), return_q=return_q, top_k=top_k)
        active = pred.active.cpu()
        ids = self._active_ids if self._active_ids is not None else list(range(active.shape[1]))
        top1 = pred.top1.tolist()
        return Prediction(
            top1=top1, names=[self.class_names[c] for c in top1], prob=pred.top1_prob.tolist(),
            topk_indices=pred.topk_indices.tolist(), topk_probs=pred.topk_probs.tolist(),
            active=[[ids[j] for j in row.nonzero().flatten().tolist()] for row in active],
            q=pred.q.float().cpu() if return_q else None,
        )

    # ------------------------------------------------------------------------------ input
    def preprocess(self, images: ImageLike | Sequence[ImageLike]) -> torch.Tensor:
        """Raw images → normalised float (B, C, S, S) on :attr:`device`, as ``specialists predict`` makes them."""
        if isinstance(images, torch.Tensor):
            self._check_pixels(images, "images", batch=True)
            items: list[ImageLike] = list(images.unbind(0)) if images.ndim == 4 else [images]
        elif isinstance(images, (str, Path, Image.Image)):
            items = [images]
        elif isinstance(images, Sequence):
            items = list(images)
        else:
            raise ValueError(f"images: expected a uint8 tensor, a PIL image, a file path or a list of them, "
                             f"got {type(images).__name__}")
        if not items:
            raise ValueError("images: an empty batch")
        batch = torch.stack([self._one(item, k) for k, item in enumerate(items)])
        return normalize(batch.to(self.device), self._data)

    def _one(self, item: ImageLike, k: int) -> torch.Tensor:
        """One image → uint8 (C, S, S) through the eval transform."""
        if isinstance(item, (str, Path)):
            image, error = _load(Path(item), self.channels, self._transform)
            if image is None:
                raise ValueError(f"{item}: cannot read the image ({error})")
            return image
        if isinstance(item, Image.Image):
            return self._transform(image_to_tensor(item, self.channels))
        if isinstance(item, torch.Tensor):
            self._check_pixels(item, f"images[{k}]")
            return self._transform(item.cpu())
        raise ValueError(f"images[{k}]: expected a uint8 tensor, a PIL image or a file path, got {type(item).__name__}")

    def _check_pixels(self, image: torch.Tensor, what: str, *, batch: bool = False) -> None:
        """A raw image (C, H, W), or with ``batch`` also a batch (B, C, H, W), of uint8 pixels."""
        shape = f"(B, {self.channels}, H, W) or ({self.channels}, H, W)" if batch else f"({self.channels}, H, W)"
        if image.dtype != torch.uint8:
            raise ValueError(f"{what}: expected uint8 pixels 0..255, got {image.dtype} "
                             "(for a normalised float batch use predict_tensor)")
        ok = image.ndim == 3 or (batch and image.ndim == 4)
        if not ok or image.shape[-3] != self.channels or 0 in image.shape[-2:]:
            raise ValueError(f"{what}: expected {shape} pixels, got shape {tuple(image.shape)}")

    def _check_batch(self, x: torch.Tensor) -> None:
        want = (self.channels, self.image_size, self.image_size)
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"x: expected a normalised float tensor (B, {', '.join(map(str, want))}), got {got}")
        if x.ndim != 4 or tuple(x.shape[1:]) != want or x.shape[0] == 0:
            raise ValueError(f"x: expected shape (B, {', '.join(map(str, want))}) with B ≥ 1, got {tuple(x.shape)}")


def load(path: str | Path, *, device: str | torch.device = "cpu", predictor: str = "ensemble",
         config: str | Path | None = None) -> Predictor:
    """The predictor of a run directory or of a package written by ``specialists export``.

    predictor: ``generalist``, ``ensemble`` (default), ``control``, ``control-x<K>``, ``control-x<K>-mean``
    or ``student[:NAME]``, as ``specialists predict --predictor``. config: a run's config file, for a run
    directory without one (a package needs none).
    """
    if is_package(path):
        if config is not None:
            raise UserError(f"{path}: a package holds its settings; load it without config=")
        package = read_package(path)
        return Predictor(package.config(), device=device, predictor=predictor, package=package)
    return Predictor(run_config(path, config), device=device, predictor=predictor)


__all__ = ["Prediction", "Predictor", "load"]
