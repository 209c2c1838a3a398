"""Compare the fused planner (runtime/planner_triton.py) with the torch reference on many count
matrices; print one JSON line {"cases": n, "mismatches": [...]} (a script, run in a subprocess).

    TRITON_INTERPRET=1 python tests/runtime/planner_fused_worker.py --device cpu --cases 16 --small
    python tests/runtime/planner_fused_worker.py --device cuda --cases 400

The interpreter must be chosen before triton is imported, hence a process of its own.
Cases: zipf counts of any skew, ties (uniform and tiny counts), all zeros, everything on one
expert, random counts unrelated to the routed copies, spare slots 0..4, node and cluster
clone domains, offer 1..El+1, min_clone_rows 1..5.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from runtime import planner_triton  # noqa: E402
from runtime.planner import assign_slots_reference, plan_reference  # noqa: E402

KINDS = ("zipf", "uniform", "tiny", "zeros", "one_expert", "random")


def routed(ep: int, E: int, tokens: int, kind: str, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """(copies [ep, tokens] experts of each rank's copies, counts [ep, E])."""
    if kind == "one_expert":
        idx = torch.full((ep, tokens), int(torch.randint(E, (1,), generator=g)), dtype=torch.int64)
    elif kind == "zeros":
        idx = torch.zeros(ep, 0, dtype=torch.int64)
    else:
        skew = {"zipf": 0.5 + 1.5 * float(torch.rand(1, generator=g)), "uniform": 0.0, "tiny": 0.0,
                "random": 1.0}[kind]
        w = (torch.arange(1, E + 1, dtype=torch.float64) ** -skew)[torch.randperm(E, generator=g)]
        idx = torch.multinomial(w.expand(ep, E), tokens, replacement=True, generator=g)
    counts = torch.zeros(ep, E, dtype=torch.int64).scatter_add_(1, idx, torch.ones_like(idx))
    if kind == "random":  # counts that do not describe the copies: the functions must still agree
        counts = torch.randint(0, 3 * tokens // E + 2, (ep, E), generator=g)
    return idx, counts


def case(i: int, rng: random.Random, small: bool) -> dict:
    """The i-th random case: shapes, planner arguments and the count kind (small: EP ≤ 8, few
    tokens, for the slow CPU interpreter)."""
    ep = rng.choice([1, 2, 4, 8] if small else [1, 2, 4, 8, 16, 64] if i % 5 else [8, 16, 64])
    el = rng.choice([1, 2, 3, 4, 5, 6, 32]) if ep <= 16 else rng.choice([1, 2, 4])
    domains = [d for d in (1, 2, 4, 8, ep) if ep % d == 0]
    kind = KINDS[i % len(KINDS)]
    tokens = {"tiny": rng.randint(1, 8)}.get(kind, rng.choice([1, 17, 300] if small else [1, 17, 300, 4096]))
    if i % 16 == 7:  # more copies than two assign_slots blocks (512 each): the cross-block prefix counts
        tokens = 1100
    return dict(ep=ep, el=el, s=rng.randint(0, 4), domain=rng.choice(domains),
                offer=rng.randint(1, el + 1), min_rows=rng.randint(1, 5), kind=kind, tokens=tokens)


def compare(c: dict, device: str, g: torch.Generator) -> list[str]:
    """What differs between the fused and reference planner on case c (empty = identical)."""
    idx, counts = routed(c["ep"], c["ep"] * c["el"], c["tokens"], c["kind"], g)
    ref = plan_reference(counts, c["el"], c["s"], c["domain"], c["offer"], c["min_rows"])
    spare, quota = planner_triton.plan_fused(counts.to(device), c["el"], c["s"], c["domain"], c["offer"],
                                             c["min_rows"])
    bad = [] if torch.equal(spare.cpu(), ref.spare_expert) else ["spare_expert"]
    bad += [] if torch.equal(quota.cpu(), ref.quota) else ["quota"]
    if c["s"] == 0 or idx.shape[1] == 0:
        return bad
    k = 2 if idx.shape[1] % 2 == 0 else 1
    for rank in sorted({0, c["ep"] - 1, c["ep"] // 2}):
        topk = idx[rank].view(-1, k)
        want = assign_slots_reference(topk, counts, ref.quota, rank, c["el"], c["s"])
        got = planner_triton.assign_slots_fused(topk.to(device), counts.to(device), ref.quota.to(device),
                                                rank, c["el"], c["s"])
        bad += [] if torch.equal(got.cpu(), want) else [f"assign_slots rank {rank}"]
    return bad


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true", help="EP ≤ 8 and ≤ 300 copies per rank")
    args = ap.parse_args()
    rng, g = random.Random(args.seed), torch.Generator().manual_seed(args.seed)
    mismatches = []
    for i in range(args.cases):
        c = case(i, rng, args.small)
        bad = compare(c, args.device, g)
        if bad:
            mismatches.append({**c, "differs": bad})
    print(json.dumps({"cases": args.cases, "mismatches": mismatches}))


if __name__ == "__main__":
    main()
