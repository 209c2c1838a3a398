"""ECHO planner time per layer on one GPU, captured in a CUDA graph: the torch reference path
(old) against the fused Triton path (new), for plan, assign_slots, and both.

    python bench/planner_time.py [--out bench/results/planner_time.json] [--warps 4,8,16,32]

--warps: also time the fused plan kernel at each of these num_warps (outputs checked equal).

Counts [ep, 256] drawn from zipf(1.2) (4096 tokens × top-8 per rank), 2 spare slots per rank,
clone domain = the whole EP group; assign_slots for rank 0's 4096 × 8 copies. Each time is the
median over 50 replays of a graph that runs the step 10 times (one layer = one step).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
from pathlib import Path

import torch

from runtime import planner_triton
from runtime.planner import assign_slots, assign_slots_reference, plan, plan_reference, rank_rows

STEPS_PER_GRAPH = 10


def zipf_counts(ep, E, copies, skew, g, device):
    w = torch.arange(1, E + 1, dtype=torch.float64) ** -skew
    w = w[torch.randperm(E, generator=g)]
    idx = torch.multinomial(w.expand(ep, E), copies, replacement=True, generator=g)
    counts = torch.zeros(ep, E, dtype=torch.int64).scatter_add_(1, idx, torch.ones_like(idx))
    return counts.to(device), idx[0].to(device)


def graph_ms(fn, iters=50):
    """Median ms of one fn() inside a CUDA graph that runs it STEPS_PER_GRAPH times."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(STEPS_PER_GRAPH):
            fn()
    graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(iters):
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end) / STEPS_PER_GRAPH)
    return statistics.median(out)


def measure(ep, g):
    """One row of the table: old and new ms for plan, assign_slots and both, plus the balance."""
    E, S, El = 256, 2, 256 // ep
    counts, idx = zipf_counts(ep, E, 4096 * 8, 1.2, g, "cuda")
    idx = idx.view(4096, 8)
    quota = plan_reference(counts, El, S, ep).quota
    paths = {"old": (plan_reference, assign_slots_reference), "new": (plan, assign_slots)}
    row = {"ep": ep, "experts": E, "spares": S}
    for name, (p_fn, a_fn) in paths.items():
        row[f"{name}_plan_ms"] = graph_ms(lambda: p_fn(counts, El, S, ep, S, 1))
        row[f"{name}_assign_ms"] = graph_ms(lambda: a_fn(idx, counts, quota, 0, El, S))
        row[f"{name}_both_ms"] = graph_ms(lambda: a_fn(idx, counts, p_fn(counts, El, S, ep, S, 1).quota, 0, El, S))
    new, old = plan(counts, El, S, ep), plan_reference(counts, El, S, ep)
    row["identical"] = bool(torch.equal(new.quota, old.quota) and torch.equal(new.spare_expert, old.spare_expert)
                            and torch.equal(assign_slots(idx, counts, new.quota, 0, El, S),
                                            assign_slots_reference(idx, counts, old.quota, 0, El, S)))
    rr, base = rank_rows(counts, new, El, S).double(), counts.sum(0).view(ep, El).sum(1).double()
    row["straggler_none"], row["straggler_echo"] = float(base.max() / base.mean()), float(rr.max() / rr.mean())
    return row


def warps_sweep(ep, warps, g):
    """ms of the fused plan at each num_warps (the planner's own choice is the default row)."""
    E, S, El = 256, 2, 256 // ep
    counts, _ = zipf_counts(ep, E, 4096 * 8, 1.2, g, "cuda")
    want = plan_reference(counts, El, S, ep)
    meta, out = planner_triton.plan_meta, {}
    try:
        for w in warps:
            planner_triton.plan_meta = lambda *a, w=w: dataclasses.replace(meta(*a), num_warps=w)
            got = plan(counts, El, S, ep)
            same = torch.equal(got.quota, want.quota) and torch.equal(got.spare_expert, want.spare_expert)
            out[w] = (graph_ms(lambda: plan(counts, El, S, ep, S, 1)), same)
    finally:
        planner_triton.plan_meta = meta
    return out


