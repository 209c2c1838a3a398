"""ECHO ops: plan, assign copies to replicas, clone weights into spare slots.

`echo::clone_weights` (torch backend): every rank offers the weights of its
`offer` hottest home experts (a static count, the same experts the planner may
clone) in one all-gather over its clone domain, and picks the experts its spare
slots host this step. Its backward is the gradient reduction: the spare slots'
gradients go back with one reduce-scatter (the transpose of the all-gather) and
are added into the home experts' gradients, so the optimizer sees one gradient
per expert. Static shapes throughout; no host decision.
"""
from __future__ import annotations

import torch
from torch import Tensor

from runtime import arena, comm, contracts, rows as row_ops
from runtime.contracts import ASSIGN_SLOTS, CLONE_WEIGHTS, PLAN
from runtime.layout import gather_rows
from runtime.planner import assign_slots as _assign_slots
from runtime.planner import offered_experts, plan as _plan


@torch.library.custom_op("echo::plan", mutates_args=())
def plan(counts_all: Tensor, experts_per_rank: int, spares: int, domain_size: int, offer: int,
         min_clone_rows: int, buf: str) -> tuple[Tensor, Tensor]:
    """counts_all [ep, E] → spare_expert [ep, S] (-1 empty), quota [E, 1 + ep·S]. See runtime/planner.py."""
    p = _plan(counts_all, experts_per_rank, spares, domain_size, offer, min_clone_rows)
    spare_key, quota_key = PLAN.output_keys(buf)
    return arena.place(spare_key, p.spare_expert), arena.place(quota_key, p.quota)


@plan.register_fake
def _(counts_all, experts_per_rank, spares, domain_size, offer, min_clone_rows, buf):
    ep, E = counts_all.shape
    return (counts_all.new_empty((ep, spares)), counts_all.new_empty((E, 1 + ep * spares)))


@torch.library.custom_op("echo::assign_slots", mutates_args=())
def assign_slots(topk_idx: Tensor, counts_all: Tensor, quota: Tensor, experts_per_rank: int,
                 spares: int, group: str, buf: str) -> Tensor:
    """topk_idx [T, K] experts → [T, K] global slots (home or spare) following the quotas."""
    slots = _assign_slots(topk_idx, counts_all, quota, comm.group_rank(group), experts_per_rank, spares)
    return arena.place(ASSIGN_SLOTS.output_key(buf), slots.view_as(topk_idx))


@assign_slots.register_fake
def _(topk_idx, counts_all, quota, experts_per_rank, spares, group, buf):
    return torch.empty_like(topk_idx)


