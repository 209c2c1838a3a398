"""`echoc simulate`: routing count traces through load-balancing strategies and the cost model, no GPU.

A trace is a LongTensor counts [steps, layers, ep, E]: copies each source EP rank routes to each
expert (the runtime's `--record-routing` writes {"counts": ...} with torch.save), or a synthetic
one (`skew="zipf:1.2"`, `drift="zipf:1.2,rate:0.1"`). Each step and layer, every strategy turns
counts [ep, E] into a `StepOutcome` (rows per rank and expert slot, token and weight traffic):

  none     experts at home only.
  static   DeepSeek-EPLB-style redundant experts, chosen once from the average load of the first
           `static_warmup` steps: ep·S replicas go to the hottest experts (the next replica to the
           highest load per replica), heaviest replica first onto the least-loaded rank with a free
           slot that is not the expert's home; each step an expert's rows split evenly over its copies.
  shadow   FasterMoE-style shadowing: up to S hottest experts above the mean per-rank load are
           broadcast to every rank, which computes its own copies of them locally.
  echo     the ECHO planner (runtime.planner.plan), with the spec's spare slots and clone domain,
           offer = S and the cost model's min_clone_rows.
  optimum  (ep ≤ 4, E ≤ 8, S ≤ 1) the least possible max rank rows over every choice of expert for
           every spare slot, each with its best split of rows over the copies (see optimum_max_rows).

Metrics (per MoE layer per step; averaged and maxed over steps × layers):

  token straggler  max rank rows / mean rank rows.
  GEMM straggler   max rank expert-GEMM time / mean, with per-slot cost
                   gemm(n) = GEMM_FIXED_S + ceil(n / GEMM_TILE_ROWS) · GEMM_TILE_ROWS · row_compute_s
                   for n > 0 (0 for an empty slot): a fixed per-expert launch / tile-tail overhead
                   (fwd + bwd) plus rows quantised to 128-row tiles.
  overflow rate    rows beyond spec.receive_rows on their rank / all rows.
  token bytes      rows computed on a rank other than their source × row_bytes × 2 (dispatch + combine).
  weight bytes     2 · expert_bytes per clone (weights out, gradient home); shadow: 2 · (ep−1) ·
                   expert_bytes per shadowed expert; static: 2 · expert_bytes per replica every step
                   (a replica is a trained parameter: its gradient must meet the home's and fresh
                   weights must come back after each optimizer step) plus the one-time placement
                   (expert_bytes per replica) amortised over the steps.
  MoE ms           max over ranks of rows · row_compute_s + that rank's weight bytes / link, where the
                   link is the clone domain's (echo) or the whole EP group's (static, shadow).
"""
from __future__ import annotations

import heapq
import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor

from echoc.errors import EchocError, MissingDependencyError
from echoc.spec import Spec
from passes import cost_model
from runtime.planner import plan

STRATEGIES = ("none", "static", "shadow", "echo", "optimum")
DEFAULT_STEPS = 20
DEFAULT_SKEW = "zipf:1.2"
GEMM_TILE_ROWS = 128
GEMM_FIXED_S = 10e-6   # per non-empty expert slot, fwd + bwd: ~6 grouped-GEMM groups × ~1.5 µs setup/tail
OPTIMUM_LIMITS = (4, 8, 1)  # ep, E, S


class TraceError(EchocError):
    """A routing trace or a synthetic-trace option the simulator cannot use."""


# Results ---------------------------------------------------------------------------------------

@dataclass
class Stat:
    mean: float
    max: float


@dataclass
class StrategyMetrics:
    """One strategy's metrics over steps × layers; None where the strategy does not define it."""
    token_straggler: Stat
    gemm_straggler: Optional[Stat] = None
    overflow_rate: Optional[Stat] = None
    token_bytes: Optional[Stat] = None   # per layer per step
    weight_bytes: Optional[Stat] = None  # per layer per step
    moe_ms: Optional[Stat] = None        # per layer per step


@dataclass
class SimResult:
    spec_name: str
    source: str
    steps: int
    layers: int
    ep: int
    experts: int
    spares: int
    metrics: dict[str, StrategyMetrics]
    series: dict[str, list[float]]  # token straggler per step (mean over layers)
    notes: list[str] = field(default_factory=list)


