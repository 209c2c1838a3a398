"""ZeRO and the device-side guard on gloo (CPU): tests/runtime/zero_worker.py under torchrun.

The oracle for ZeRO 1/2/3 (loss and every gradient against the reference) is in
test_distributed.py; here: the guard skips updates on the device, ZeRO 3 frees gathered
weights after use and gathers them again in backward, and a ZeRO 3 run resumes bitwise.
Also the pass alone (passes/zero.py) on a compiled graph, in-process.
"""
import json
from pathlib import Path

import pytest

from echoc.compile import compile_build
from passes import zero
from runtime import contracts, zero_ops
from runtime.zero_ops import ZERO_GATHER, ZERO_REDUCE, ZERO_WAIT

WORKER = Path(__file__).with_name("zero_worker.py")


@pytest.fixture
def run_zero(tmp_path, torchrun):
    def run(spec, mode, **settings):
        out = tmp_path / f"{mode}.json"
        cfg = {"spec": spec, "mode": mode, "out": str(out), "ckpt_dir": str(tmp_path / "ckpt"), **settings}
        torchrun(WORKER, cfg, spec["parallel"]["ep"] * spec["parallel"]["dp"], tmp_path)
        return json.loads(out.read_text())
    return run


def _zero_spec(oracle_spec, zero_level, **kw):
    spec = oracle_spec(**kw)
    spec["parallel"]["zero"] = zero_level
    return spec


def test_pass_gathers_each_layer_once_per_group(make_spec):
    spec = make_spec({"parallel.ep": 2, "parallel.dp": 2, "parallel.zero": 3, "echo.enabled": True})
    build = compile_build(spec)
    info = next(r.info for r in build.records if r.name == "zero")
    units = {(u.node, u.group) for u in info.units}
    assert ("zero_layers_1_expert_dp", "expert_dp") in units and ("zero_layers_0_world", "world") in units
    gathered = {p for u in info.units for p in u.params}
    assert gathered == {n for n, _ in build.program.model.named_parameters()}, "a weight was left whole"
    gm = build.program.gm
    assert not any(n.op == "call_module" and list(gm.get_submodule(n.target).parameters()) for n in gm.graph.nodes)
    assert sum(contracts.of(n.target) is ZERO_GATHER for n in gm.graph.nodes) == len(info.units)
    # prefetch: each group's next gather is issued right after this unit's wait, before its weights are used
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for group in ("world", "expert_dp"):
        gathers = [n for n in gm.graph.nodes if contracts.of(n.target) is ZERO_GATHER
                   and ZERO_GATHER.arg(n, "group") == group]
        waits = [next(u for u in g.users if contracts.of(u.target) is ZERO_WAIT) for g in gathers]
        assert len(gathers) >= 2
        for k in range(len(gathers) - 1):
            uses_k = min(order[u] for u in waits[k].users)
            assert order[waits[k]] < order[gathers[k + 1]] < uses_k, (group, k)


def test_pass_reduces_each_layers_gradients_once_per_group_at_zero_2(make_spec):
    spec = make_spec({"parallel.ep": 2, "parallel.dp": 2, "parallel.zero": 2, "echo.enabled": True})
    build = compile_build(spec)
    info = next(r.info for r in build.records if r.name == "zero")
    units = {(u.node, u.group) for u in info.units}
    assert ("zero_layers_1_expert_dp", "expert_dp") in units and ("zero_layers_0_world", "world") in units
    gm = build.program.gm
    reduced = zero_ops.reduced_params(gm)
    assert set(reduced) == {n for n, _ in build.program.model.named_parameters()}, "a gradient is reduced late"
    assert not zero_ops.gathered_params(gm)
    assert sum(contracts.of(n.target) is ZERO_REDUCE for n in gm.graph.nodes) == len(info.units)
    assert not any(n.op == "call_module" and list(gm.get_submodule(n.target).parameters()) for n in gm.graph.nodes)


