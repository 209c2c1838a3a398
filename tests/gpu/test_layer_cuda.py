"""The compiled MoE layer's fused kernels on a GPU (runtime/rows_triton.py, runtime/swiglu_triton.py):
the kernels against the torch path on random rows, and one compiled layer (EP 1, bf16) with the
kernels against the same layer on the torch path and against the dropless reference, eager and
replayed in a CUDA graph with new routing. Needs CUDA and the triton package."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from echoc.compile import MoELeafTracer
from echoc.spec_io import spec_from_dict
from passes import sync_free_dispatch
from runtime import comm, grouped_gemm, rows, streams
from runtime.model import MoE

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(rows._fused is None, reason="needs the triton package (pip install triton)")]

H, E, K, F, T = 256, 16, 4, 128, 1024
WORKER = Path(__file__).parents[1] / "runtime" / "kernels_worker.py"
ROOT = Path(__file__).resolve().parents[2]


def test_kernels_equal_the_torch_path_on_the_gpu():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT),
                                                                os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(WORKER), "--device", "cuda"], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["cases"] == 36 and res["failures"] == [], res["failures"]


class OneLayer(torch.nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.mlp = MoE(cfg)

    def forward(self, x):
        return self.mlp(x)


@pytest.fixture(scope="module")
def layer():
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29573")
        dist.init_process_group("gloo", rank=0, world_size=1)
    comm.init_groups(1, 1)
    spec = spec_from_dict({
        "model": {"name": "layer", "vocab_size": 64, "hidden_size": H, "num_layers": 1, "first_dense_layers": 0,
                  "dense_intermediate_size": 4 * H, "dtype": "bfloat16",
                  "attention": {"kind": "gqa", "num_heads": 2, "num_kv_heads": 2, "head_dim": 64},
                  "moe": {"num_experts": E, "top_k": K, "expert_intermediate_size": F, "shared_experts": 1}},
        "cluster": {"device": "cuda", "nodes": 1, "gpus_per_node": 1}, "parallel": {"ep": 1, "dp": 1},
        "budgets": {"seq_len": T, "micro_batch": 1, "received_token_capacity": 1.5, "row_alignment": 16}})
    torch.manual_seed(0)
    with torch.device("cuda"):
        ref = OneLayer(spec.model).to(torch.bfloat16)
        model = OneLayer(spec.model).to(torch.bfloat16)
    model.load_state_dict(ref.state_dict())
    gm = torch.fx.GraphModule(model, MoELeafTracer().trace(model))
    return ref, model, sync_free_dispatch.run(gm, spec).gm, spec


def _inputs(step):
    g = torch.Generator(device="cuda").manual_seed(step)
    return (torch.randn(1, T, H, device="cuda", generator=g, dtype=torch.bfloat16),
            torch.randn(1, T, H, device="cuda", generator=g, dtype=torch.bfloat16))


def _step(fn, params, x, gy):
    for p in params:
        p.grad = None
    x = x.detach().requires_grad_(True)
    y = fn(x)
    y.backward(gy)
    return [y.detach(), x.grad] + [p.grad.clone() for p in params]


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-30))


def test_layer_with_kernels_equals_torch_path_and_reference(layer, monkeypatch):
    ref, model, gm, _ = layer
    params = list(model.parameters())
    x, gy = _inputs(0)
    fused = _step(lambda v: gm(v)[0], params, x, gy)
    with monkeypatch.context() as m:
        m.setattr(rows, "_fused", None)
        m.setattr(grouped_gemm, "swiglu_triton", None)
        plain = _step(lambda v: gm(v)[0], params, x, gy)
    want = _step(ref, list(ref.parameters()), x, gy)
    assert max(_rel(a, b) for a, b in zip(fused, plain)) < 1e-2
    assert max(_rel(a, b) for a, b in zip(fused[:2], want[:2])) < 1e-2


class _Captured:
    """gm's forward + backward captured in one CUDA graph (after `warmup` eager steps on a side
    stream); replay(x, gy) → [y, x.grad, *param grads] of that replay, cloned."""

    def __init__(self, gm, params, warmup: int):
        x0, g0 = _inputs(0)
        self.sx, self.sg = x0.clone().requires_grad_(True), g0.clone()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(warmup):
                gm(self.sx)[0].backward(self.sg)
        torch.cuda.current_stream().wait_stream(s)
        for p in params + [self.sx]:
            p.grad = None
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.y = gm(self.sx)[0]
            self.y.backward(self.sg)
        self.grads = [p.grad for p in params]   # the graph's own buffers (eager steps replace p.grad)

    def replay(self, x, gy):
        self.sx.data.copy_(x)
        self.sg.copy_(gy)
        self.graph.replay()
        return [self.y.clone(), self.sx.grad.clone()] + [g.clone() for g in self.grads]


def test_captured_layer_replays_new_routing_like_eager(layer):
    _, model, gm, _ = layer
    params = list(model.parameters())
    cap = _Captured(gm, params, warmup=2)
    for step in (1, 2, 3):
        x, gy = _inputs(step)
        got = cap.replay(x, gy)
        eager = _step(lambda v: gm(v)[0], params, x, gy)
        assert max(_rel(a, b) for a, b in zip(got, eager)) < 1e-2


@pytest.mark.parametrize("flag, marker", [("shared_expert_overlap", streams.side_begin),
                                          ("wgrad_overlap", streams.wgrad_fork)])
def test_work_on_a_second_stream_changes_no_number(layer, flag, marker):
    """backends.shared_expert_overlap and wgrad_overlap (runtime/streams.py) move kernels to a
    second stream (the shared expert; the expert weight gradients); the same kernels run on the
    same data, so outputs and every gradient are bitwise equal, eager and replayed in a CUDA
    graph, and no stashed tensor outlives backward."""
    _, model, gm, spec = layer
    assert any(n.target is marker for n in gm.graph.nodes), f"the layer has no {marker.__name__}"
    off_spec = spec.model_copy(update={"backends": spec.backends.model_copy(update={flag: False})})
    off = sync_free_dispatch.run(torch.fx.GraphModule(model, MoELeafTracer().trace(model)), off_spec).gm
    assert not any(n.target is marker for n in off.graph.nodes)
    params = list(model.parameters())
    for step in (0, 1):
        x, gy = _inputs(step)
        on, plain = _step(lambda v: gm(v)[0], params, x, gy), _step(lambda v: off(v)[0], params, x, gy)
        assert all(torch.equal(a, b) for a, b in zip(on, plain)), step
        assert streams.live_stashes() == []
    x, gy = _inputs(5)
    got = _Captured(gm, params, warmup=1).replay(x, gy)
    want = _step(lambda v: off(v)[0], params, x, gy)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
