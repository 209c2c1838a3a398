"""ECHO: clone hot experts onto spare slots, per MoE layer.

Runs after sync_free_dispatch. For each `echo::layout` node it inserts, between
the count exchange and the layout:

    plan      (spare_expert [ep, S], quota [E, 1+ep·S])   echo::plan
    slots     [T, K]                                      echo::assign_slots
    slot_count [ep·L], slot_counts_all [ep, ep·L]         echo::count, echo::all_gather_counts

rewires the layout to address `home + spare` slots (L = El + S per rank), and
replaces the expert FFN's weights by `echo::clone_weights` nodes whose backward is
the gradient reduction (clone gradients sent home and added to the main expert).
With `echo.recompute_clone_dispatch` the FFN node becomes `expert_ffn_recompute_clone`,
whose backward fetches the clone weights again instead of saving them, so between a
layer's forward and backward only home weights are alive and one spare-slot buffer
serves every layer. The new nodes carry their layer like the layout they serve
(passes/layer_builder.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch.fx import GraphModule, Node

from echoc.spec import Spec
from passes.cost_model import clone_decision
from passes.layer_builder import LayerBuilder, moe_block, moe_layer, output_node, user_of
from passes.manager import PassResult
from runtime import clone, contracts, grouped_gemm, ops  # noqa: F401  (the op modules bind the contracts)
from runtime.contracts import (ALL_GATHER_COUNTS, ASSIGN_SLOTS, CLONE_WEIGHTS, COUNT, EXPERT_FFN,
                               EXPERT_FFN_RECOMPUTE_CLONE, LAYER_STATS, PLAN, TOKEN_LAYOUTS)


@dataclass
class EchoInfo:
    enabled: bool
    spare_slots_per_rank: int = 0
    domain_ranks: int = 0
    offer: int = 0                 # experts each rank offers for cloning: min(spare slots, home experts)
    min_clone_rows: int = 0
    recompute: bool = False
    layers: list[str] = field(default_factory=list)
    reason: str = ""


def _plan_slots(b: LayerBuilder, layout: Node, ep: int, info: EchoInfo) -> tuple[Node, Node, Node, Node]:
    """plan → assign_slots → count → all_gather_counts, before the layout:
    (spare_expert, slots, slot counts, all ranks' slot counts)."""
    lay = contracts.of(layout.target).values(layout)
    El, S, group = lay["slots_per_rank"], info.spare_slots_per_rank, lay["group"]
    plan = b.op("plan", PLAN, counts_all=lay["counts_all"], experts_per_rank=El, spares=S,
                domain_size=info.domain_ranks, offer=info.offer, min_clone_rows=info.min_clone_rows)
    spare, quota = b.outputs(plan, PLAN)
    slots = b.op("slots", ASSIGN_SLOTS, topk_idx=lay["dest_slot"], counts_all=lay["counts_all"], quota=quota,
                 experts_per_rank=El, spares=S, group=group)
    s_counts = b.op("slot_count", COUNT, dest_slot=slots, n_slots=ep * (El + S))
    s_all = b.op("slot_counts_all", ALL_GATHER_COUNTS, counts=s_counts, group=group, group_size=ep)
    return spare, slots, s_counts, s_all


def _clone_ffn_weights(b: LayerBuilder, ffn: Node, counts_all: Node, spare: Node, info: EchoInfo, group: str) -> None:
    """The FFN computes on home + spare slots: its weights become clones (or, with recompute,
    the FFN clones them itself and again in backward)."""
    f = EXPERT_FFN.values(ffn)
    clone_args = dict(counts_all=counts_all, spare_expert=spare, offer=info.offer)
    if info.recompute:
        token = f.pop("wgrad")
        assert token is None, "with ECHO the weight gradients stay on the main stream (sync_free_dispatch.defer_wgrad)"
        ffn.target = contracts.target(EXPERT_FFN_RECOMPUTE_CLONE)
        ffn.args = EXPERT_FFN_RECOMPUTE_CLONE.call_args(**f, **clone_args, ep_group=group)
        return
    with b.graph.inserting_before(ffn):
        c13 = b.op("clone_w13", CLONE_WEIGHTS, w=f["w13"], group="clone", ep_group=group, **clone_args)
        c2 = b.op("clone_w2", CLONE_WEIGHTS, w=f["w2"], group="clone", ep_group=group, **clone_args)
    EXPERT_FFN.set_args(ffn, w13=c13, w2=c2)


def _rewrite(gm: GraphModule, layout: Node, spec: Spec, info: EchoInfo) -> None:
    b = LayerBuilder(gm.graph, moe_block(layout), moe_layer(layout))
    c = contracts.of(layout.target)              # the backend's layout (runtime/contracts.py TOKEN_LAYOUTS)
    counts_all = c.arg(layout, "counts_all")
    with gm.graph.inserting_before(layout):
        spare, slots, s_counts, s_all = _plan_slots(b, layout, spec.parallel.ep, info)
    L = c.arg(layout, "slots_per_rank") + info.spare_slots_per_rank
    c.set_args(layout, dest_slot=slots, counts=s_counts, counts_all=s_all, slots_per_rank=L)
    ffn = user_of(output_node(layout, c, "offs"), EXPERT_FFN)
    _clone_ffn_weights(b, ffn, counts_all, spare, info, c.arg(layout, "group"))
    LAYER_STATS.set_args(user_of(output_node(layout, c, "stats"), LAYER_STATS), spare_expert=spare)
    info.layers.append(b.block)


def run(gm: GraphModule, spec: Spec) -> PassResult:
    e = spec.echo
    if not e.enabled:
        return PassResult(gm, EchoInfo(False, reason="echo.enabled is false"))
    decision = clone_decision(spec)
    # a rank offers its `offer` hottest experts' weights: never more than the experts it holds
    offer = min(e.spare_slots_per_rank, spec.experts_per_rank)
    info = EchoInfo(True, e.spare_slots_per_rank, decision.domain_ranks, offer, decision.min_clone_rows,
                    e.recompute_clone_dispatch, reason=decision.explain)
    layouts = [n for n in gm.graph.nodes if contracts.of(n.target) in TOKEN_LAYOUTS]
    for layout in layouts:
        _rewrite(gm, layout, spec, info)
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, info)