def test_pass_leaves_single_rank_groups_and_lower_levels_alone(make_spec):
    for overrides in ({"parallel.zero": 1, "parallel.dp": 2}, {"parallel.zero": 3, "parallel.ep": 1,
                                                               "cluster.gpus_per_node": 1},
                      {"parallel.zero": 2, "parallel.ep": 1, "cluster.gpus_per_node": 1}):
        build = compile_build(make_spec(overrides))
        info = next(r.info for r in build.records if r.name == "zero")
        assert info.units == [] and info.reason
    spec = make_spec({"parallel.zero": 3, "parallel.ep": 2, "parallel.dp": 1})   # expert-DP of one rank
    info = next(r.info for r in compile_build(spec).records if r.name == "zero")
    assert {u.group for u in info.units} == {"world"}


@pytest.mark.slow
@pytest.mark.parametrize("zero_level", [0, 3])
def test_nonfinite_gradient_on_one_rank_skips_the_update_everywhere(run_zero, oracle_spec, zero_level):
    ranks = run_zero(_zero_spec(oracle_spec, zero_level, ep=2, dp=2), "guard", inject_nan=True)
    for rows in ranks:
        ok0, bad, ok2 = rows
        assert (ok0["skipped"], ok0["nonfinite"], ok2["skipped"], ok2["nonfinite"]) == (0, 0, 0, 0)
        assert ok0["weights"] and ok0["step_count"] and ok2["weights"] and ok2["step_count"]
        assert (bad["skipped"], bad["nonfinite"]) == (1, 1)
        assert not bad["weights"] and not bad["step_count"] and not bad["biases"], bad


@pytest.mark.slow
def test_overflow_under_rerun_skips_the_update(run_zero, oracle_spec):
    spec = _zero_spec(oracle_spec, 1, ep=2, capacity=1.0, experts=4, top_k=2, on_overflow="rerun")
    ranks = run_zero(spec, "guard")
    assert any(r["overflow"] for r in ranks[0]), "the test needs an overflowing step to mean anything"
    for rows in ranks:
        for r in rows:
            assert r["nonfinite"] == 0 and r["skipped"] == int(r["overflow"] > 0), r
            assert r["weights"] == r["step_count"] == (not r["skipped"]), r


@pytest.mark.slow
def test_zero3_frees_gathered_weights_and_gathers_again_in_backward(run_zero, oracle_spec):
    ranks = run_zero(_zero_spec(oracle_spec, 3, ep=2, dp=2), "memory")
    for r in ranks:
        assert r["alive_after_forward"] == 0, "whole weights outlived the forward"
        # every unit but the embedding (its backward needs only the token ids) is gathered again
        assert r["regathered"] == r["units"] - 1 > 0
        for name, (held, numel, sharded) in r["held"].items():
            assert sharded and held == -(-numel // (2 if ".experts." in name else 4)), name


@pytest.mark.slow
def test_zero2_reduces_each_layer_in_backward_and_keeps_no_whole_gradient(run_zero, oracle_spec):
    ranks = run_zero(_zero_spec(oracle_spec, 2, ep=2, dp=2), "reduce")
    for r in ranks:
        assert r["reduced"] == r["params"], "a gradient is left to the reduction after backward"
        assert len(r["calls"]) == len(r["units"]) > 2, "one reduce-scatter per unit and group, in backward"
        # each call finds the earlier units' shards and no whole gradient anywhere
        assert [c[0] for c in r["calls"]] == sorted(c[0] for c in r["calls"]) and r["calls"][0][0] == 0
        assert all(whole == 0 for _, whole in r["calls"]) and r["whole_grads"] == []
        assert set(r["shards"]) == set(r["params"])
        assert all(n == rows for n, rows in r["shards"].values())


@pytest.mark.slow
def test_zero3_resume_is_bitwise(run_zero, oracle_spec):
    spec = _zero_spec(oracle_spec, 3, ep=2, dp=2, echo={"enabled": True, "spare_slots_per_rank": 1,
                                                        "clone_domain": "cluster"})
    res = run_zero(spec, "resume", steps=4, save_at=2)[0]
    assert res["start"] == 2
    assert res["resumed"] == res["whole"], "the resumed run's losses differ from the uninterrupted run"
