"""The memory plan's data: buffers, their lifetimes and placements, the timeline, totals.

Written by passes/buffer_lifetimes.py (buffers and lifetimes) and
passes/buffer_alloc.py (offsets), assembled by passes/buffer_plan.py, emitted by
passes/buffer_json.py. (The ECHO planner's clone plan is a different thing:
runtime/planner.py.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

ALIGN_BYTES = 256
ARENA, ALLOCATOR = "arena", "allocator"   # who provides a buffer's bytes (see Buffer.placement)
Span = tuple[int, int]                    # a closed interval of timeline steps


def aligned(nbytes: int, align: int = ALIGN_BYTES) -> int:
    return -(-nbytes // align) * align


def dtype_name(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def nbytes_of(shape, dt: torch.dtype) -> int:
    return math.prod(int(s) for s in shape) * dt.itemsize


@dataclass(frozen=True)
class Part:
    """A named view inside a composite buffer (e.g. w13 and w2 of the spare slots)."""
    name: str
    shape: tuple[int, ...]
    offset_bytes: int
    keys: tuple[str, ...] = ()     # the runtime keys that resolve to this part


@dataclass
class Buffer:
    name: str
    layer: int | None          # transformer layer index; None for buffers shared by all layers
    role: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    live: tuple[Span, ...]     # closed step intervals, sorted
    parts: tuple[Part, ...] = ()
    offset: int | None = None
    placement: str = ARENA     # ARENA: the op writes into its planned view; ALLOCATOR: a kernel without
                               # an output argument (grouped_mm, torch.stack) allocates it itself
    keys: tuple[str, ...] = () # the keys ops ask the runtime arena for (runtime/arena.py)
    kept: bool = False         # a routing decision: a recomputed region keeps it from its forward
                               # into its backward (the rest of its layer's saved buffers it drops)

    @property
    def first(self) -> int:
        return self.live[0][0]

    @property
    def last(self) -> int:
        return self.live[-1][1]

    def live_at(self, step: int) -> bool:
        return any(s <= step <= e for s, e in self.live)

    def crosses(self, step: int) -> bool:
        """Live at `step` and the step after (at the forward's last step: saved for backward)."""
        return self.live_at(step) and self.live_at(step + 1)


def composite(name: str, layer: int | None, role: str, tensors, dt: torch.dtype, live,
              placement: str = ARENA) -> Buffer:
    """One buffer holding several tensors back to back (each part 256-byte aligned).
    tensors: (part name, shape, runtime keys of the part)."""
    parts, at = [], 0
    for pname, shape, keys in tensors:
        parts.append(Part(pname, tuple(shape), at, tuple(keys)))
        at += aligned(nbytes_of(shape, dt))
    last = parts[-1]
    total = last.offset_bytes + nbytes_of(last.shape, dt)
    return Buffer(name, layer, role, (total // dt.itemsize,), dtype_name(dt), total, tuple(live), tuple(parts),
                  placement=placement)


@dataclass
class Timeline:
    steps: int                 # 8N + 2 (4 sub-steps per node and pass)
    forward: Span              # (0, 4N-1)
    backward: Span             # (4N, 8N-1)
    grad_reduction: int
    optimizer: int
    layers: list[dict] = field(default_factory=list)   # {layer, forward, backward} at the dispatch


class HeldRegion(NamedTuple):
    """One block of the arena's held part: buffers of `layer` (None: of no layer) saved across
    the forward/backward boundary, at [lo, hi). `kept`: the layer's routing decisions, which a
    recomputed region keeps through the loss; the layer's other saved buffers are a region of
    their own, which a recomputed region gives back after its forward."""
    layer: int | None
    lo: int
    hi: int
    kept: bool = False


@dataclass
class MemoryPlan:
    """The MoE buffers of one rank over one iteration, and their places in the arena."""
    planned: bool
    reason: str = ""
    ranks: str = "all"
    note: str = ""
    align_bytes: int = ALIGN_BYTES
    recompute_clone_dispatch: bool = False
    timeline: Timeline | None = None
    buffers: list[Buffer] = field(default_factory=list)
    arena_bytes: int = 0
    held_bytes: int = 0    # below: buffers live across the forward/backward boundary (saved for
                           # backward), two regions per layer; above: the transient block
    held_regions: list[HeldRegion] = field(default_factory=list)
    naive_bytes: int = 0
    lower_bound_bytes: int = 0
    peak_step: int = 0
    allocator_lower_bound_bytes: int = 0   # peak live bytes of the ALLOCATOR buffers
    total_lower_bound_bytes: int = 0       # peak live bytes of the arena's and the allocator's buffers
    symmetric_bytes: int = 0               # the backend's symmetric pools: allocated once, held all run
    lifetimes: int = 0
    interference_edges: int = 0
    interfering_pairs: int = 0
