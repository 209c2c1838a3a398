"""The buffer plan: the allocator on random lifetimes (hypothesis), the pass on a small
compiled spec (with and without recompute_clone_dispatch), a golden plan, and the views.

Golden files live in tests/passes/golden/. When the plan changes on purpose, regenerate
them with `ECHOC_UPDATE_GOLDEN=1 pytest tests/passes/test_buffer_plan.py` and review the
diff before committing; never update them just to make the test pass.
"""
import json
import os
import re
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st
from rich.console import Console

from echoc import views
from echoc.compile import compile_graph, propagate_shapes
from echoc.errors import EchocError, MissingDependencyError
from passes import buffer_alloc as alloc
from passes import buffer_plan as bp
from passes.buffer_lifetimes import LAST_SUB
from passes.memory_plan import ALIGN_BYTES, ALLOCATOR, ARENA, Buffer, aligned
from runtime import contracts
from runtime.dtypes import torch_dtype
from runtime.model import meta_transformer
from runtime.parallel import shard_experts

GOLDEN = Path(__file__).parent / "golden"


# --- the allocator on random lifetimes ----------------------------------------------------------

def _overlap(a: Buffer, b: Buffer) -> bool:
    return any(s1 <= e2 and s2 <= e1 for s1, e1 in a.live for s2, e2 in b.live)


@st.composite
def buffer_sets(draw):
    n = draw(st.integers(1, 24))
    out = []
    for i in range(n):
        starts = sorted(draw(st.lists(st.integers(0, 40), min_size=1, max_size=3, unique=True)))
        live, at = [], -1
        for s in starts:                     # disjoint, sorted spans (like the shared spare buffer)
            if s <= at:
                continue
            e = draw(st.integers(s, min(s + 15, 60)))
            live.append((s, e))
            at = e + 1
        nbytes = draw(st.one_of(st.integers(0, 5000), st.sampled_from([256, 512, 4096, 65536])))
        out.append(Buffer(f"b{i}", None, "activation", (nbytes,), "uint8", nbytes, tuple(live)))
    if draw(st.booleans()) and n > 1:      # some buffers share a lifetime: one folded graph node
        out[-1].live = out[0].live
    return out


@settings(max_examples=150, deadline=None)
@given(buffer_sets())
def test_allocator_never_overlaps_live_buffers(buffers):
    g = alloc.allocate(buffers)
    assert all(b.offset % ALIGN_BYTES == 0 for b in buffers)
    pairs = 0
    for i, a in enumerate(buffers):
        for b in buffers[i + 1:]:
            if _overlap(a, b):
                pairs += 1
                if a.nbytes and b.nbytes:
                    assert a.offset + a.nbytes <= b.offset or b.offset + b.nbytes <= a.offset, (a, b)
    assert alloc.interfering_pairs(g) == pairs
    lower, _ = alloc.lower_bound(buffers)
    naive = sum(aligned(b.nbytes) for b in buffers)
    assert lower <= alloc.arena_bytes(buffers) <= naive


def test_disjoint_lifetimes_share_bytes_and_the_bound_is_tight():
    bufs = [Buffer("a", None, "x", (1000,), "uint8", 1000, ((0, 3),)),
            Buffer("b", None, "x", (1000,), "uint8", 1000, ((4, 9),)),
            Buffer("c", None, "x", (300,), "uint8", 300, ((2, 5),))]
    alloc.allocate(bufs)
    assert bufs[0].offset == bufs[1].offset == 0 and bufs[2].offset == 1024
    assert alloc.arena_bytes(bufs) == alloc.lower_bound(bufs)[0] == 1024 + 512


# --- the pass on a small compiled spec ------------------------------------------------------------

