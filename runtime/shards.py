"""Flat shards of a tensor over a data-parallel group, and the bucketed collectives on them.

A tensor of `numel` elements is flattened and split into n equal pieces of
m = ceil(numel / n) elements; rank r holds elements [r·m, r·m + m) (the tail past `numel`
is padding, kept at zero). Every tensor is sharded on its own (as FSDP2's per-parameter
sharding), so a parameter's shard is a tensor of its own with the parameter's identity.

Many tensors of one group move in one collective: their shards side by side in a
bucket [Σm], all-gathered into [n, Σm] (rank-major), or their full values laid out as
[n, Σm] and reduce-scattered into [Σm]. Shapes are static Python ints: no host read,
capturable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from runtime import comm


@dataclass(frozen=True)
class ShardSpec:
    """Where one tensor's shard lies: `numel` elements over a group of `n` ranks, this rank `rank`."""
    numel: int
    n: int
    rank: int
    group: str                     # the comm group name: "world" (dense) or "expert_dp" (experts)

    @property
    def rows(self) -> int:
        """m: elements per shard (padded)."""
        return -(-self.numel // self.n)

    @property
    def lo(self) -> int:
        return min(self.rank * self.rows, self.numel)

    @property
    def hi(self) -> int:
        return min(self.lo + self.rows, self.numel)


def shard_spec(numel: int, group: str) -> ShardSpec:
    return ShardSpec(numel, comm.group_size(group), comm.group_rank(group), group)


def take_shard(full: Tensor, s: ShardSpec, out: Tensor) -> Tensor:
    """out [m] ← this rank's elements of `full` (any shape, numel elements), zero-padded."""
    flat, k = full.reshape(-1), s.hi - s.lo
    out[:k].copy_(flat[s.lo:s.hi])
    out[k:].zero_()
    return out


def to_rows(full: Tensor, s: ShardSpec, dst: Tensor) -> None:
    """dst [n, m] (a strided view) ← `full` flattened, row r = rank r's piece, zero-padded."""
    flat, m = full.reshape(-1), s.rows
    whole = s.numel // m
    dst[:whole].copy_(flat[:whole * m].view(whole, m))
    rem = s.numel - whole * m
    if whole < s.n:
        dst[whole:].zero_()
        if rem:
            dst[whole, :rem].copy_(flat[whole * m:])


def from_rows(src: Tensor, s: ShardSpec, full: Tensor) -> None:
    """`full` (numel elements, contiguous) ← src [n, m] with the padding dropped."""
    flat, m = full.view(-1), s.rows
    whole = s.numel // m
    flat[:whole * m].view(whole, m).copy_(src[:whole])
    rem = s.numel - whole * m
    if rem:
        flat[whole * m:].copy_(src[whole, :rem])


def _offsets(specs: list[ShardSpec]) -> list[int]:
    out, at = [], 0
    for s in specs:
        out.append(at)
        at += s.rows
    return out + [at]


@dataclass
class PendingGather:
    """An all-gather of shards in flight: `finish()` waits for it and fills the whole tensors."""
    recv: Tensor                 # [n, Σm]
    work: object | None
    specs: list[ShardSpec]
    fulls: list[Tensor]

    def finish(self) -> None:
        if self.work is not None:
            self.work.wait()
        off = _offsets(self.specs)
        for s, full, a, b in zip(self.specs, self.fulls, off, off[1:]):
            from_rows(self.recv[:, a:b], s, full)


def gather_full_start(shards: list[Tensor], specs: list[ShardSpec], fulls: list[Tensor]) -> PendingGather:
    """Issue one all-gather over the specs' (common) group; fulls[i] (the whole tensor whose shard
    on each rank is shards[i], cast to fulls[i]'s dtype) is filled by the result's `finish()`."""
    group, off = specs[0].group, _offsets(specs)
    assert all(s.group == group for s in specs)
    dtype = fulls[0].dtype
    send = torch.empty(off[-1], dtype=dtype, device=fulls[0].device)
    for shard, a, b in zip(shards, off, off[1:]):
        send[a:b].copy_(shard)
    recv, work = comm.all_gather_rows_async(send, group)             # [n, Σm]
    return PendingGather(recv, work, list(specs), list(fulls))


def gather_full(shards: list[Tensor], specs: list[ShardSpec], fulls: list[Tensor]) -> None:
    """One all-gather over the specs' (common) group: every fulls[i] ← the whole tensor whose
    shard on each rank is shards[i] ([m_i], cast to fulls[i]'s dtype)."""
    if specs:
        gather_full_start(shards, specs, fulls).finish()


def reduce_scatter_full(fulls: list[Tensor], specs: list[ShardSpec], dtype: torch.dtype) -> Tensor:
    """One reduce-scatter (sum) over the specs' group: returns [Σm] in `dtype`, this rank's
    shard of every fulls[i] summed over the group, side by side (split with `split_rows`)."""
    group, off = specs[0].group, _offsets(specs)
    assert all(s.group == group for s in specs)
    n = specs[0].n
    buf = torch.empty((n, off[-1]), dtype=dtype, device=fulls[0].device)
    for s, full, a, b in zip(specs, fulls, off, off[1:]):
        to_rows(full, s, buf[:, a:b])
    return comm.reduce_scatter_rows(buf, group).view(-1)


def split_rows(flat: Tensor, specs: list[ShardSpec]) -> list[Tensor]:
    """[Σm] → one view [m_i] per spec."""
    return list(flat.split([s.rows for s in specs]))
