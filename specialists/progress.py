"""Progress bars: tqdm on the main process, shown only on an interactive terminal."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")


def progress(iterable: Iterable[T], *, main_process: bool = True, **kwargs) -> Iterable[T]:
    """``tqdm(iterable)`` on the main process when stderr is a terminal; the bare iterable otherwise."""
    if not main_process:
        return iterable
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=None, **kwargs)


class _Silent:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def progress_bar(total: int, *, initial: int = 0, main_process: bool = True, **kwargs):
    """A bar advanced by hand (``.update(n)``, ``.close()``): tqdm on the main process, else silent."""
    if not main_process:
        return _Silent()
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(total=total, initial=initial, disable=None, **kwargs)