@dataclass
class StepOutcome:
    """What one strategy does with one step's counts [ep, E] of one layer."""
    slot_rows: Tensor    # [ep, El + S] int64 rows each rank computes per slot (home slots, then spares)
    remote_rows: int     # rows computed on a rank other than the one that routed them
    weight_bytes: float  # expert weight + gradient bytes moved, all links together
    link_bytes: Tensor   # [ep] float64 weight bytes through each rank's link (for its time)


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


# Traces ----------------------------------------------------------------------------------------

def parse_synthetic(text: str, need_rate: bool) -> tuple[float, float]:
    """'zipf:1.2' → (1.2, 0.0); 'zipf:1.2,rate:0.1' → (1.2, 0.1)."""
    want = "'zipf:S,rate:R' (e.g. zipf:1.2,rate:0.1)" if need_rate else "'zipf:S' (e.g. zipf:1.2)"
    items = [p.split(":", 1) for p in text.replace(" ", "").split(",")]
    keys = ["zipf", "rate"] if need_rate else ["zipf"]
    if [k[0] for k in items] != keys or any(len(k) != 2 for k in items):
        raise TraceError(f"cannot read {text!r}: expected {want}")
    try:
        values = [float(v) for _, v in items]
    except ValueError:
        raise TraceError(f"cannot read {text!r}: expected {want}") from None
    skew, rate = values[0], (values[1] if need_rate else 0.0)
    if skew < 0 or not 0 <= rate <= 1:
        raise TraceError(f"{text!r}: the zipf exponent must be >= 0 and the rate in [0, 1]")
    return skew, rate


def sample_counts(probs: Tensor, ep: int, copies: int, g: torch.Generator) -> Tensor:
    """Each of ep ranks draws `copies` experts from probs [E] (a multinomial) → [ep, E] int64.

    Sequential conditional binomials over experts, vectorised over ranks: O(E) small ops.
    """
    tail = torch.flip(torch.cumsum(torch.flip(probs, [0]), 0), [0])   # mass of experts e.. E-1
    cond = (probs / tail.clamp(min=1e-300)).clamp(0, 1).tolist()
    left = torch.full((ep,), float(copies), dtype=torch.float64)
    out = torch.zeros(ep, probs.numel(), dtype=torch.int64)
    for e, q in enumerate(cond[:-1]):
        x = torch.binomial(left, torch.full_like(left, q), generator=g)
        out[:, e] = x.long()
        left -= x
    out[:, -1] = left.long()
    return out


def synthetic_trace(ep: int, experts: int, copies: int, steps: int, layers: int, skew: float,
                    rate: float = 0.0, seed: int = 0) -> Tensor:
    """Zipf(skew) popularity over a random permutation of experts per layer → counts [steps, layers, ep, E].

    Each step a fraction `rate` of every layer's permutation is re-shuffled (hot experts move).
    """
    g = torch.Generator().manual_seed(seed)
    zipf = torch.arange(1, experts + 1, dtype=torch.float64) ** -skew
    zipf /= zipf.sum()
    perms = [torch.randperm(experts, generator=g) for _ in range(layers)]
    n_move = round(rate * experts)
    out = torch.empty(steps, layers, ep, experts, dtype=torch.int64)
    for t in range(steps):
        for layer, perm in enumerate(perms):
            if t > 0 and n_move > 1:
                pos = torch.randperm(experts, generator=g)[:n_move]
                perm[pos] = perm[pos[torch.randperm(n_move, generator=g)]]
            out[t, layer] = sample_counts(zipf[torch.argsort(perm)], ep, copies, g)
    return out


def save_trace(counts: Tensor, path: str | Path) -> None:
    """Write counts [steps, layers, ep, E] in the runtime's --record-routing format."""
    torch.save({"counts": counts.to(torch.int64).cpu()}, str(path))


def load_trace(path: str | Path) -> Tensor:
    """A trace file (torch.save of {"counts": ...} or .npz with key "counts") → [steps, layers, ep, E]."""
    path = Path(path)
    if not path.is_file():
        raise TraceError(f"trace file {path} does not exist")
    if path.suffix == ".npz":
        try:
            import numpy as np
        except ImportError:
            raise MissingDependencyError(f"reading {path.name}", "pip install numpy") from None
        with np.load(path) as f:
            if "counts" not in f:
                raise TraceError(f"{path} has no array 'counts' (found: {', '.join(f.files)})")
            counts = torch.from_numpy(f["counts"].astype("int64"))
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(data, dict) or "counts" not in data:
            raise TraceError(f"{path} must hold a dict with key 'counts' (LongTensor [steps, layers, ep, E])")
        counts = torch.as_tensor(data["counts"]).to(torch.int64)
    return counts.unsqueeze(1) if counts.dim() == 3 else counts


