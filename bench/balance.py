"""Load-balancing strategies on skewed routing traces, through `echoc simulate` (no GPU).

    python bench/balance.py [--out bench/results/balance.json] [--steps 32]

Traces: zipf 1.0, 1.2, 1.5 and drifting hot experts (zipf 1.2, 10 % of the popularity order
re-shuffled each step), at EP 8, 16 and 64; 256 experts, top-8, 4096 tokens per rank, 2 spare
slots per rank, clone domain 'cluster' (plus one 'node' row for contrast); GLM-5 expert sizes
(hidden 6144, expert FFN 2048, bf16) on 8-GPU H200 nodes (450 GB/s NVLink, 50 GB/s per GPU
between nodes). Prints one table, writes JSON, then says whether the goal — token straggler
≤ 1.05 at EP 8 with 2 spare slots per rank on zipf 1.2 — is met.
"""
from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console
from rich.table import Table

from echoc.simulate import simulate
from echoc.spec_io import spec_from_dict

TRACES = [("zipf 1.0", {"skew": "zipf:1.0"}), ("zipf 1.2", {"skew": "zipf:1.2"}),
          ("zipf 1.5", {"skew": "zipf:1.5"}), ("drift 1.2/0.1", {"drift": "zipf:1.2,rate:0.1"})]
EPS = (8, 16, 64)
EXTRA = [("zipf 1.2", {"skew": "zipf:1.2"}, 64, "node")]
STRATEGIES = ["none", "static", "shadow", "echo"]
GOAL = ("zipf 1.2", 8, "cluster", 1.05)


def spec_dict(ep: int, domain: str = "cluster", spares: int = 2, experts: int = 256, top_k: int = 8,
              tokens: int = 4096) -> dict:
    """A one-MoE-layer spec with GLM-5's expert sizes on ep GPUs of 8-GPU nodes."""
    gpn = min(8, ep)
    return {
        "model": {"name": f"balance-ep{ep}", "vocab_size": 1024, "hidden_size": 6144, "num_layers": 1,
                  "dense_intermediate_size": 12288, "dtype": "bfloat16",
                  "attention": {"kind": "gqa", "num_heads": 48, "num_kv_heads": 8, "head_dim": 128},
                  "moe": {"num_experts": experts, "top_k": top_k, "expert_intermediate_size": 2048}},
        "cluster": {"device": "cuda", "nodes": ep // gpn, "gpus_per_node": gpn,
                    "intra_node_gbps": 450, "inter_node_gbps": 50},
        "parallel": {"ep": ep, "dp": 1},
        "budgets": {"seq_len": tokens, "received_token_capacity": 1.25},
        "echo": {"enabled": True, "spare_slots_per_rank": spares, "clone_domain": domain},
    }


def run(steps: int) -> list[dict]:
    """One row per (trace, ep, domain, strategy)."""
    configs = [(name, kw, ep, "cluster") for name, kw in TRACES for ep in EPS] + EXTRA
    rows = []
    for name, kw, ep, domain in configs:
        res = simulate(spec_from_dict(spec_dict(ep, domain)), steps=steps, seed=0, strategies=STRATEGIES, **kw)
        for strat, m in res.metrics.items():
            rows.append({"trace": name, "ep": ep, "domain": domain, "strategy": strat, **asdict(m)})
    return rows


def _cell(stat: dict | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if stat is None else f"{stat['mean'] * scale:.{digits}f} ({stat['max'] * scale:.{digits}f})"


def table_rows(rows: list[dict]) -> list[list[str]]:
    return [[r["trace"], str(r["ep"]), r["domain"], r["strategy"], _cell(r["token_straggler"]),
             _cell(r["gemm_straggler"]), _cell(r["token_bytes"], 2**-30, 2), _cell(r["weight_bytes"], 2**-30, 2),
             _cell(r["moe_ms"], 1.0, 2)] for r in rows]


HEADER = ["trace", "EP", "domain", "strategy", "token straggler", "GEMM straggler", "tokens GiB",
          "weights GiB", "MoE ms"]


def print_table(rows: list[dict], title: str) -> None:
    table = Table(title=title)
    for h in HEADER:
        table.add_column(h, justify="left" if h in ("trace", "domain", "strategy") else "right")
    for r in table_rows(rows):
        table.add_row(*r)
    Console(width=160).print(table)


def goal(rows: list[dict]) -> tuple[bool, float, float]:
    trace, ep, domain, limit = GOAL
    r = next(r for r in rows if (r["trace"], r["ep"], r["domain"], r["strategy"]) == (trace, ep, domain, "echo"))
    s = r["token_straggler"]
    return s["max"] <= limit, s["mean"], s["max"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench/results/balance.json")
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = run(args.steps)
    seconds = time.perf_counter() - t0
    print_table(rows, f"load balance, {args.steps} steps per trace, mean (max) per layer-step; "
                      f"256 experts, top-8, 4096 tokens/rank, 2 spare slots/rank")
    met, mean, worst = goal(rows)
    trace, ep, domain, limit = GOAL
    print(f"goal: echo token straggler <= {limit} at EP {ep} ({domain} domain), 2 spare slots/rank, {trace}: "
          f"{'MET' if met else 'NOT MET'} (mean {mean:.3f}, max {worst:.3f} over {args.steps} steps)")
    print(f"simulated in {seconds:.1f} s")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"steps": args.steps, "seconds": seconds, "goal_met": met,
                               "goal": {"trace": trace, "ep": ep, "domain": domain, "max_token_straggler": limit,
                                        "echo_mean": mean, "echo_max": worst},
                               "rows": rows}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
