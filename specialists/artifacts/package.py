"""An exported ensemble (``specialists export``): one self-contained directory, read and written here only.

A package holds a run's models laid out as in the run directory (generalist, specialists, control
copies, students, each weights + card, and ``clusters.json``), so the ensemble loads from it
unchanged; ``package.json`` with everything a run's config would otherwise supply (class names,
preprocessing, inference settings, the dustbin correction applied to each specialist); and
``manifest.json`` with every other file's sha256 and size and the project version. Reading checks
every file against the manifest and refuses, in one line naming the file, a package that is
damaged or edited: a file missing, changed or added, an unknown format, an unreadable manifest.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from ..config import DataConfig, DistillConfig, GeneralistConfig, InferenceConfig, RunConfig
from ..errors import UserError
from ..io import atomic_directory, atomic_write, atomic_write_json, read_json
from ..layout import PackageLayout

PACKAGE_FORMAT = "specialists-package/1"
SETTINGS_KEYS = ("format", "name", "class_names", "preprocessing", "inference", "correction", "specialists",
                 "controls", "students", "default_student", "source")


@dataclass(frozen=True)
class Package:
    """A verified package: its files and the settings recorded in ``package.json``."""

    layout: PackageLayout
    settings: dict[str, Any]
    version: str  # the project version that wrote it

    @property
    def class_names(self) -> list[str]:
        return list(self.settings["class_names"])

    def config(self) -> RunConfig:
        """The run config the package stands for: what loading its ensemble and preprocessing need."""
        s = self.settings
        pre, inf = s["preprocessing"], s["inference"]
        return RunConfig(
            name=s["name"], run_dir=str(self.layout.root),
            data=DataConfig(image_size=pre["image_size"], channels=pre["channels"], mean=tuple(pre["mean"]),
                            std=tuple(pre["std"]), augment="none"),
            generalist=GeneralistConfig(mixed_precision=inf["mixed_precision"], channels_last=inf["channels_last"]),
            inference=InferenceConfig(top_n=inf["top_n"], bias=s["correction"], solver=inf["solver"], tol=inf["tol"],
                                      max_iter=inf["max_iter"], batch_size=inf["batch_size"],
                                      control=bool(s["controls"])),
            distill=DistillConfig(name=s["default_student"]),
        )

    def check_applied(self, ids: list[int], dustbin_biases: list[float], temperatures: list[float]) -> None:
        """Refuse an engine whose dustbin corrections are not the ones recorded at export."""
        recorded = [(r["id"], r["dustbin_bias"], r["temperature"]) for r in self.settings["specialists"]]
        built = list(zip(ids, dustbin_biases, temperatures, strict=True))
        if recorded != built:
            raise UserError(f"{self.layout.settings}: the dustbin corrections recorded at export {recorded} differ "
                            f"from those the cards give now {built}; export the run again with this version")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------- writing
def write_package(out: str | Path, files: Iterable[tuple[Path, str]], settings: dict[str, Any], *,
                  version: str, overwrite: bool = False) -> PackageLayout:
    """Copy ``files`` (source, path inside the package) and write package.json and manifest.json into
    ``out`` atomically (a temporary sibling renamed when complete); an existing ``out`` needs ``overwrite``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out}: already exists; choose another --out or pass --force to replace it")
    missing = set(SETTINGS_KEYS) - {"format", *settings}
    if missing:
        raise ValueError(f"package settings lack {sorted(missing)}")
    with atomic_directory(out, overwrite=overwrite) as tmp:
        staged = PackageLayout(tmp)
        for source, name in files:
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
        atomic_write_json(staged.settings, {**settings, "format": PACKAGE_FORMAT})
        entries = {_relative(p, tmp): {"sha256": sha256_file(p), "size": p.stat().st_size}
                   for p in sorted(_files_under(tmp)) if p != staged.manifest}
        atomic_write_json(staged.manifest, {"format": PACKAGE_FORMAT, "version": version, "files": entries})
        _shareable(tmp)
    return PackageLayout(out)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _shareable(root: Path) -> None:
    """Temporary files and folders are private (0600 / 0700); a package is for others to read: umask modes."""
    mask = _umask()
    for path in [root, *root.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~mask)


