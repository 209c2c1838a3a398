"""echoc/simulate/: strategies conserve rows, the optimum bounds them all, traces are reproducible,
and bad options or trace files are one clear TraceError."""
from __future__ import annotations

import dataclasses
import io
import json

import networkx as nx
import pytest
import torch
from rich.console import Console

from echoc import simulate as sim
from echoc.errors import EchocError, MissingDependencyError
from echoc.simulate.optimum import optimum_masks, optimum_max_rows
from echoc.simulate.strategies import (SimContext, StepOutcome, context, echo_step, none_step, plan_outcome,
                                       shadow_step, static_placement, static_replicas, static_step)
from echoc.simulate.traces import synthetic_trace
from runtime.planner import assign_slots, plan
from runtime.routing_trace import save_trace


@pytest.fixture
def sim_spec(make_spec):
    """sim_spec(ep, experts, spares, **overrides) → tiny.yaml's spec with ep ranks, E experts, S spare slots."""
    def build(ep: int = 4, experts: int = 8, spares: int = 1, **overrides):
        return make_spec({"parallel.ep": ep, "model.moe.num_experts": experts,
                          "echo.spare_slots_per_rank": spares, "echo.enabled": ep > 1, **overrides})
    return build


@pytest.fixture
def ctx_for(sim_spec):
    # min_clone_rows 1: the planner may clone anything, so the comparisons test the algorithms
    def build(ep: int = 4, experts: int = 8, spares: int = 1) -> SimContext:
        return dataclasses.replace(context(sim_spec(ep, experts, spares)), min_clone_rows=1)
    return build


def random_counts(ep: int, experts: int, seed: int, skew: float = 1.2) -> torch.Tensor:
    return synthetic_trace(ep, experts, 256, 1, 1, skew, seed=seed)[0, 0]


def outcomes(counts: torch.Tensor, ctx: SimContext) -> dict[str, StepOutcome]:
    placement = static_placement(counts.sum(0).double(), ctx.ep, ctx.spares)
    return {"none": none_step(counts, ctx), "static": static_step(counts, placement, ctx, 1),
            "shadow": shadow_step(counts, ctx), "echo": echo_step(counts, ctx)}


def max_rows(out: StepOutcome) -> int:
    return int(out.slot_rows.sum(1).max())


