"""What the layer benches share (bench/moe_layer.py, bench/profile_layer.py): the shape options,
the one-layer model built and compiled like the runtime does, inputs, forward+backward helpers,
CUDA-graph capture, timing, the GEMM floor and the reference check."""
from __future__ import annotations
import statistics
import time
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from echoc.compile import MoELeafTracer
from echoc.spec_io import spec_from_dict
from passes import echo_clone, sync_free_dispatch
from runtime import comm, p2p
from runtime.model import MoE
from runtime.parallel import shard_experts

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def add_shape_args(ap) -> None:
    """The layer's shape: 4096 tokens, H 2048, 64 experts, top-8, F 1024, capacity 1.5 by default."""
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--ffn", type=int, default=1024)
    ap.add_argument("--capacity", type=float, default=1.5)


class OneLayer(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.mlp = MoE(cfg)

    def forward(self, x):
        return self.mlp(x)


def layer_spec(args, backend: str, world: int, echo: bool = False, device: str = "cuda",
               overlap: bool = True, exchange: str = "auto", wgrad: bool | None = None) -> dict:
    """`overlap`: the shared expert on a second stream; `wgrad` (default: as `overlap`): the expert
    weight gradients on a second stream in backward. Both off: the layer on one stream."""
    return {
        "model": {"name": "moe-layer", "vocab_size": 1024, "hidden_size": args.hidden, "num_layers": 1,
                  "first_dense_layers": 0, "dense_intermediate_size": 4 * args.hidden, "dtype": "bfloat16",
                  "attention": {"kind": "gqa", "num_heads": 8, "num_kv_heads": 8, "head_dim": 64},
                  "moe": {"num_experts": args.experts, "top_k": args.top_k,
                          "expert_intermediate_size": args.ffn, "shared_experts": 1,
                          "router": {"score_fn": "sigmoid", "routed_scaling_factor": 2.5}}},
        "cluster": {"device": device, "nodes": 1, "gpus_per_node": world},
        "parallel": {"ep": world, "dp": 1},
        "budgets": {"seq_len": args.tokens, "micro_batch": 1, "received_token_capacity": args.capacity,
                    "row_alignment": 16},
        "echo": {"enabled": echo, "spare_slots_per_rank": 2 if echo else 0, "clone_domain": "node"},
        "backends": {"dispatch": backend, "shared_expert_overlap": overlap, "exchange": exchange,
                     "wgrad_overlap": overlap if wgrad is None else wgrad,
                     "cuda_graph": "full_iteration" if backend == "torch" and device == "cuda" else "none"},
    }


def build(args, backend, device, seed=0, echo=False, overlap=True, exchange="auto", wgrad=None):
    """The one-layer graph module under `backend`; sets this process's exchange to the spec's
    (runtime/p2p.py), which the module's eager calls read: run a module before building another."""
    spec = spec_from_dict(layer_spec(args, backend, dist.get_world_size(), echo, device.type, overlap, exchange,
                                        wgrad))
    p2p.setup(spec.token_exchange)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: seconds less per build at GLM-5 widths
        ref = OneLayer(spec.model).to(dtype=torch.bfloat16)
        if echo:  # make the experts of EP rank 0 hot, so the planner has something to balance
            with torch.no_grad():
                ref.mlp.router.expert_bias[: spec.experts_per_rank // 4] += 0.05
        model = OneLayer(spec.model).to(dtype=torch.bfloat16)
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


def module_fwd_bwd(module, x, gy):
    """A plain module's forward + backward (the peer): output and input gradient."""
    for p in module.parameters():
        p.grad = None
    x = x.detach().requires_grad_(True)
    y = module(x)
    y.backward(gy)
    return y.detach(), x.grad


def rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def echoc_layer(gm):
    """The compiled layer as `x → (y, stats)` for Captured."""
    return lambda x: gm(x)[:2]


def plain_layer(module):
    return lambda x: (module(x), None)


class Captured:
    """Forward + backward of a layer captured as one CUDA graph, over static buffers.
    `layer(x) → (y, stats)`; `model` owns the parameters whose gradients are kept."""

    def __init__(self, layer, model, x, gy):
        self.layer, self.model = layer, model
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
            self.y, self.stats = layer(self.x)
            self.y.backward(self.gy)
        self.grads = {n: p.grad for n, p in model.named_parameters()}

    def _step(self):
        y, _ = self.layer(self.x)
        y.backward(self.gy)

    def replay(self, x, gy):
        self.x.data.copy_(x)
        self.gy.copy_(gy)
        self.graph.replay()
        return self.y, self.x.grad, self.grads, self.stats


def capture(fn):
    """fn() captured in a CUDA graph after three warm-up runs on a side stream."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph


class GemmFloor:
    """The layer's GEMMs alone, forward + dgrad + wgrad, on the real rows only.

    Routed: the six grouped_mm calls of echoc's expert FFN (runtime/grouped_gemm.py) over
    rows_per_expert [L] real rows: h13 = rows·W13, y = act·W2; grad_act = dy·W2ᵀ, dW2 = actᵀ·dy;
    dx = grad_h13·W13ᵀ, dW13 = rowsᵀ·grad_h13. Shared: the same six products as dense mm on
    `tokens` rows. No SwiGLU, no routing, no data movement: what no layer can beat.
    """

    def __init__(self, rows_per_expert, H, F, tokens, device, dtype=torch.bfloat16):
        self.offs = rows_per_expert.cumsum(0).to(torch.int32)
        R, L = int(rows_per_expert.sum()), rows_per_expert.shape[0]
        g = torch.Generator(device=device).manual_seed(0)

        def rnd(*shape, std=1.0):  # the layer's statistics: unit activations, weights at init std
            return torch.randn(*shape, device=device, dtype=dtype, generator=g) * std

        self.rows, self.act, self.dy, self.gh13 = rnd(R, H), rnd(R, F), rnd(R, H), rnd(R, 2 * F)
        self.w13, self.w2 = rnd(L, H, 2 * F, std=0.02), rnd(L, F, H, std=0.02)
        self.xs, self.acts, self.dys, self.ghs = rnd(tokens, H), rnd(tokens, F), rnd(tokens, H), rnd(tokens, 2 * F)
        self.ws13, self.ws2 = rnd(H, 2 * F, std=0.02), rnd(F, H, std=0.02)
        self.rows_total = R + tokens

    def tensors(self):
        return [self.rows, self.act, self.dy, self.gh13, self.w13, self.w2,
                self.xs, self.acts, self.dys, self.ghs, self.ws13, self.ws2]

    def routed(self):
        o = self.offs
        _grouped_mm(self.rows, self.w13, offs=o)
        _grouped_mm(self.act, self.w2, offs=o)
        _grouped_mm(self.dy, self.w2.transpose(-2, -1), offs=o)
        _grouped_mm(self.act.transpose(-2, -1), self.dy, offs=o)
        _grouped_mm(self.gh13, self.w13.transpose(-2, -1), offs=o)
        _grouped_mm(self.rows.transpose(-2, -1), self.gh13, offs=o)

    def shared(self):
        self.xs @ self.ws13, self.acts @ self.ws2
        self.dys @ self.ws2.t(), self.ghs @ self.ws13.t()
        self.acts.t() @ self.dys, self.xs.t() @ self.ghs

    def both(self):
        self.routed()
        self.shared()


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ms(fn, iters, device=torch.device("cuda")):
    times = []
    cuda = device.type == "cuda"
    if cuda:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    for _ in range(iters):
        dist.barrier()
        if cuda:
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
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


def model_flops(rows: int, hidden: int, ffn: int) -> float:
    """Routed + shared expert GEMM FLOPs of forward + backward: 3 · 2 · rows · (H·2F + F·H)."""
    return 3 * 2 * rows * (hidden * 2 * ffn + ffn * hidden)