def _pick_index(counts_all: Tensor, spare_expert: Tensor, experts_per_rank: int, offer: int,
                rank: int, dom: int) -> tuple[Tensor, Tensor]:
    """(my offered local experts [offer], row of each of my spare slots in the gathered
    [dom·offer] buffer or -1) — identical arithmetic on every rank."""
    offered = offered_experts(counts_all.sum(0), experts_per_rank, offer)   # [ep, offer]
    e = spare_expert[rank]                                                   # [S]
    valid = e >= 0
    home = torch.where(valid, e // experts_per_rank, rank)
    local = e % experts_per_rank
    k = (offered[home] == local.unsqueeze(1)).long().argmax(1)
    row = (home - (rank // dom) * dom) * offer + k
    return offered[rank], torch.where(valid, row, -1)


def _chunks(index: Tensor, q: int) -> Tensor:
    """Expert indices [n] (-1: none) → the indices of their q chunk rows each, [n·q] (-1: none)."""
    idx = index.unsqueeze(1) * q + torch.arange(q, device=index.device)
    return torch.where(index.unsqueeze(1) >= 0, idx, -1).reshape(-1)


def _chunk_width(t: Tensor) -> int:
    """Whole experts move as rows of this many elements (0: as one row each, the torch path): the
    largest power of two ≤ 65536 dividing an expert, so the row kernels' grid stays small."""
    d = t[0].numel() if t.shape[0] else 0
    w = d & -d if d else 0
    return min(w, 65536) if row_ops.fused(t) and w >= 1024 else 0


def _experts(src: Tensor, index: Tensor, out: Tensor) -> Tensor:
    """src [M, ...] experts, index [n] (-1: zeros) → out [n, ...] = src[index] (Triton on CUDA)."""
    w = _chunk_width(src)
    if not w:
        gather_rows(src.reshape(src.shape[0], -1), index, out=out.view(out.shape[0], -1))
        return out
    q = src[0].numel() // w
    row_ops.gather(src.view(-1, w), _chunks(index, q), out=out.view(-1, w))
    return out


def _experts_summed(src: Tensor, slot_row: Tensor, n: int, out: Tensor) -> Tensor:
    """src [S, ...] spare-slot gradients, slot_row [S] (row of each slot, -1: none) → out [n, ...]:
    row j the sum of the slots filed under j, zeros where none (fp32 sums, rounded once)."""
    S, d = src.shape[0], src[0].numel()
    table = torch.where(slot_row.unsqueeze(0) == torch.arange(n, device=src.device).unsqueeze(1),
                        torch.arange(S, device=src.device), -1)                            # [n, S]
    w = _chunk_width(src)
    if not w:      # torch: gather the slots of each row, sum them (fp32 accumulation, as the kernel)
        picked = gather_rows(src.reshape(S, d), table.reshape(-1)).view(n, S, d)
        return torch.sum(picked, 1, out=out.view(n, d)).view_as(out) if n else out
    q = d // w
    index = _chunks(table.t().reshape(-1), q).view(S, n * q).t().contiguous()               # [n·q, S]
    row_ops.gather_sum(src.reshape(-1, w), index, out=out.view(-1, w))
    return out


@torch.library.custom_op("echo::clone_weights", mutates_args=())
def clone_weights(w: Tensor, counts_all: Tensor, spare_expert: Tensor, offer: int, group: str,
                  ep_group: str, buf: str) -> Tensor:
    """w [El, ...] home experts → [El + S, ...]: home experts, then the spare slots' clones (zero if empty).
    Internals: `buf.send` [offer, ...] (my offered experts), `buf.gather` [dom·offer, ...]."""
    El, S, tail = w.shape[0], spare_expert.shape[1], tuple(w.shape[1:])
    dom, rank = comm.group_size(group), comm.group_rank(ep_group)
    mine, rows = _pick_index(counts_all, spare_expert, El, offer, rank, dom)
    send = _experts(w, mine, arena.out_like(CLONE_WEIGHTS.key(buf, "send"), (offer,) + tail, w))
    gathered = arena.out_like(CLONE_WEIGHTS.key(buf, "gather"), (dom * offer,) + tail, w)
    comm.all_gather_rows(send, group, out=gathered.view((dom, offer) + tail))
    out = arena.out_like(CLONE_WEIGHTS.output_key(buf), (El + S,) + tail, w)
    out[:El].copy_(w)
    _experts(gathered, rows, out[El:])
    return out


@clone_weights.register_fake
def _(w, counts_all, spare_expert, offer, group, ep_group, buf):
    return w.new_empty((w.shape[0] + spare_expert.shape[1],) + tuple(w.shape[1:]))


def _clone_backward(ctx, grad):
    """The gradient reduction: spare slots' gradients summed per offered expert into
    `buf.bwd.rs_in` [dom·offer (+1 planned, unused), ...], reduce-scattered home into
    `buf.bwd.rs_out` [offer, ...], added to the home experts' gradient. That gradient is a copy of
    the home rows: a view would keep the spare rows' memory alive as the weight's .grad."""
    saved = CLONE_WEIGHTS.saved_by_name(ctx)
    counts_all, spare_expert = saved["counts_all"], saved["spare_expert"]
    El, offer = ctx.w_shape[0], ctx.offer
    dom, rank = comm.group_size(ctx.group), comm.group_rank(ctx.ep_group)
    mine, rows = _pick_index(counts_all, spare_expert, El, offer, rank, dom)
    tail, grad = tuple(grad.shape[1:]), grad.contiguous()
    rs_in = arena.out_like(CLONE_WEIGHTS.key(ctx.buf, "bwd.rs_in"), (dom * offer + 1,) + tail, grad)
    _experts_summed(grad[El:], rows, dom * offer, rs_in[:-1])
    rs_out = arena.out_like(CLONE_WEIGHTS.key(ctx.buf, "bwd.rs_out"), (offer,) + tail, grad)
    back = comm.reduce_scatter_rows(rs_in[:-1], ctx.group, out=rs_out)
    g_home = grad[:El].clone()
    home = g_home.view(El, -1)
    home[mine] = home[mine] + back.view(offer, -1)       # the offered experts are distinct
    return CLONE_WEIGHTS.input_grads(w=g_home)


clone_weights.register_autograd(_clone_backward, setup_context=CLONE_WEIGHTS.setup_context(
    "w", "offer", "group", "ep_group", "buf"))
contracts.bind(PLAN, torch.ops.echo.plan.default)
contracts.bind(ASSIGN_SLOTS, torch.ops.echo.assign_slots.default)
contracts.bind(CLONE_WEIGHTS, torch.ops.echo.clone_weights.default)