def assign_sweep(ep, g, blks=(256, 512, 1024), warps=(4, 8, 16)):
    """ms of assign_slots alone and of plan + assign_slots at each (copies per program, num_warps)
    of the assign kernels (outputs checked equal to the reference)."""
    E, S, El = 256, 2, 256 // ep
    counts, idx = zipf_counts(ep, E, 4096 * 8, 1.2, g, "cuda")
    idx = idx.view(4096, 8)
    quota = plan_reference(counts, El, S, ep).quota
    want = assign_slots_reference(idx, counts, quota, 0, El, S)
    meta, out = planner_triton.assign_meta, {}
    try:
        for blk in blks:
            for w in warps:
                planner_triton.assign_meta = lambda n, E, qc, blk=blk, w=w: dataclasses.replace(
                    meta(n, E, qc, blk), num_warps=w)
                same = torch.equal(assign_slots(idx, counts, quota, 0, El, S), want)
                out[f"blk={blk},warps={w}"] = (
                    graph_ms(lambda: assign_slots(idx, counts, quota, 0, El, S)),
                    graph_ms(lambda: assign_slots(idx, counts, plan(counts, El, S, ep, S, 1).quota, 0, El, S)), same)
    finally:
        planner_triton.assign_meta = meta
    return out


def kernel_breakdown(ep, g):
    """GPU time of each kernel of one plan + assign_slots (profiler, eager, median of 20)."""
    E, S, El = 256, 2, 256 // ep
    counts, idx = zipf_counts(ep, E, 4096 * 8, 1.2, g, "cuda")
    idx = idx.view(4096, 8)
    for _ in range(3):
        assign_slots(idx, counts, plan(counts, El, S, ep, S, 1).quota, 0, El, S)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(20):
            assign_slots(idx, counts, plan(counts, El, S, ep, S, 1).quota, 0, El, S)
        torch.cuda.synchronize()
    times = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            times.setdefault(ev.name[:60], []).append(ev.time_range.elapsed_us() / 1000)
    return {k: statistics.median(v) for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "planner_time.json"))
    ap.add_argument("--warps", default="", help="comma-separated num_warps to time the plan kernel at")
    ap.add_argument("--variants", action="store_true",
                    help="also time assign_slots' block and warp sizes, and each kernel (profiler)")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    rows = [measure(ep, g) for ep in (8, 16, 64)]
    sweep = {}
    if args.warps:
        warps = [int(w) for w in args.warps.split(",")]
        for ep in (8, 16, 64):
            sweep[ep] = warps_sweep(ep, warps, g)
            print(f"plan kernel at ep {ep}: " + ", ".join(f"{w} warps {ms:.3f} ms{'' if ok else ' DIFFERENT'}"
                                                         for w, (ms, ok) in sweep[ep].items()))
    variants, breakdown = {}, {}
    if args.variants:
        for ep in (8, 16, 64):
            variants[ep] = assign_sweep(ep, g)
            for name, (a_ms, b_ms, same) in variants[ep].items():
                print(f"ep {ep:>3} {name:<18} assign {a_ms:.4f} ms  plan+assign {b_ms:.4f} ms{'' if same else ' DIFFERENT'}")
            breakdown[ep] = kernel_breakdown(ep, g)
            print(f"ep {ep:>3} kernels (ms): " + ", ".join(f"{k} {v:.4f}" for k, v in breakdown[ep].items()))
    print(f"{'ep':>4}{'old plan':>10}{'new plan':>10}{'old assign':>12}{'new assign':>12}"
          f"{'old both':>10}{'new both':>10}{'ratio':>8}{'same':>6}{'strag none':>12}{'echo':>7}   (ms per layer, graph)")
    for r in rows:
        print(f"{r['ep']:>4}{r['old_plan_ms']:>10.3f}{r['new_plan_ms']:>10.3f}{r['old_assign_ms']:>12.3f}"
              f"{r['new_assign_ms']:>12.3f}{r['old_both_ms']:>10.3f}{r['new_both_ms']:>10.3f}"
              f"{r['old_both_ms'] / r['new_both_ms']:>8.1f}{str(r['identical']):>6}"
              f"{r['straggler_none']:>12.3f}{r['straggler_echo']:>7.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
            "date": datetime.date.today().isoformat(), "steps_per_graph": STEPS_PER_GRAPH}
    with open(args.out, "w") as f:
        json.dump({**meta, "rows": rows, "warps_sweep": {str(k): {str(w): v for w, v in d.items()}
                                                            for k, d in sweep.items()},
                   "variants": {str(k): v for k, v in variants.items()},
                   "kernel_ms": {str(k): v for k, v in breakdown.items()}}, f, indent=2)


if __name__ == "__main__":
    main()
