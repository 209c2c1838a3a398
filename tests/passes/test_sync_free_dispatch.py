"""The sync_free_dispatch and echo_clone passes on a tiny graph built here, and the
grouped-GEMM implementations against each other."""
import pytest
import torch
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from echoc.compile import MoELeafTracer
from echoc.shapes import _PlanShapes
from passes import echo_clone, sync_free_dispatch
from passes.layer_builder import MOE_BLOCK, MOE_LAYER
from runtime import contracts, grouped_gemm
from runtime.contracts import EXPERT_FFN, LAYER_STATS, LAYOUT
from runtime.model import MoE
from runtime.parallel import shard_experts

SMALL = {"model.vocab_size": 32, "model.hidden_size": 16, "model.num_layers": 1, "model.first_dense_layers": 0,
         "model.dense_intermediate_size": 32, "model.attention.num_heads": 2, "model.attention.num_kv_heads": 1,
         "model.attention.head_dim": 8, "model.moe.num_experts": 8, "model.moe.top_k": 2,
         "model.moe.expert_intermediate_size": 8, "model.moe.shared_experts": 1, "budgets.seq_len": 8,
         "budgets.micro_batch": 2, "budgets.received_token_capacity": 1.5, "budgets.row_alignment": 4}


@pytest.fixture
def spec(make_spec):
    """spec(**echo) → the small spec, ECHO off unless echo fields are given."""
    return lambda **echo: make_spec(SMALL | {"echo.enabled": False} | {f"echo.{k}": v for k, v in echo.items()})


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


def test_each_moe_node_becomes_the_explicit_pipeline(spec):
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


def test_every_inserted_node_carries_its_layer(spec):
    """Blocks outside a layer list (`a`, `b`) are numbered in order; echo_clone's nodes inherit."""
    s = spec(enabled=True, spare_slots_per_rank=1)
    gm = echo_clone.run(sync_free_dispatch.run(traced(s), s).gm, s).gm
    tagged = {}
    for n in gm.graph.nodes:
        if n.op in ("placeholder", "output") or n.name in ("moe_stats", "moe_counts"):
            assert MOE_LAYER not in n.meta, n.name
            continue
        tagged[n.name] = (n.meta[MOE_LAYER], n.meta[MOE_BLOCK])
    assert {v for k, v in tagged.items() if k.startswith("a_")} == {(0, "a")}
    assert {v for k, v in tagged.items() if k.startswith("b_")} == {(1, "b")}
    assert {"a_plan", "b_clone_w13", "b_slot_counts_all"} <= set(tagged)


def test_layer_index_is_the_layer_list_entry():
    assert sync_free_dispatch.layer_index("layers.7.mlp", 0) == 7
    assert sync_free_dispatch.layer_index("a", 3) == 3


def test_static_shapes_follow_the_budget(spec):
    s = spec()
    gm = sync_free_dispatch.run(traced(s), s).gm
    x = torch.zeros(2, 8, 16, device="meta")
    _PlanShapes(gm, fake_mode=FakeTensorMode(allow_non_fake_inputs=True, static_shapes=True)).propagate(x)
    rows = {n.name: tuple(n.meta["tensor_meta"].shape) for n in gm.graph.nodes
            if n.target is torch.ops.echo.dispatch.default}
    C = s.peer_chunk_rows  # ceil(1.5 * 16 * 2 / 2) = 24, aligned to 4
    assert C == 24 and set(rows.values()) == {(2 * C, 16)}


def test_echo_inserts_plan_and_clone_nodes(spec):
    s = spec(enabled=True, spare_slots_per_rank=1)
    gm = sync_free_dispatch.run(traced(s), s).gm
    res = echo_clone.run(gm, s)
    t = targets(res.gm)
    assert t.count(torch.ops.echo.plan.default) == 2
    assert t.count(torch.ops.echo.assign_slots.default) == 2
    assert t.count(torch.ops.echo.clone_weights.default) == 4  # w13 and w2, two layers
    layout = [n for n in res.gm.graph.nodes if n.target is torch.ops.echo.layout.default][0]
    assert LAYOUT.arg(layout, "slots_per_rank") == s.experts_per_rank + 1  # home + spare slots per rank
    assert LAYOUT.arg(layout, "dest_slot").name == "a_slots"
    ffn = next(n for n in res.gm.graph.nodes if contracts.of(n.target) is EXPERT_FFN)
    assert EXPERT_FFN.arg(ffn, "w13").target is torch.ops.echo.clone_weights.default
    stats = next(n for n in res.gm.graph.nodes if contracts.of(n.target) is LAYER_STATS)
    assert LAYER_STATS.arg(stats, "spare_expert").name == "a_spare_expert"


def test_echo_recompute_uses_the_checkpointed_ffn(spec):
    s = spec(enabled=True, spare_slots_per_rank=1, recompute_clone_dispatch=True)
    res = echo_clone.run(sync_free_dispatch.run(traced(s), s).gm, s)
    t = targets(res.gm)
    assert t.count(grouped_gemm.expert_ffn_recompute_clone) == 2
    assert torch.ops.echo.clone_weights.default not in t


@pytest.mark.skipif(grouped_gemm.resolved_impl("torch") != "torch",
                    reason="this torch has no grouped_mm: 'torch' falls back to the loop, nothing to compare")
def test_grouped_and_loop_ffn_agree():
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(20, 16, generator=g, requires_grad=True)
    w13 = torch.randn(3, 16, 8, generator=g, requires_grad=True)
    w2 = torch.randn(3, 4, 16, generator=g, requires_grad=True)
    offs = torch.tensor([5, 5, 17], dtype=torch.int32)
    gy = torch.randn(20, 16, generator=g)
    gy[17:] = 0  # padding rows carry no gradient (combine never reads them)
    outs = []
    for ffn in (grouped_gemm.ffn_grouped, grouped_gemm.ffn_loop):   # two implementations, called directly
        y = ffn(rows, w13, w2, offs)
        grads = torch.autograd.grad(y, (rows, w13, w2), gy)
        outs.append((y[:17].detach(), [gr.clone() for gr in grads], y.grad_fn.name()))
    (ya, ga, fa), (yb, gb, fb) = outs
    assert "GroupedSwiGLU" in fa and "GroupedSwiGLU" not in fb
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(ga[0][:17], gb[0][:17])
    torch.testing.assert_close(ga[1], gb[1])
    torch.testing.assert_close(ga[2], gb[2])
