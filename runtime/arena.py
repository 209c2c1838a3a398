"""The planned arena: one byte buffer per rank, carved into the views the buffer plan placed.

The memory plan (passes/buffer_plan.py) gives every MoE buffer that an echo op writes
itself a byte offset in one arena; buffers whose lifetimes overlap never share bytes.
At run time the arena's bytes are held from each iteration's forward to the end of its
backward, except the transient region (buffers not saved for backward), which is given back
between forward and backward (inside a CUDA graph: from the graph's pool, at one address in
every replay), and each op asks for its output by key:

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
    """What the runtime needs of a buffer plan: the arena size and where each key lives.
    Views below `held_bytes` are saved across the forward/backward boundary; those above it
    live within a forward or within a backward (None: all held)."""
    nbytes: int
    views: dict[str, View] = field(default_factory=dict)
    held_bytes: int | None = None

    @property
    def split(self) -> int:
        return self.nbytes if self.held_bytes is None else self.held_bytes


class Arena:
    """The planned views of `layout` on `device`, in two blocks: the held region (buffers saved
    for backward) and the transient one (buffers that live within one pass).

    The Trainer allocates the held block at the start of each iteration's forward and releases
    both after its backward, so the gradient reduction and the optimizer (where the rank's peak
    often falls) reuse the bytes. The transient block is allocated when an op first asks for one
    of its views and released after the forward, so the loss's working set reuses it; backward
    takes it again. Inside a captured CUDA graph both come from the graph's pool, at the same
    addresses in every replay."""

    def __init__(self, layout: ArenaLayout, device: torch.device, allocate: bool = True):
        self.layout, self.device = layout, device
        split = layout.split
        for key, v in layout.views.items():
            assert v.offset_bytes % v.dtype.itemsize == 0 and v.offset_bytes + v.nbytes <= layout.nbytes, (key, v)
            assert v.offset_bytes + v.nbytes <= split or v.offset_bytes >= split, (key, v, split)
        self.base: Tensor | None = None          # the held block
        self.transient: Tensor | None = None     # the transient block
        self._alias: dict[str, Tensor] = {}
        self.taken: set[str] = set()
        if allocate:
            self.allocate()

    def _block(self, lo: int, hi: int) -> Tensor:
        """Bytes [lo, hi) of the layout as one allocation, with an alias per view inside."""
        block = torch.empty(hi - lo, dtype=torch.uint8, device=self.device)
        for key, v in self.layout.views.items():
            if lo <= v.offset_bytes < hi or (v.nbytes == 0 and v.offset_bytes == lo == hi):
                flat = block[v.offset_bytes - lo:v.offset_bytes - lo + v.nbytes].view(v.dtype)
                self._alias[key] = torch.from_dlpack(flat)  # same bytes, a storage of its own
        return block

    def allocate(self) -> None:
        """Allocate the held block (no-op when held)."""
        if self.base is None:
            self.base = self._block(0, self.layout.split)

    def _allocate_transient(self) -> None:
        if self.transient is None:
            self.transient = self._block(self.layout.split, self.layout.nbytes)

    def release_transient(self) -> None:
        """Give the transient block back (after the forward: no view of it is in use)."""
        if self.transient is not None:
            split = self.layout.split
            self._alias = {k: a for k, a in self._alias.items() if self.layout.views[k].offset_bytes < split}
            self.transient = None

    def release(self) -> None:
        """Give both blocks back to the allocator (views taken earlier keep theirs alive)."""
        self.base, self.transient, self._alias = None, None, {}

    @property
    def held(self) -> bool:
        return self.base is not None

    def __contains__(self, key: str) -> bool:
        return key in self.layout.views

    def take(self, key: str, shape, dtype: torch.dtype) -> Tensor:
        """A fresh tensor (own autograd metadata) over the planned bytes of `key`."""
        v = self.layout.views[key]
        shape = tuple(int(s) for s in shape)
        assert v.shape == shape and v.dtype == dtype, (
            f"arena view {key!r} was planned as {v.dtype}{list(v.shape)}, the op asks for {dtype}{list(shape)}")
        assert self.base is not None, "the arena's bytes are released: allocate() first"
        if key not in self._alias:
            self._allocate_transient()
        alias = self._alias[key]
        self.taken.add(key)
        return torch.empty(0, dtype=dtype, device=alias.device).set_(alias.untyped_storage(), 0, shape)

    def address(self, key: str) -> int:
        """Device address of `key`'s planned bytes (tests check that ops really wrote there)."""
        self.allocate()
        v, split = self.layout.views[key], self.layout.split
        if v.offset_bytes < split:
            return self.base.data_ptr() + v.offset_bytes
        self._allocate_transient()
        return self.transient.data_ptr() + v.offset_bytes - split


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
