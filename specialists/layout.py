"""Every file of a run and of a prepared data set, named in one place.

Stages, tests, scripts and reports reach files only through :class:`RunLayout` and
:class:`DataLayout` (as timm's ``CheckpointSaver`` alone names checkpoint files); no other
module spells a run file's name. ``specialists paths --config …`` prints them for scripts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

WEIGHTS = "model.safetensors"
CARD = "model.json"


@dataclass(frozen=True)
class ModelPaths:
    """The files of one trained model: weights, card, training log, checkpoints."""

    dir: Path

    @property
    def weights(self) -> Path:
        return self.dir / WEIGHTS

    @property
    def card(self) -> Path:
        return self.dir / CARD

    @property
    def checkpoints(self) -> Path:
        return self.dir / "checkpoints"

    @property
    def train_log(self) -> Path:
        """One JSON line per epoch or evaluation (``metrics.jsonl``)."""
        return self.dir / "metrics.jsonl"

    @property
    def config(self) -> Path:
        return self.dir / "config.yaml"


@dataclass(frozen=True)
class RunLayout:
    """The files of one run directory (``run_dir`` of the config)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    # --- the run as a whole
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    @property
    def stage_times(self) -> Path:
        return self.root / "stage_times.json"

    @property
    def stage_memory(self) -> Path:
        return self.root / "stage_memory.json"

    @property
    def seeds(self) -> Path:
        return self.root / "seeds.json"

    def seed_run(self, seed: int) -> RunLayout:
        return RunLayout(self.root / f"seed-{seed}")

    # --- models
    @property
    def generalist(self) -> ModelPaths:
        return ModelPaths(self.root / "generalist")

    @property
    def specialists_dir(self) -> Path:
        return self.root / "specialists"

    def specialist(self, m: int) -> ModelPaths:
        return ModelPaths(self.specialists_dir / f"{m:03d}")

    @property
    def control(self) -> ModelPaths:
        return ModelPaths(self.root / "control")

    def control_copies(self, copies: int) -> list[ModelPaths]:
        """The fine-tuned copies of ``control.copies`` = K: ``control/`` for one (the one-copy control),
        ``control-x<K>/<k>/`` for a plain ensemble of K."""
        if copies == 1:
            return [self.control]
        return [ModelPaths(self.root / f"control-x{copies}" / f"{k:03d}") for k in range(copies)]

    def control_counts(self) -> list[int]:
        """The K of every control family with a finished card for each copy, sorted (1: ``control/``)."""
        found = [int(p.name.removeprefix("control-x")) for p in self.root.glob("control-x*")
                 if p.name.removeprefix("control-x").isdigit()]
        return [k for k in sorted({1, *found}) if all(m.card.is_file() for m in self.control_copies(k))]

    @property
    def students_dir(self) -> Path:
        return self.root / "students"

    def student(self, name: str) -> ModelPaths:
        """A distilled student, by name (``distill.name``, by default its teacher)."""
        return ModelPaths(self.students_dir / name)

    def teacher_cache(self, key: str, epoch: int, rank: int) -> Path:
        """One epoch's cached teacher targets for one process (``key`` names the teacher and the views)."""
        return self.root / "teacher-cache" / key / f"e{epoch:04d}-r{rank:05d}.npz"

    def student_names(self) -> list[str]:
        """The students with a finished card, sorted."""
        if not self.students_dir.is_dir():
            return []
        return sorted(p.name for p in self.students_dir.iterdir() if ModelPaths(p).card.is_file())

    # --- clustering
    @property
    def clusters(self) -> Path:
        return self.root / "clusters.json"

    @property
    def covariance(self) -> Path:
        return self.root / "covariance.npy"

    @property
    def confusion(self) -> Path:
        return self.root / "cluster" / "confusion.npz"

    @property
    def cluster_config(self) -> Path:
        """The resolved config of the cluster stage (absolute shard path): ``report --run`` needs nothing else."""
        return self.root / "cluster" / "config.yaml"

    @property
    def report_dir(self) -> Path:
        return self.root / "report"

    @property
    def report_index(self) -> Path:
        return self.report_dir / "index.html"

    # --- evaluation
    def metrics(self, split: str) -> Path:
        return self.root / f"metrics-{split}.json"

    def evaluated_splits(self) -> list[str]:
        """Splits with both metrics and per-example predictions (what an evaluation report needs)."""
        found = sorted(p.stem.removeprefix("metrics-") for p in self.root.glob("metrics-*.json"))
        return [split for split in found if self.predictions(split).is_file()]

    def predictions(self, split: str) -> Path:
        """Per-example labels and predictions of every predictor on ``split`` (beside its metrics)."""
        return self.root / f"predictions-{split}.npz"

    def evaluation_report(self, split: str) -> Path:
        """The evaluation report's page for ``split``, beside the clustering report's index."""
        return self.report_dir / f"evaluation-{split}.html"

    def evaluation_assets(self, split: str) -> Path:
        """The images of the evaluation report for ``split`` (charts, example strips)."""
        return self.report_dir / f"evaluation-{split}"

    def evaluation_reports(self) -> dict[str, Path]:
        """Split → page of every evaluation report written so far, sorted by split."""
        pages = sorted(self.report_dir.glob("evaluation-*.html")) if self.report_dir.is_dir() else []
        return {p.stem.removeprefix("evaluation-"): p for p in pages}

    # --- experiment trackers (``log_with``)
    @property
    def tracking(self) -> Path:
        """Trackers' files (e.g. TensorBoard event files), one folder per stage inside."""
        return self.root / "tracking"

    def files(self) -> dict[str, Path]:
        """Name → path of the run's fixed files (what ``specialists paths`` prints)."""
        return {
            "run_dir": self.root, "config": self.config, "generalist_dir": self.generalist.dir,
            "generalist": self.generalist.weights,
            "generalist_card": self.generalist.card, "clusters": self.clusters, "covariance": self.covariance,
            "confusion": self.confusion, "report": self.report_index, "specialists": self.specialists_dir,
            "control": self.control.weights, "students": self.students_dir,
            "metrics_test": self.metrics("test"), "metrics_val": self.metrics("val"),
            "predictions_test": self.predictions("test"), "predictions_val": self.predictions("val"),
            "evaluation_report_test": self.evaluation_report("test"),
            "evaluation_report_val": self.evaluation_report("val"), "tracking": self.tracking,
            "stage_times": self.stage_times, "stage_memory": self.stage_memory,
        }