def small(dtype="float32", recompute=False, echo=True, dispatch="torch") -> dict:
    """Overrides of the tiny spec: 3 layers (1 dense, 2 MoE), H=16, 8 experts over ep=2."""
    return {"model.name": "bp", "model.vocab_size": 32, "model.hidden_size": 16, "model.num_layers": 3,
            "model.first_dense_layers": 1, "model.dense_intermediate_size": 32, "model.dtype": dtype,
            "model.attention.num_heads": 2, "model.attention.num_kv_heads": 1, "model.attention.head_dim": 8,
            "model.moe.num_experts": 8, "model.moe.top_k": 2, "model.moe.expert_intermediate_size": 8,
            "model.moe.shared_experts": 1, "budgets.seq_len": 8, "budgets.micro_batch": 2,
            "budgets.received_token_capacity": 1.5, "budgets.row_alignment": 4, "echo.enabled": echo,
            "echo.spare_slots_per_rank": 1, "echo.recompute_clone_dispatch": recompute,
            "backends.dispatch": dispatch}


def compiled(spec):
    model = meta_transformer(spec.model, torch_dtype(spec.model.dtype))
    shard_experts(model, 0, spec.parallel.ep)
    gm, _ = compile_graph(model, spec)
    propagate_shapes(gm, spec)
    return gm


_PLANS: dict = {}


@pytest.fixture
def planned(make_spec):
    """planned(dtype, recompute, echo) → (spec, MemoryPlan) of the small spec, computed once per session."""
    def get(dtype="float32", recompute=False, echo=True):
        key = (dtype, recompute, echo)
        if key not in _PLANS:
            spec = make_spec(small(dtype, recompute, echo))
            gm = compiled(spec)
            res = bp.run(gm, spec)
            assert res.gm is gm
            _PLANS[key] = spec, res.info, gm
        return _PLANS[key][:2]
    return get


def _by_name(plan):
    return {b.name: b for b in plan.buffers}


def test_recompute_keeps_one_spare_slot_buffer_for_all_layers(planned):
    _, rc = planned(recompute=True)
    _, no = planned(recompute=False)
    spare_rc = [b for b in rc.buffers if b.role == "clone_weights"]
    spare_no = [b for b in no.buffers if b.role == "clone_weights"]
    assert [b.name for b in spare_rc] == ["spare_weights"] and spare_rc[0].layer is None
    assert sorted(b.layer for b in spare_no) == [1, 2]
    # live only around each use: the FFN step of each layer, forward and backward
    assert len(spare_rc[0].live) == 4 and all(e - s == LAST_SUB for s, e in spare_rc[0].live)
    assert spare_rc[0].nbytes == spare_no[0].nbytes     # El + S slots of w13 and w2 either way
    (p13, p2) = spare_rc[0].parts
    assert p13.shape == (4 + 1, 16, 16) and p2.shape == (4 + 1, 8, 16)


def test_shapes_follow_the_spec_and_lifetimes_follow_autograd(planned):
    spec, plan = planned(dtype="bfloat16")
    b, tl = _by_name(plan), plan.timeline
    R, H, F = spec.receive_rows, spec.model.hidden_size, spec.model.moe.expert_intermediate_size
    TK = spec.budgets.tokens * spec.model.moe.top_k
    p = "layers_1_mlp_"
    assert b[p + "dispatch"].shape == (R, H) and b[p + "dispatch.send"].shape == (R, H)
    assert b[p + "combine"].shape == (TK, H) and b[p + "expert_ffn.h13"].shape == (R, 2 * F)
    assert p + "routed.copies_f32" not in b                          # weighted_sum (bmm) saves no fp32 copy
    in_fwd = lambda x: tl.forward[0] <= x.first and x.last <= tl.forward[1]     # noqa: E731
    in_bwd = lambda x: tl.backward[0] <= x.first and x.last <= tl.backward[1]   # noqa: E731
    saved = [p + "dispatch", p + "expert_ffn.h13", p + "sorted_src", p + "offs", p + "clone_weights"]
    assert all(b[n].first <= tl.forward[1] < b[n].last for n in saved)
    send, recv, rows = b[p + "dispatch.send"], b[p + "dispatch.recv"], b[p + "dispatch"]
    # sub-steps of a token movement: gather into send, exchange into recv, gather into the result
    assert in_fwd(send) and (send.first + 1, send.last + 1) == (recv.first, recv.last) == (recv.first, rows.first)
    assert send.last < rows.first                                     # so the result may reuse send's bytes
    assert in_bwd(b[p + "dispatch.bwd.send"]) and in_bwd(b[p + "clone_weights.grad"])
    assert b[p + "combine"].last > tl.forward[1] and in_fwd(b[p + "expert_ffn"])  # copies saved, FFN out not
    assert b["moe_stats"].last == tl.optimizer
    # the backward mirrors the forward: the dispatch's index maps outlive the FFN's saved rows
    assert b[p + "sorted_src"].last > b[p + "dispatch"].last


