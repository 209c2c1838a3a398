"""The wgrad fork in the compiled graph and in the memory plan (passes/sync_free_dispatch.py,
buffer_lifetimes.py): each MoE layer gets one fork whose token reaches its expert FFN, and what
the deferred weight gradients read stays live to the fork's backward; elsewhere (the flag off,
the loop FFN, ZeRO 3, ECHO) the graph and plan are as before."""
from __future__ import annotations

import pytest

from passes import buffer_plan as bp
from passes.buffer_lifetimes import LAST_SUB
from runtime import contracts, streams
from runtime.contracts import EXPERT_FFN, EXPERT_FFN_RECOMPUTE_CLONE
from test_buffer_plan import compiled, small

CUDA = {"cluster.device": "cuda", "model.dtype": "bfloat16"}


def _plan(make_spec, **over):
    spec = make_spec(small("bfloat16", echo=False) | CUDA | over)
    gm = compiled(spec)
    return gm, bp.run(gm, spec).info


def _forks(gm):
    return [n for n in gm.graph.nodes if n.target is streams.wgrad_fork]


def test_each_layer_forks_once_and_its_ffn_reads_the_token(make_spec):
    gm, _ = _plan(make_spec)
    ffns = [n for n in gm.graph.nodes if contracts.of(n.target) is EXPERT_FFN]
    assert len(ffns) == 2 and len(_forks(gm)) == 2
    for ffn in ffns:
        token = EXPERT_FFN.arg(ffn, "wgrad")
        fork = token.args[0]
        assert fork.target is streams.wgrad_fork and fork.args[1] == EXPERT_FFN.arg(ffn, "buf")
        assert fork.meta["moe_layer"] == ffn.meta["moe_layer"]


@pytest.mark.parametrize("over", [{"backends.wgrad_overlap": False}, {"backends.grouped_gemm": "loop"},
                                  {"echo.enabled": True, "echo.spare_slots_per_rank": 1},
                                  {"parallel.zero": 3, "parallel.dp": 2, "cluster.gpus_per_node": 4}])
def test_no_fork_where_the_weight_gradients_stay_on_the_main_stream(make_spec, over):
    gm, _ = _plan(make_spec, **over)
    assert not _forks(gm)
    assert all(EXPERT_FFN.arg(n, "wgrad") is None for n in gm.graph.nodes if contracts.of(n.target) is EXPERT_FFN)


def test_recompute_clone_dispatch_keeps_them_inline(make_spec):
    spec = make_spec(small("bfloat16", recompute=True) | CUDA)
    gm = compiled(spec)
    assert not _forks(gm) and any(contracts.of(n.target) is EXPERT_FFN_RECOMPUTE_CLONE for n in gm.graph.nodes)


def _backward_end(gm, node) -> int:
    """The last sub-step of `node`'s backward on the plan's timeline (the mirror of the forward)."""
    nodes = list(gm.graph.nodes)
    return 4 * (2 * len(nodes) - 1 - nodes.index(node)) + LAST_SUB


@pytest.mark.parametrize("exchange, rows", [("p2p", "rows"), ("nccl", "dispatch")])
def test_what_the_weight_gradients_read_lives_to_the_forks_backward(make_spec, exchange, rows):
    for over, deferred in (({}, True), ({"backends.wgrad_overlap": False}, False)):
        gm, plan = _plan(make_spec, **over, **{"backends.exchange": exchange})
        b = {b.name: b for b in plan.buffers}
        for layer in (1, 2):
            p = f"layers_{layer}_mlp_"
            ffn = next(n for n in gm.graph.nodes if n.name == p + "expert_ffn")
            end = _backward_end(gm, ffn)
            if deferred:
                end = _backward_end(gm, EXPERT_FFN.arg(ffn, "wgrad").args[0])
                assert end > _backward_end(gm, ffn) + 4 * 5      # past the dispatch's and the router's backward
            for name in ("expert_ffn.act", "expert_ffn.bwd.grad_h13", rows, "expert_ffn.grad"):
                assert b[p + name].last == end, (over, name)
            assert b[p + "offs"].last >= end                      # a routing decision: at least that long
            assert b[p + "expert_ffn.h13"].last == _backward_end(gm, ffn)   # the dx path alone reads it
