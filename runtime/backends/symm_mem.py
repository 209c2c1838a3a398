"""The `symm_mem` backend: torch symmetric memory (NVSHMEM), moving only real rows.

Legend: T tokens, K top-k, N = T·K copies, H hidden, ep ranks, L slots per rank, C the
per-peer chunk (spec.peer_chunk_rows), A `major_align` (spec.budgets.row_alignment).

Dispatch is one `torch.ops.symm_mem.all_to_all_vdev_2d` (splits on the device):

    inp  [N, H]      my kept copies packed rank-major: (destination rank, slot, copy index)
    in_splits [ep·L] rows for (destination p, slot l) at p·L + l
    out  [R, H]      expert-major: slot l's rows from source s at out_offsets[l·ep + s]; each
                     slot's block is A-aligned and at least A rows (the library's rule)

so the grouped GEMM reads `out` with offsets straight away (no regrouping). Combine is
`all_to_all_vdev_2d_offset`, the transpose: expert-major rows (the dispatch's output splits
and offsets as input splits and offsets) back to the rank-major order they were sent in.

Overflow is counted exactly as under the `torch` backend: copy c of (source s → rank p) is
kept when it is among the first C of that pair in slot order (runtime/layout.py), so at
most ep·C real rows arrive and R = ep·C + L·A bounds the aligned receive buffer.

The exchange buffers are symmetric allocations, one pool per rank shared by every exchange
(layers, forward and backward run one after the other on one stream): allocated and
rendezvoused on the first call, before any CUDA-graph capture. World size ≥ 2 (the library
refuses a group of one); ≤ 32 ranks and L ≤ 16 (all_to_all_vdev_2d's tile limits).
"""
from __future__ import annotations

from typing import NamedTuple, Protocol

import torch
from torch import Tensor

from runtime import arena, comm, contracts
from runtime.backends import base
from runtime.contracts import SYMM_COMBINE, SYMM_DISPATCH, SYMM_LAYOUT
from runtime.layout import gather_rows, kept_counts, send_layout, token_of

MAX_RANKS, MAX_SLOTS = 32, 16       # all_to_all_vdev_2d: one warp-scan per slot, 16 tiles


class VdevTransport(Protocol):
    """The library calls, with their contracts (torch/csrc/distributed/c10d/symm_mem, NVSHMEM).

    Splits and offsets are int64 on the device, in rows of dim 0; every tensor passed to a
    collective comes from `empty` (symmetric) and is contiguous."""

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
        """A symmetric allocation (the same size on every rank of the group)."""

    def all_to_all_vdev_2d(self, inp: Tensor, out: Tensor, in_splits: Tensor, out_splits_offsets: Tensor,
                           group: str, major_align: int) -> None:
        """inp rank-major, in_splits [ep·L] (p·L + l) → out expert-major; out_splits_offsets [2, L·ep]
        ← (rows from s for slot l at l·ep + s, their exclusive-scan offsets with each slot's
        block aligned up to major_align and at least major_align rows)."""

    def all_to_all_vdev_2d_offset(self, inp: Tensor, out: Tensor, in_splits_offsets: Tensor,
                                  out_splits_offsets: Tensor, group: str) -> None:
        """inp expert-major, in_splits_offsets [2, L·ep] (l·ep + p: rows for rank p, their offset)
        → out rank-major, packed; out_splits_offsets [2, ep·L] ← (rows from s for slot l at s·L + l,
        exclusive-scan offsets)."""


class NvshmemTransport:
    """The real thing: torch.ops.symm_mem on the NVSHMEM backend (CUDA, world ≥ 2)."""

    def __init__(self):
        from torch.distributed import _symmetric_memory as symm   # optional: CUDA builds with NVSHMEM
        symm.set_backend("NVSHMEM")
        self._symm, self._enabled = symm, set()

    def _name(self, group: str) -> str:
        name = comm.get_group(group).group_name
        if name not in self._enabled:
            self._symm.enable_symm_mem_for_group(name)
            self._enabled.add(name)
        return name

    def empty(self, shape, dtype, device):
        return self._symm.empty(shape, dtype=dtype, device=device)

    def all_to_all_vdev_2d(self, inp, out, in_splits, out_splits_offsets, group, major_align):
        torch.ops.symm_mem.all_to_all_vdev_2d(inp, out, in_splits, out_splits_offsets, self._name(group),
                                              major_align=major_align)

    def all_to_all_vdev_2d_offset(self, inp, out, in_splits_offsets, out_splits_offsets, group):
        torch.ops.symm_mem.all_to_all_vdev_2d_offset(inp, out, in_splits_offsets, out_splits_offsets,
                                                     self._name(group))