@pytest.mark.parametrize("ep,experts,spares", [(4, 8, 1), (8, 64, 2), (16, 32, 3)])
def test_every_strategy_conserves_rows(ep, experts, spares, ctx_for):
    ctx = ctx_for(ep, experts, spares)
    for seed in range(5):
        counts = random_counts(ep, experts, seed)
        for name, out in outcomes(counts, ctx).items():
            assert out.slot_rows.shape == (ep, experts // ep + spares), name
            assert int(out.slot_rows.sum()) == int(counts.sum()), name
            assert (out.slot_rows >= 0).all(), name


def test_echo_never_worse_than_none(ctx_for):
    for ep, experts, spares in [(4, 8, 1), (8, 64, 2), (8, 16, 1)]:
        ctx = ctx_for(ep, experts, spares)
        for seed in range(10):
            out = outcomes(random_counts(ep, experts, seed, skew=0.5 + seed / 5), ctx)
            assert max_rows(out["echo"]) <= max_rows(out["none"])


def test_optimum_bounds_every_strategy_on_small_cases(ctx_for):
    ctx = ctx_for(4, 8, 1)
    masks = optimum_masks(4, 8, 1)
    assert masks.shape == (9 ** 4, 8)
    for seed in range(10):
        counts = random_counts(4, 8, seed, skew=0.3 * seed)
        best = optimum_max_rows(counts, masks)
        assert best >= -(-int(counts.sum()) // 4)
        for name, out in outcomes(counts, ctx).items():
            assert best <= max_rows(out), name


def flow_max_rows(load: list[int], holders: list[set[int]], ep: int) -> int:
    """Least T such that rows of expert e can go to the ranks in holders[e] with ≤ T per rank (max-flow)."""
    lo, hi = 0, sum(load)
    while lo < hi:
        t = (lo + hi) // 2
        g = nx.DiGraph()
        for e, n in enumerate(load):
            g.add_edge("s", ("e", e), capacity=n)
            for r in holders[e]:
                g.add_edge(("e", e), ("r", r))
        for r in range(ep):
            g.add_edge(("r", r), "t", capacity=t)
        lo, hi = (lo, t) if nx.maximum_flow_value(g, "s", "t") == sum(load) else (t + 1, hi)
    return lo


def test_optimum_hall_bound_matches_max_flow():
    ep, experts = 3, 6
    g = torch.Generator().manual_seed(0)
    masks = optimum_masks(ep, experts, 1)
    for trial in range(4):
        counts = torch.randint(0, 50, (ep, experts), generator=g)
        counts[:, trial] *= 6
        load = counts.sum(0).tolist()
        for c in torch.randint(0, masks.shape[0], (6,), generator=g).tolist():
            holders = [{r for r in range(ep) if int(masks[c, e]) >> r & 1} for e in range(experts)]
            assert optimum_max_rows(counts, masks[c:c + 1]) == flow_max_rows(load, holders, ep)


def test_static_replicas_never_on_home_and_never_twice_on_a_rank():
    for ep, experts, spares, skew in [(8, 64, 2, 1.2), (8, 16, 3, 2.0), (16, 32, 2, 1.5)]:
        load = random_counts(ep, experts, 0, skew).sum(0).double()
        p = static_placement(load, ep, spares)
        El = experts // ep
        for r in range(ep):
            hosted = [e for e in p.spare_expert[r].tolist() if e >= 0]
            assert all(e // El != r for e in hosted)
            assert len(hosted) == len(set(hosted))
        assert int((p.spare_expert >= 0).sum()) + p.dropped == ep * spares
        assert int(p.copies.sum()) == experts + int((p.spare_expert >= 0).sum())


def test_static_gives_replicas_to_the_hottest_expert():
    load = torch.tensor([1000.0, 10, 10, 10, 10, 10, 10, 10])
    assert static_replicas(load, 4, 3).tolist() == [3, 0, 0, 0, 0, 0, 0, 0]


def test_shadow_bytes_scale_with_ep(ctx_for):
    weight = {}
    for ep in (4, 8, 16):
        ctx = ctx_for(ep, 2 * ep, 1)
        counts = torch.full((ep, 2 * ep), 10, dtype=torch.int64)
        counts[:, 3] = 200  # one expert far above the mean rank load
        out = shadow_step(counts, ctx)
        assert out.weight_bytes == 2 * (ep - 1) * ctx.expert_bytes
        assert out.remote_rows == (2 * ep - 1) * (ep - 1) * 10  # every rank computes its own hot copies
        weight[ep] = out.weight_bytes
    assert weight[16] / weight[4] == pytest.approx(15 / 3)


def test_plan_outcome_remote_rows_match_the_runtime_slot_assignment():
    ep, experts, spares = 4, 16, 2
    El, L = experts // ep, experts // ep + spares
    for seed in range(4):
        counts = random_counts(ep, experts, seed)
        p = plan(counts, El, spares, ep, spares, 1)
        slot_rows, remote = plan_outcome(counts, p.spare_expert, p.quota)
        moved, per_slot = 0, torch.zeros(ep * L, dtype=torch.int64)
        for rank in range(ep):
            topk = torch.repeat_interleave(torch.arange(experts), counts[rank]).view(-1, 1)
            slots = assign_slots(topk, counts, p.quota, rank, El, spares)
            moved += int((slots // L != rank).sum())
            per_slot += torch.bincount(slots, minlength=ep * L)
        assert remote == moved
        assert torch.equal(slot_rows.reshape(-1), per_slot)


def test_synthetic_traces_are_deterministic_per_seed():
    a = synthetic_trace(4, 8, 100, 3, 2, 1.2, 0.0, seed=7)
    b = synthetic_trace(4, 8, 100, 3, 2, 1.2, 0.0, seed=7)
    c = synthetic_trace(4, 8, 100, 3, 2, 1.2, 0.0, seed=8)
    assert a.shape == (3, 2, 4, 8) and torch.equal(a, b) and not torch.equal(a, c)
    assert (a.sum(3) == 100).all()


def test_drift_moves_the_hot_experts():
    steady = synthetic_trace(1, 64, 100_000, 12, 1, 1.5, 0.0, seed=1)[:, 0, 0]
    drift = synthetic_trace(1, 64, 100_000, 12, 1, 1.5, 0.5, seed=1)[:, 0, 0]
    assert len(set(steady.argmax(1).tolist())) == 1
    assert len(set(drift.argmax(1).tolist())) > 1


def test_trace_file_round_trip(tmp_path, sim_spec):
    spec = sim_spec()
    counts = synthetic_trace(4, 8, spec.budgets.tokens * spec.model.moe.top_k, 5, 2, 1.2, seed=3)
    save_trace(counts, tmp_path / "routing.pt")
    from_file = sim.simulate(spec, trace=tmp_path / "routing.pt")
    assert (from_file.steps, from_file.layers) == (5, 2)
    assert from_file.metrics["echo"].token_straggler.mean <= from_file.metrics["none"].token_straggler.mean
    np = pytest.importorskip("numpy")
    np.savez(tmp_path / "routing.npz", counts=counts.numpy())
    from_npz = sim.simulate(spec, trace=tmp_path / "routing.npz", steps=3)
    assert from_npz.steps == 3
    assert sim.simulate(spec, trace=tmp_path / "routing.pt", steps=3).metrics == from_npz.metrics


@pytest.mark.parametrize("shape", [(2, 1, 8, 8), (2, 1, 4, 16), (2, 1, 4, 4)])
def test_a_trace_of_the_wrong_shape_for_the_spec_is_a_user_error(tmp_path, sim_spec, shape):
    save_trace(torch.zeros(shape, dtype=torch.int64), tmp_path / "bad.pt")
    with pytest.raises(sim.TraceError, match=r"\[steps, layers, 4, 8\]"):
        sim.simulate(sim_spec(), trace=tmp_path / "bad.pt")


def test_a_trace_routing_more_rows_than_the_spec_is_a_user_error(tmp_path, sim_spec):
    spec = sim_spec()
    copies = spec.budgets.tokens * spec.model.moe.top_k
    save_trace(synthetic_trace(4, 8, copies + 1, 2, 1, 1.2, seed=3), tmp_path / "big.pt")
    with pytest.raises(sim.TraceError, match=f"routes {copies + 1} rows in one layer, more than this spec's {copies}"):
        sim.simulate(spec, trace=tmp_path / "big.pt")


def test_a_missing_or_corrupt_trace_file_is_a_user_error(tmp_path, sim_spec):
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    for path in (tmp_path / "absent.pt", tmp_path, tmp_path / "junk.pt"):
        with pytest.raises(sim.TraceError, match="trace file"):
            sim.simulate(sim_spec(), trace=path)


@pytest.mark.parametrize("skew", ["zipf:nan", "zipf:inf", "zipf:-inf", "zipf:-1", "zipf:1e400", "zipf",
                                  "zipf:x", "garbage", "", "zipf:1.2,rate:0.1", "rate:1.2"])
def test_a_bad_skew_is_a_user_error_naming_the_option(skew, sim_spec):
    with pytest.raises(sim.TraceError, match=r"--skew .*finite number >= 0") as e:
        sim.simulate(sim_spec(), skew=skew, steps=2)
    assert isinstance(e.value, EchocError) and repr(skew) in str(e.value)


@pytest.mark.parametrize("drift", ["zipf:nan,rate:0.1", "zipf:inf,rate:0.1", "zipf:-1,rate:0.1",
                                   "zipf:1.2,rate:nan", "zipf:1.2,rate:inf", "zipf:1.2,rate:1.5",
                                   "zipf:1.2,rate:-0.1", "zipf:1.2", "rate:0.1,zipf:1.2", "zipf:1,rate:0.1,x:1"])
def test_a_bad_drift_is_a_user_error_naming_the_option(drift, sim_spec):
    with pytest.raises(sim.TraceError, match=r"--drift .*R in \[0, 1\]"):
        sim.simulate(sim_spec(), drift=drift, steps=2)


@pytest.mark.parametrize("option,value", [("steps", 0), ("steps", -3), ("layers", 0), ("layers", -1),
                                          ("steps", True), ("steps", 2.5)])
def test_a_count_below_one_is_a_user_error(option, value, sim_spec):
    with pytest.raises(sim.TraceError, match=f"--{option} must be a whole number >= 1"):
        sim.simulate(sim_spec(), **{"steps": 2, option: value})


def test_steps_below_one_are_refused_with_a_trace_file_too(tmp_path, sim_spec):
    save_trace(synthetic_trace(4, 8, 64, 3, 1, 1.2), tmp_path / "routing.pt")
    with pytest.raises(sim.TraceError, match="--steps"):
        sim.simulate(sim_spec(), trace=tmp_path / "routing.pt", steps=0)


def test_a_synthetic_trace_too_large_to_hold_is_refused(sim_spec):
    with pytest.raises(sim.TraceError, match="lower --steps or --layers"):
        sim.simulate(sim_spec(), steps=10**9, layers=10)


def test_edge_skews_still_simulate(sim_spec):
    flat = sim.simulate(sim_spec(), skew="zipf:0", steps=2, strategies=["none"])
    hot = sim.simulate(sim_spec(), skew="zipf:50", steps=2, strategies=["none"])
    assert flat.metrics["none"].token_straggler.max < hot.metrics["none"].token_straggler.mean
    assert hot.metrics["none"].token_straggler.mean == pytest.approx(4.0)  # every copy to one expert of 4 ranks


@pytest.mark.parametrize("kw", [{"skew": "zipf:1.2", "drift": "zipf:1.2,rate:0.1"},
                                {"strategies": ["none", "magic"]}])
def test_bad_combinations_are_user_errors(kw, sim_spec):
    with pytest.raises(sim.TraceError):
        sim.simulate(sim_spec(), steps=2, **kw)


def test_simulate_small_reports_every_strategy_and_writes_json(tmp_path, sim_spec):
    res = sim.simulate(sim_spec(), skew="zipf:1.2", steps=4, layers=2, seed=1)
    assert list(res.metrics) == list(sim.STRATEGIES)
    opt = res.metrics["optimum"].token_straggler
    for name, m in res.metrics.items():
        assert opt.mean <= m.token_straggler.mean + 1e-12, name
    assert len(res.series["echo"]) == 4
    sim.write_json(res, tmp_path / "out" / "sim.json")
    saved = json.loads((tmp_path / "out" / "sim.json").read_text())
    assert saved["metrics"]["echo"]["token_straggler"]["mean"] == res.metrics["echo"].token_straggler.mean
    buf = io.StringIO()
    sim.print_table(res, Console(file=buf, width=200))
    assert "optimum" in buf.getvalue() and res.source in buf.getvalue()


def test_optimum_is_skipped_with_a_note_when_too_large(sim_spec):
    res = sim.simulate(sim_spec(8, 16, 1), drift="zipf:1.2,rate:0.2", steps=2)
    assert "optimum" not in res.metrics
    assert any("optimum skipped" in n for n in res.notes)


def test_plot_needs_matplotlib(tmp_path, sim_spec):
    res = sim.simulate(sim_spec(), steps=2, strategies=["none", "echo"])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match="echoc\\[plot\\]"):
            sim.plot(res, tmp_path / "s.png")
    else:
        sim.plot(res, tmp_path / "s.png")
        assert (tmp_path / "s.png").stat().st_size > 0


def test_simulate_at_1024_ranks_completes(sim_spec):
    # the spec needs num_experts divisible by ep, so 1024 ranks hold 1024 experts (one home expert each)
    spec = sim_spec(1024, 1024, 2, **{"budgets.seq_len": 4096, "budgets.micro_batch": 1, "model.moe.top_k": 8})
    res = sim.simulate(spec, skew="zipf:1.2", steps=2)
    assert res.ep == 1024 and set(res.metrics) == {"none", "static", "shadow", "echo"}
    assert res.metrics["echo"].token_straggler.mean < res.metrics["none"].token_straggler.mean
