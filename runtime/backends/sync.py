"""The `sync` backend: the classic host-synced dropless dispatcher (the baseline).

What Megatron-Core's all-to-all dispatcher does: read the all-gathered counts to
the host once per layer, then exchange exactly the real rows with variable
splits. Nothing is padded and nothing is dropped, but every shape depends on
data, so it cannot be captured in a CUDA graph; verify_sync_free rejects it
there. It is kept as fast as the design allows: one host read per layer
(`echo::sync_layout`), splits handed to the exchanges as a CPU tensor (no
second device read), regrouping by one device gather instead of per-chunk
split/cat, and device offsets for the grouped GEMM.
"""
from __future__ import annotations

import torch
from torch import Tensor

from runtime import comm, contracts
from runtime.contracts import SYNC_COMBINE, SYNC_DISPATCH, SYNC_LAYOUT
from runtime.layout import recv_layout, send_layout
from runtime.ops import to_experts, to_sources, token_of


@torch.library.custom_op("echo::sync_layout", mutates_args=())
def sync_layout(dest_slot: Tensor, counts: Tensor, counts_all: Tensor, slots_per_rank: int,
                group: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Like echo::layout with unbounded chunks. HOST SYNC: reads counts_all.

    Returns send_copy [N], copy_slot [N], sorted_src [n_recv], recv_sorted [n_recv],
    offs [L] int32, stats [3], splits [2, ep] int64 on the CPU (row 0: rows I send to
    each rank, row 1: rows I receive from each rank).
    """
    ep, L, n = counts_all.shape[0], slots_per_rank, dest_slot.numel()
    rank = comm.group_rank(group)
    per_pair = counts_all.view(ep, ep, L).sum(2)  # [src, dst]
    splits = torch.stack([per_pair[rank], per_pair[:, rank]]).cpu()  # the one host sync
    n_recv = int(splits[1].sum())
    snd = send_layout(dest_slot.reshape(-1), counts, ep, L, max(n, 1))
    kept_here = counts_all.view(ep, ep, L)[:, rank, :]
    starts = torch.cumsum(splits[1], 0).to(dest_slot.device)
    m = torch.arange(n_recv, device=dest_slot.device)
    src = torch.searchsorted(starts, m, right=True)
    j = m - (starts - per_pair[:, rank])[src]
    rcv = recv_layout(kept_here, src, j, n_recv)
    # send rows are packed: rank p's chunk starts after the rows for ranks < p
    send_start = torch.cumsum(per_pair[rank], 0) - per_pair[rank]
    cs = snd.copy_slot
    packed = (cs // max(n, 1)).clamp(min=0)
    copy_slot = send_start[packed] + cs % max(n, 1)
    send_copy = torch.empty_like(copy_slot).scatter_(0, copy_slot, torch.arange(n, device=cs.device))
    stats = torch.stack([snd.dropped, rcv.received, counts.sum()])
    return send_copy, copy_slot, rcv.sorted_src, rcv.recv_sorted, rcv.offs, stats, splits


@sync_layout.register_fake
def _(dest_slot, counts, counts_all, slots_per_rank, group):
    ctx = torch.library.get_ctx()
    n_recv = ctx.new_dynamic_size()
    n, ep = dest_slot.numel(), counts_all.shape[0]
    i64 = dict(dtype=torch.int64)
    return (dest_slot.new_empty(n, **i64), dest_slot.new_empty(n, **i64),
            dest_slot.new_empty(n_recv, **i64), dest_slot.new_empty(n_recv, **i64),
            dest_slot.new_empty(slots_per_rank, dtype=torch.int32), dest_slot.new_empty(3, **i64),
            torch.empty((2, ep), dtype=torch.int64, device="cpu"))


def _var(splits: Tensor, group: str, reverse: bool):
    send, recv = splits.tolist()  # a CPU tensor: no device sync here
    if reverse:
        send, recv = recv, send
    return lambda t, out=None: comm.all_to_all_var(t, sum(recv), send, recv, group)  # sizes vary: never planned


@torch.library.custom_op("echo::sync_dispatch", mutates_args=())
def sync_dispatch(x: Tensor, send_copy: Tensor, copy_slot: Tensor, sorted_src: Tensor,
                  recv_sorted: Tensor, splits: Tensor, top_k: int, group: str) -> Tensor:
    """x [T, H] → exactly the received rows, sorted by slot [n_recv, H]."""
    return to_experts(x, token_of(send_copy, top_k), sorted_src, _var(splits, group, False))


@sync_dispatch.register_fake
def _(x, send_copy, copy_slot, sorted_src, recv_sorted, splits, top_k, group):
    return x.new_empty((sorted_src.shape[0], x.shape[1]))


@torch.library.custom_op("echo::sync_combine", mutates_args=())
def sync_combine(y: Tensor, send_copy: Tensor, copy_slot: Tensor, sorted_src: Tensor,
                 recv_sorted: Tensor, splits: Tensor, group: str) -> Tensor:
    """Expert outputs [n_recv, H] → one row per copy at its source [N, H]."""
    return to_sources(y, recv_sorted, copy_slot, _var(splits, group, True))


@sync_combine.register_fake
def _(y, send_copy, copy_slot, sorted_src, recv_sorted, splits, group):
    return y.new_empty((copy_slot.shape[0], y.shape[1]))


def _dispatch_backward(ctx, grad):
    """The transpose of sync_dispatch: a sync_combine of the rows' gradient, summed per token."""
    g = sync_combine(y=grad.contiguous(), group=ctx.group, **SYNC_DISPATCH.saved_by_name(ctx))
    return SYNC_DISPATCH.input_grads(x=g.view(ctx.x_shape[0], ctx.top_k, -1).sum(1))


def _combine_backward(ctx, grad):
    """The transpose of sync_combine: the copies' gradient dispatched back to the experts' rows."""
    maps = SYNC_COMBINE.saved_by_name(ctx)
    exchange = _var(maps["splits"], ctx.group, False)
    return SYNC_COMBINE.input_grads(y=to_experts(grad.contiguous(), maps["send_copy"], maps["sorted_src"], exchange))


sync_dispatch.register_autograd(_dispatch_backward, setup_context=SYNC_DISPATCH.setup_context("x", "top_k", "group"))
sync_combine.register_autograd(_combine_backward, setup_context=SYNC_COMBINE.setup_context("group"))
contracts.bind(SYNC_LAYOUT, torch.ops.echo.sync_layout.default)
contracts.bind(SYNC_DISPATCH, torch.ops.echo.sync_dispatch.default)
contracts.bind(SYNC_COMBINE, torch.ops.echo.sync_combine.default)
