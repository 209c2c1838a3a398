"""One MoE layer, forward + backward, on GPUs: sync-free `torch` backend in a CUDA graph vs eager
vs the host-synced `sync` baseline, in one run.

    torchrun --nproc-per-node 2 bench/moe_layer.py [--tokens 4096] [--out results.json]

Checks first, then times:
  * the captured graph is replayed with NEW routing each replay (fresh inputs copied into
    the static buffers); its output and gradients match an eager run of the same inputs
    (bf16, relative error < 1e-2);
  * eager `torch` backend matches the single-process reference MoE (dropless) when no
    row overflows.
Prints one table (rank 0) and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
import torch.distributed as dist
from torch import nn

from echoc.compile import MoELeafTracer
from echoc.spec_io import spec_from_dict
from passes import echo_clone, sync_free_dispatch
from runtime import comm
from runtime.model import MoE
from runtime.parallel import shard_experts


class OneLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.mlp = MoE(cfg)

    def forward(self, x):
        return self.mlp(x)


def layer_spec(args, backend: str, world: int, echo: bool = False) -> dict:
    return {
        "model": {"name": "moe-layer", "vocab_size": 1024, "hidden_size": args.hidden, "num_layers": 1,
                  "first_dense_layers": 0, "dense_intermediate_size": 4 * args.hidden, "dtype": "bfloat16",
                  "attention": {"kind": "gqa", "num_heads": 8, "num_kv_heads": 8, "head_dim": 64},
                  "moe": {"num_experts": args.experts, "top_k": args.top_k,
                          "expert_intermediate_size": args.ffn, "shared_experts": 1,
                          "router": {"score_fn": "sigmoid", "routed_scaling_factor": 2.5}}},
        "cluster": {"device": "cuda", "nodes": 1, "gpus_per_node": world},
        "parallel": {"ep": world, "dp": 1},
        "budgets": {"seq_len": args.tokens, "micro_batch": 1, "received_token_capacity": args.capacity,
                    "row_alignment": 16},
        "echo": {"enabled": echo, "spare_slots_per_rank": 2 if echo else 0, "clone_domain": "node"},
        "backends": {"dispatch": backend, "cuda_graph": "full_iteration" if backend == "torch" else "none"},
    }


def build(args, backend, device, seed=0, echo=False):
    spec = spec_from_dict(layer_spec(args, backend, dist.get_world_size(), echo))
    torch.manual_seed(seed)
    ref = OneLayer(spec.model).to(device=device, dtype=torch.bfloat16)
    if echo:  # make the experts of EP rank 0 hot, so the planner has something to balance
        with torch.no_grad():
            ref.mlp.router.expert_bias[: spec.experts_per_rank // 4] += 0.05
    model = OneLayer(spec.model).to(device=device, dtype=torch.bfloat16)
    model.load_state_dict(ref.state_dict())
    shard_experts(model, comm.group_rank("ep"), spec.parallel.ep)
    gm = torch.fx.GraphModule(model, MoELeafTracer().trace(model))
    gm = sync_free_dispatch.run(gm, spec).gm
    if echo:
        gm = echo_clone.run(gm, spec).gm
    return spec, ref, model, gm


def inputs(args, device, step):
    g = torch.Generator(device=device).manual_seed(1000 * dist.get_rank() + step)
    x = torch.randn(1, args.tokens, args.hidden, device=device, generator=g, dtype=torch.bfloat16)
    # skew routing a little, differently each step, so every replay routes differently
    return x, torch.randn(x.shape, device=device, generator=g, dtype=torch.bfloat16)


def fwd_bwd(gm, model, x, gy):
    for p in model.parameters():
        p.grad = None
    x = x.detach().requires_grad_(True)
    y, stats, _ = gm(x)
    y.backward(gy)
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}, stats


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


class Captured:
    """Forward + backward of the layer captured as one CUDA graph, over static buffers."""

    def __init__(self, gm, model, x, gy):
        self.gm, self.model = gm, model
        self.x = x.detach().clone().requires_grad_(True)
        self.gy = gy.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(3):
                self._step()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        for p in model.parameters():
            p.grad = None
        self.x.grad = None
        with torch.cuda.graph(self.graph):
            self.y, self.stats, _ = gm(self.x)
            self.y.backward(self.gy)
        self.grads = {n: p.grad for n, p in model.named_parameters()}

    def _step(self):
        y, _, _ = self.gm(self.x)
        y.backward(self.gy)

    def replay(self, x, gy):
        self.x.data.copy_(x)
        self.gy.copy_(gy)
        self.graph.replay()
        return self.y, self.x.grad, self.grads, self.stats


def time_ms(fn, iters):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(iters):
        dist.barrier()
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def reference_check(ref, x, gy, y, gx, checks, prefix):
    """Run the single-process reference on every rank's tokens; compare this rank's slice."""
    world, rank, T = dist.get_world_size(), dist.get_rank(), x.shape[1]
    xs = [torch.empty_like(x) for _ in range(world)]
    gs = [torch.empty_like(gy) for _ in range(world)]
    dist.all_gather(xs, x)
    dist.all_gather(gs, gy)
    xr = torch.cat(xs, 1).requires_grad_(True)
    yr = ref(xr)
    yr.backward(torch.cat(gs, 1))
    checks[f"{prefix}_vs_reference_y"] = rel(y, yr[:, rank * T:(rank + 1) * T])
    checks[f"{prefix}_vs_reference_dx"] = rel(gx, xr.grad[:, rank * T:(rank + 1) * T])


def echo_checks(args, device, checks, times):
    """The cloned layer: eager vs reference, captured graph replayed with new routing vs eager."""
    spec, ref, model, gm = build(args, "torch", device, echo=True)
    x0, g0 = inputs(args, device, 0)
    y, gx, _, stats = fwd_bwd(gm, model, x0, g0)
    checks["echo_clones"] = int(stats[:, 3].sum())
    checks["echo_dropped"] = int(stats[:, 0].sum())
    reference_check(ref, x0, g0, y, gx, checks, "echo_eager")
    rec = stats[:, 1].double().reshape(1)
    allrec = [torch.empty_like(rec) for _ in range(dist.get_world_size())]
    dist.all_gather(allrec, rec)
    allrec = torch.cat(allrec)
    checks["echo_token_straggler"] = float(allrec.max() / allrec.mean())
    cap = Captured(gm, model, x0, g0)
    worst = 0.0
    for step in range(1, 4):
        x, gy = inputs(args, device, 10 + step)
        y_c, gx_c, grads_c, _ = cap.replay(x, gy)
        y_c, gx_c = y_c.clone(), gx_c.clone()
        grads_c = {k: v.clone() for k, v in grads_c.items()}
        y_e, gx_e, grads_e, _ = fwd_bwd(gm, model, x, gy)
        errs = [rel(y_c, y_e), rel(gx_c, gx_e)] + [rel(grads_c[k], grads_e[k]) for k in grads_e]
        worst = max(worst, max(errs))
    checks["echo_graph_vs_eager_worst_rel_err"] = worst
    times["echo_graph"] = time_ms(cap.graph.replay, args.iters)
    _, _, model_s, gm_s = build(args, "sync", device, echo=False)
    with torch.no_grad():
        model_s.mlp.router.expert_bias.copy_(model.mlp.router.expert_bias)
    times["sync_eager_skewed"] = time_ms(lambda: fwd_bwd(gm_s, model_s, x0, g0), args.iters)
    _, _, model_t, gm_t = build(args, "torch", device, echo=False)
    with torch.no_grad():
        model_t.mlp.router.expert_bias.copy_(model.mlp.router.expert_bias)
    cap_t = Captured(gm_t, model_t, x0, g0)
    times["torch_graph_skewed"] = time_ms(cap_t.graph.replay, args.iters)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--capacity", type=float, default=1.5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "moe_layer.json"))
    args = ap.parse_args()
    local = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local)
    device = torch.device("cuda", local)
    dist.init_process_group("nccl", device_id=device)
    world = dist.get_world_size()
    comm.init_groups(world, 1)
    rank = dist.get_rank()
    checks, times = {}, {}

    spec, ref, model, gm = build(args, "torch", device)
    x0, g0 = inputs(args, device, 0)
    y_e, gx_e, grads_e, stats = fwd_bwd(gm, model, x0, g0)
    # the reference sees every rank's tokens (experts serve all ranks)
    reference_check(ref, x0, g0, y_e, gx_e, checks, "eager")
    checks["dropped_eager"] = int(stats[:, 0].sum())

    cap = Captured(gm, model, x0, g0)
    worst = 0.0
    for step in range(1, 4):
        x, gy = inputs(args, device, step)
        y_c, gx_c, grads_c, st_c = cap.replay(x, gy)
        y_c, gx_c = y_c.clone(), gx_c.clone()
        grads_c = {k: v.clone() for k, v in grads_c.items()}
        routed_rows = int(st_c[:, 1].sum())
        y_e, gx_e, grads_e, _ = fwd_bwd(gm, model, x, gy)
        errs = [rel(y_c, y_e), rel(gx_c, gx_e)] + [rel(grads_c[k], grads_e[k]) for k in grads_e]
        worst = max(worst, max(errs))
        checks[f"replay{step}_received_rows"] = routed_rows
    checks["graph_vs_eager_worst_rel_err"] = worst

    times["torch_graph"] = time_ms(cap.graph.replay, args.iters)
    times["torch_eager"] = time_ms(lambda: fwd_bwd(gm, model, x0, g0), args.iters)
    y_t, gx_t, _, _ = fwd_bwd(gm, model, x0, g0)
    del cap
    _, _, model_s, gm_s = build(args, "sync", device)
    y_s, gx_s, _, _ = fwd_bwd(gm_s, model_s, x0, g0)
    checks["sync_vs_torch_y"] = rel(y_s, y_t)
    checks["sync_vs_torch_dx"] = rel(gx_s, gx_t)
    times["sync_eager"] = time_ms(lambda: fwd_bwd(gm_s, model_s, x0, g0), args.iters)

    echo_checks(args, device, checks, times)

    if rank == 0:
        flops = 3 * 2 * 3 * args.tokens * args.top_k * args.hidden * args.ffn * world  # fwd+bwd, 3 GEMMs
        print(f"\nMoE layer fwd+bwd: {world} GPUs, {args.tokens} tokens/rank, H {args.hidden}, "
              f"{args.experts} experts top-{args.top_k}, F {args.ffn}, capacity {args.capacity}, bf16")
        print(f"{'variant':<20}{'ms/layer':>10}{'vs sync':>10}  (skewed variants vs sync_eager_skewed)")
        for k, v in times.items():
            base = times["sync_eager_skewed"] if k.endswith("skewed") or k == "echo_graph" else times["sync_eager"]
            print(f"{k:<20}{v:>10.3f}{base / v:>9.2f}x")
        print("checks:", json.dumps(checks))
        json.dump({"args": vars(args), "world": world, "device": torch.cuda.get_device_name(),
                   "torch": torch.__version__, "times_ms": times, "checks": checks,
                   "routed_expert_tflops_graph": flops / times["torch_graph"] / 1e9},
                  open(args.out, "w"), indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
