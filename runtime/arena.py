"""The planned arena: one byte buffer per rank, carved into the views the buffer plan placed.

The memory plan (passes/buffer_plan.py) gives every MoE buffer that an echo op writes
itself a byte offset in one arena; buffers whose lifetimes overlap never share bytes.
At run time each region of the arena is one allocation, taken at its first use in a
forward: a layer's saved buffers live until its backward frees them, the transient region
(buffers of one pass) is given back between forward and backward (inside a CUDA graph: from
the graph's pool, at one address in every replay); each op asks for its output by key:

    out = arena.out("layers_1_mlp_dispatch", (R, H), torch.bfloat16, x.device)

With an arena active and the key planned, `out` is the planned view; otherwise (no
arena, or a buffer the plan leaves to the caching allocator) a fresh tensor. Keys are
node names, `node.part` for an op's internals (`layers_1_mlp_dispatch.send`) and
`node[i]` for the i-th output of a tuple-returning op; each op's contract
(runtime/contracts.py) declares its keys, and the ops and the plan both read it there.

Every view gets a storage object and version counter of its own (through DLPack), so
two buffers that reuse the same bytes at different times are different tensors to
autograd and to the custom-op aliasing check; only the plan says they may not coexist.
"""
from __future__ import annotations

import bisect
import math
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor


@dataclass(frozen=True)
class View:
    offset_bytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class ArenaLayout:
    """What the runtime needs of a buffer plan: the arena size, where each key lives, and its
    regions. `bounds` (0, …, held_bytes): the held regions [bounds[i], bounds[i+1]) hold
    buffers saved across the forward/backward boundary (a layer's routing decisions, its
    other saved buffers); above held_bytes the transient region holds buffers that live within
    one pass. None: one region. `layers`: the layer of each held region (None: of no layer,
    kept until release); left None, each held region is a layer of its own."""
    nbytes: int
    views: dict[str, View] = field(default_factory=dict)
    bounds: tuple[int, ...] | None = None
    layers: tuple[int | None, ...] | None = None

    @property
    def edges(self) -> tuple[int, ...]:
        """Every region's start, then the end: (0, …, held_bytes, nbytes)."""
        if self.bounds is None:
            return (0, self.nbytes)
        return tuple(self.bounds) + (() if self.bounds[-1] == self.nbytes else (self.nbytes,))


