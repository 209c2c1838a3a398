"""The whole training iteration on GPUs: captured as one CUDA graph vs eager vs the `sync`
baseline (and with ECHO cloning), same model, same seed, same data, in one run.

    torchrun --nproc-per-node 2 bench/iteration.py [--steps 20] [--out iteration.json]

Each variant trains `steps` steps from the same initial weights on the same batches.
Checks: the graph variant's loss curve matches the eager one (bf16, relative
difference < 1e-2 at every step); ms per iteration is the median of the CUDA-event
times of the steps after warm-up (graph: replays only). `*_allocator` variants keep the
MoE buffers in PyTorch's caching allocator instead of the planned arena
(backends.buffers); peak GiB is each variant's own peak allocated memory (measured from
what was allocated before its Trainer was built; with backends.exchange 'p2p' plus its symmetric
receive pool, which the caching allocator does not count), arena GiB the planned arena in it.
`graph_nccl` is `graph` with backends.exchange 'nccl' (the padded all_to_all; `graph` picks 'p2p'
on one node). Prints one table (rank 0) and writes JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import traceback

import torch
import torch.distributed as dist

from echoc.spec_io import spec_from_dict
from runtime import p2p
from runtime.cuda_graph import StepRunner
from runtime.data import TokenSource, local_rows
from echoc.compile import compile_build
from runtime.trainer import Trainer, init_distributed

from real_rows import skip_reason


def spec_dict(args, world, dispatch="torch", graph=True, echo=False, recompute=False, buffers=None,
              exchange="auto", wgrad=True) -> dict:
    return {
        "model": {"name": "glm5-mini-2gpu", "vocab_size": 32000, "hidden_size": args.hidden,
                  "num_layers": args.layers, "first_dense_layers": 1, "dense_intermediate_size": 4 * args.hidden,
                  "dtype": "bfloat16",
                  "attention": {"kind": "mla", "num_heads": 16, "q_lora_rank": 768, "kv_lora_rank": 256,
                                "qk_nope_head_dim": 64, "qk_rope_head_dim": 32, "v_head_dim": 64},
                  "moe": {"num_experts": args.experts, "top_k": 8, "expert_intermediate_size": args.ffn,
                          "shared_experts": 1,
                          "router": {"score_fn": "sigmoid", "routed_scaling_factor": 2.5,
                                     "bias_update_rate": 1e-3}}},
        "cluster": {"device": "cuda", "nodes": 1, "gpus_per_node": world},
        "parallel": {"ep": world, "dp": 1},
        "budgets": {"seq_len": args.seq_len, "micro_batch": 1, "received_token_capacity": args.capacity,
                    "row_alignment": 16},
        "echo": {"enabled": echo, "spare_slots_per_rank": 2 if echo else 0,
                 "recompute_clone_dispatch": recompute, "clone_domain": "node"},
        "backends": {"dispatch": dispatch, "cuda_graph": "full_iteration" if graph else "none", "exchange": exchange,
                     "wgrad_overlap": wgrad,
                     "buffers": buffers or ("arena" if dispatch == "torch" else "allocator")},
        "train": {"steps": args.steps, "seed": 0, "optimizer": {"lr": args.lr}},
    }


VARIANTS = {
    "graph": dict(dispatch="torch", graph=True),
    "graph_inline_wgrad": dict(dispatch="torch", graph=True, wgrad=False),   # expert wgrad on the main stream
    "graph_nccl": dict(dispatch="torch", graph=True, exchange="nccl"),   # padded all_to_all (EP ≥ 2: else = graph)
    "graph_allocator": dict(dispatch="torch", graph=True, buffers="allocator"),  # no planned arena
    "eager": dict(dispatch="torch", graph=False),
    "eager_allocator": dict(dispatch="torch", graph=False, buffers="allocator"),
    "eager_again": dict(dispatch="torch", graph=False),  # run-to-run spread of eager itself
    "sync": dict(dispatch="sync", graph=False),
    "echo_graph": dict(dispatch="torch", graph=True, echo=True),
    "echo_recompute_graph": dict(dispatch="torch", graph=True, echo=True, recompute=True),
    "echo_recompute_graph_allocator": dict(dispatch="torch", graph=True, echo=True, recompute=True,
                                           buffers="allocator"),
    "symm_mem_graph": dict(dispatch="symm_mem", graph=True),      # real rows only (skip below 2 GPUs)
    "deepep_graph": dict(dispatch="deepep", graph=True),
}


def run_variant(args, name, device):
    """Train `steps` steps; memory is this variant's own: peak allocated minus what was allocated
    before its Trainer existed (earlier variants' leftovers do not count)."""
    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    spec = spec_from_dict(spec_dict(args, dist.get_world_size(), **VARIANTS[name]))
    trainer = Trainer(compile_build(spec).program, device)
    arena_gib = trainer.arena.layout.nbytes / 2**30 if trainer.arena is not None else 0.0
    runner = StepRunner(trainer, graph=spec.backends.cuda_graph == "full_iteration")
    source = (TokenSource("text", spec.model.vocab_size, spec.budgets.seq_len, 0, args.text) if args.text
              else TokenSource("synthetic", spec.model.vocab_size, spec.budgets.seq_len, 0))
    rank, world = dist.get_rank(), dist.get_world_size()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    mb = spec.budgets.micro_batch
    losses, times, straggler, overflow, clones = [], [], [], 0, 0
    for step in range(args.steps):
        tokens, labels = (x.to(device) for x in local_rows(source.global_batch(step, world * mb), rank, mb))
        trainer.set_lr(step)
        start.record()
        m = runner.run(tokens, labels)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
        losses.append(float(m.loss_sum[0]) / world)
        rec = m.stats[:, :, 1].double()
        straggler.append(float((rec.max(0).values / rec.mean(0)).max()))
        overflow += int(m.stats[:, :, 0].sum())
        clones += int(m.stats[0, :, 3].sum())
    steady = times[4:]
    peak = (torch.cuda.max_memory_allocated() - base) / 2**30
    if spec.token_exchange == "p2p":     # its receive pool, where the caching allocator does not count it
        peak += p2p.pool_bytes(outside_allocator=True) / 2**30
    del runner, trainer, m
    return {"losses": losses, "ms_median": statistics.median(steady), "ms_all": times,
            "token_straggler_mean": statistics.mean(straggler), "overflow": overflow, "clones": clones,
            "peak_mem_gib": peak, "arena_gib": arena_gib, "buffers": spec.backends.buffers}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--capacity", type=float, default=1.5)
    ap.add_argument("--variants", default=",".join(v for v in VARIANTS if v != "eager_again"))
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--text", default="specs/data/tiny.txt", help="Bytes of this file are the tokens ('' = synthetic).")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "iteration.json"))
    args = ap.parse_args()
    base = spec_from_dict(spec_dict(args, int(os.environ["WORLD_SIZE"])))
    device = init_distributed(base)
    results = {}
    for name in args.variants.split(","):
        if why := skip_reason(VARIANTS[name]["dispatch"], dist.get_world_size()):
            results[name] = {"skipped": why}
            continue
        try:
            torch.cuda.reset_peak_memory_stats()
            results[name] = run_variant(args, name, device)
        except Exception as e:  # report and go on: one broken variant must not hide the others
            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
            if dist.get_rank() == 0:
                print(f"variant {name} failed:\n{results[name]['trace']}", flush=True)
    if dist.get_rank() == 0:
        ref = results.get("eager", {}).get("losses")
        print(f"\nfull iteration: {dist.get_world_size()} GPUs ({torch.cuda.get_device_name()}), "
              f"{vars(args)}")
        print(f"{'variant':<22}{'ms/iter':>9}{'vs sync':>9}{'max|Δloss|/loss vs eager':>26}"
              f"{'straggler':>10}{'overflow':>9}{'clones':>8}{'peak GiB':>9}{'arena GiB':>10}")
        sync_ms = results.get("sync", {}).get("ms_median")
        for name, r in results.items():
            if "error" in r or "skipped" in r:
                print(f"{name:<22} " + (r["skipped"] if "skipped" in r else f"FAILED: {r['error'][:150]}"))
                continue
            dl = max(abs(a - b) / abs(b) for a, b in zip(r["losses"], ref)) if ref else float("nan")
            r["max_rel_loss_diff_vs_eager"] = dl
            ratio = f"{sync_ms / r['ms_median']:.2f}x" if sync_ms else "-"
            print(f"{name:<22}{r['ms_median']:>9.2f}{ratio:>9}{dl:>26.2e}{r['token_straggler_mean']:>10.3f}"
                  f"{r['overflow']:>9}{r['clones']:>8}{r['peak_mem_gib']:>9.2f}{r['arena_gib']:>10.3f}")
        json.dump({"args": vars(args), "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "world": dist.get_world_size(), "results": results}, open(args.out, "w"), indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