def _transport() -> VdevTransport:
    return base.transport("symm_mem", (), NvshmemTransport)


# --- layout: splits, offsets, alignment (pure index arithmetic) --------------------------------

def receive_rows(ep: int, chunk_rows: int, slots_per_rank: int, major_align: int) -> int:
    """R: the aligned receive buffer's rows (≤ ep·C real rows, ≤ A padding per slot)."""
    return ep * chunk_rows + slots_per_rank * major_align


class Splits(NamedTuple):
    in_splits: Tensor        # [ep·L] rows I send to (rank p, slot l) at p·L + l
    out_splits: Tensor       # [L·ep] rows I receive for slot l from source s at l·ep + s
    out_offsets: Tensor      # [L·ep] where they land in the receive buffer
    slot_rows: Tensor        # [L] real rows per local slot
    slot_end: Tensor         # [L] aligned end of each slot's block (the grouped-GEMM offsets)


def vdev_2d_splits(counts_all: Tensor, rank: int, slots_per_rank: int, chunk_rows: int, major_align: int) -> Splits:
    """What all_to_all_vdev_2d will report, computed from the all-gathered counts [ep, ep·L]."""
    L, A = slots_per_rank, major_align
    kept = kept_counts(counts_all, L, chunk_rows)                 # [src, dst, L]
    mine = kept[:, rank, :].t()                                    # [L, src]
    slot_rows = mine.sum(1)
    padded = torch.clamp(-(-slot_rows // A) * A, min=A)
    slot_end = torch.cumsum(padded, 0)
    within = torch.cumsum(mine, 1) - mine
    offsets = (slot_end - padded).unsqueeze(1) + within
    return Splits(kept[rank].reshape(-1), mine.reshape(-1), offsets.reshape(-1), slot_rows, slot_end)


def packed_send(dest_slot: Tensor, counts: Tensor, kept_mine: Tensor, ep: int, L: int, C: int):
    """Send rows packed rank-major: (send_copy [N] copy in each send row or -1, copy_slot [N]
    send row of each copy or -1 dropped, dropped copies). kept_mine [ep, L]: my kept rows."""
    n = dest_slot.numel()
    snd = send_layout(dest_slot, counts, ep, L, C)
    per_dest = kept_mine.sum(1)
    start = torch.cumsum(per_dest, 0) - per_dest
    cs = snd.copy_slot
    row = torch.where(cs >= 0, start[(cs // C).clamp(min=0)] + cs % C, -1)
    send_copy = torch.full((n + 1,), -1, dtype=torch.int64, device=dest_slot.device)
    send_copy.scatter_(0, torch.where(row >= 0, row, n), torch.arange(n, device=dest_slot.device))
    return send_copy[:n], row, snd.dropped


def receive_row_map(s: Splits, rows: int) -> Tensor:
    """[R]: r for a real row of the receive buffer, -1 for alignment padding and the unused tail."""
    r = torch.arange(rows, device=s.slot_end.device)
    L = s.slot_end.shape[0]
    slot = torch.searchsorted(s.slot_end, r, right=True)
    c = slot.clamp(max=L - 1)
    start = torch.cat([s.slot_end.new_zeros(1), s.slot_end[:-1]])[c]
    real = (slot < L) & (r - start < s.slot_rows[c])
    return torch.where(real, r, -1)


@torch.library.custom_op("echo::symm_layout", mutates_args=())
def symm_layout(dest_slot: Tensor, counts: Tensor, counts_all: Tensor, slots_per_rank: int, chunk_rows: int,
                major_align: int, group: str, buf: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dest_slot [T, K]; counts [ep·L]; counts_all [ep, ep·L] → send_copy [N], copy_slot [N],
    in_splits [ep·L], splits_offsets [2, L·ep] (the dispatch's output splits and offsets),
    recv_row [R], offs [L] int32, stats [3] = (dropped copies, rows received, rows sent)."""
    ep, L, C = counts_all.shape[0], slots_per_rank, chunk_rows
    rank = comm.group_rank(group)
    s = vdev_2d_splits(counts_all, rank, L, C, major_align)
    send_copy, copy_slot, dropped = packed_send(dest_slot.reshape(-1), counts, s.in_splits.view(ep, L), ep, L, C)
    recv_row = receive_row_map(s, receive_rows(ep, C, L, major_align))
    stats = torch.stack([dropped, s.slot_rows.sum(), s.in_splits.sum()])
    maps = (send_copy, copy_slot, s.in_splits, torch.stack([s.out_splits, s.out_offsets]), recv_row,
            s.slot_end.to(torch.int32), stats)
    return tuple(arena.place(key, t) for key, t in zip(SYMM_LAYOUT.output_keys(buf), maps))


@symm_layout.register_fake
def _(dest_slot, counts, counts_all, slots_per_rank, chunk_rows, major_align, group, buf):
    ep, n, L = counts_all.shape[0], dest_slot.numel(), slots_per_rank
    i64 = dict(dtype=torch.int64)
    return (dest_slot.new_empty(n, **i64), dest_slot.new_empty(n, **i64), dest_slot.new_empty(ep * L, **i64),
            dest_slot.new_empty((2, ep * L), **i64),
            dest_slot.new_empty(receive_rows(ep, chunk_rows, L, major_align), **i64),
            dest_slot.new_empty(L, dtype=torch.int32), dest_slot.new_empty(3, **i64))


# --- the symmetric pool and the two movements --------------------------------------------------

class Pool(NamedTuple):
    """One rank's symmetric exchange buffers (see SYMM_DISPATCH's parts)."""
    inp: Tensor                  # [M, H], M = max(N, R)
    out: Tensor                  # [M, H]
    in_splits: Tensor            # [ep·L]
    in_splits_offsets: Tensor    # [2, L·ep]
    out_splits_offsets: Tensor   # [2, ep·L]


_POOLS: dict[tuple, Pool] = {}


def pool(rows: int, like: Tensor, n_splits: int) -> Pool:
    """The shared pool for [rows, H] exchanges of `like`'s dtype (made on first use)."""
    t = _transport()
    key = (id(t), rows, tuple(like.shape[1:]), like.dtype, like.device, n_splits)
    if key not in _POOLS:
        i64 = torch.int64
        _POOLS[key] = Pool(t.empty((rows,) + tuple(like.shape[1:]), like.dtype, like.device),
                           t.empty((rows,) + tuple(like.shape[1:]), like.dtype, like.device),
                           t.empty((n_splits,), i64, like.device), t.empty((2, n_splits), i64, like.device),
                           t.empty((2, n_splits), i64, like.device))
    return _POOLS[key]


def _pool_for(src: Tensor, maps: dict[str, Tensor]) -> Pool:
    return pool(max(maps["send_copy"].shape[0], maps["recv_row"].shape[0]), src, maps["in_splits"].shape[0])


def to_experts(src: Tensor, send_index: Tensor, maps: dict[str, Tensor], major_align: int, group: str,
               key: str | None) -> Tensor:
    """Rows of src picked by send_index [N] (-1: none) → all_to_all_vdev_2d → expert-major rows
    [R, H] into `key`, alignment padding zeroed."""
    p = _pool_for(src, maps)
    gather_rows(src, send_index, out=p.inp[: send_index.shape[0]])
    p.in_splits.copy_(maps["in_splits"])
    _transport().all_to_all_vdev_2d(p.inp, p.out, p.in_splits, p.out_splits_offsets, group, major_align)
    rows = maps["recv_row"]
    return gather_rows(p.out, rows, out=arena.out_like(key, (rows.shape[0], src.shape[1]), src))


def to_sources(y: Tensor, maps: dict[str, Tensor], group: str, key: str | None) -> Tensor:
    """Expert-major rows y [R, H] → all_to_all_vdev_2d_offset → one row per copy [N, H] (dropped: 0)."""
    p = _pool_for(y, maps)
    p.inp[: y.shape[0]].copy_(y)
    p.in_splits_offsets.copy_(maps["splits_offsets"])
    _transport().all_to_all_vdev_2d_offset(p.inp, p.out, p.in_splits_offsets, p.out_splits_offsets, group)
    cs = maps["copy_slot"]
    return gather_rows(p.out, cs, out=arena.out_like(key, (cs.shape[0], y.shape[1]), y))


def _maps(send_copy, copy_slot, in_splits, splits_offsets, recv_row) -> dict[str, Tensor]:
    return dict(send_copy=send_copy, copy_slot=copy_slot, in_splits=in_splits, splits_offsets=splits_offsets,
                recv_row=recv_row)


def _key(contract, buf: str | None, part: str = "") -> str | None:
    if buf is None:
        return None
    return contract.key(buf, part) if part else contract.output_key(buf)


@torch.library.custom_op("echo::symm_dispatch", mutates_args=())
def symm_dispatch(x: Tensor, send_copy: Tensor, copy_slot: Tensor, in_splits: Tensor, splits_offsets: Tensor,
                  recv_row: Tensor, major_align: int, top_k: int, group: str, buf: str) -> Tensor:
    """x [T, H] → expert-major rows [R, H] on the slots' owners (padding rows zero)."""
    maps = _maps(send_copy, copy_slot, in_splits, splits_offsets, recv_row)
    token = token_of(send_copy, top_k)
    return to_experts(x, token, maps, major_align, group, _key(SYMM_DISPATCH, buf))


@symm_dispatch.register_fake
def _(x, send_copy, copy_slot, in_splits, splits_offsets, recv_row, major_align, top_k, group, buf):
    return x.new_empty((recv_row.shape[0], x.shape[1]))


def _dispatch_backward(ctx, grad):
    """Rows' gradient → their copies (`buf.bwd.grad_copies`) → summed per token."""
    maps = SYMM_DISPATCH.saved_by_name(ctx)
    g = to_sources(grad.contiguous(), maps, ctx.group, _key(SYMM_DISPATCH, ctx.buf, "bwd.grad_copies"))
    return SYMM_DISPATCH.input_grads(x=g.view(ctx.x_shape[0], ctx.top_k, -1).sum(1))


@torch.library.custom_op("echo::symm_combine", mutates_args=())
def symm_combine(y: Tensor, send_copy: Tensor, copy_slot: Tensor, in_splits: Tensor, splits_offsets: Tensor,
                 recv_row: Tensor, major_align: int, group: str, buf: str) -> Tensor:
    """Expert outputs y [R, H] → one row per copy [N, H] at its source (dropped copies: zero)."""
    maps = _maps(send_copy, copy_slot, in_splits, splits_offsets, recv_row)
    return to_sources(y, maps, group, _key(SYMM_COMBINE, buf))


@symm_combine.register_fake
def _(y, send_copy, copy_slot, in_splits, splits_offsets, recv_row, major_align, group, buf):
    return y.new_empty((copy_slot.shape[0], y.shape[1]))


def _combine_backward(ctx, grad):
    """The copies' gradient dispatched back to the experts' rows, into `buf.bwd.grad_in` [R, H]."""
    maps = SYMM_COMBINE.saved_by_name(ctx)
    g = to_experts(grad.contiguous(), maps["send_copy"], maps, ctx.major_align, ctx.group,
                   _key(SYMM_COMBINE, ctx.buf, SYMM_COMBINE.input_grad))
    return SYMM_COMBINE.input_grads(y=g)


symm_dispatch.register_autograd(_dispatch_backward, setup_context=SYMM_DISPATCH.setup_context(
    "x", "major_align", "top_k", "group", "buf"))
symm_combine.register_autograd(_combine_backward, setup_context=SYMM_COMBINE.setup_context(
    "major_align", "group", "buf"))
contracts.bind(SYMM_LAYOUT, torch.ops.echo.symm_layout.default)
contracts.bind(SYMM_DISPATCH, torch.ops.echo.symm_dispatch.default)
contracts.bind(SYMM_COMBINE, torch.ops.echo.symm_combine.default)
