"""ECHO planner time per layer on one GPU: eager and captured in a CUDA graph.

    python bench/planner_time.py [--out planner_time.json]

Counts [ep, 256] drawn from zipf(1.2) (4096 tokens × top-8 per rank), 2 spare slots per
rank, clone domain = the whole EP group. Also times assign_slots for one rank's copies.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch

from runtime.planner import assign_slots, plan, rank_rows


def zipf_counts(ep, E, copies, skew, g, device):
    w = torch.arange(1, E + 1, dtype=torch.float64) ** -skew
    w = w[torch.randperm(E, generator=g)]
    idx = torch.multinomial(w.expand(ep, E), copies, replacement=True, generator=g)
    counts = torch.zeros(ep, E, dtype=torch.int64).scatter_add_(1, idx, torch.ones_like(idx))
    return counts.to(device), idx[0].to(device)


def time_ms(fn, iters=50):
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    out = []
    for _ in range(iters):
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        out.append(s.elapsed_time(e))
    return statistics.median(out)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "planner_time.json"))
    args = ap.parse_args()
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    rows = []
    for ep in (8, 16, 64):
        E, S, El = 256, 2, 256 // ep
        counts, idx = zipf_counts(ep, E, 4096 * 8, 1.2, g, dev)
        idx = idx.view(4096, 8)
        fn = lambda: plan(counts, El, S, ep, S, 1)
        fn()
        eager = time_ms(fn)
        static = counts.clone()
        graph = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(graph):
            p = plan(static, El, S, ep, S, 1)
            slots = assign_slots(idx, static, p.quota, 0, El, S)
        captured = time_ms(graph.replay)
        rr = rank_rows(counts, p, El, S).double()
        base = counts.sum(0).view(ep, El).sum(1).double()
        rows.append({"ep": ep, "experts": E, "spares": S, "plan_eager_ms": eager,
                     "plan_plus_assign_graph_ms": captured,
                     "straggler_none": float(base.max() / base.mean()),
                     "straggler_echo": float(rr.max() / rr.mean())})
    print(f"{'ep':>4}{'plan eager ms':>15}{'plan+assign graph ms':>22}{'straggler none':>16}{'echo':>8}")
    for r in rows:
        print(f"{r['ep']:>4}{r['plan_eager_ms']:>15.3f}{r['plan_plus_assign_graph_ms']:>22.3f}"
              f"{r['straggler_none']:>16.3f}{r['straggler_echo']:>8.3f}")
    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
              open(args.out, "w"), indent=2)


if __name__ == "__main__":
    main()
