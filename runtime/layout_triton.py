"""The layout op's index maps as four Triton kernels: the same maps, bit for bit, as
runtime/layout.py's torch path (send_layout · kept_counts · recv_layout), which is ~80
small kernels (a radix sort, cumsums, searchsorted, scatters); in a CUDA graph each
costs a launch and a gap.

    _tables   one program: the receive side's per-(source, slot) tables from counts_all,
              the offsets, rows received and sent (stats[1:]); stats[0] = 0
    _hist     per block of copies: a histogram over the slots
    _send     per block: each copy's position in its destination chunk (earlier blocks'
              copies of its slot first, then this block's in copy order: a stable sort of
              (slot, index) in registers), → copy_slot, send_copy; dropped copies added to
              stats[0]
    _recv     per receive row: its slot (a search of its source's chunk ends) and sorted
              position → recv_sorted, sorted_src

Legend: N copies, S = ep·L slots, C rows per chunk, M = ep·C receive rows; *B padded
powers of two; BLK copies per block (IB index bits).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BLK = 1024     # copies per block of _hist / _send
_RECV_TILE = 8192   # _recv's [rows, slots] tile: receive rows per program × padded slots (more spills registers)


@triton.jit
def _kept(c, C):
    """rows [.., LB] each wants to send to consecutive slots of one chunk → rows that fit C."""
    room = tl.maximum(C - (tl.cumsum(c, 1) - c), 0)
    return tl.minimum(room, c)


@triton.jit(do_not_specialize=["ep", "L", "C", "rank"])
def _tables(counts_all_ptr, end_ptr, base_ptr, offs_ptr, stats_ptr, ep, L, C, rank,
            EPB: tl.constexpr, LB: tl.constexpr):
    r = tl.arange(0, EPB)[:, None]
    l = tl.arange(0, LB)[None, :]
    m = (r < ep) & (l < L)
    S = ep * L
    kept = _kept(tl.load(counts_all_ptr + r * S + rank * L + l, mask=m, other=0).to(tl.int64), C)
    chunk_end = tl.cumsum(kept, 1)
    per_slot = tl.sum(kept, 0)
    slot_end = tl.cumsum(per_slot, 0)
    src_start = tl.cumsum(kept, 0) - kept
    base = (slot_end - per_slot)[None, :] + src_start - (chunk_end - kept)
    tl.store(end_ptr + r * L + l, chunk_end, mask=m)
    tl.store(base_ptr + r * L + l, base, mask=m)
    tl.store(offs_ptr + tl.arange(0, LB), slot_end.to(tl.int32), mask=tl.arange(0, LB) < L)
    sent = tl.sum(tl.sum(_kept(tl.load(counts_all_ptr + rank * S + r * L + l, mask=m, other=0).to(tl.int64), C),
                         1), 0)
    tl.store(stats_ptr, 0)
    tl.store(stats_ptr + 1, tl.sum(per_slot, 0))
    tl.store(stats_ptr + 2, sent)


@triton.jit(do_not_specialize=["n", "S"])
def _hist(dest_ptr, hist_ptr, n, S, BLK: tl.constexpr, SB: tl.constexpr):
    b = tl.program_id(0)
    i = b * BLK + tl.arange(0, BLK)
    e = tl.load(dest_ptr + i, mask=i < n, other=S).to(tl.int32)
    tl.store(hist_ptr + b * SB + tl.arange(0, SB), tl.histogram(e, SB))


@triton.jit(do_not_specialize=["n", "ep", "L", "C", "blocks"])
def _send(dest_ptr, counts_ptr, hist_ptr, scratch_ptr, copy_slot_ptr, send_copy_ptr, stats_ptr,
          n, ep, L, C, blocks, BLK: tl.constexpr, IB: tl.constexpr, SB: tl.constexpr,
          EPB: tl.constexpr, LB: tl.constexpr, BCH: tl.constexpr):
    b = tl.program_id(0)
    S = ep * L
    row = scratch_ptr + b * SB
    # copies of slot s that rank-s's chunk holds before s's first copy: earlier slots of that rank
    r = tl.arange(0, EPB)[:, None]
    l = tl.arange(0, LB)[None, :]
    cnt = tl.load(counts_ptr + r * L + l, mask=(r < ep) & (l < L), other=0).to(tl.int64)
    tl.store(row + r * L + l, tl.cumsum(cnt, 1) - cnt, mask=(r < ep) & (l < L))
    tl.debug_barrier()
    # + copies of s in earlier blocks − where s starts among this block's copies sorted by slot
    s = tl.arange(0, SB)
    before = tl.zeros([SB], tl.int64)
    mine = tl.zeros([SB], tl.int64)
    for b0 in range(0, blocks, BCH):
        bb = b0 + tl.arange(0, BCH)[:, None]
        h = tl.load(hist_ptr + bb * SB + s[None, :], mask=bb < blocks, other=0).to(tl.int64)
        before += tl.sum(tl.where(bb < b, h, 0), 0)
        mine += tl.sum(tl.where(bb == b, h, 0), 0)
    start = tl.load(row + s, mask=s < S, other=0) + before - (tl.cumsum(mine, 0) - mine)
    tl.debug_barrier()
    tl.store(row + s, start)
    tl.debug_barrier()
    i = tl.arange(0, BLK)
    e = tl.load(dest_ptr + b * BLK + i, mask=b * BLK + i < n, other=S).to(tl.int64)
    key = tl.sort((e << IB) | i)
    slot = key >> IB
    copy = b * BLK + (key & (BLK - 1))
    valid = slot < S
    pos = tl.load(row + slot, mask=valid, other=0) + i
    keep = valid & (pos < C)
    dest = tl.where(keep, (slot // L) * C + pos, -1)
    tl.store(copy_slot_ptr + copy, dest, mask=valid)
    tl.store(send_copy_ptr + dest, copy, mask=keep)
    tl.atomic_add(stats_ptr, tl.sum((valid & ~keep).to(tl.int64), 0))


@triton.jit(do_not_specialize=["m", "L", "C"])
def _recv(end_ptr, base_ptr, recv_sorted_ptr, sorted_src_ptr, m, L, C, BR: tl.constexpr, LB: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    inside = rows < m
    src, j = rows // C, rows % C
    l = tl.arange(0, LB)[None, :]
    ends = tl.load(end_ptr + src[:, None] * L + l, mask=inside[:, None] & (l < L), other=C + 1)
    slot = tl.sum((ends <= j[:, None]).to(tl.int64), 1)
    valid = inside & (slot < L)
    pos = tl.load(base_ptr + src * L + tl.minimum(slot, L - 1), mask=valid, other=0) + j
    tl.store(recv_sorted_ptr + rows, tl.where(valid, pos, -1), mask=inside)
    tl.store(sorted_src_ptr + pos, rows, mask=valid)


def _pow2(n: int) -> int:
    return triton.next_power_of_2(max(n, 2))


def layout(dest_slot: Tensor, counts: Tensor, counts_all: Tensor, rank: int, slots_per_rank: int,
           chunk_rows: int, send_copy: Tensor, copy_slot: Tensor, sorted_src: Tensor, recv_sorted: Tensor,
           offs: Tensor, stats: Tensor) -> None:
    """dest_slot [N] int64, counts [S] (mine), counts_all [ep, S] → the six maps of
    runtime/ops.layout, written into the given tensors (see runtime/layout.py)."""
    ep, L, C = counts_all.shape[0], slots_per_rank, chunk_rows
    n, S, dev = dest_slot.numel(), ep * slots_per_rank, dest_slot.device
    epb, lb, sb = _pow2(ep), _pow2(L), _pow2(S + 1)
    blk = min(_BLK, _pow2(n))
    blocks = triton.cdiv(n, blk)
    end = torch.empty(ep, L, dtype=torch.int64, device=dev)
    base = torch.empty(ep, L, dtype=torch.int64, device=dev)
    counts_all = counts_all.contiguous()
    _tables[(1,)](counts_all, end, base, offs, stats, ep, L, C, rank, EPB=epb, LB=lb)
    send_copy.fill_(-1)
    sorted_src.fill_(-1)
    if n:
        hist = torch.empty(blocks, sb, dtype=torch.int32, device=dev)
        scratch = torch.empty(blocks, sb, dtype=torch.int64, device=dev)
        _hist[(blocks,)](dest_slot, hist, n, S, BLK=blk, SB=sb)
        _send[(blocks,)](dest_slot, counts.contiguous(), hist, scratch, copy_slot, send_copy, stats, n, ep, L, C,
                         blocks, BLK=blk, IB=max(1, (blk - 1).bit_length()), SB=sb, EPB=epb, LB=lb,
                         BCH=max(2, 4096 // sb))
    m, br = ep * C, max(16, _RECV_TILE // lb)
    _recv[(triton.cdiv(m, br),)](end, base, recv_sorted, sorted_src, m, L, C, BR=br, LB=lb)
