"""The memory model against the GPU: predicted peak per rank vs torch.cuda.max_memory_allocated.

    python bench/memory.py [--steps 6] [--out bench/results/memory.json] [--cap 1.02 | --cap needs]
                           [--shape glm5-mini | gqa-wide] [--world EP,DP] [--variants none:arena:3,...]

One GPU, a glm5-mini-shaped model (MLA, hidden 2048, 4 layers of which 1 dense, 32 experts
top-8, expert FFN 1024, one shared expert, vocab 32 000, 4096 tokens, bf16, capacity 1.25; or
--shape gqa-wide, unlike it wherever the memory model has a term: see _gqa_wide),
for every train.recompute setting, with and without the arena (backends.buffers). Each variant
runs in its own process (a captured graph's memory pool would otherwise stay allocated): the
compile's prediction (summary.json's `memory`), then `steps` iterations through
runtime.cuda_graph.StepRunner (3 eager warm-up steps, one capture, replays), and the peak
allocated bytes from process start. --world EP,DP runs each variant on ep × dp GPUs (torchrun),
every rank measured against its own prediction; the table shows the rank furthest above it.
At world 1 ZeRO 1 and 2 hold the same bytes as 0 (a shard of one rank is the whole tensor); ZeRO 3 adds the gathered layers and runs its collectives (on
NCCL, inside the graph): a variant `RECOMPUTE:BUFFERS:ZERO` picks a level (default 0).
ms per iteration: the median replay. --cap R: the caching allocator may hold at most R × the
predicted peak (torch.cuda.set_per_process_memory_fraction), so a variant that runs proves the
prediction is enough memory for the run, fragmentation included; one that needs more fails with
an out-of-memory error row. --cap needs: at most what the plan says it needs (summary.json's
`needs_bytes`, the peak and the allocator's headroom): every variant must run.
Prints one table and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from runtime.launch import worker_env_defaults

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
VARIANTS = [(r, b, "0") for b in ("arena", "allocator") for r in ("none", "moe", "full")]
FWD_BWD_PHASES = ("loss", "output head forward", "output head backward")   # and every "backward layer i"


def spec_dict(recompute: str, buffers: str, zero: str = "0", shape: str = "glm5-mini", world=(1, 1)) -> dict:
    """The bench's spec; world = (ep, dp): ep × dp GPUs of one node."""
    d = _glm5_mini(recompute, buffers, zero)
    if shape == "gqa-wide":
        _gqa_wide(d)
    ep, dp = world
    d["model"]["name"] = d["model"]["name"].replace("-1gpu", f"-{ep * dp}gpu")
    d["parallel"].update({"ep": ep, "dp": dp})
    d["cluster"]["gpus_per_node"] = ep * dp
    return d


def _gqa_wide(d: dict) -> None:
    """A second shape, unlike glm5-mini wherever the memory model has a term: GQA attention,
    a 128k vocabulary, no shared expert, softmax top-4 of 64, two sequences of 2048, capacity
    1.5, bf16 gradient reduction."""
    d["model"].update({"name": "gqa-wide-1gpu", "vocab_size": 128000, "hidden_size": 1536, "num_layers": 6,
                       "first_dense_layers": 2, "dense_intermediate_size": 4096,
                       "attention": {"kind": "gqa", "num_heads": 12, "num_kv_heads": 4, "head_dim": 128}})
    d["model"]["moe"] = {"num_experts": 64, "top_k": 4, "expert_intermediate_size": 768, "shared_experts": 0,
                         "router": {"score_fn": "softmax"}}
    d["budgets"].update({"seq_len": 2048, "micro_batch": 2, "received_token_capacity": 1.5})
    d["train"]["grad_reduce_dtype"] = "bfloat16"