class Arena:
    """The planned views of `layout` on `device`, one block per region, each taken from the
    allocator when an op first asks for one of its views.

    The Trainer opens the arena at each forward (`allocate`) and calls `end_forward` after it:
    the arena then forgets every block no view uses, so the transient block goes back to the
    allocator (the loss's working set reuses it); the layers' blocks that autograd's saved views
    (or, under recompute, the kept routing decisions) still use stay. In forward, moving to
    another layer's regions forgets the last layer's blocks no view uses (under recompute, its
    saved buffers other than the routing decisions); in backward it forgets all of them, so
    each lives as long as its views, and backward takes a fresh transient block. `release`
    closes the arena after backward. Inside a captured CUDA graph every block comes from the
    graph's pool, at the same address in every replay."""

    def __init__(self, layout: ArenaLayout, device: torch.device, allocate: bool = True):
        self.layout, self.device = layout, device
        edges = layout.edges
        assert list(edges) == sorted(edges) and edges[0] == 0, edges
        self._region: dict[str, int] = {}
        for key, v in layout.views.items():
            k = min(bisect.bisect_right(edges, v.offset_bytes) - 1, len(edges) - 2)
            assert v.offset_bytes % v.dtype.itemsize == 0 and v.offset_bytes + v.nbytes <= edges[k + 1], (key, v, edges)
            self._region[key] = k
        self.blocks: dict[int, Tensor] = {}
        self._alias: dict[str, Tensor] = {}
        self.taken: set[str] = set()
        self.held, self._backward, self._layer = False, False, None   # held: open for ops
        probe = torch.empty(1, dtype=torch.uint8)
        self._unused_owners = _owners(torch.from_dlpack(probe[0:1]))
        if allocate:
            self.allocate()

    def _block(self, k: int) -> Tensor:
        """Region k's bytes, allocated on first use, with an alias per view inside. Moving to
        another layer's region lets go of the last layer's blocks: in backward all of them (its
        backward is over), in forward those no view uses (a recomputed layer's saved buffers
        other than its routing decisions: its recomputing backward takes them again)."""
        layer = self._layer_of(k)
        if layer is not None:
            if self._layer is not None and layer != self._layer:
                for j in [j for j in self.blocks if self._layer_of(j) == self._layer]:
                    if self._backward or not self.in_use(j):
                        self._drop(j)
            self._layer = layer
        if k not in self.blocks:
            lo, hi = self.layout.edges[k], self.layout.edges[k + 1]
            block = self.blocks[k] = torch.empty(hi - lo, dtype=torch.uint8, device=self.device)
            for key, r in self._region.items():
                if r == k:
                    v = self.layout.views[key]
                    flat = block[v.offset_bytes - lo:v.offset_bytes - lo + v.nbytes].view(v.dtype)
                    self._alias[key] = torch.from_dlpack(flat)  # same bytes, a storage of its own
        return self.blocks[k]

    def _drop(self, k: int) -> None:
        """Forget block k (views still in use keep its bytes alive)."""
        del self.blocks[k]
        self._alias = {key: a for key, a in self._alias.items() if self._region[key] != k}

    def in_use(self, k: int) -> bool:
        """Whether a view of block k handed out earlier is still alive (its alias's storage has
        more owners than an unused alias)."""
        return any(self._region[key] == k and _owners(a) > self._unused_owners for key, a in self._alias.items())

    def _layer_of(self, k: int) -> int | None:
        """The layer whose saved buffers region k holds; None for the shared and transient regions."""
        bounds, layers = self.layout.bounds, self.layout.layers
        if bounds is None or k >= len(bounds) - 1:
            return None
        return k if layers is None else layers[k]

    def allocate(self) -> None:
        """Open the arena for a forward: ops may take views (each block allocated on first use)."""
        self.held, self._backward, self._layer = True, False, None

    def end_forward(self, recomputing: bool = False) -> None:
        """Between forward and backward: forget every block no view uses any more (the transient
        one; under recompute each layer's region of saved buffers other than its routing
        decisions), so the loss reuses their bytes. Without recompute the blocks autograd's saved
        views use are forgotten too: they live exactly as long as those views, freed as backward
        passes each layer.
        `recomputing` (the graph has Recompute regions): those blocks are kept instead, and a
        recomputing backward writes into the same bytes (the plan keeps the live views and the
        rewritten buffers apart) rather than allocating a second copy while the kept routing
        decisions still hold the first."""
        for k in [k for k in self.blocks if not (recomputing and self.in_use(k))]:
            self._drop(k)
        self._backward = True

    def release(self) -> None:
        """Close the arena (after backward) and drop its blocks."""
        self.blocks, self._alias = {}, {}
        self.held, self._backward = False, False

    def __contains__(self, key: str) -> bool:
        return key in self.layout.views

    def take(self, key: str, shape, dtype: torch.dtype) -> Tensor:
        """A fresh tensor (own autograd metadata) over the planned bytes of `key`."""
        v = self.layout.views[key]
        shape = tuple(int(s) for s in shape)
        assert v.shape == shape and v.dtype == dtype, (
            f"arena view {key!r} was planned as {v.dtype}{list(v.shape)}, the op asks for {dtype}{list(shape)}")
        assert self.held, "the arena's bytes are released: allocate() first"
        self.taken.add(key)
        if v.nbytes == 0:       # no bytes to place: an empty region's edge may be the next region's start
            return torch.empty(shape, dtype=dtype, device=self.device)
        self._block(self._region[key])
        alias = self._alias[key]
        return torch.empty(0, dtype=dtype, device=alias.device).set_(alias.untyped_storage(), 0, shape)

    def address(self, key: str) -> int:
        """Device address of `key`'s planned bytes (tests check that ops really wrote there)."""
        self.allocate()
        k = self._region[key]
        return self._block(k).data_ptr() + self.layout.views[key].offset_bytes - self.layout.edges[k]


def _owners(t: Tensor) -> int:
    """How many references hold t's storage."""
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


_ACTIVE: Arena | None = None   # module-global, not thread-local: autograd runs CUDA backward on its own thread


@contextmanager
def active(arena: Arena | None):
    """Ops inside this block (forward and backward) write into `arena`'s planned views."""
    global _ACTIVE
    before, _ACTIVE = _ACTIVE, arena
    try:
        yield arena
    finally:
        _ACTIVE = before


def out(key: str, shape, dtype: torch.dtype, device) -> Tensor:
    """The output buffer for `key`: its planned view when an arena holds it, else a new tensor."""
    a = _ACTIVE
    if a is not None and key in a:
        return a.take(key, shape, dtype)
    return torch.empty(shape, dtype=dtype, device=device)


def out_like(key: str, shape, like: Tensor) -> Tensor:
    """`out` with the dtype and device of `like`."""
    return out(key, tuple(shape), like.dtype, like.device)


def place(key: str, t: Tensor) -> Tensor:
    """`t` copied into `key`'s planned view when an arena holds the key; else `t` itself.
    For small results computed by many temporaries (index maps, plans), where writing
    each step of the arithmetic into the view would buy nothing."""
    a = _ACTIVE
    if a is None or key not in a:
        return t
    return a.take(key, t.shape, t.dtype).copy_(t)
