"""The shared HybridCache's rows and what each holds, for BatchGenerator (batch.py): prefix reuse, conv-state
snapshots, rollback after an interrupted step, and growth of the cache.

Prefix reuse: a finished request leaves its tokens in its row. A new request placed in that row skips the longest
common token prefix (same image pixels included) that ends at a point where the row's conv state is known: the end
of the row's content, or a snapshot taken at the end of an earlier prompt. Conv layers keep a rolling state, so an
arbitrary prefix cannot be resumed; attention K/V can.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .units import Unit

CAPACITY_STEP = 256  # capacities are multiples of this (few distinct shapes for compiled decode steps)
MAX_SNAPSHOTS = 8  # conv-state snapshots kept per row (prompt ends of earlier requests)


@dataclass
class Row:
    """What one cache row holds: the tokens whose state is stored, the image units among them, and conv-state
    snapshots {position: [state per conv layer]} taken at the end of earlier prompts."""

    tokens: list[int] = field(default_factory=list)
    units: list[tuple[tuple[int, int], bytes]] = field(default_factory=list)  # ((h, w), digest of the patches)
    snaps: dict[int, list[torch.Tensor]] = field(default_factory=dict)
    active: object = None  # the request running in this row (batch.Active), None when the row is free
    last_used: int = 0


class RowCache:
    """A HybridCache of `n_rows` rows and the Row record of each; `cache` is replaced when the cache grows."""

    def __init__(self, model, n_rows: int, capacity: int, max_context: int, dtype, device):
        self.model, self.max_context, self.dtype, self.device = model, max_context, dtype, device
        self.cache = model.make_cache(n_rows, capacity, dtype=dtype, device=device)
        self.rows = [Row() for _ in range(n_rows)]
        self._clock = 0

    def __getitem__(self, slot: int) -> Row:
        return self.rows[slot]

    @property
    def capacity(self) -> int:
        return self.cache.max_seq_len

    def free(self) -> list[int]:
        return [i for i, r in enumerate(self.rows) if r.active is None]

    def rows_arg(self, slots: list[int]) -> torch.Tensor | None:
        """None when a call covers every row in order (no gather of the cache), else the row indices."""
        if slots == list(range(len(self.rows))):
            return None
        return torch.tensor(slots, dtype=torch.long, device=self.device)

    # ---- prefix reuse -----------------------------------------------------------------------------------------
    def pick(self, free: list[int], ids: list[int], units: list[Unit]) -> int:
        """The free row that reuses the longest prefix of `ids`; among equals an empty row, then the least recent."""
        return max(free, key=lambda s: (self.reuse_point(s, ids, units)[0],
                                        -self.rows[s].last_used if self.rows[s].tokens else 1))

    def reuse_point(self, slot: int, ids: list[int], units: list[Unit]) -> tuple[int, list[torch.Tensor] | None]:
        """Longest reusable prefix of `ids` in row `slot` -> (length p, conv snapshot to restore or None)."""
        row = self.rows[slot]
        if row.active is not None or not row.tokens:
            return 0, None
        n = min(len(row.tokens), len(ids) - 1)  # at least one prompt token is prefilled to get logits
        L = 0
        while L < n and row.tokens[L] == ids[L]:
            L += 1
        for u, (start, _, hw, dig) in enumerate(units):  # same placeholder tokens, but the same pixels?
            if start >= L:
                break
            if u >= len(row.units) or row.units[u] != (hw, dig):
                L = start
                break
        if len(row.tokens) <= L:
            return len(row.tokens), None
        p = max((s for s in row.snaps if s <= L), default=0)
        return p, (row.snaps[p] if p else None)

    def claim(self, slot: int, active, units: list[Unit], ids: list[int]) -> int:
        """Give row `slot` to `active`, keeping its reusable prefix of `ids`; returns that prefix's length."""
        p, snap = self.reuse_point(slot, ids, units)
        row = self.rows[slot]
        self._clock += 1
        row.active, row.last_used = active, self._clock
        if snap is not None:
            self._restore(slot, snap)
        row.tokens = row.tokens[:p]
        row.snaps = {s: v for s, v in row.snaps.items() if s <= p}
        row.units = [(hw, dig) for _, _, hw, dig in units]
        self.cache.lengths[slot] = p
        return p

    def release(self, slot: int) -> None:
        """Free row `slot`; its content stays for later requests to reuse."""
        self.rows[slot].active = None

    # ---- conv-state snapshots ---------------------------------------------------------------------------------
    def snapshot(self, slot: int) -> None:
        """Keep row `slot`'s conv state at the end of its tokens (a prompt end), at most MAX_SNAPSHOTS per row."""
        row = self.rows[slot]
        row.snaps[len(row.tokens)] = [c[slot].clone() for c in self.cache.conv if c is not None]
        while len(row.snaps) > MAX_SNAPSHOTS:
            del row.snaps[min(row.snaps)]

    def roll_back(self, slot: int) -> None:
        """Free row `slot` and cut it back to its last snapshot: after an interrupted step its conv state may be
        ahead of its tokens, while the K/V of the snapshot's tokens are intact (a forward writes only past them)."""
        row = self.rows[slot]
        row.active = None
        p = max(row.snaps, default=0)
        row.tokens = row.tokens[:p]
        if p:
            self._restore(slot, row.snaps[p])

    def _restore(self, slot: int, snap: list[torch.Tensor]) -> None:
        for state, saved in zip((c for c in self.cache.conv if c is not None), snap):
            state[slot] = saved

    # ---- growth -----------------------------------------------------------------------------------------------
    def grow(self, needed: int) -> None:
        """Reallocate the cache with room for `needed` tokens per row, keeping every row's content."""
        cap = max(needed, min(2 * self.capacity, needed + 4 * CAPACITY_STEP))
        cap = min(self.max_context, -(-cap // CAPACITY_STEP) * CAPACITY_STEP)
        new = self.model.make_cache(len(self.rows), cap, dtype=self.dtype, device=self.device)
        old_len = self.capacity
        for dst, src in zip(new.k + new.v, self.cache.k + self.cache.v):
            if src is not None:
                dst[:, :, :old_len] = src
        for dst, src in zip(new.conv, self.cache.conv):
            if src is not None:
                dst.copy_(src)
        new.lengths.copy_(self.cache.lengths)
        self.cache = new
