"""The pipeline's stages, as one table that the CLI and ``specialists run`` both read.

Each stage is a module with one shape: ``NAME``, ``HELP``, ``DESCRIPTION``, ``add_arguments(parser)``,
``command(cfg, args)`` (the CLI entry), and for the stages of the pipeline ``run(cfg)`` and
``is_done(cfg)`` — the skip rule, which raises :class:`~specialists.artifacts.StaleError` when a
finished output was made with other deciding values. Stages talk only through the run's files;
no stage imports another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType

from ..config import RunConfig
from . import (
    cluster,
    compare,
    control,
    distill,
    evaluate,
    export,
    generalist,
    import_generalist,
    paths,
    predict,
    prepare,
    report,
    specialists,
    summary,
)


def _always(cfg: RunConfig) -> bool:
    return True


@dataclass(frozen=True)
class Stage:
    module: ModuleType
    in_pipeline: bool = False  # one of the steps of `specialists run`, in table order
    enabled: Callable[[RunConfig], bool] = _always  # whether `specialists run` runs it for this config

    @property
    def name(self) -> str:
        return self.module.NAME

    @property
    def uses_config(self) -> bool | str:
        return getattr(self.module, "USES_CONFIG", True)

    def is_done(self, cfg: RunConfig) -> bool:
        return self.module.is_done(cfg)


STAGES: tuple[Stage, ...] = (
    Stage(prepare, in_pipeline=True),
    Stage(summary),
    Stage(generalist, in_pipeline=True),
    Stage(import_generalist),
    Stage(cluster, in_pipeline=True),
    Stage(report),
    Stage(specialists, in_pipeline=True),
    Stage(control, in_pipeline=True, enabled=lambda cfg: cfg.inference.control),
    Stage(distill, in_pipeline=True, enabled=lambda cfg: cfg.distill.enabled),
    Stage(evaluate, in_pipeline=True),
    Stage(predict),
    Stage(export),
    Stage(compare),
    Stage(paths),
)

PIPELINE: tuple[Stage, ...] = tuple(s for s in STAGES if s.in_pipeline)
