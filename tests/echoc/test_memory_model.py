"""The whole-rank memory model (echoc/memory_model.py, echoc/memory_census.py) and the budget check."""
from __future__ import annotations

import math
import re

import pytest
import torch

from echoc import memory_model as mm
from echoc import views
from echoc.compile import compile_build
from echoc.errors import EchocError
from echoc.memory_census import layer_census
from echoc.spec_io import load_spec
from runtime.model import MLP, Router
from runtime.recompute import Recompute
from support import ROOT

GIB = 2**30
GROUPS = mm.ParamGroups(dense=1000, expert=800, layers=(400, 600), outside_layers=800)


def _mini(make_spec, **over):
    """A bf16 CUDA-shaped spec compiled on the CPU (nothing runs): 2 MoE layers, ep 2 × dp 2."""
    base = {"parallel.ep": 2, "parallel.dp": 2, "cluster.device": "cuda", "model.dtype": "bfloat16",
            "budgets.seq_len": 256, "backends.buffers": "allocator"}
    return make_spec(base | over)


@pytest.mark.parametrize("zero,weights,master,moments", [
    (0, 2 * 1800, 4 * 1800, 8 * 1800),
    (1, 2 * 1800, 4 * (1000 // 4 + 800 // 2), 8 * (1000 // 4 + 800 // 2)),
    (2, 2 * 1800, 4 * (1000 // 4 + 800 // 2), 8 * (1000 // 4 + 800 // 2)),
    (3, 2 * (1000 // 4 + 800 // 2), 4 * (1000 // 4 + 800 // 2), 8 * (1000 // 4 + 800 // 2)),
])
def test_static_bytes_by_zero_level(make_spec, zero, weights, master, moments):
    """bf16 weights; fp32 master and both moments sharded at zero >= 1 (dense over all 4 ranks,
    experts over their 2 expert-DP ranks); weights sharded at zero 3."""
    spec = _mini(make_spec, **{"parallel.zero": zero})
    assert mm.static_bytes(spec, GROUPS) == {"weights": weights, "master_weights": master,
                                             "optimizer_moments": moments}


def test_fp32_model_whole_weight_is_its_own_master(make_spec):
    spec = make_spec({"parallel.ep": 2, "parallel.dp": 2})
    assert spec.model.dtype == "float32"
    assert mm.static_bytes(spec, GROUPS)["master_weights"] == 0


def test_gradients_by_zero_level(make_spec):
    """The optimizer reads fp32 gradients (this rank's shard at zero >= 1); at zero 3 even the
    model-dtype gradients are shards; at zero 2 the graph reduce-scatters each layer's gradients
    in its backward (backward_unit_bytes), so after backward it holds the reduced shards (in the
    reduce dtype: with fp32, the optimizer's own); at zero 0 and 1 the reduction walks buckets,
    each model-dtype gradient dropped as its bucket is cast."""
    g = {z: mm.gradient_bytes(_mini(make_spec, **{"parallel.zero": z}), GROUPS) for z in range(4)}
    assert g[0]["model_grads"] == g[1]["model_grads"] == 2 * 1800
    assert g[3]["model_grads"] == 2 * (250 + 400)
    assert g[2]["model_grads"] == 4 * (250 + 400)               # fp32 reduction: the shards are the fp32 grads
    assert g[0]["fp32_grads"] == 4 * 1800 and g[1]["fp32_grads"] == g[2]["fp32_grads"] == g[3]["fp32_grads"] == 4 * 650
    # zero 0, buckets one group each: the experts' flat fp32 buffer (4·800) beside the dense
    # fp32 gradients (views of their flat buffer, 4·1000) and the experts' bf16 ones (2·800)
    assert g[0]["reduce_transient"] == 4 * 1000 + 2 * 800 + 4 * 800 - 2 * 1800
    assert g[1]["reduce_transient"] == 4 * 1000                 # the first flat buffer, beside every bf16 gradient
    assert g[2]["reduce_transient"] == 0                        # nothing left to reduce after backward
    bf16 = mm.gradient_bytes(_mini(make_spec, **{"parallel.zero": 2, "train.grad_reduce_dtype": "bfloat16"}),
                             GROUPS)
    assert bf16["model_grads"] == 2 * 650 and bf16["reduce_transient"] == 0


def test_zero3_gathers_and_shards_only_groups_of_more_than_one_rank(make_spec):
    """passes/zero.py gathers nothing for a group of one rank: at ep = world (expert-DP of one)
    zero 3 gathers a layer's dense weights only, and its experts' gradients are reduced by the
    host path, bucket by bucket, like zero 2's; at world 1 nothing is gathered at all."""
    groups = mm.ParamGroups(dense=1000, expert=800, layers=(400, 600), outside_layers=800,
                            layer_experts=(300, 500))
    # forward: three units' worth of the largest unit (the output head, V·H, is the last unit);
    # backward: per layer, its weights again, and at its reduce-scatter the buffer and result
    ep_only = _mini(make_spec, **{"parallel.zero": 3, "parallel.dp": 1})       # dense over 2, experts over 1
    head = ep_only.model.vocab_size * ep_only.model.hidden_size
    b, r = 2, 4
    assert mm.zero3_gathered_bytes(ep_only, groups) == 3 * b * max(100, head)
    parts = mm.layer_parts(ep_only, groups, 1)
    assert parts == [(100, 2), (500, 1)]
    assert mm.backward_unit_bytes(ep_only, parts) == {"gathered_weights": b * 100,
                                                      "reduce_transient": r * 100 + r * 100 // 2}
    both = _mini(make_spec, **{"parallel.zero": 3})                            # dense over 4, experts over 2
    assert mm.backward_unit_bytes(both, mm.layer_parts(both, groups, 1)) == {
        "gathered_weights": b * 600, "reduce_transient": r * 100 + r * 100 // 4 + r * 500 + r * 500 // 2}
    # after their backward: zero 3 keeps model-dtype shards, zero 2 reduce-dtype shards, a
    # group of one (the experts here) whole model-dtype gradients, as zero 0 and 1 do
    assert mm.held_grad_bytes(ep_only, parts) == b * 100 // 2 + b * 500
    z2 = _mini(make_spec, **{"parallel.zero": 2})
    assert mm.held_grad_bytes(z2, mm.layer_parts(z2, groups, 1)) == r * 100 // 4 + r * 500 // 2
    z1 = _mini(make_spec, **{"parallel.zero": 1})
    assert mm.held_grad_bytes(z1, mm.layer_parts(z1, groups, 1)) == b * 600
    assert mm.backward_unit_bytes(z1, mm.layer_parts(z1, groups, 1)) == {"gathered_weights": 0, "reduce_transient": 0}
    one = dict(zip(("parallel.ep", "parallel.dp", "cluster.gpus_per_node"), (1, 1, 1)))
    world1 = {z: _mini(make_spec, **one, **{"parallel.zero": z, "train.grad_reduce_dtype": "bfloat16"})
              for z in (2, 3)}
    assert mm.zero3_gathered_bytes(world1[3], groups) == 0
    g2, g3 = (mm.gradient_bytes(world1[z], groups) for z in (2, 3))
    assert g3 == g2
    # the dense group, then the experts', one bucket each: the [1, m] buffer and its [m] result
    # (bf16), then the result and its fp32 copies; the result and the bf16 gradients are freed
    # after each bucket, the fp32 copies kept (4·1000 − 2·1000 above the gradients' bytes)
    dense_peak = max(2 * 1000 + 2 * 1000, 2 * 1000 + 4 * 1000)
    assert g3["model_grads"] == 2 * 1800
    assert g3["reduce_transient"] == max(dense_peak, (4 - 2) * 1000 + 2 * 800 + 4 * 800)


def test_a_layers_backward_is_the_largest_of_its_moments(make_spec):
    """Zero 2 and 3 reduce-scatter each group when its weights' last backward use is done
    (runtime/zero_ops.py): the experts' in the middle of the layer (its activations still held),
    the dense weights' at its end (its activations freed, the gradient flowing down, two [T, H],
    instead); the group's gathered weights are freed first. Counting everything at once
    overpredicted the two-GPU runs by up to 12 % (docs/BENCHMARKS.md)."""
    spec = _mini(make_spec, **{"parallel.zero": 3})                  # dense over 4 ranks, experts over 2
    groups = mm.ParamGroups(dense=1000, expert=800, layers=(400, 600), outside_layers=800,
                            layer_experts=(300, 50))                 # layer 1: 550 dense, 50 expert parameters
    moe = mm.MoEBuffers(held={0: 0, 1: 0, None: 0})
    flow = 2 * spec.budgets.tokens * spec.model.hidden_size * 2

    def at(kept1, sp=spec):
        acts = [mm.LayerActivations(1000, 0), mm.LayerActivations(kept1, 0)]
        return mm._layer_backward(sp, groups, {"weights": 7}, acts, 1, moe, False, held=11)

    common = {"weights": 7, "moe_arena": 0, "moe_transient": 0}
    # the dense reduce-scatter: layer 0's activations and the flow; the experts' shards (2·50/2),
    # the dense whole gradients (2·550), the fp32 buffer [4, 550/4] and result
    assert at(0) == dict(common, activations=1000 + flow, model_grads=11 + 50 + 1100,
                         reduce_transient=4 * 550 + 4 * 550 // 4)
    # a layer holding much: the experts' reduce-scatter, mid-layer, its activations still there,
    # the dense weights gathered again (2·550), every whole gradient, the buffer [2, 50/2] and result
    assert at(10**6) == dict(common, activations=1000 + 10**6 + flow, model_grads=11 + 1200,
                             gathered_weights=1100, reduce_transient=4 * 50 + 4 * 50 // 2)
    # zero 1 reduces after backward: one moment, every gradient whole, nothing gathered
    z1 = _mini(make_spec, **{"parallel.zero": 1})
    assert at(5, z1) == dict(common, activations=1005, model_grads=11 + 1200, gathered_weights=0)
    # zero 2 gathers nothing; its dense reduce-scatter's moment as zero 3's (reduced shards fp32)
    z2 = _mini(make_spec, **{"parallel.zero": 2})
    assert at(0, z2) == dict(common, activations=1000 + flow, model_grads=11 + 4 * 50 // 2 + 1100,
                             reduce_transient=4 * 550 + 4 * 550 // 4)


def test_sharded_headroom_is_what_the_recorded_two_gpu_runs_show():
    """SHARDED_HEADROOM against bench/results/memory_round7 (bench/memory.py --world, two H200):
    above the factor a zero >= 1 run over two ranks ran out of memory under (a `--cap needs`
    run: the factor of its file's runs that went through), and a recorded run of that setting
    went through at exactly it."""
    import json
    oom_under, went = [], set()
    for path in sorted((ROOT / "bench" / "results" / "memory_round7").glob("ep*.json")):
        rows = json.loads(path.read_text())["variants"]
        needs = {round(r["needs_bytes"] / r["predicted_bytes"], 3) for r in rows
                 if r.get("cap") == "needs" and "error" not in r}
        for row in rows:
            cap = row.get("cap", "needs")           # the first runs' error rows carry no cap: all were `needs`
            factor = float(cap) if cap != "needs" else (min(needs) if len(needs) == 1 else None)
            if "reserved by PyTorch but unallocated" in row.get("error", "") or "OutOfMemoryError" in row.get("error", ""):
                assert row["zero"] >= 1 and factor is not None, (path.name, row["zero"])
                oom_under.append(factor)
            elif "error" not in row and row["zero"] >= 1 and factor:        # cap 0: no cap, no evidence
                went.add(factor)
    assert oom_under, "no recorded out-of-memory run: the evidence is missing"
    assert mm.SHARDED_HEADROOM > max(oom_under), oom_under
    assert mm.SHARDED_HEADROOM in went, went


def test_the_sharded_headroom_applies_to_a_sharded_reduction_only(make_spec):
    one = dict(zip(("parallel.ep", "parallel.dp", "cluster.gpus_per_node"), (1, 1, 1)))
    for over, factor in (({"parallel.zero": 1}, mm.SHARDED_HEADROOM), ({"parallel.zero": 0}, 1.15),
                         ({**one, "parallel.zero": 3}, 1.15)):
        mem = compile_build(_mini(make_spec, **over)).summary["memory"]
        assert mem["allocator_headroom"] == factor, over
        assert mem["needs_bytes"] == math.ceil(mem["peak_bytes"] * factor)


def test_census_counts_what_autograd_saves_on_a_real_device(make_spec):
    """The meta-device census equals the bytes a real CPU forward saves (distinct storages,
    parameters excluded) for the dense FFN and the router."""
    spec = make_spec({"budgets.seq_len": 64})
    census, m = layer_census(spec), spec.model

    def saved(module, x):
        params = {p.untyped_storage().data_ptr() for p in module.parameters()}
        seen = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in params:
                seen[s.data_ptr()] = (s.nbytes(), t)
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x.requires_grad_(True))
        return sum(n for n, _ in seen.values())

    x = torch.randn(spec.budgets.micro_batch, spec.budgets.seq_len, m.hidden_size)
    assert census.dense_mlp == saved(MLP(m.hidden_size, m.dense_intermediate_size), x.clone())
    assert census.router == saved(Router(m), x.reshape(-1, m.hidden_size).clone())
    assert census.dense_mlp > 0 and census.router > 0


def test_recompute_lowers_the_activation_phases(make_spec):
    """Kept activations: none > moe > full; each policy's loss phase is lower than the last."""
    spec = _mini(make_spec)
    build = compile_build(spec)
    census, plan = layer_census(spec), build.memory_plan
    groups = mm.ParamGroups(0, 0, (0,) * spec.model.num_layers, 0)
    kept = {p: sum(a.kept for a in mm.layer_activations(spec, census, plan, p)) for p in mm.POLICIES}
    assert kept["none"] > kept["moe"] > kept["full"] > 0
    loss = {p: mm.predict(spec, groups, census, plan, p).phases["loss"] for p in mm.POLICIES}
    assert loss["none"] - loss["moe"] == kept["none"] - kept["moe"]
    work = mm.layer_activations(spec, census, plan, "full")
    assert all(a.working > 0 for a in work)


def test_the_loss_and_the_output_head_follow_the_chunked_loss(make_spec):
    """At the loss: the model-dtype logits and the chunked loss's backward (runtime/loss.py),
    not fp32 copies of the logits. The head's backward (the logits' and the input's gradients)
    is its own phase."""
    from runtime.loss import fused_planned, loss_bytes
    spec = _mini(make_spec, **{"model.vocab_size": 50000, "parallel.zero": 0})
    build = compile_build(spec)
    census, plan, T = layer_census(spec), build.memory_plan, spec.budgets.tokens
    groups = mm.ParamGroups(0, 0, (0,) * spec.model.num_layers, 0)
    pred = mm.predict(spec, groups, census, plan, "none")
    head = mm.head_bytes(spec, census)
    assert head["logits"] == 2 * T * 50000 and head["loss"] == sum(loss_bytes(T, 50000, 2, fused_planned("cuda")).values())
    assert head["loss"] < 2 * 4 * T * 50000          # below two fp32 copies of the logits
    out = mm._head_backward(spec)
    assert out["grad_logits"] == 2 * T * 50000 and out["grad_hidden"] == 2 * T * spec.model.hidden_size
    assert "output head backward" in pred.phases and pred.phases["loss"] > 0
    head_params, H = 50000 * spec.model.hidden_size, spec.model.hidden_size
    assert out["model_grads"] == 2 * head_params and "reduce_transient" not in out
    # sharded over the 4 ranks, when the head reduce-scatters: the logits' gradient and the
    # gathered weight freed, the whole gradient (bf16) beside the fp32 buffer [4, VH/4] and result
    rs = 4 * head_params + 4 * head_params // 4
    won = set()
    for zero, seq in ((2, 256), (3, 256), (2, 8), (3, 8)):    # few tokens: the reduce-scatter's moment wins
        z = _mini(make_spec, **{"model.vocab_size": 50000, "parallel.zero": zero, "budgets.seq_len": seq})
        t = z.budgets.tokens
        computing = {"grad_logits": 2 * t * 50000, "grad_hidden": 2 * t * H, "model_grads": 2 * head_params,
                     "gathered_weights": 2 * head_params if zero == 3 else 0}
        reducing = {"grad_hidden": 2 * t * H, "model_grads": 2 * head_params, "reduce_transient": rs}
        want = max(computing, reducing, key=lambda d: sum(d.values()))
        assert mm._head_backward(z) == want, (zero, seq)
        won.add("reducing" if want is reducing else "computing")
    assert won == {"reducing", "computing"}
    assert rs == 5 * head_params
    z3 = _mini(make_spec, **{"model.vocab_size": 50000, "parallel.zero": 3})
    z3_phases = mm.predict(z3, groups, census, plan, "none").phases
    assert z3_phases["output head forward"] >= z3_phases["loss"] - head["loss"] + 2 * 2 * head_params
    assert "output head forward" not in pred.phases                  # zero 0: the loss phase covers it


def test_auto_picks_the_cheapest_policy_that_fits(make_spec):
    peaks = {p: compile_build(_mini(make_spec, **{"train.recompute": p})).summary["memory"] for p in mm.POLICIES}
    assert peaks["none"]["peak_bytes"] >= peaks["moe"]["peak_bytes"] >= peaks["full"]["peak_bytes"]
    for p, m in peaks.items():      # what the run needs: the peak and the allocator's headroom on it
        assert m["needs_bytes"] == math.ceil(m["peak_bytes"] * mm.ALLOCATOR_HEADROOM[p]) > m["peak_bytes"]
    between = (peaks["moe"]["needs_bytes"] + 1) / GIB
    build = compile_build(_mini(make_spec, **{"train.recompute": "auto", "budgets.memory_gib": between}))
    chosen = build.summary["memory"]["recompute"]
    assert chosen == "moe" or (chosen == "none" and peaks["none"]["needs_bytes"] <= between * GIB)
    # a budget the peak fits but the headroom does not: moe is not chosen
    tight = (peaks["moe"]["peak_bytes"] + 1) / GIB
    assert peaks["full"]["needs_bytes"] <= tight * GIB < peaks["moe"]["needs_bytes"]
    tight_build = compile_build(_mini(make_spec, **{"train.recompute": "auto", "budgets.memory_gib": tight}))
    assert tight_build.summary["memory"]["recompute"] == "full"
    regions = [m for m in build.program.gm.modules() if isinstance(m, Recompute)]
    assert len(regions) == (spec_moe_layers := build.spec.model.num_moe_layers) and spec_moe_layers > 0
    none = compile_build(_mini(make_spec, **{"train.recompute": "auto"}))       # no budget: nothing to meet
    assert none.summary["memory"]["recompute"] == "none"


def test_over_budget_is_one_actionable_line(make_spec):
    spec = _mini(make_spec, **{"budgets.memory_gib": 0.001})
    with pytest.raises(mm.MemoryBudgetError) as info:
        compile_build(spec)
    msg = str(info.value)
    assert isinstance(info.value, EchocError) and "\n" not in msg
    assert "over budgets.memory_gib 0.001" in msg
    for field in mm.HELPFUL_FIELDS:       # nothing is at its limit here: every remedy is offered
        assert field in msg, field
    sized = re.findall(r"(\w+) (\d+\.\d\d) (GiB|MiB|KiB)[,)]", msg.split("largest: ")[1])
    assert len(sized) == 3 and all(float(v) > 0 for _, v, _ in sized), sized    # the three largest, sized
    assert " 0.00 " not in msg                                   # no size reads as zero


def test_over_budget_offers_only_the_settings_that_can_still_change(make_spec):
    """ZeRO 3, full recompute, capacity 1.0 and one expert per rank: none of them can lower the
    peak any more, so the message does not ask for them."""
    spec = _mini(make_spec, **{"budgets.memory_gib": 0.001, "parallel.zero": 3, "train.recompute": "full",
                               "budgets.received_token_capacity": 1.0})
    with pytest.raises(mm.MemoryBudgetError) as info:
        compile_build(spec)
    msg = str(info.value)
    for field in ("parallel.zero", "train.recompute", "budgets.received_token_capacity"):
        assert field not in msg.split("); ")[-1], (field, msg)
    assert "or run on more GPUs" in msg


@pytest.mark.parametrize("name,limit_gib", [("glm5", 120), ("glm5-h100", 72), ("deepseek-v3", 72)])
def test_flagship_specs_fit_their_gpus(name, limit_gib):
    spec = load_spec(ROOT / "specs" / f"{name}.yaml")
    mem = compile_build(spec).summary["memory"]
    assert mem["fits"] and mem["peak_bytes"] <= limit_gib * GIB, mem["peak_bytes"] / GIB
    assert mem["budget_bytes"] == int(spec.budgets.memory_gib * GIB)


def test_inspect_memory_view_lists_categories_and_the_peak_phase(make_spec):
    summary = compile_build(_mini(make_spec, **{"train.recompute": "full"})).summary
    table = views.memory_table(summary)
    rows = table.columns[0]._cells
    mem = summary["memory"]
    assert set(mem["by_category"]) <= set(rows)
    assert any(r.startswith(f"phase: {mem['peak_phase']}") and "(peak)" in r for r in rows)
    assert sum(r.startswith("phase: backward") for r in rows) == 1     # the worst layer only
    with pytest.raises(EchocError, match="no memory prediction"):
        views.memory_table({"name": "old"})


def test_moe_regions_by_phase_follow_the_arena():
    """Layers 1 and 2 hold 10 and 20 bytes (2 and 3 of them routing decisions), the shared region 5,
    the transient one 7. Without recompute every region is held through the loss; with it each
    layer keeps only its routing decisions, and holds all of its own again in its backward (and,
    for the last layer, in its forward, beside the transient region)."""
    moe = mm.MoEBuffers(held={None: 5, 1: 10, 2: 20}, kept={1: 2, 2: 3}, transient_region=7)
    assert moe.through_loss(False) == 35 and moe.through_loss(True) == 5 + 2 + 3
    assert moe.in_last_forward(False) == 35 + 7 and moe.in_last_forward(True) == 5 + 2 + 20 + 7
    assert moe.held_through(2, False) == 35 and moe.held_through(2, True) == 5 + 2 + 20
    assert moe.held_through(1, True) == 5 + 10 and moe.held_through(1, False) == 15


def test_allocator_headroom_is_what_the_recorded_gpu_runs_show():
    """ALLOCATOR_HEADROOM against the GPU runs kept in bench/results (bench/memory.py --cap, one
    H200, expandable segments): above every cap a run of that recompute setting ran out of memory
    under, and for every setting a recorded run that went through at exactly today's factor."""
    import json
    results = ROOT / "bench" / "results"
    failed_under: dict[str, list[float]] = {}
    for path in sorted((results / "memory_cap").glob("cap_expandable_*.json")):
        cap = float(path.stem.rsplit("_", 1)[1])
        for row in json.loads(path.read_text())["variants"]:
            if "OutOfMemoryError" in row.get("error", ""):
                failed_under.setdefault(row["recompute"], []).append(cap)
    old = {"none": 1.05, "moe": 1.15, "full": 1.15}      # the headroom needs_old_headroom.json ran with
    for row in json.loads((results / "memory_round6" / "needs_old_headroom.json").read_text())["variants"]:
        if "OutOfMemoryError" in row.get("error", ""):
            failed_under.setdefault(row["recompute"], []).append(old[row["recompute"]])
    assert failed_under, "no recorded out-of-memory run: the evidence is missing"
    for recompute, caps in failed_under.items():
        assert mm.ALLOCATOR_HEADROOM[recompute] > max(caps), (recompute, caps)
    ran_at = {}
    for path in (results / "memory_round6").glob("*_needs.json"):
        for row in json.loads(path.read_text())["variants"]:
            if "error" not in row and row.get("cap") == "needs":
                ran_at.setdefault(row["recompute"], set()).add(round(row["needs_bytes"] / row["predicted_bytes"], 3))
    for recompute, factor in mm.ALLOCATOR_HEADROOM.items():
        assert round(factor, 3) in ran_at.get(recompute, ()), (recompute, factor, ran_at)
