"""Run under torchrun (2+ GPUs, NCCL) by tests/gpu/test_backends_cuda.py and test_p2p_cuda.py: one MoE
layer (bf16) under the `torch` backend and under BACKEND ('symm_mem' or 'deepep', the real library
calls; or 'p2p': the `torch` backend with backends.exchange 'p2p', against 'nccl'), the same weights
on every rank. Rank 0 writes the relative errors as JSON to OUT.

argv: BACKEND OUT [HIDDEN]
  eager     output, input gradient and every parameter gradient: BACKEND vs torch
  graph     BACKEND's forward + backward captured once, replayed with new routing (other inputs):
            vs BACKEND eager and vs torch eager on the same inputs
"""
import faulthandler
import json
import os
import sys
import time

import torch
import torch.distributed as dist

from echoc.compile import MoELeafTracer
from echoc.spec_io import spec_from_dict
from passes import sync_free_dispatch
from runtime import comm, p2p
from runtime.model import MoE
from runtime.parallel import shard_experts

H, E, K, F, T = 256, 16, 4, 128, 1024


class OneLayer(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.mlp = MoE(cfg)

    def forward(self, x):
        return self.mlp(x)


EXCHANGE: dict[int, str] = {}      # id(graph module) → the exchange its eager calls need


def build(backend, world, state=None, exchange="nccl"):
    spec = spec_from_dict({
        "model": {"name": "layer", "vocab_size": 64, "hidden_size": H, "num_layers": 1, "first_dense_layers": 0,
                  "dense_intermediate_size": 4 * H, "dtype": "bfloat16",
                  "attention": {"kind": "gqa", "num_heads": 2, "num_kv_heads": 2, "head_dim": 64},
                  "moe": {"num_experts": E, "top_k": K, "expert_intermediate_size": F, "shared_experts": 1}},
        "cluster": {"device": "cuda", "nodes": 1, "gpus_per_node": world}, "parallel": {"ep": world, "dp": 1},
        "budgets": {"seq_len": T, "micro_batch": 1, "received_token_capacity": 2.0, "row_alignment": 16},
        "backends": {"dispatch": backend, "exchange": exchange if backend == "torch" else "auto"}})
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = OneLayer(spec.model).to(torch.bfloat16)
    if state is not None:
        model.load_state_dict(state)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    shard_experts(model, comm.group_rank("ep"), world)
    gm = torch.fx.GraphModule(model, MoELeafTracer().trace(model))
    gm = sync_free_dispatch.run(gm, spec).gm
    EXCHANGE[id(gm)] = spec.token_exchange
    return full, model, gm


def inputs(step):
    g = torch.Generator(device="cuda").manual_seed(100 * dist.get_rank() + step)
    return (torch.randn(1, T, H, device="cuda", generator=g, dtype=torch.bfloat16),
            torch.randn(1, T, H, device="cuda", generator=g, dtype=torch.bfloat16))


def step(gm, params, x, gy):
    p2p.setup(EXCHANGE[id(gm)])
    for p in params:
        p.grad = None
    x = x.detach().requires_grad_(True)
    y = gm(x)[0]
    y.backward(gy)
    return [y.detach().clone(), x.grad.clone()] + [p.grad.clone() for p in params]


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def worst(got, want):
    return max(rel(a, b) for a, b in zip(got, want))


def captured(gm, params, x0, g0):
    """(graph, static input, static output gradient, the graph's output and gradients)."""
    p2p.setup(EXCHANGE[id(gm)])
    sx, sg = x0.clone().requires_grad_(True), g0.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):          # eager warm-up: the libraries allocate and rendezvous here
        for _ in range(2):
            gm(sx)[0].backward(sg)
    torch.cuda.current_stream().wait_stream(s)
    for p in params + [sx]:
        p.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = gm(sx)[0]
        y.backward(sg)
    return graph, sx, sg, [y, sx.grad] + [p.grad for p in params]


def main():
    global H
    backend, out = sys.argv[1], sys.argv[2]
    H = int(sys.argv[3]) if len(sys.argv) > 3 else H
    local = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local))
    world = dist.get_world_size()
    comm.init_groups(world, 1)
    state, model_t, gm_t = build("torch", world)
    if backend == "p2p":
        _, model_b, gm_b = build("torch", world, state, exchange="p2p")
        assert EXCHANGE[id(gm_b)] == "p2p"
    else:
        _, model_b, gm_b = build(backend, world, state)
    p_t, p_b = list(model_t.parameters()), list(model_b.parameters())
    x0, g0 = inputs(0)
    got, want = step(gm_b, p_b, x0, g0), step(gm_t, p_t, x0, g0)
    res = {"eager_vs_torch": worst(got, want), "eager_equal": all(torch.equal(a, b) for a, b in zip(got, want))}
    graph, sx, sg, held = captured(gm_b, p_b, x0, g0)
    res["replays"] = []
    for k in range(1, 4):
        x, gy = inputs(k)
        sx.data.copy_(x)
        sg.copy_(gy)
        graph.replay()
        got = [t.clone() for t in held]
        eager, ref = step(gm_b, p_b, x, gy), step(gm_t, p_t, x, gy)
        res["replays"].append({"vs_eager": worst(got, eager), "vs_torch": worst(got, ref),
                               "equal_torch": all(torch.equal(a, b) for a, b in zip(got, ref))})
    res["p2p_pool_bytes"] = p2p.pool_bytes()        # > 0: the 'p2p' layer really pushed
    if dist.get_rank() == 0:
        json.dump(res, open(out, "w"))
    # the captured graph holds the communicators' kernels: free it before the groups go (NCCL's
    # destroy waited forever with it alive); a hang from here on prints where it is and fails the run
    del graph, held, sx, sg
    torch.cuda.synchronize()
    faulthandler.dump_traceback_later(60, exit=True)
    t0 = time.perf_counter()
    comm.shutdown()
    print(f"rank {dist.get_rank() if dist.is_initialized() else '-'}: shut down in {time.perf_counter() - t0:.1f} s",
          flush=True)


if __name__ == "__main__":
    main()
