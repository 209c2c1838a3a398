"""The compiled, distributed, sync-free step against the single-process reference (gloo, CPU).

Each case launches real torchrun processes running tests/runtime/dist_worker.py,
which compares loss and every gradient after each of several optimizer steps.
"""
from pathlib import Path

import pytest

from support import assert_oracle_matches, run_json_worker

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("dist_worker.py")


@pytest.fixture
def run_oracle(tmp_path):
    def run(spec, steps=3, reference_drops=False):
        return run_json_worker(WORKER, {"spec": spec, "steps": steps, "reference_drops": reference_drops}, tmp_path)
    return run


@pytest.mark.parametrize("ep,dp,backend", [(2, 1, "torch"), (4, 1, "torch"), (2, 2, "torch"),
                                           (1, 2, "torch"), (2, 1, "sync")])
def test_matches_reference(run_oracle, oracle_spec, ep, dp, backend):
    # capacity = ep makes every per-peer chunk hold all of a rank's copies: no overflow possible
    res = run_oracle(oracle_spec(ep=ep, dp=dp, backend=backend, capacity=float(ep)))
    assert all(s["dropped"] == 0 for s in res["steps"])
    assert_oracle_matches(res)


def test_mla_softmax_grouped_router_matches_reference(run_oracle, oracle_spec):
    spec = oracle_spec(ep=2, attention={"kind": "mla", "num_heads": 2, "q_lora_rank": 16, "kv_lora_rank": 16,
                                      "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8})
    spec["model"]["moe"]["router"].update(score_fn="softmax", num_groups=4, topk_groups=2)
    assert_oracle_matches(run_oracle(spec, steps=2))


def test_sigmoid_top1_matches_reference_router_gradient_included(run_oracle, oracle_spec):
    """Top-1 keeps the raw sigmoid score (runtime/model.Router): the router's gradient is real, and
    the compiled step's must match the reference's like every other."""
    assert_oracle_matches(run_oracle(oracle_spec(ep=2, capacity=2.0, top_k=1), steps=2))


def test_tight_capacity_drops_exactly_the_counted_rows(run_oracle, oracle_spec):
    # capacity 1.0 with skewed routing: some copies must overflow their chunk
    spec = oracle_spec(ep=2, capacity=1.0, experts=4, top_k=2)
    res = run_oracle(spec, steps=2, reference_drops=True)
    assert sum(s["dropped"] for s in res["steps"]) > 0, "the test needs overflow to mean anything"
    assert_oracle_matches(res)


def test_tight_capacity_without_the_mask_differs(run_oracle, oracle_spec):
    """Sanity of the test above: if the reference is NOT told about drops, results differ."""
    spec = oracle_spec(ep=2, capacity=1.0, experts=4, top_k=2)
    res = run_oracle(spec, steps=1, reference_drops=False)
    assert res["steps"][0]["dropped"] > 0
    assert res["steps"][0]["loss_rel_err"] > 1e-4 or res["steps"][0]["worst_grad"][1] > 1e-3


@pytest.mark.parametrize("ep,dp,recompute", [(2, 1, False), (4, 1, True), (2, 2, True)])
def test_echo_cloning_matches_reference(run_oracle, oracle_spec, ep, dp, recompute):
    """Clones forced on (spare slots, min_clone_rows 1 on CPU): every expert's gradient,
    including experts whose tokens were split over clones, equals the reference."""
    spec = oracle_spec(ep=ep, dp=dp, capacity=float(ep), experts=4 * ep,
                     echo={"enabled": True, "spare_slots_per_rank": 2, "clone_domain": "cluster",
                           "recompute_clone_dispatch": recompute})
    res = run_oracle(spec, steps=3)
    assert sum(s["clones"] for s in res["steps"]) > 0, "no clone was planned: the test proves nothing"
    assert all(s["dropped"] == 0 for s in res["steps"])
    assert_oracle_matches(res)


def test_echo_with_more_spare_slots_than_home_experts(run_oracle, oracle_spec):
    """3 spare slots a rank, 2 home experts: a rank offers all its experts (offer = min(S, El)),
    never more than it has, and the oracle holds."""
    spec = oracle_spec(ep=2, capacity=2.0, experts=4,
                       echo={"enabled": True, "spare_slots_per_rank": 3, "clone_domain": "cluster"})
    res = run_oracle(spec, steps=2)
    assert sum(s["clones"] for s in res["steps"]) > 0, "no clone was planned: the test proves nothing"
    assert_oracle_matches(res)


@pytest.mark.parametrize("zero,echo", [(1, False), (2, True), (3, False), (3, True)])
def test_zero_matches_reference(run_oracle, oracle_spec, zero, echo):
    """ep 2 × dp 2 with sharded training state: dense state over all 4 ranks, experts over their
    expert-DP pair; gradients are compared after gathering the shards."""
    spec = oracle_spec(ep=2, dp=2, capacity=2.0, experts=8,
                       echo={"enabled": True, "spare_slots_per_rank": 2, "clone_domain": "cluster"} if echo else None)
    spec["parallel"]["zero"] = zero
    res = run_oracle(spec, steps=3)
    assert all(s["dropped"] == 0 for s in res["steps"])
    if echo:
        assert sum(s["clones"] for s in res["steps"]) > 0, "no clone was planned: the test proves nothing"
    assert_oracle_matches(res)


def test_bf16_zero3_with_bf16_gradient_reduction_matches_reference(run_oracle, oracle_spec):
    """bf16 weights, fp32 masters, gradients reduce-scattered in bf16: within DESIGN's bf16 bound."""
    spec = oracle_spec(ep=2, dp=2, capacity=2.0)
    spec["model"]["dtype"], spec["backends"]["grouped_gemm"] = "bfloat16", "loop"
    spec["parallel"]["zero"], spec["train"]["grad_reduce_dtype"] = 3, "bfloat16"
    assert_oracle_matches(run_oracle(spec, steps=3), tol=1e-2)