def test_plan_totals_and_fp32_copies(planned):
    spec, plan = planned()
    b = _by_name(plan)
    assert "layers_1_mlp_routed.copies_f32" not in b and b["layers_1_mlp_combine"].last > plan.timeline.forward[1]
    assert plan.lower_bound_bytes <= plan.arena_bytes <= plan.naive_bytes
    assert plan.interfering_pairs >= plan.interference_edges > 0
    assert plan.ranks == "all" and str(spec.cluster.world_size) in plan.note


def test_placement_grouped_mm_products_come_from_the_allocator_the_rest_from_the_arena(planned):
    for recompute in (False, True):
        _, plan = planned(recompute=recompute)
        b = _by_name(plan)
        p = "layers_1_mlp_"
        alloc = {n for n, x in b.items() if x.placement == ALLOCATOR}
        # grouped_mm has no out= variant: its products; torch.stack makes the graph outputs
        assert {p + "expert_ffn", p + "expert_ffn.h13", p + "expert_ffn.bwd.grad_act", p + "dispatch.grad",
                p + "clone_weights.grad", "moe_stats", "moe_counts"} <= alloc
        assert all(n.startswith(("layers_", "moe_")) for n in alloc)
        assert all(x.offset is None and not x.keys for x in b.values() if x.placement == ALLOCATOR)
        assert b[p + "expert_ffn.grad"].keys == (p + "combine.bwd.grad_in",)   # combine's backward writes it
        assert b[p + "combine.grad"].keys == (p + "routed.bwd.grad_in",)       # weighted_sum's backward
        assert b[p + "send_copy"].keys == (p + "layout[0]",) and b[p + "stats"].keys == (p + "layout[5]",)
        layout = bp.arena_layout(plan)
        assert layout.nbytes == plan.arena_bytes >= plan.lower_bound_bytes
        assert plan.total_lower_bound_bytes >= max(plan.lower_bound_bytes, plan.allocator_lower_bound_bytes)
        assert all(v.offset_bytes + v.nbytes <= layout.nbytes for v in layout.views.values())
    spare = _by_name(plan)["spare_weights"]   # recompute: every layer's clones, forward and again in backward
    assert spare.parts[0].keys == tuple(f"layers_{i}_mlp_expert_ffn.clone_w13{t}" for i in (1, 2)
                                        for t in ("", ".recompute"))
    assert {layout.views[k].offset_bytes for k in spare.parts[0].keys} == {spare.offset}


def test_the_loop_fallback_is_not_planned_inside_the_ffn(make_spec):
    spec = make_spec(small(echo=False) | {"backends.grouped_gemm": "loop"})
    b = _by_name(bp.run(compiled(spec), spec).info)
    assert b["layers_1_mlp_expert_ffn.act"].placement == ALLOCATOR
    assert b["layers_1_mlp_dispatch"].placement == ARENA


def test_non_static_backends_are_not_planned(make_spec):
    plan = bp.plan_buffers(None, make_spec(small(echo=False, dispatch="sync")))
    assert not plan.planned and "sync" in plan.reason
    assert bp.plan_to_json(plan)["planned"] is False


