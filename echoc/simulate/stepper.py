"""Runs every step × layer of a trace through each strategy and the cost model's metrics.

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
The `optimum` strategy reports the token straggler only.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from echoc.simulate.optimum import OPTIMUM_LIMITS, fits_optimum, optimum_masks, optimum_max_rows
from echoc.simulate.result import SimResult, Stat, StrategyMetrics
from echoc.simulate.strategies import (SimContext, StepOutcome, context, echo_step, none_step, shadow_step,
                                       static_placement, static_step)
from echoc.simulate.traces import trace_counts
from echoc.spec import Spec
from passes import cost_model
from runtime.routing_trace import TraceError

STRATEGIES = ("none", "static", "shadow", "echo", "optimum")
GEMM_TILE_ROWS = 128
GEMM_FIXED_S = 10e-6   # per non-empty expert slot, fwd + bwd: ~6 grouped-GEMM groups × ~1.5 µs setup/tail

StepFn = Callable[[Tensor], dict[str, float]]  # counts [ep, E] → one step's metrics


def gemm_cost_s(slot_rows: Tensor, row_s: float) -> Tensor:
    """Expert-GEMM seconds per rank [ep] for slot_rows [ep, slots] (see the module docstring)."""
    tiles = (slot_rows + GEMM_TILE_ROWS - 1) // GEMM_TILE_ROWS
    cost = GEMM_FIXED_S + tiles.double() * GEMM_TILE_ROWS * row_s
    return torch.where(slot_rows > 0, cost, 0.0).sum(1)


def _ratio(x: Tensor) -> float:
    mean = float(x.double().mean())
    return float(x.max()) / mean if mean > 0 else 1.0


def step_metrics(out: StepOutcome, ctx: SimContext, link_bps: float) -> dict[str, float]:
    """The metrics of one strategy's outcome for one step and layer (see the module docstring)."""
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
    """Mean and max of each metric over a list of per-step metrics."""
    stats = {k: Stat(sum(v[k] for v in values) / len(values), max(v[k] for v in values)) for k in values[0]}
    return StrategyMetrics(**stats)


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


def _choose_strategies(strategies: list[str] | None, ctx: SimContext, notes: list[str]) -> list[str]:
    names = list(strategies or STRATEGIES)
    bad = [n for n in names if n not in STRATEGIES]
    if bad:
        raise TraceError(f"unknown strategy {', '.join(bad)}; choose from {', '.join(STRATEGIES)}")
    if "optimum" in names and not fits_optimum(ctx.ep, ctx.experts, ctx.spares):
        ep_max, e_max, s_max = OPTIMUM_LIMITS
        names.remove("optimum")
        notes.append(f"optimum skipped: it enumerates every placement, so only for ep <= {ep_max}, "
                     f"E <= {e_max}, S <= {s_max} (here ep {ctx.ep}, E {ctx.experts}, S {ctx.spares})")
    return names


def simulate(spec: Spec, trace: str | Path | None = None, skew: str | None = None, drift: str | None = None,
             steps: int | None = None, seed: int = 0, strategies: list[str] | None = None,
             layers: int = 1, static_warmup: int | None = None) -> SimResult:
    """Run every step × layer of a routing trace through each strategy; averaged metrics per strategy.

    trace: a file (runtime.routing_trace); else skew 'zipf:S' or drift 'zipf:S,rate:R' (default
    zipf:1.2) with `layers` layers and `steps` steps (default 20; with a file, its first `steps`).
    static_warmup: steps whose average load picks static's replicas (default: the first quarter).
    """
    ctx = context(spec)
    notes: list[str] = []
    names = _choose_strategies(strategies, ctx, notes)
    tr = trace_counts(spec, trace, skew, drift, steps, layers, seed)
    counts = tr.counts
    n_steps, n_layers = counts.shape[:2]
    warmup = static_warmup or max(1, n_steps // 4)
    per: dict[str, list[list[dict[str, float]]]] = {n: [[] for _ in range(n_steps)] for n in names}
    for layer in range(n_layers):
        fns = _layer_steppers(names, ctx, counts[:, layer], warmup, notes)
        for t in range(n_steps):
            for name, fn in fns.items():
                per[name][t].append(fn(counts[t, layer]))
    notes += _static_notes(names, warmup, n_steps) + _spec_notes(spec)
    series = {n: [sum(v["token_straggler"] for v in per[n][t]) / n_layers for t in range(n_steps)] for n in names}
    metrics = {n: summarise([v for step in per[n] for v in step]) for n in names}
    return SimResult(spec.model.name, tr.source, n_steps, n_layers, ctx.ep, ctx.experts, ctx.spares,
                     metrics, series, notes)


def _static_notes(names: list[str], warmup: int, steps: int) -> list[str]:
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