def _glm5_mini(recompute: str, buffers: str, zero: str) -> dict:
    return {
        "model": {"name": "glm5-mini-1gpu", "vocab_size": 32000, "hidden_size": 2048, "num_layers": 4,
                  "first_dense_layers": 1, "dense_intermediate_size": 8192, "dtype": "bfloat16",
                  "attention": {"kind": "mla", "num_heads": 16, "q_lora_rank": 768, "kv_lora_rank": 256,
                                "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64},
                  "moe": {"num_experts": 32, "top_k": 8, "expert_intermediate_size": 1024, "shared_experts": 1,
                          "router": {"score_fn": "sigmoid", "routed_scaling_factor": 2.5}}},
        "cluster": {"device": "cuda", "nodes": 1, "gpus_per_node": 1},
        "parallel": {"ep": 1, "dp": 1, "zero": int(zero)},
        "budgets": {"seq_len": 4096, "micro_batch": 1, "received_token_capacity": 1.25},
        "backends": {"dispatch": "torch", "grouped_gemm": "torch", "cuda_graph": "full_iteration",
                     "buffers": buffers},
        "train": {"steps": 100, "seed": 0, "recompute": recompute, "optimizer": {"lr": 3e-4}},
    }


def run_one(recompute: str, buffers: str, zero: str, steps: int, cap: str = "0", shape: str = "glm5-mini",
            world=(1, 1)) -> dict:
    """In this process (one rank of ep × dp under torchrun): compile, predict, run `steps`
    captured iterations, measure this rank's peak."""
    from echoc.compile import compile_build
    from echoc.spec_io import spec_from_dict
    from runtime import p2p
    from runtime.cuda_graph import StepRunner
    from runtime.data import TokenSource, local_rows
    from runtime.trainer import Trainer, init_distributed

    spec = spec_from_dict(spec_dict(recompute, buffers, zero, shape, world))
    device = init_distributed(spec)
    rank, ranks = torch.distributed.get_rank(), spec.cluster.world_size
    build = compile_build(spec)
    mem = build.summary["memory"]
    limit = mem["needs_bytes"] if cap == "needs" else float(cap) * mem["peak_bytes"]
    if limit:
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, limit / torch.cuda.get_device_properties(device).total_memory), device)
    trainer = Trainer(build.program, device)
    source = TokenSource("synthetic", spec.model.vocab_size, spec.budgets.seq_len, 0)
    mb = spec.budgets.micro_batch
    fwd_bwd = _forward_backward_peak(trainer, source, device, mb, rank, ranks) + p2p.pool_bytes(outside_allocator=True)
    torch.cuda.reset_peak_memory_stats()
    runner = StepRunner(trainer, graph=True)
    times, reserved_by_step = [], []
    for step in range(steps):
        tokens, labels = (x.to(device) for x in local_rows(source.global_batch(step, ranks * mb), rank, mb))
        trainer.set_lr(step)
        t0 = time.perf_counter()
        runner.run(tokens, labels)
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
        reserved_by_step.append([torch.cuda.max_memory_reserved(), torch.cuda.memory_reserved(),
                                 torch.cuda.memory_allocated()])
    # backends.exchange 'p2p': the symmetric receive pool, where the caching allocator does not count it
    symmetric = p2p.pool_bytes(outside_allocator=True)
    measured = torch.cuda.max_memory_allocated() + symmetric
    reserved = torch.cuda.max_memory_reserved() + symmetric
    predicted_fb = max(v for k, v in mem["phases"].items() if k in FWD_BWD_PHASES or k.startswith("backward"))
    return {"recompute": recompute, "buffers": buffers, "zero": int(zero), "world": list(world), "rank": rank,
            "predicted_bytes": mem["peak_bytes"],
            "needs_bytes": mem["needs_bytes"],
            "predicted_fwd_bwd_bytes": predicted_fb, "measured_fwd_bwd_bytes": fwd_bwd,
            "fwd_bwd_ratio": fwd_bwd / predicted_fb,
            "predicted_phase": mem["peak_phase"], "predicted_by_category": mem["by_category"],
            "predicted_phases": mem["phases"], "measured_bytes": measured, "reserved_bytes": reserved,
            "symmetric_outside_allocator_bytes": symmetric, "exchange": spec.token_exchange,
            "ratio": measured / mem["peak_bytes"], "ms_per_iteration": statistics.median(times[4:] or times),
            "reserved_by_step": reserved_by_step,
            "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""), "cap": cap, "shape": shape,
            "device": torch.cuda.get_device_name(), "torch": torch.__version__}


def _forward_backward_peak(trainer, source, device, mb: int, rank: int = 0, ranks: int = 1) -> int:
    """Peak allocated bytes of one eager forward + loss + backward, before the gradient
    reduction (the phases where activations and recompute matter), from the trained state."""
    from runtime import arena, zero_ops
    from runtime.data import local_rows
    from runtime.loss import chunked_cross_entropy

    tokens, labels = (x.to(device) for x in local_rows(source.global_batch(0, ranks * mb), rank, mb))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    if trainer.arena is not None:
        trainer.arena.allocate()
    with arena.active(trainer.arena), zero_ops.regather_in_backward():          # as the Trainer
        out = trainer.gm(tokens)
        if trainer.arena is not None:
            trainer.arena.end_forward(trainer.recomputing)
        loss = chunked_cross_entropy(out[0] if isinstance(out, tuple) else out, labels)
        del out                      # as the Trainer
        loss.backward()
    if trainer.arena is not None:
        trainer.arena.release()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    trainer.zero_grad()
    return peak


