"""The ECHO planner: which hot experts get clones, on which spare slots, with which share.

Algorithm (water-filling by interval overlay; static shapes, device ops only, so every
rank computes the identical plan from the identical all-gathered counts):

 1. Per clone domain (a node, or the whole cluster) the target is the domain's mean
    load m. An overloaded rank's excess (load − m) is taken from its hottest
    *offerable* home experts first (the `offer` hottest per rank: the torch backend
    ships only those weights), giving one "piece" per expert.
 2. Lay the pieces end to end on one line and the underloaded ranks' room (m − load)
    end to end on another; overlay the two. Each overlap segment is one clone:
    (expert of the piece) → (rank of the room), with as many rows as the overlap.
 3. A rank's k-th segment takes its k-th spare slot; segments beyond S, or smaller
    than `min_clone_rows` (the cost model's break-even: moving the weights and the
    gradient must cost less than the rows it saves), are not cloned and their rows
    stay at home.

Output: spare_expert [ep, S] (−1 = empty) and quota [E, 1 + ep·S]: the rows of expert
e kept at home (column 0) and sent to each spare slot (column 1 + p·S + s). Copies of
e are then given to replicas in the order (source rank, copy index): global position
i of a copy goes to the replica whose cumulative quota first exceeds i.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

try:  # the fused kernels need triton; without it (CPU installs, CI) every device uses torch
    from runtime import planner_triton as _fused
except ImportError:
    _fused = None


class Plan(NamedTuple):
    spare_expert: Tensor  # [ep, S] int64, -1 = empty slot
    quota: Tensor         # [E, 1 + ep·S] int64 rows per replica (col 0 = home)


def offered_experts(load_e: Tensor, experts_per_rank: int, offer: int) -> Tensor:
    """The `offer` hottest home experts of each rank (local indices), [ep, offer]; ties by index.

    Only these may be cloned, so the torch backend ships only their weights.
    """
    per_rank = load_e.view(-1, experts_per_rank)
    return per_rank.sort(dim=1, descending=True, stable=True).indices[:, :offer]


def _overlay(per_rank: Tensor, load: Tensor, mean: Tensor, free: Tensor, offered: Tensor,
             min_rows: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One overlay round over a batch of D domains of g ranks with El experts each.

    per_rank [D, g, El] rows still at home; load [D, g] rows per rank; mean [D, 1];
    free [D, g] spare slots still free; offered [D, g, El] 0/1, experts that may be cloned. Returns per segment [D, n+g]: expert
    (domain-local), receiver rank (domain-local), k-th new clone of that receiver, rows.
    """
    D, g, El = per_rank.shape
    dev = per_rank.device
    excess = (load - mean).clamp(min=0)
    room = torch.where(free > 0, (mean - load).clamp(min=0), 0)
    r_order = torch.argsort(room, dim=1, descending=True, stable=True)
    hot, hot_idx = (per_rank * offered).sort(dim=2, descending=True, stable=True)
    before = torch.cumsum(hot, 2) - hot
    piece = torch.minimum((excess.unsqueeze(2) - before).clamp(min=0), hot).reshape(D, g * El)
    piece_expert = (hot_idx + torch.arange(g, device=dev).view(1, g, 1) * El).reshape(D, g * El)
    # biggest pieces meet the biggest rooms first: fewer, larger clones
    piece, p_order = piece.sort(dim=1, descending=True, stable=True)
    piece_expert = torch.gather(piece_expert, 1, p_order)
    room_sorted = torch.gather(room, 1, r_order)
    piece_end, room_end = torch.cumsum(piece, 1), torch.cumsum(room_sorted, 1)
    total = torch.minimum(piece_end[:, -1:], room_end[:, -1:])
    bounds, _ = torch.cat([piece_end, room_end], 1).clamp(max=total).sort(dim=1)
    seg_start = torch.cat([torch.zeros_like(bounds[:, :1]), bounds[:, :-1]], 1)
    rows = bounds - seg_start
    p_idx = torch.searchsorted(piece_end, seg_start, right=True).clamp(max=g * El - 1)
    r_pos = torch.searchsorted(room_end, seg_start, right=True).clamp(max=g - 1)
    # the k-th segment (large enough to pay for itself) of each receiver takes its k-th free slot
    big = (rows >= max(min_rows, 1)).long()
    c = torch.cumsum(big, 1) - big
    first = torch.searchsorted(r_pos.contiguous(), r_pos.contiguous(), right=False)
    k = c - torch.gather(c, 1, first)
    receiver = torch.gather(r_order, 1, r_pos)
    keep = (big > 0) & (k < torch.gather(free, 1, receiver))
    return torch.gather(piece_expert, 1, p_idx), receiver, k, torch.where(keep, rows, 0)


