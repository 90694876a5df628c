"""Class sets of the specialists as padded index tables (shared by routing, solver, engine)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

ClassSets = Sequence[Tensor | Sequence[int]]


@dataclass(frozen=True)
class SetTable:
    """The M class sets Sᵐ over C classes, on one device.

    table:  (M, S) long, row m = sorted Sᵐ padded with C (a sentinel class).
    sizes:  (M,) long, |Sᵐ|.
    member: (C, M) bool, member[j, m] = j ∈ Sᵐ.
    member_bits: (C, W) int64, the same as bit words: bit m % 63 of word m // 63.
    slot_class: (M, S) long, ``table`` with padding replaced by the row's first class
        (a valid index wherever a slot's class is read).
    slot_others: (M, S, W) int64, bits of the specialists other than m whose sets hold
        slot s's class (0 on padding); ``& active bits`` finds classes shared in an image.
    slot_lower: (M, S, W) int64, the same restricted to specialists < m.
    """

    num_classes: int
    table: Tensor
    sizes: Tensor
    member: Tensor
    member_bits: Tensor
    size_list: tuple[int, ...]
    slot_class: Tensor
    slot_others: Tensor
    slot_lower: Tensor

    @property
    def num_specialists(self) -> int:
        return len(self.size_list)


_CACHE_SIZE = 8
_cache: OrderedDict[tuple, tuple[ClassSets, tuple, tuple, SetTable]] = OrderedDict()


def _versions(class_sets: ClassSets) -> tuple | None:
    """The version of every set if all are tensors (torch bumps a tensor's version on
    every in-place change), else None: lists, and tensors made under ``torch.inference_mode``
    (which carry no version counter), are not cached (no cheap change check)."""
    if not isinstance(class_sets, list | tuple) or not all(isinstance(s, Tensor) for s in class_sets):
        return None
    if any(s.is_inference() for s in class_sets):
        return None
    return tuple(s._version for s in class_sets)


def check_class_sets(class_sets: ClassSets, num_classes: int, device: torch.device) -> SetTable:
    """Validate ``class_sets`` (a list of M index tensors or lists) and build a SetTable.

    The table of a list of tensors is memoised (the last few, by identity of the list
    and of its tensors, and their version counters: a set changed in place, or a list
    changed, is validated and built again), so repeated solves with the same sets do
    not rebuild it. The result is the same either way.
    """
    versions = _versions(class_sets)
    key = (id(class_sets), num_classes, str(device))
    if versions is not None:
        hit = _cache.get(key)
        if (
            hit is not None and hit[0] is class_sets and hit[2] == versions
            and len(hit[1]) == len(class_sets)
            and all(a is b for a, b in zip(hit[1], class_sets, strict=True))
        ):
            _cache.move_to_end(key)
            return hit[3]
    table = _check_class_sets(class_sets, num_classes, device)
    if versions is not None:  # holds the list and its tensors: their ids stay unique
        _cache[key] = (class_sets, tuple(class_sets), versions, table)
        if len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return table


def _check_class_sets(class_sets: ClassSets, num_classes: int, device: torch.device) -> SetTable:
    if isinstance(class_sets, Tensor) or not isinstance(class_sets, Sequence):
        raise ValueError(
            f"class_sets must be a list of M index tensors or lists, got {type(class_sets).__name__}"
        )
    if len(class_sets) == 0:
        raise ValueError("class_sets must hold at least one class set, got an empty list")
    rows = []
    for m, s in enumerate(class_sets):
        t = torch.as_tensor(s, device=device)
        if t.ndim != 1 or t.numel() == 0:
            raise ValueError(
                f"class_sets[{m}] must be a non-empty 1-D list of class indices, got shape "
                f"{tuple(t.shape)}"
            )
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ValueError(f"class_sets[{m}] must hold integer class indices, got {t.dtype}")
        t = t.long()
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= num_classes:
            raise ValueError(
                f"class_sets[{m}] holds class {lo if lo < 0 else hi}, expected indices in "
                f"[0, {num_classes}) (C = {num_classes} columns of p_general)"
            )
        t = torch.sort(t).values
        if t.numel() > 1 and bool((t[1:] == t[:-1]).any()):
            raise ValueError(f"class_sets[{m}] lists a class more than once")
        rows.append(t)
    return build_set_table(rows, num_classes)


def build_set_table(rows: list[Tensor], num_classes: int) -> SetTable:
    """Build the table from already valid, sorted, unique long tensors on one device."""
    sizes = [int(r.numel()) for r in rows]
    width = max(sizes)
    device = rows[0].device
    table = torch.full((len(rows), width), num_classes, dtype=torch.long, device=device)
    for m, r in enumerate(rows):
        table[m, : r.numel()] = r
    member = torch.zeros(num_classes + 1, len(rows), dtype=torch.bool, device=device)
    member[table, torch.arange(len(rows), device=device)[:, None]] = True
    member = member[:num_classes]
    member_bits = to_bits(member)
    num_spec = len(rows)
    pad = table == num_classes
    slot_class = torch.where(pad, table[:, :1], table)  # (M, S)
    specs = torch.arange(num_spec, device=device)
    own = to_bits(specs[:, None] == specs[None, :])  # (M, W) bit m alone
    below = to_bits(specs[None, :] < specs[:, None])  # (M, W) bits of the specialists < m
    slot_bits = member_bits[slot_class].masked_fill(pad[:, :, None], 0)  # (M, S, W)
    return SetTable(
        num_classes=num_classes,
        table=table,
        sizes=torch.tensor(sizes, dtype=torch.long, device=device),
        member=member,
        member_bits=member_bits,
        size_list=tuple(sizes),
        slot_class=slot_class,
        slot_others=slot_bits & ~own[:, None, :],
        slot_lower=slot_bits & below[:, None, :],
    )


BITS_PER_WORD = 63


def to_bits(mask: Tensor) -> Tensor:
    """(..., M) bool -> (..., W) int64 bit words, W = ceil(M / 63) (bit m % 63 of word m // 63)."""
    num = mask.shape[-1]
    words = -(-num // BITS_PER_WORD)
    padded = torch.zeros(*mask.shape[:-1], words * BITS_PER_WORD, dtype=torch.long, device=mask.device)
    padded[..., :num] = mask.long()
    shifts = torch.arange(BITS_PER_WORD, device=mask.device)
    return (padded.view(*mask.shape[:-1], words, BITS_PER_WORD) << shifts).sum(-1)


def table_on(tab: SetTable, device: torch.device) -> SetTable:
    """The same table on ``device`` (no copy if already there)."""
    if tab.table.device == device:
        return tab
    return SetTable(
        num_classes=tab.num_classes,
        table=tab.table.to(device),
        sizes=tab.sizes.to(device),
        member=tab.member.to(device),
        member_bits=tab.member_bits.to(device),
        size_list=tab.size_list,
        slot_class=tab.slot_class.to(device),
        slot_others=tab.slot_others.to(device),
        slot_lower=tab.slot_lower.to(device),
    )
