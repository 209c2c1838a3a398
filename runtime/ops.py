"""The `echo::` custom ops that the sync_free_dispatch pass puts into the graph.

Each op has a fake implementation (so graphs trace and shape-propagate on the
meta device at compile time) and, where it carries gradients, an autograd rule.
Groups are passed by name (see runtime/comm.py) together with their size, so the
fake implementations know every shape without a process group.

The `torch` backend lives here: token exchange is one all_to_all_single on
[ep·C, H] buffers with equal splits, so no split size ever comes from the host.
"""
from __future__ import annotations

import torch
from torch import Tensor

from runtime import comm
from runtime.layout import (equal_chunk_rows, gather_rows, kept_counts, recv_layout, send_layout,
                            slot_counts)


# --- count / exchange --------------------------------------------------------------------------

@torch.library.custom_op("echo::count", mutates_args=())
def count(dest_slot: Tensor, n_slots: int) -> Tensor:
    """dest_slot [T, K] int64 → copies per slot [n_slots] int64."""
    return slot_counts(dest_slot.reshape(-1), n_slots)


@count.register_fake
def _(dest_slot, n_slots):
    return dest_slot.new_empty(n_slots, dtype=torch.int64)


@torch.library.custom_op("echo::all_gather_counts", mutates_args=())
def all_gather_counts(counts: Tensor, group: str, group_size: int) -> Tensor:
    """counts [n] → [group_size, n] (row s = rank s's counts). Every rank gets the same tensor."""
    assert comm.group_size(group) == group_size, (
        f"group {group!r} has {comm.group_size(group)} ranks, the graph was compiled for {group_size}")
    return comm.all_gather_rows(counts, group)


@all_gather_counts.register_fake
def _(counts, group, group_size):
    return counts.new_empty((group_size, counts.shape[0]))


# --- layout ------------------------------------------------------------------------------------