def run_all(steps: int, variants=VARIANTS, cap: str = "0", shape: str = "glm5-mini", world=(1, 1)) -> list[dict]:
    """Each variant in its own process (ep × dp of them under torchrun); a row per variant: the
    rank with the highest measured / predicted, and every rank's figures under "ranks"; or the
    first failing rank's error (each rank writes its own traceback)."""
    rows, n = [], world[0] * world[1]
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n)]
                                 if n > 1 else [])
    for recompute, buffers, zero in variants:
        out = Path(f"/tmp/echoc_memory_{recompute}_{buffers}_{zero}_{world[0]}x{world[1]}.json")
        for r in range(n):
            rank_out(out, r, n).unlink(missing_ok=True)         # nothing left from an earlier run
        env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        worker_env_defaults(env, n)            # as `echoc run`: expandable segments unless set
        rc, stderr = _run_group(launch + [__file__, "--one", recompute, buffers, zero, "--steps", str(steps),
                                          "--cap", str(cap), "--shape", shape, "--world", f"{world[0]},{world[1]}",
                                          "--out", str(out)], env)
        ranks = [json.loads(f.read_text()) for f in (rank_out(out, r, n) for r in range(n)) if f.exists()]
        failed = [r for r in ranks if "error" in r]
        if rc != 0 or failed or len(ranks) < n:
            rows.append({"recompute": recompute, "buffers": buffers, "zero": int(zero), "cap": cap,
                         "world": list(world), "error": failed[0]["error"] if failed else stderr[-1500:]})
            continue
        row = max(ranks, key=lambda r: r["ratio"])
        row["ranks"] = [{k: r[k] for k in ("rank", "predicted_bytes", "measured_bytes", "ratio")} for r in ranks]
        rows.append(row)
    return rows


def _run_group(cmd: list[str], env: dict, timeout: int = 300) -> tuple[int, str]:
    """Run cmd in its own process group; past `timeout` kill the whole group (torchrun's workers
    too, so no GPU memory stays held for the next variant). (returncode, stderr)."""
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        _, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        stderr += f"\ntimed out after {timeout} s"
    return proc.returncode, stderr


def rank_out(out: Path, rank: int, ranks: int) -> Path:
    return out if ranks == 1 else out.with_suffix(f".rank{rank}.json")


def print_table(rows: list[dict]) -> None:
    base = {r["buffers"]: r.get("ms_per_iteration") for r in rows if r["recompute"] == "none" and not r["zero"]}
    print(f"{'recompute':<10} {'buffers':<10} {'zero':>4} {'predicted GiB':>14} {'measured GiB':>13} {'measured/pred':>14} "
          f"{'reserved':>9} {'ms/iter':>8} {'vs none':>8} {'fwd+bwd pred':>13} {'fwd+bwd meas':>13} {'ratio':>6}  peak phase")
    for r in rows:
        if "error" in r:
            print(f"{r['recompute']:<10} {r['buffers']:<10} {r['zero']:>4} error: {r['error'].splitlines()[-1:]}")
            continue
        ref = base.get(r["buffers"])
        print(f"{r['recompute']:<10} {r['buffers']:<10} {r['zero']:>4} {r['predicted_bytes'] / GIB:>14.2f} "
              f"{r['measured_bytes'] / GIB:>13.2f} {r['ratio']:>14.3f} {r.get('reserved_bytes', 0) / GIB:>9.2f} "
              f"{r['ms_per_iteration']:>8.2f} "
              f"{r['ms_per_iteration'] / ref if ref else float('nan'):>8.3f} "
              f"{r['predicted_fwd_bwd_bytes'] / GIB:>13.2f} {r['measured_fwd_bwd_bytes'] / GIB:>13.2f} "
              f"{r['fwd_bwd_ratio']:>6.3f}  {r['predicted_phase']}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--cap", default="0", help="allocator limit: a multiple of the predicted peak, or 'needs' "
                                                "(the plan's needs_bytes)")
    ap.add_argument("--shape", default="glm5-mini", choices=("glm5-mini", "gqa-wide"))
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "memory.json"))
    ap.add_argument("--one", nargs=3, metavar=("RECOMPUTE", "BUFFERS", "ZERO"))
    ap.add_argument("--world", default="1,1", help="EP,DP: ep × dp GPUs of this node (torchrun), e.g. 2,1 or 1,2")
    ap.add_argument("--variants", default="", help="e.g. none:arena,none:allocator,none:arena:3 (default: the six "
                                                    "recompute × buffers at zero 0)")
    args = ap.parse_args()
    if args.cap != "needs":
        try:
            float(args.cap)
        except ValueError:
            ap.error(f"--cap must be a number or 'needs', not {args.cap!r}")
    try:
        world = tuple(int(x) for x in args.world.split(","))
        assert len(world) == 2 and min(world) >= 1
    except (ValueError, AssertionError):
        ap.error(f"--world must be EP,DP (two positive integers), not {args.world!r}")
    if args.one:
        rank = int(os.environ.get("RANK", 0))
        try:
            row = run_one(*args.one, args.steps, args.cap, args.shape, world)
        except BaseException:          # this rank's own traceback, for the table (torchrun's hides it)
            rank_out(Path(args.out), rank, world[0] * world[1]).write_text(
                json.dumps({"rank": rank, "error": traceback.format_exc()[-3000:]}))
            raise
        rank_out(Path(args.out), rank, world[0] * world[1]).write_text(json.dumps(row))
        return
    rows = run_all(args.steps, [tuple((v + ":0").split(":")[:3]) for v in args.variants.split(",")] if args.variants
                   else VARIANTS, args.cap, args.shape, world)
    print_table(rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "shape": args.shape, "world": world,
                                          "variants": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
