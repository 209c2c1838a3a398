"""The sync_free_dispatch and echo_clone passes on a tiny graph built here, and the
grouped-GEMM implementations against each other."""
import torch
from torch import nn

from echoc.compile import MoELeafTracer, propagate_shapes
from echoc.spec_io import spec_from_dict
from passes import echo_clone, sync_free_dispatch
from runtime import grouped_gemm
from runtime.model import MoE
from runtime.parallel import shard_experts


def spec(**echo):
    return spec_from_dict({
        "model": {"name": "t", "vocab_size": 32, "hidden_size": 16, "num_layers": 1, "dense_intermediate_size": 32,
                  "dtype": "float32", "attention": {"kind": "gqa", "num_heads": 2, "num_kv_heads": 1, "head_dim": 8},
                  "moe": {"num_experts": 8, "top_k": 2, "expert_intermediate_size": 8, "shared_experts": 1}},
        "cluster": {"nodes": 1, "gpus_per_node": 2}, "parallel": {"ep": 2},
        "budgets": {"seq_len": 8, "micro_batch": 2, "received_token_capacity": 1.5, "row_alignment": 4},
        "echo": echo or {"enabled": False},
    })


class Two(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.a, self.b = MoE(cfg), MoE(cfg)

    def forward(self, x):
        return self.b(self.a(x))


def traced(s):
    with torch.device("meta"):
        m = Two(s.model)
    shard_experts(m, 0, s.parallel.ep)
    return torch.fx.GraphModule(m, MoELeafTracer().trace(m))


def targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_each_moe_node_becomes_the_explicit_pipeline():
    s = spec()
    gm = traced(s)
    res = sync_free_dispatch.run(gm, s)
    t = targets(res.gm)
    for op in (torch.ops.echo.count.default, torch.ops.echo.all_gather_counts.default,
               torch.ops.echo.layout.default, torch.ops.echo.dispatch.default,
               torch.ops.echo.combine.default, grouped_gemm.expert_ffn):
        assert t.count(op) == 2, op
    assert not [n for n in res.gm.graph.nodes if n.op == "call_module" and isinstance(res.gm.get_submodule(n.target), MoE)]
    assert [layer.receive_rows for layer in res.info.layers] == [s.receive_rows] * 2


def test_static_shapes_follow_the_budget():
    s = spec()
    gm = sync_free_dispatch.run(traced(s), s).gm
    gm.graph.owning_module = gm
    from torch.fx.passes.shape_prop import ShapeProp
    from torch._subclasses.fake_tensor import FakeTensorMode
    x = torch.zeros(2, 8, 16, device="meta")
    from echoc.compile import _PlanShapes
    _PlanShapes(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True, static_shapes=True)).propagate(x)
    rows = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
            if n.target is torch.ops.echo.dispatch.default}
    C = s.peer_chunk_rows  # ceil(1.5 * 16 * 2 / 2) = 24, aligned to 4
    assert C == 24 and set(rows.values()) == {(2 * C, 16)}


def test_echo_inserts_plan_and_clone_nodes():
    s = spec(enabled=True, spare_slots_per_rank=1)
    gm = sync_free_dispatch.run(traced(s), s).gm
    res = echo_clone.run(gm, s)
    t = targets(res.gm)
    assert t.count(torch.ops.echo.plan.default) == 2
    assert t.count(torch.ops.echo.assign_slots.default) == 2
    assert t.count(torch.ops.echo.clone_weights.default) == 4  # w13 and w2, two layers
    layout = [n for n in res.gm.graph.nodes if n.target is torch.ops.echo.layout.default][0]
    assert layout.args[3] == s.experts_per_rank + 1  # home + spare slots per rank


def test_echo_recompute_uses_the_checkpointed_ffn():
    s = spec(enabled=True, spare_slots_per_rank=1, recompute_clone_dispatch=True)
    res = echo_clone.run(sync_free_dispatch.run(traced(s), s).gm, s)
    t = targets(res.gm)
    assert t.count(grouped_gemm.expert_ffn_recompute_clone) == 2
    assert torch.ops.echo.clone_weights.default not in t


def test_grouped_and_loop_ffn_agree():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(20, 16, generator=g, requires_grad=True)
    w13 = torch.randn(3, 16, 8, generator=g, requires_grad=True)
    w2 = torch.randn(3, 4, 16, generator=g, requires_grad=True)
    offs = torch.tensor([5, 5, 17], dtype=torch.int32)
    gy = torch.randn(20, 16, generator=g)
    gy[17:] = 0  # padding rows carry no gradient (combine never reads them)
    outs = []
    for impl in ("torch", "loop"):
        y = grouped_gemm.expert_ffn(rows, w13, w2, offs, impl)
        grads = torch.autograd.grad(y, (rows, w13, w2), gy)
        outs.append((y[:17].detach(), [gr.clone() for gr in grads]))
    (ya, ga), (yb, gb) = outs
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(ga[0][:17], gb[0][:17])
    torch.testing.assert_close(ga[1], gb[1])
    torch.testing.assert_close(ga[2], gb[2])
