"""Load-balancing strategies: each turns one layer's counts [ep, E] of one step into a StepOutcome.

  none     experts at home only.
  static   DeepSeek-EPLB-style redundant experts, chosen once from the average load of the first
           `static_warmup` steps: ep·S replicas go to the hottest experts (the next replica to the
           highest load per replica), heaviest replica first onto the least-loaded rank with a free
           slot that is not the expert's home; each step an expert's rows split evenly over its copies.
  shadow   FasterMoE-style shadowing: up to S hottest experts above the mean per-rank load are
           broadcast to every rank, which computes its own copies of them locally.
  echo     the ECHO planner (runtime.planner.plan), with the spec's spare slots and clone domain,
           offer = min(S, El) and the cost model's min_clone_rows.

Shapes: ep EP ranks, E experts, El = E / ep home experts per rank, S spare slots per rank.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
from torch import Tensor

from echoc.spec import Spec
from passes import cost_model
from runtime.planner import plan


@dataclass(frozen=True)
class SimContext:
    """The sizes and cost-model constants every strategy and metric reads."""
    ep: int
    experts: int
    spares: int
    domain_ranks: int
    min_clone_rows: int
    row_bytes: int
    expert_bytes: int
    row_s: float
    receive_rows: int
    cluster_link_bps: float  # bytes/s of the link a cluster-wide replica crosses
    domain_link_bps: float   # bytes/s of the clone domain's link

    @property
    def experts_per_rank(self) -> int:
        return self.experts // self.ep


def context(spec: Spec) -> SimContext:
    """The simulator's constants for `spec` (cost model, clone domain, capacity)."""
    d = cost_model.clone_decision(spec)
    ep = spec.parallel.ep
    return SimContext(ep=ep, experts=spec.model.moe.num_experts, spares=spec.echo.spare_slots_per_rank,
                      domain_ranks=d.domain_ranks, min_clone_rows=d.min_clone_rows,
                      row_bytes=cost_model.row_bytes(spec), expert_bytes=cost_model.expert_bytes(spec),
                      row_s=cost_model.row_compute_s(spec), receive_rows=spec.receive_rows,
                      cluster_link_bps=cost_model.link_gbps(spec, ep) * 1e9,
                      domain_link_bps=d.link_gbps * 1e9)


@dataclass
class StepOutcome:
    """What one strategy does with one step's counts [ep, E] of one layer."""
    slot_rows: Tensor    # [ep, El + S] int64 rows each rank computes per slot (home slots, then spares)
    remote_rows: int     # rows computed on a rank other than the one that routed them
    weight_bytes: float  # expert weight + gradient bytes moved, all links together
    link_bytes: Tensor   # [ep] float64 weight bytes through each rank's link (for its time)


def _overlap(a0: Tensor, a1: Tensor, b0: Tensor, b1: Tensor) -> Tensor:
    return (torch.minimum(a1, b1) - torch.maximum(a0, b0)).clamp(min=0)


def plan_outcome(counts: Tensor, spare_expert: Tensor, quota: Tensor) -> tuple[Tensor, int]:
    """Slot rows [ep, El + S] and remote rows of a Plan (spare_expert [ep, S], quota [E, 1 + ep·S]).

    Copies of expert e are handed out as runtime.planner.assign_slots does: in (source rank,
    copy index) order, home replica first, then spare slots in column order; a copy is local
    when its replica sits on its source rank.
    """
    ep, E = counts.shape
    S = spare_expert.shape[1]
    El = E // ep
    e_spare = spare_expert.clamp(min=0).reshape(-1)
    col = torch.arange(1, 1 + ep * S)
    spare_rows = torch.where(spare_expert >= 0, quota[e_spare, col].view(ep, S), 0)
    before = torch.cumsum(counts, 0) - counts                      # [ep, E] copies from lower ranks
    home, e = torch.arange(E) // El, torch.arange(E)
    lo = before[home, e]
    local = _overlap(torch.zeros_like(lo), quota[:, 0], lo, lo + counts[home, e]).sum()
    if S:
        q_end = torch.cumsum(quota, 1)[e_spare, col]
        rank = torch.arange(ep).repeat_interleave(S)
        lo = before[rank, e_spare]
        local += _overlap(q_end - spare_rows.reshape(-1), q_end, lo, lo + counts[rank, e_spare]).sum()
    slot_rows = torch.cat([quota[:, 0].view(ep, El), spare_rows], 1)
    return slot_rows, int(counts.sum() - local)


def clone_traffic(spare_expert: Tensor, expert_bytes: int) -> tuple[float, Tensor]:
    """2 · expert_bytes (weights out, gradient home) per filled spare slot: (total, per rank [ep])."""
    per_rank = (spare_expert >= 0).sum(1).double() * 2 * expert_bytes
    return float(per_rank.sum()), per_rank


def none_step(counts: Tensor, ctx: SimContext) -> StepOutcome:
    """Experts at home only."""
    ep, E = counts.shape
    quota = torch.zeros(E, 1 + ep * ctx.spares, dtype=torch.int64)
    quota[:, 0] = counts.sum(0)
    spare = torch.full((ep, ctx.spares), -1, dtype=torch.int64)
    slot_rows, remote = plan_outcome(counts, spare, quota)
    return StepOutcome(slot_rows, remote, 0.0, torch.zeros(ep, dtype=torch.float64))