def _plan_domain(load_e: Tensor, experts_per_rank: int, spares: int, offer: int, min_rows: int,
                 rounds: int = 3) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """load_e [D, g·El] rows per expert (domain-local numbering) → segments of all rounds:
    expert, receiver, spare slot index, rows (rows 0 = no clone)."""
    D, n = load_e.shape
    g = n // experts_per_rank
    home = load_e.view(D, g, experts_per_rank).clone()
    load = home.sum(2)
    mean = (load.sum(1, keepdim=True) + g - 1) // g
    level = mean
    used = torch.zeros_like(load)
    offered = torch.zeros_like(home).scatter_(
        2, offered_experts(load_e, experts_per_rank, offer).view(D, g, -1), 1)
    out = []
    for _ in range(rounds):  # a fixed count: static shapes, no host decision
        expert, recv, k, rows = _overlay(home, load, level, spares - used, offered, min_rows)
        slot = torch.gather(used, 1, recv) + k
        home.view(D, n).scatter_add_(1, expert, -rows)
        load.scatter_add_(1, recv, rows)
        load.scatter_add_(1, expert // experts_per_rank, -rows)
        used.scatter_add_(1, recv, (rows > 0).long())
        out.append((expert, recv, slot, rows))
        # later rounds spread what is left over the ranks that still have a free slot
        left = (load - mean).clamp(min=0).sum(1, keepdim=True)
        open_ranks = ((used < spares) & (load <= mean)).sum(1, keepdim=True).clamp(min=1)
        level = mean + (left + open_ranks - 1) // open_ranks
    return tuple(torch.cat(parts, 1) for parts in zip(*out))


def fused_available(t: Tensor) -> bool:
    """Whether the Triton kernels (runtime/planner_triton.py) serve tensors like t: CUDA and triton."""
    return _fused is not None and t.is_cuda


def plan(counts: Tensor, experts_per_rank: int, spares: int, domain_size: int, offer: int | None = None,
         min_clone_rows: int = 1) -> Plan:
    """counts [ep_src, E] copies per (source rank, expert) → Plan. Experts home on e // El.

    domain_size: ranks per clone domain (gpus_per_node for 'node', ep for 'cluster');
    must divide ep. offer: hottest experts per rank whose weights may be cloned (default min(S, El)).
    On CUDA with triton installed one fused kernel computes it; else plan_reference. Both
    give the same plan bit for bit (tests/runtime/test_planner.py, tests/gpu/test_planner_cuda.py).
    """
    offer = min(spares, experts_per_rank) if offer is None else offer
    if fused_available(counts):
        return Plan(*_fused.plan_fused(counts, experts_per_rank, spares, domain_size, offer, min_clone_rows))
    return plan_reference(counts, experts_per_rank, spares, domain_size, offer, min_clone_rows)


def plan_reference(counts: Tensor, experts_per_rank: int, spares: int, domain_size: int,
                   offer: int | None = None, min_clone_rows: int = 1) -> Plan:
    """plan in plain torch ops (any device): the reference the fused kernel is tested against."""
    ep, E = counts.shape[0], counts.shape[1]
    El = experts_per_rank
    offer = min(spares, experts_per_rank) if offer is None else offer
    dev = counts.device
    load_e = counts.sum(0)                                          # [E]
    n_dom = ep // domain_size
    expert, recv, slot, rows = _plan_domain(load_e.view(n_dom, domain_size * El), El, spares, offer,
                                            min_clone_rows)
    dom = torch.arange(n_dom, device=dev).unsqueeze(1)
    g_expert = expert + dom * domain_size * El                      # global expert id
    g_rank = recv + dom * domain_size
    col = (g_rank * spares + slot).reshape(-1)
    rows, g_expert = rows.reshape(-1), g_expert.reshape(-1)
    used = rows > 0
    P = ep * spares
    spare_flat = torch.full((P + 1,), -1, dtype=torch.int64, device=dev)
    spare_flat.scatter_(0, torch.where(used, col, P), torch.where(used, g_expert, -1))
    quota = torch.zeros(E, 1 + P + 1, dtype=torch.int64, device=dev)
    quota.view(-1).scatter_add_(0, torch.where(used, g_expert * (P + 2) + 1 + col, P + 1), rows)
    quota = quota[:, : 1 + P]
    quota[:, 0] = load_e - quota[:, 1:].sum(1)
    return Plan(spare_flat[:P].view(ep, spares), quota)


def assign_slots(topk_idx: Tensor, counts: Tensor, quota: Tensor, rank: int, experts_per_rank: int,
                 spares: int) -> Tensor:
    """This rank's copies → global slot ids [T·K] int64 (home slot or a spare slot) following the plan.

    topk_idx [T, K] experts of this rank's copies; counts [ep, E]; quota [E, 1 + ep·S].
    Slot numbering: rank p owns slots p·L … p·L+L-1, L = El + S; home expert e sits in
    slot (e // El)·L + e % El, spare s of rank p in slot p·L + El + s.
    On CUDA with triton installed two fused kernels compute it; else assign_slots_reference.
    """
    if fused_available(topk_idx) and spares > 0:
        return _fused.assign_slots_fused(topk_idx, counts, quota, rank, experts_per_rank, spares)
    return assign_slots_reference(topk_idx, counts, quota, rank, experts_per_rank, spares)


def assign_slots_reference(topk_idx: Tensor, counts: Tensor, quota: Tensor, rank: int,
                           experts_per_rank: int, spares: int) -> Tensor:
    """assign_slots in plain torch ops (any device): the reference for the fused kernels."""
    e = topk_idx.reshape(-1)
    n = e.numel()
    L = experts_per_rank + spares
    order = torch.argsort(e, stable=True)
    mine = counts[rank]
    start_e = torch.cumsum(mine, 0) - mine
    local_pos = torch.empty_like(e).scatter_(0, order, torch.arange(n, device=e.device) - start_e[e[order]])
    before_me = (torch.cumsum(counts, 0) - counts)[rank]             # copies of e on lower ranks
    pos = before_me[e] + local_pos
    quota_end = torch.cumsum(quota, 1)[e]                            # [N, 1 + P]
    col = torch.searchsorted(quota_end, pos.unsqueeze(1), right=True).squeeze(1)
    col = col.clamp(max=quota.shape[1] - 1)
    home = (e // experts_per_rank) * L + e % experts_per_rank
    spare = col - 1
    spare_slot = (spare // spares) * L + experts_per_rank + spare % spares
    return torch.where(col == 0, home, spare_slot)


def rank_rows(counts: Tensor, p: Plan, experts_per_rank: int, spares: int) -> Tensor:
    """Rows each rank computes under plan p: [ep] (home quotas + spare quotas)."""
    ep = counts.shape[0]
    home = p.quota[:, 0].view(ep, experts_per_rank).sum(1)
    spare = p.quota[:, 1:].sum(0).view(ep, spares)
    return home + spare.sum(1)