def write_tar(layout: PackageLayout) -> Path:
    """``PKG.tar`` beside the package, atomically: its files under ``PKG/``, sorted, with fixed owners and times."""

    def reproducible(info: tarfile.TarInfo) -> tarfile.TarInfo:
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = 0
        return info

    def write(f) -> None:
        os.fchmod(f.fileno(), 0o666 & ~_umask())
        with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path in sorted(_files_under(layout.root)):
                tar.add(path, arcname=f"{layout.root.name}/{_relative(path, layout.root)}", filter=reproducible)

    atomic_write(layout.tar, write)
    return layout.tar


# ----------------------------------------------------------------------------------- reading
def read_package(root: str | Path) -> Package:
    """The package at ``root``, every file checked against its manifest (one-line UserError naming the file)."""
    layout = PackageLayout(root)
    if not layout.root.is_dir():
        raise UserError(f"{layout.root}: not a package directory")
    manifest = _read_manifest(layout)
    listed = manifest["files"]
    for name, entry in listed.items():
        _check_file(layout.root / name, entry, layout.manifest)
    on_disk = {_relative(p, layout.root) for p in _files_under(layout.root)} - {layout.manifest.name}
    extra = sorted(on_disk - set(listed))
    if extra:
        raise UserError(f"{layout.root / extra[0]}: not in {layout.manifest}; the package was edited")
    settings_name = layout.settings.name
    if settings_name not in listed:
        raise UserError(f"{layout.settings}: not in {layout.manifest}; the package is incomplete")
    return Package(layout, _read_settings(layout), manifest["version"])


def is_package(path: str | Path) -> bool:
    """Whether ``path`` looks like a package (has a manifest); :func:`read_package` verifies it."""
    return PackageLayout(path).manifest.is_file()


def _read_manifest(layout: PackageLayout) -> dict[str, Any]:
    manifest = _read_record(layout.manifest)
    files, version = manifest.get("files"), manifest.get("version")
    if not isinstance(files, dict) or not isinstance(version, str) or not all(
            _safe_name(n) and isinstance(e, dict) and isinstance(e.get("sha256"), str)
            and isinstance(e.get("size"), int) for n, e in files.items()):
        raise UserError(f"{layout.manifest}: malformed manifest (expected version and files: {{name: {{sha256, size}}}})")
    return manifest


def _read_record(path: Path) -> dict[str, Any]:
    """manifest.json or package.json: a JSON object of this package format."""
    try:
        record = read_json(path)
    except FileNotFoundError:
        raise UserError(f"{path}: missing; not a package (write one with `specialists export`)") from None
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: unreadable ({exc.__class__.__name__}); the package is damaged") from None
    found = record.get("format") if isinstance(record, dict) else None
    if found != PACKAGE_FORMAT:
        raise UserError(f"{path}: unknown package format {found!r} (this version reads {PACKAGE_FORMAT!r})")
    return record


def _check_file(path: Path, entry: dict[str, Any], manifest: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path}: missing from the package (listed in {manifest})")
    if path.stat().st_size != entry["size"] or sha256_file(path) != entry["sha256"]:
        raise UserError(f"{path}: its sha256 differs from {manifest}; the package is damaged or was edited")


def _read_settings(layout: PackageLayout) -> dict[str, Any]:
    settings = _read_record(layout.settings)
    missing = [k for k in SETTINGS_KEYS if k not in settings]
    if missing:
        raise UserError(f"{layout.settings}: lacks {', '.join(missing)}")
    return settings


def _files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() or p.is_symlink()]


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _safe_name(name: object) -> bool:
    """A manifest entry must name a file inside the package (no absolute path, no ``..``)."""
    if not isinstance(name, str) or not name:
        return False
    parts = PurePosixPath(name).parts
    return not PurePosixPath(name).is_absolute() and ".." not in parts and "\\" not in name