def test_layers_come_from_node_metadata_not_names(planned):
    """The plan's layers are node metadata: shifting the metadata shifts them, names unchanged."""
    spec, plan = planned()
    gm = _PLANS[("float32", False, True)][2]
    renamed = {}
    for node in gm.graph.nodes:
        if node.meta.get("moe_layer") is not None:
            renamed[node] = node.meta["moe_layer"]
    assert sorted(set(renamed.values())) == [1, 2]
    by_layer = {b.layer for b in plan.buffers}
    assert by_layer == {None, 1, 2}
    for node, layer in renamed.items():
        node.meta["moe_layer"] = layer + 10
    try:
        shifted = bp.run(gm, spec).info
    finally:
        for node, layer in renamed.items():
            node.meta["moe_layer"] = layer
    assert [b.layer for b in shifted.buffers] == [None if b.layer is None else b.layer + 10 for b in plan.buffers]


def test_every_arena_key_is_declared_by_its_nodes_contract(planned):
    """Keys are `node`, `node[i]`, `node.<part>` or the keys of an op called at a part, all
    declared by the node's contract (runtime/contracts.py); a misspelt key fails here."""
    for recompute in (False, True):
        spec, plan = planned(recompute=recompute)
        gm = _PLANS[("float32", recompute, True)][2]
        by_name = {n.name: contracts.of(n.target) for n in gm.graph.nodes}
        keys = bp.arena_layout(plan).views
        assert len(keys) > 40
        for key in keys:
            name = re.match(r"[^.\[]+", key).group(0)
            c = by_name[name]
            assert c is not None and c.owns(name, key), key
    assert contracts.COMBINE.owns("x", "x.bwd.grad_in") and not contracts.DISPATCH.owns("x", "x.bwd.grad_in")


@pytest.mark.parametrize("name,kwargs", [("plan_bf16_echo", dict(dtype="bfloat16")),
                                         ("plan_fp32_echo_recompute", dict(recompute=True))])
