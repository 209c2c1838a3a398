"""Where every token copy goes: index arithmetic on the device, static shapes only.

Vocabulary (one MoE layer, one EP group of `ep` ranks):
  copy      one (token, k) pair; copy c = t·K + k, N = T·K copies per rank.
  slot      an expert slot: rank p owns slots p·L … p·L+L-1 (L = home experts + spare
            slots per rank). Without cloning a slot is simply an expert id.
  chunk     the C rows rank s may send to rank p in one exchange (torch backend:
            equal splits, so every send/receive buffer is [ep·C, H]).
  sorted    the receive buffer regrouped by local slot, so that slot l's rows are
            contiguous at offs[l-1]:offs[l] (grouped-GEMM offsets, int32).

Inside a chunk, copies are ordered by (slot, copy index). A copy whose position
in its chunk is ≥ C does not fit: it is dropped and counted, never silently.
Every index map uses -1 for "nothing here" (an empty slot, a dropped copy); the
movement code turns -1 into a zero row.

No function here reads a value back to the host: no .item(), nonzero, bincount
or repeat_interleave, so all of it runs inside a CUDA graph.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class SendLayout(NamedTuple):
    send_copy: Tensor   # [ep·C] int64: copy index placed in each send row, -1 empty
    copy_slot: Tensor   # [N] int64: send row of each copy, -1 dropped
    dropped: Tensor     # [] int64: copies of this rank that did not fit a chunk


class RecvLayout(NamedTuple):
    sorted_src: Tensor   # [R] int64: receive row feeding each sorted row, -1 padding
    recv_sorted: Tensor  # [M] int64: sorted row of each receive row, -1 empty
    offs: Tensor         # [L] int32: cumulative rows per local slot
    received: Tensor     # [] int64: real rows received


def token_of(send_copy: Tensor, top_k: int) -> Tensor:
    """The token of each send row (copy c = t·K + k → t), -1 where the row is empty."""
    return torch.where(send_copy >= 0, send_copy // top_k, -1)


def slot_counts(dest_slot: Tensor, n_slots: int, out: Tensor | None = None) -> Tensor:
    """dest_slot [N] int64 → copies per slot [n_slots] int64 (scatter_add_, not bincount)."""
    counts = torch.zeros(n_slots, dtype=torch.int64, device=dest_slot.device) if out is None else out.zero_()
    return counts.scatter_add_(0, dest_slot, torch.ones_like(dest_slot))


def _exclusive_cumsum(x: Tensor, dim: int) -> Tensor:
    return torch.cumsum(x, dim) - x


def send_layout(dest_slot: Tensor, counts: Tensor, ep: int, slots_per_rank: int,
                chunk_rows: int) -> SendLayout:
    """Place each copy in the send buffer [ep·C]: chunk = destination rank, ordered by slot.

    dest_slot [N] int64 global slot of each copy; counts [ep·L] = slot_counts(dest_slot).
    """
    n, C = dest_slot.numel(), chunk_rows
    dev = dest_slot.device
    order = torch.argsort(dest_slot, stable=True)
    dest_rank = dest_slot[order] // slots_per_rank
    rank_start = _exclusive_cumsum(counts.view(ep, slots_per_rank).sum(1), 0)
    pos = torch.arange(n, device=dev) - rank_start[dest_rank]
    keep = pos < C
    row = torch.where(keep, dest_rank * C + pos, -1)
    copy_slot = torch.empty_like(row).scatter_(0, order, row)
    send_copy = torch.full((ep * C + 1,), -1, dtype=torch.int64, device=dev)
    send_copy.scatter_(0, torch.where(keep, row, ep * C), order)
    return SendLayout(send_copy[: ep * C], copy_slot, (~keep).sum())


def kept_counts(counts_all: Tensor, slots_per_rank: int, chunk_rows: int) -> Tensor:
    """counts_all [ep_src, ep·L] → rows that fit their chunk, [ep_src, ep_dst, L].

    Within a chunk slots are laid out in order, so slot l keeps what is left of C
    after slots < l.
    """
    ep = counts_all.shape[0]
    c = counts_all.view(ep, ep, slots_per_rank)
    room = (chunk_rows - _exclusive_cumsum(c, 2)).clamp(min=0)
    return torch.minimum(room, c)


def recv_layout(kept_here: Tensor, row_src: Tensor, row_j: Tensor, sorted_rows: int) -> RecvLayout:
    """Regroup the receive buffer by local slot.

    kept_here [ep_src, L]: rows each source sent to each of my slots (in chunk order).
    row_src, row_j [M]: for each receive row, its source rank and index within that
    source's chunk. sorted_rows R: static size of the sorted buffer (≥ every real row).
    """
    L = kept_here.shape[1]
    chunk_end = torch.cumsum(kept_here, 1)
    chunk_start = chunk_end - kept_here
    per_slot = kept_here.sum(0)
    slot_end = torch.cumsum(per_slot, 0)
    src_start = _exclusive_cumsum(kept_here, 0)
    slot = torch.searchsorted(chunk_end[row_src], row_j.unsqueeze(1), right=True).squeeze(1)
    valid = slot < L
    s = slot.clamp(max=L - 1)
    pos = (slot_end - per_slot)[s] + src_start[row_src, s] + row_j - chunk_start[row_src, s]
    recv_sorted = torch.where(valid, pos, -1)
    m = row_src.numel()
    sorted_src = torch.full((sorted_rows + 1,), -1, dtype=torch.int64, device=row_src.device)
    sorted_src.scatter_(0, torch.where(valid, pos, sorted_rows),
                        torch.arange(m, device=row_src.device))
    return RecvLayout(sorted_src[:sorted_rows], recv_sorted, slot_end.to(torch.int32), slot_end[-1])


def equal_chunk_rows(ep: int, chunk_rows: int, device) -> tuple[Tensor, Tensor]:
    """(source, index-in-chunk) of each row of an [ep·C] receive buffer."""
    m = torch.arange(ep * chunk_rows, device=device)
    return m // chunk_rows, m % chunk_rows


def gather_rows(src: Tensor, index: Tensor, out: Tensor | None = None) -> Tensor:
    """src [M, H], index [n] with -1 for "zero row" → [n, H] (into `out` when given).
    NaN-safe (masked_fill, not multiply)."""
    out = torch.index_select(src, 0, index.clamp(min=0), out=out)
    return out.masked_fill_((index < 0).unsqueeze(1), 0)
