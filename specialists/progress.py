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