def echo_step(counts: Tensor, ctx: SimContext) -> StepOutcome:
    """runtime.planner.plan with the spec's spare slots, clone domain, offer = min(S, El), min_clone_rows."""
    p = plan(counts, ctx.experts_per_rank, ctx.spares, ctx.domain_ranks, min(ctx.spares, ctx.experts_per_rank),
             ctx.min_clone_rows)
    slot_rows, remote = plan_outcome(counts, p.spare_expert, p.quota)
    total, per_rank = clone_traffic(p.spare_expert, ctx.expert_bytes)
    return StepOutcome(slot_rows, remote, total, per_rank)


def shadow_step(counts: Tensor, ctx: SimContext) -> StepOutcome:
    """Up to S hottest experts whose load exceeds the mean rank load go to every rank (FasterMoE).

    Weight bytes: broadcast to ep−1 ranks + gradients back. Each rank's link carries one copy of
    each way per shadowed expert (ring broadcast / reduce).
    """
    ep, E = counts.shape
    El, S = ctx.experts_per_rank, ctx.spares
    load = counts.sum(0)
    top = torch.topk(load, min(S, E))
    shadow = top.indices[top.values * ep > load.sum()]            # [k]
    k = shadow.numel()
    home_rows = load.clone()
    home_rows[shadow] = counts[shadow // El, shadow]
    mine = counts[:, shadow].clone()                              # [ep, k] each rank's own copies
    mine[shadow // El, torch.arange(k)] = 0                       # the home computes them in its home slot
    spare_rows = torch.cat([mine, torch.zeros(ep, S - k, dtype=torch.int64)], 1)
    is_shadow = torch.zeros(E, dtype=torch.bool)
    is_shadow[shadow] = True
    remote = int(torch.where(is_shadow, 0, load - counts[torch.arange(E) // El, torch.arange(E)]).sum())
    slot_rows = torch.cat([home_rows.view(ep, El), spare_rows], 1)
    link = torch.full((ep,), 2.0 * ctx.expert_bytes * k, dtype=torch.float64)
    return StepOutcome(slot_rows, remote, 2.0 * (ep - 1) * ctx.expert_bytes * k, link)


@dataclass
class StaticPlacement:
    """The static strategy's replicas, placed once for the whole run."""
    spare_expert: Tensor  # [ep, S] int64, -1 = empty
    replica_index: Tensor  # [ep, S] int64, 1.. among the expert's extra replicas (home is 0)
    copies: Tensor         # [E] int64 replicas per expert, home included
    dropped: int           # replicas for which no eligible rank was left


def static_replicas(load: Tensor, ep: int, n_replicas: int) -> Tensor:
    """Extra replicas per expert [E]: each goes to the expert with the highest load per copy.

    The m-th extra copy of e is worth load_e / m; greedy = the n_replicas largest of those
    (at most ep − 1 extra copies per expert, ties by expert index).
    """
    E = load.numel()
    if n_replicas == 0 or ep == 1:
        return torch.zeros(E, dtype=torch.int64)
    worth = load.double().unsqueeze(1) / torch.arange(1, ep, dtype=torch.float64)   # [E, ep-1]
    order = torch.sort(worth.reshape(-1), descending=True, stable=True).indices[:n_replicas]
    order = order[worth.reshape(-1)[order] > 0]
    return torch.bincount(order // (ep - 1), minlength=E)


def static_placement(load: Tensor, ep: int, spares: int) -> StaticPlacement:
    """Place ep·S replicas for average loads load [E]: heaviest replica first onto the least-loaded
    rank with a free slot that is neither its home nor already holding that expert."""
    E = load.numel()
    El = E // ep
    extra = static_replicas(load, ep, ep * spares)
    share = load.double() / (1 + extra)
    rank_load = share.view(ep, El).sum(1).tolist()
    heap = [(rank_load[r], r) for r in range(ep)] if spares else []
    free = [spares] * ep
    spare_expert = torch.full((ep, spares), -1, dtype=torch.int64)
    replica_index = torch.zeros(ep, spares, dtype=torch.int64)
    dropped = 0
    order = sorted(range(E), key=lambda i: (-float(share[i]), i))
    for e in (i for i in order if extra[i] > 0):
        taken, skipped = [], []
        while heap and len(taken) < extra[e]:
            item = heapq.heappop(heap)
            (skipped if item[1] == e // El else taken).append(item)
        dropped += int(extra[e]) - len(taken)
        for i, (w, r) in enumerate(taken):
            spare_expert[r, spares - free[r]] = e
            replica_index[r, spares - free[r]] = i + 1
            free[r] -= 1
            if free[r]:
                skipped.append((w + float(share[e]), r))
        for item in skipped:
            heapq.heappush(heap, item)
    copies = 1 + torch.bincount(spare_expert[spare_expert >= 0], minlength=E)
    return StaticPlacement(spare_expert, replica_index, copies, dropped)


def static_step(counts: Tensor, placement: StaticPlacement, ctx: SimContext, steps: int) -> StepOutcome:
    """The fixed placement; each expert's rows split evenly over its copies (remainder to the first)."""
    ep, E = counts.shape
    load = counts.sum(0)
    base, rem = load // placement.copies, load % placement.copies
    quota = torch.zeros(E, 1 + ep * ctx.spares, dtype=torch.int64)
    quota[:, 0] = base + (rem > 0)
    filled = placement.spare_expert.reshape(-1) >= 0
    e = placement.spare_expert.reshape(-1)[filled]
    col = 1 + torch.arange(ep * ctx.spares)[filled]
    quota[e, col] = base[e] + (placement.replica_index.reshape(-1)[filled] < rem[e])
    slot_rows, remote = plan_outcome(counts, placement.spare_expert, quota)
    total, per_rank = clone_traffic(placement.spare_expert, ctx.expert_bytes)
    once = float(filled.sum()) * ctx.expert_bytes / steps
    return StepOutcome(slot_rows, remote, total + once, per_rank)