def test_golden_plan(name, kwargs, planned):
    """Pins plan.json of the small spec. Regenerate deliberately: ECHOC_UPDATE_GOLDEN=1."""
    got = json.loads(json.dumps(bp.plan_to_json(planned(**kwargs)[1])))
    path = GOLDEN / f"{name}.json"
    if os.environ.get("ECHOC_UPDATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(path.read_text())
    assert got["totals"] == want["totals"], "plan totals changed (ECHOC_UPDATE_GOLDEN=1 to accept, then review)"
    for g, w in zip(got["buffers"], want["buffers"]):
        assert g == w, f"buffer {w['name']} changed"
    assert got == want


# --- views ------------------------------------------------------------------------------------------

def test_buffers_table_sorts_by_size_and_layer(planned):
    plan = bp.plan_to_json(planned()[1])
    console = Console(record=True, width=220)
    by_size = views.buffers_table(plan, "size", console)
    by_layer = views.buffers_table(plan, "layer", limit=5)
    sizes = [b["bytes"] for b in plan["buffers"]]
    assert by_size.row_count == len(sizes) and by_layer.row_count == 6
    text = console.export_text()
    assert "lower bound" in text and "[ep·C]" in text                    # markup escaped
    biggest = min(plan["buffers"], key=lambda b: (-b["bytes"], b["name"]))["name"]
    assert text.index(biggest) < text.index("moe_stats")
    with pytest.raises(EchocError, match="sort"):
        views.buffers_table(plan, "offset")


def test_timeline_png(tmp_path, monkeypatch, planned):
    plan = bp.plan_to_json(planned(recompute=True)[1])
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(MissingDependencyError, match=r"echoc\[plot\]"):
            views.timeline_png(plan, tmp_path / "t.png")
        return
    out = views.timeline_png(plan, tmp_path / "t.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(MissingDependencyError, match=r"echoc\[plot\]"):
        views.timeline_png(plan, tmp_path / "u.png")


def test_graph_listing_filters_by_layer_and_op():
    text = ("layers_1_mlp_dispatch  call_function echo.dispatch  f32[8, 4]  (x)\n"
            "layers_1_mlp_route     call_module   layers.1.mlp.router  (i64[2], f32[2])  (x)\n"
            "layers_12_mlp_dispatch call_function echo.dispatch  f32[8, 4]  (x)\n"
            "embed                  call_module   embed  f32[2]  (tokens)\n")
    assert views.graph_listing(text, layer=1).count("\n") == 2
    assert views.graph_listing(text, layer="layers.12.mlp").startswith("layers_12_mlp_dispatch")
    assert views.graph_listing(text, op="echo.dispatch").count("\n") == 2
    assert views.graph_listing(text, layer=1, op="call_module").startswith("layers_1_mlp_route")
    assert views.graph_listing(text, layer=5) == ""


@pytest.mark.parametrize("kwargs", [{}, dict(recompute=True)])
def test_buffers_saved_across_the_boundary_sit_in_their_layers_held_region(planned, kwargs):
    """Below held_bytes: exactly the arena buffers live at the last forward step and the first
    backward step, each inside the held region of its own layer and kind (per layer its routing
    decisions, then its other saved buffers; regions in layer order, back to back); every other
    arena buffer sits above, in the transient region the runtime gives back while the loss
    runs. No two interfering buffers overlap."""
    _, plan = planned(**kwargs)
    fwd_end = plan.timeline.forward[1]
    placed = [b for b in plan.buffers if b.placement == ARENA and b.nbytes]
    saved = [b for b in placed if b.crosses(fwd_end)]
    others = [b for b in placed if b not in saved]
    assert saved and others
    regions = {(r.layer, r.kept): (r.lo, r.hi) for r in plan.held_regions}
    assert len(regions) == len(plan.held_regions) > 1
    assert [r.lo for r in plan.held_regions] == [0] + [r.hi for r in plan.held_regions[:-1]]
    assert [(r.layer, not r.kept) for r in plan.held_regions] == sorted((r.layer, not r.kept) for r in plan.held_regions)
    assert plan.held_regions[-1].hi == plan.held_bytes < plan.arena_bytes
    assert any(r.kept for r in plan.held_regions) and any(not r.kept for r in plan.held_regions)
    for b in saved:
        lo, hi = regions[b.layer, b.kept]
        assert lo <= b.offset and b.offset + b.nbytes <= hi, b.name
    assert all(b.offset >= plan.held_bytes for b in others)
    for i, a in enumerate(placed):
        for c in placed[i + 1:]:
            if _overlap(a, c):
                assert a.offset + a.nbytes <= c.offset or c.offset + c.nbytes <= a.offset, (a.name, c.name)


def test_routing_decisions_live_until_their_own_backward(planned):
    """A recomputed region keeps count, the counts all-gather and the layout maps from its forward
    and replays them in backward, so their bytes are planned live until their op's backward
    step (past the boundary), whatever recompute policy the compile later picks."""
    _, plan = planned()
    fwd_end = plan.timeline.forward[1]
    b = _by_name(plan)
    for name in ("layers_1_mlp_count", "layers_1_mlp_counts_all"):
        assert b[name].crosses(fwd_end) and b[name].kept, name


def test_at_ep_1_a_movements_backward_reads_its_gradient_until_its_one_gather(make_spec):
    """At ep 1 combine's backward is one gather from the gradient of its output straight into the
    gradient of the FFN's output (no send/recv in between): the two are live at once and must
    not share bytes (they did, and the ep 1 oracle caught it: a wrong mlp_norm gradient)."""
    from echoc.compile import compile_build
    plan = compile_build(make_spec({"parallel.ep": 1, "cluster.gpus_per_node": 1})).memory_plan
    b = _by_name(plan)
    src, dst = b["layers_1_mlp_combine.grad"], b["layers_1_mlp_expert_ffn.grad"]
    assert src.placement == dst.placement == ARENA
    assert _overlap(src, dst), (src.live, dst.live)
    assert src.offset + src.nbytes <= dst.offset or dst.offset + dst.nbytes <= src.offset