def check_trace(counts: Tensor, ep: int, experts: int, source: str) -> None:
    if counts.dim() != 4 or counts.shape[2:] != (ep, experts):
        raise TraceError(f"{source}: counts have shape {tuple(counts.shape)}; this spec needs "
                         f"[steps, layers, {ep}, {experts}] (ep, num_experts)")
    if (counts < 0).any():
        raise TraceError(f"{source}: counts must be >= 0")


# Strategies ------------------------------------------------------------------------------------

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
    """runtime.planner.plan with the spec's spare slots, clone domain, offer = S, min_clone_rows."""
    p = plan(counts, ctx.experts_per_rank, ctx.spares, ctx.domain_ranks, ctx.spares, ctx.min_clone_rows)
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


def optimum_masks(ep: int, experts: int, spares: int) -> Tensor:
    """For every choice of expert (or none) in every spare slot: which ranks hold a copy of each
    expert, as bitmasks over ranks [choices, E]."""
    El = experts // ep
    choices = list(itertools.product(range(experts + 1), repeat=ep * spares))
    choice = torch.tensor(choices, dtype=torch.int64).view(len(choices), ep, spares, 1)
    hosts = (choice == torch.arange(experts)).any(2)                                 # [C, ep, E]
    home = (torch.arange(experts) // El).unsqueeze(0) == torch.arange(ep).unsqueeze(1)   # [ep, E]
    member = hosts | home
    return (member * (1 << torch.arange(ep)).view(1, ep, 1)).sum(1)


def optimum_max_rows(counts: Tensor, masks: Tensor) -> int:
    """Least possible max rank rows for counts [ep, E] over placements masks [C, E].

    Exact, LP-free: for one placement, rows can be split so that every rank computes ≤ T rows
    iff for every set B of ranks, the experts all of whose copies lie inside B carry ≤ T·|B|
    rows (max-flow min-cut on the experts→ranks graph, i.e. Hall's condition); and integral
    capacities give an integral flow. So the optimum is min over placements of
    max over B of ceil(load(experts inside B) / |B|).
    """
    ep = counts.shape[0]
    load = counts.sum(0)
    subsets = torch.arange(1, 1 << ep)                                         # every non-empty rank set
    inside = (masks.unsqueeze(1) & ~subsets.view(1, -1, 1)) == 0                # [C, B, E]
    size = torch.tensor([bin(b).count("1") for b in subsets.tolist()])
    need = ((inside * load).sum(2) + size - 1) // size                          # [C, B]
    return int(need.amax(1).min())


# Metrics ---------------------------------------------------------------------------------------

def gemm_cost_s(slot_rows: Tensor, row_s: float) -> Tensor:
    """Expert-GEMM seconds per rank [ep] for slot_rows [ep, slots] (see the module docstring)."""
    tiles = (slot_rows + GEMM_TILE_ROWS - 1) // GEMM_TILE_ROWS
    cost = GEMM_FIXED_S + tiles.double() * GEMM_TILE_ROWS * row_s
    return torch.where(slot_rows > 0, cost, 0.0).sum(1)


def _ratio(x: Tensor) -> float:
    mean = float(x.double().mean())
    return float(x.max()) / mean if mean > 0 else 1.0


def step_metrics(out: StepOutcome, ctx: SimContext, link_bps: float) -> dict[str, float]:
    rows = out.slot_rows.sum(1)
    total = max(int(rows.sum()), 1)
    t = rows.double() * ctx.row_s + out.link_bytes / link_bps
    return {"token_straggler": _ratio(rows),
            "gemm_straggler": _ratio(gemm_cost_s(out.slot_rows, ctx.row_s)),
            "overflow_rate": float((rows - ctx.receive_rows).clamp(min=0).sum()) / total,
            "token_bytes": out.remote_rows * ctx.row_bytes * 2.0,
            "weight_bytes": out.weight_bytes,
            "moe_ms": float(t.max()) * 1e3}


def summarise(values: list[dict[str, float]]) -> StrategyMetrics:
    stats = {k: Stat(sum(v[k] for v in values) / len(values), max(v[k] for v in values)) for k in values[0]}
    return StrategyMetrics(**stats)


# Driver ----------------------------------------------------------------------------------------

StepFn = Callable[[Tensor], dict[str, float]]  # counts [ep, E] → one step's metrics


def _layer_steppers(names: list[str], ctx: SimContext, layer_counts: Tensor, warmup: int,
                    notes: list[str]) -> dict[str, StepFn]:
    """One step function per strategy for one layer's counts [steps, ep, E]: counts [ep, E] → metrics."""
    links = {"none": 1.0, "static": ctx.cluster_link_bps, "shadow": ctx.cluster_link_bps,
             "echo": ctx.domain_link_bps}
    outcome: dict[str, Callable[[Tensor], StepOutcome]] = {
        "none": lambda c: none_step(c, ctx), "shadow": lambda c: shadow_step(c, ctx),
        "echo": lambda c: echo_step(c, ctx)}
    if "static" in names:
        placement = static_placement(layer_counts[:warmup].double().mean(0).sum(0), ctx.ep, ctx.spares)
        if placement.dropped:
            notes.append(f"static: {placement.dropped} replica(s) of a layer found no eligible rank (dropped)")
        steps = layer_counts.shape[0]
        outcome["static"] = lambda c: static_step(c, placement, ctx, steps)

    def measure(name: str) -> StepFn:
        def fn(c: Tensor) -> dict[str, float]:
            out = outcome[name](c)
            assert int(out.slot_rows.sum()) == int(c.sum()), f"{name} lost rows"
            return step_metrics(out, ctx, links[name])
        return fn

    fns = {n: measure(n) for n in names if n != "optimum"}
    if "optimum" in names:
        masks = optimum_masks(ctx.ep, ctx.experts, ctx.spares)
        fns["optimum"] = lambda c: {"token_straggler": _ratio_of(optimum_max_rows(c, masks), c, ctx.ep)}
    return fns


def _ratio_of(max_rows: int, counts: Tensor, ep: int) -> float:
    total = int(counts.sum())
    return max_rows * ep / total if total else 1.0


def _choose_strategies(strategies, ctx: SimContext, notes: list[str]) -> list[str]:
    names = list(strategies or STRATEGIES)
    bad = [n for n in names if n not in STRATEGIES]
    if bad:
        raise TraceError(f"unknown strategy {', '.join(bad)}; choose from {', '.join(STRATEGIES)}")
    ep_max, e_max, s_max = OPTIMUM_LIMITS
    if "optimum" in names and not (ctx.ep <= ep_max and ctx.experts <= e_max and ctx.spares <= s_max):
        names.remove("optimum")
        notes.append(f"optimum skipped: it enumerates every placement, so only for ep <= {ep_max}, "
                     f"E <= {e_max}, S <= {s_max} (here ep {ctx.ep}, E {ctx.experts}, S {ctx.spares})")
    return names


def _trace(spec: Spec, trace, skew, drift, steps, layers, seed) -> tuple[Tensor, str]:
    """The counts [steps, layers, ep, E] to simulate and a description of where they came from."""
    ep, E = spec.parallel.ep, spec.model.moe.num_experts
    if sum(x is not None for x in (trace, skew, drift)) > 1:
        raise TraceError("give only one of a trace file, skew and drift")
    if trace is not None:
        counts = load_trace(trace)
        check_trace(counts, ep, E, str(trace))
        return counts[:steps] if steps else counts, str(trace)
    text = drift if drift is not None else (skew or DEFAULT_SKEW)
    s, rate = parse_synthetic(text, need_rate=drift is not None)
    copies = spec.budgets.tokens * spec.model.moe.top_k
    counts = synthetic_trace(ep, E, copies, steps or DEFAULT_STEPS, layers, s, rate, seed)
    return counts, f"{'drift' if drift is not None else 'skew'} {text}, seed {seed}"


def simulate(spec: Spec, trace: str | Path | None = None, skew: str | None = None, drift: str | None = None,
             steps: int | None = None, seed: int = 0, strategies: list[str] | None = None,
             layers: int = 1, static_warmup: int | None = None) -> SimResult:
    """Run every step × layer of a routing trace through each strategy; averaged metrics per strategy.

    trace: a file (see load_trace); else skew 'zipf:S' or drift 'zipf:S,rate:R' (default zipf:1.2)
    with `layers` layers and `steps` steps (default 20; with a file, its first `steps`).
    static_warmup: steps whose average load picks static's replicas (default: the first quarter).
    """
    ctx = context(spec)
    notes: list[str] = []
    names = _choose_strategies(strategies, ctx, notes)
    counts, source = _trace(spec, trace, skew, drift, steps, layers, seed)
    n_steps, n_layers = counts.shape[:2]
    warmup = static_warmup or max(1, n_steps // 4)
    per: dict[str, list[list[dict[str, float]]]] = {n: [[] for _ in range(n_steps)] for n in names}
    for layer in range(n_layers):
        fns = _layer_steppers(names, ctx, counts[:, layer], warmup, notes)
        for t in range(n_steps):
            for name, fn in fns.items():
                per[name][t].append(fn(counts[t, layer]))
    notes += _static_notes(names, ctx, warmup, n_steps) + _spec_notes(spec)
    series = {n: [sum(v["token_straggler"] for v in per[n][t]) / n_layers for t in range(n_steps)] for n in names}
    metrics = {n: summarise([v for step in per[n] for v in step]) for n in names}
    return SimResult(spec.model.name, source, n_steps, n_layers, ctx.ep, ctx.experts, ctx.spares,
                     metrics, series, notes)


def _static_notes(names: list[str], ctx: SimContext, warmup: int, steps: int) -> list[str]:
    if "static" not in names:
        return []
    return [f"static: replicas chosen from the average load of the first {warmup} of {steps} steps; "
            f"each replica moves 2 × expert_bytes every step (gradient to home, fresh weights back) "
            f"plus its one-time placement amortised over the steps"]


def _spec_notes(spec: Spec) -> list[str]:
    d = cost_model.clone_decision(spec)
    notes = [f"echo: clone domain {d.domain_ranks} ranks over {d.link_gbps:g} GB/s, "
             f"min_clone_rows {d.min_clone_rows}; GEMM cost per slot {GEMM_FIXED_S * 1e6:g} µs + "
             f"{GEMM_TILE_ROWS}-row tiles × {d.row_compute_us:.3f} µs/row"]
    if not spec.echo.enabled:
        notes.append("echo.enabled is false in the spec; simulated with its spare_slots_per_rank anyway")
    return notes


# Output ----------------------------------------------------------------------------------------

def _fmt(s: Optional[Stat], scale: float = 1.0, digits: int = 3) -> str:
    if s is None:
        return "-"
    return f"{s.mean * scale:.{digits}f} ({s.max * scale:.{digits}f})"


def print_table(result: SimResult, console) -> None:
    """One rich table: a row per strategy, mean (max) of each metric."""
    from rich.table import Table
    r = result
    table = Table(title=f"{r.spec_name}: ep {r.ep}, {r.experts} experts, {r.spares} spare slot(s)/rank, "
                        f"{r.steps} steps × {r.layers} layer(s), {r.source} — mean (max)")
    for col in ("strategy", "token straggler", "GEMM straggler", "overflow %", "tokens MiB",
                "weights MiB", "MoE ms"):
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for name, m in r.metrics.items():
        table.add_row(name, _fmt(m.token_straggler), _fmt(m.gemm_straggler), _fmt(m.overflow_rate, 100, 2),
                      _fmt(m.token_bytes, 2**-20, 1), _fmt(m.weight_bytes, 2**-20, 1), _fmt(m.moe_ms))
    console.print(table)
    for note in r.notes:
        console.print(f"  note: {note}")


def write_json(result: SimResult, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(asdict(result), indent=2) + "\n")


def plot(result: SimResult, path: str | Path) -> None:
    """Token straggler per step, one line per strategy, saved to `path` (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("--plot", "pip install 'echoc[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in result.series.items():
        ax.plot(range(len(ys)), ys, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("token straggler (max / mean rank rows)")
    ax.set_title(f"{result.spec_name}: ep {result.ep}, {result.source}")
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)