@dataclass(frozen=True)
class DataLayout:
    """The files of a prepared shard directory (``data.shards``)."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def index(self) -> Path:
        return self.root / "index.json"

    @property
    def classes(self) -> Path:
        return self.root / "classes.json"

    @property
    def card(self) -> Path:
        """DATA.md: how the data was made (sources that write one)."""
        return self.root / "DATA.md"

    @staticmethod
    def shard_pattern(split: str) -> str:
        """``%``-pattern of a split's shard names; ``byclass`` for the by-class shards."""
        return f"{split}-%06d.tar"


@dataclass(frozen=True)
class PackageLayout:
    """The files of an exported package (``specialists export``): the run's models under the names
    :class:`RunLayout` gives them (so a package loads as a run), plus its settings and manifest."""

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root))

    @property
    def manifest(self) -> Path:
        """Every other file's sha256 and size, the format and the project version."""
        return self.root / "manifest.json"

    @property
    def settings(self) -> Path:
        """Class names, preprocessing, inference settings, the applied dustbin corrections."""
        return self.root / "package.json"

    @property
    def tar(self) -> Path:
        """``export --tar``: the package as one archive beside it."""
        return self.root.with_name(f"{self.root.name}.tar")

    @property
    def models(self) -> RunLayout:
        """The models and ``clusters.json``, named as in a run directory."""
        return RunLayout(self.root)