@torch.library.custom_op("echo::layout", mutates_args=())
def layout(dest_slot: Tensor, counts: Tensor, counts_all: Tensor, slots_per_rank: int,
           chunk_rows: int, group: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Index maps for one exchange with fixed [ep·C] chunks (see runtime/layout.py).

    dest_slot [T, K]; counts [ep·L] (mine); counts_all [ep, ep·L] (everyone's).
    Returns send_copy [ep·C], copy_slot [N], sorted_src [R=ep·C], recv_sorted [ep·C],
    offs [L] int32, stats [3] int64 = (dropped copies, rows received, rows sent).
    """
    ep, C, L = counts_all.shape[0], chunk_rows, slots_per_rank
    rank = comm.group_rank(group)
    snd = send_layout(dest_slot.reshape(-1), counts, ep, L, C)
    kept = kept_counts(counts_all, L, C)
    src, j = equal_chunk_rows(ep, C, dest_slot.device)
    rcv = recv_layout(kept[:, rank, :], src, j, ep * C)
    sent = kept[rank].sum()
    stats = torch.stack([snd.dropped, rcv.received, sent])
    return snd.send_copy, snd.copy_slot, rcv.sorted_src, rcv.recv_sorted, rcv.offs, stats


@layout.register_fake
def _(dest_slot, counts, counts_all, slots_per_rank, chunk_rows, group):
    ep, n = counts_all.shape[0], dest_slot.numel()
    i64 = dict(dtype=torch.int64)
    m = ep * chunk_rows
    return (dest_slot.new_empty(m, **i64), dest_slot.new_empty(n, **i64),
            dest_slot.new_empty(m, **i64), dest_slot.new_empty(m, **i64),
            dest_slot.new_empty(slots_per_rank, dtype=torch.int32), dest_slot.new_empty(3, **i64))


# --- token movement ----------------------------------------------------------------------------

def to_experts(src: Tensor, send_rows: Tensor, sorted_src: Tensor, exchange) -> Tensor:
    """Rows of `src` picked by send_rows [S] → exchange(·) → regrouped by slot [R, H]."""
    return gather_rows(exchange(gather_rows(src, send_rows)), sorted_src)


def to_sources(y: Tensor, recv_sorted: Tensor, copy_slot: Tensor, exchange) -> Tensor:
    """Expert-sorted rows y [R, H] → exchange(·) back to their sources → one row per copy [N, H]."""
    return gather_rows(exchange(gather_rows(y, recv_sorted)), copy_slot)


def _equal(group: str):
    return lambda t: comm.all_to_all_equal(t, group)


def token_of(send_copy: Tensor, top_k: int) -> Tensor:
    return torch.where(send_copy >= 0, send_copy // top_k, -1)


@torch.library.custom_op("echo::dispatch", mutates_args=())
def dispatch(x: Tensor, send_copy: Tensor, copy_slot: Tensor, sorted_src: Tensor,
             recv_sorted: Tensor, top_k: int, group: str) -> Tensor:
    """x [T, H] → expert-sorted rows [R, H] on the ranks that own the slots (padding rows are zero)."""
    return to_experts(x, token_of(send_copy, top_k), sorted_src, _equal(group))


@dispatch.register_fake
def _(x, send_copy, copy_slot, sorted_src, recv_sorted, top_k, group):
    return x.new_empty((sorted_src.shape[0], x.shape[1]))


def _dispatch_setup(ctx, inputs, output):
    x, send_copy, copy_slot, sorted_src, recv_sorted, top_k, group = inputs
    ctx.save_for_backward(send_copy, copy_slot, sorted_src, recv_sorted)
    ctx.top_k, ctx.group, ctx.tokens = top_k, group, x.shape[0]


def _dispatch_backward(ctx, grad):
    send_copy, copy_slot, sorted_src, recv_sorted = ctx.saved_tensors
    g = combine(grad.contiguous(), send_copy, copy_slot, sorted_src, recv_sorted, ctx.group)
    return g.view(ctx.tokens, ctx.top_k, -1).sum(1), None, None, None, None, None, None


dispatch.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)


@torch.library.custom_op("echo::combine", mutates_args=())
def combine(y: Tensor, send_copy: Tensor, copy_slot: Tensor, sorted_src: Tensor,
            recv_sorted: Tensor, group: str) -> Tensor:
    """Expert outputs y [R, H] → one row per copy [N, H] at its source rank (dropped copies: zero)."""
    return to_sources(y, recv_sorted, copy_slot, _equal(group))


@combine.register_fake
def _(y, send_copy, copy_slot, sorted_src, recv_sorted, group):
    return y.new_empty((copy_slot.shape[0], y.shape[1]))


def _combine_setup(ctx, inputs, output):
    y, send_copy, copy_slot, sorted_src, recv_sorted, group = inputs
    ctx.save_for_backward(send_copy, copy_slot, sorted_src, recv_sorted)
    ctx.group = group


def _combine_backward(ctx, grad):
    send_copy, copy_slot, sorted_src, recv_sorted = ctx.saved_tensors
    g = to_experts(grad.contiguous(), send_copy, sorted_src, _equal(ctx.group))
    return g, None, None, None, None, None


combine.register_autograd(_combine_backward, setup_context=_combine_setup)


def weighted_sum(copies: Tensor, weights: Tensor) -> Tensor:
    """copies [N, H] (N = T·K), weights [T, K] → Σ_k w[t, k] · copies[t·K + k], [T, H].

    One batched GEMM ([T, 1, K] @ [T, K, H]): it accumulates in fp32 like the reference's
    float32 sum, and autograd saves the combine output in its own dtype (no fp32 copy).
    """
    t, k = weights.shape
    w = weights.to(copies.dtype).unsqueeze(1)
    return torch.bmm(w, copies.view(t, k, -1)).squeeze(1)


def layer_stats(stats: Tensor, spare_expert: Tensor | None = None) -> Tensor:
    """Per-layer stats row [4]: (dropped copies, rows received, rows sent, clones hosted by the plan)."""
    clones = stats.new_zeros(1) if spare_expert is None else (spare_expert >= 0).sum().view(1)
    return torch.cat([stats, clones])
