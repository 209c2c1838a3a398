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
serves every layer.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from echoc.errors import EchocError
from echoc.spec import Spec
from passes.cost_model import clone_decision
from passes.manager import PassResult
from runtime import clone, grouped_gemm, ops  # noqa: F401  (clone registers echo:: ops)


@dataclass
class EchoInfo:
    enabled: bool
    spare_slots_per_rank: int = 0
    domain_ranks: int = 0
    offer: int = 0
    min_clone_rows: int = 0
    recompute: bool = False
    layers: list[str] = field(default_factory=list)
    reason: str = ""


def _users(node: Node, target) -> list[Node]:
    return [u for u in node.users if u.op == "call_function" and u.target is target]


def _getitem(node: Node, i: int) -> Node:
    return next(u for u in node.users if u.target is operator.getitem and u.args[1] == i)


def _node(g, name, target, *args):
    return g.create_node("call_function", target, args, {}, name=name)


def _op(g, name, target, *args):
    """An op whose last argument is its node name: its key in the planned arena."""
    node = _node(g, name, target, *args, name)
    assert node.name == name, f"node {name!r} was renamed to {node.name!r}"
    return node


def _rewrite(gm: GraphModule, layout: Node, spec: Spec, info: EchoInfo) -> None:
    g = gm.graph
    slot, counts, counts_all, El, C, group, layout_buf = layout.args
    S, ep = info.spare_slots_per_rank, spec.parallel.ep
    L = El + S
    p = layout.name.removesuffix("_layout")
    with g.inserting_before(layout):
        pl = _op(g, f"{p}_plan", torch.ops.echo.plan.default, counts_all, El, S, info.domain_ranks,
                 info.offer, info.min_clone_rows)
        spare = _node(g, f"{p}_spare_expert", operator.getitem, pl, 0)
        quota = _node(g, f"{p}_quota", operator.getitem, pl, 1)
        slots = _op(g, f"{p}_slots", torch.ops.echo.assign_slots.default, slot, counts_all, quota, El, S, group)
        s_counts = _op(g, f"{p}_slot_count", torch.ops.echo.count.default, slots, ep * L)
        s_all = _op(g, f"{p}_slot_counts_all", torch.ops.echo.all_gather_counts.default, s_counts, group, ep)
    layout.args = (slots, s_counts, s_all, L, C, group, layout_buf)
    offs = _getitem(layout, 4)
    ffn = _users(offs, grouped_gemm.expert_ffn)[0]
    rows, w13, w2, _, impl, ffn_buf = ffn.args
    if info.recompute:
        ffn.target = grouped_gemm.expert_ffn_recompute_clone
        ffn.args = (rows, w13, w2, offs, impl, counts_all, spare, info.offer, group, ffn_buf)
    else:
        with g.inserting_before(ffn):
            c13 = _op(g, f"{p}_clone_w13", torch.ops.echo.clone_weights.default, w13, counts_all, spare,
                      info.offer, "clone", group)
            c2 = _op(g, f"{p}_clone_w2", torch.ops.echo.clone_weights.default, w2, counts_all, spare,
                     info.offer, "clone", group)
        ffn.args = (rows, c13, c2, offs, impl, ffn_buf)
    stats = _users(_getitem(layout, 5), ops.layer_stats)[0]
    stats.args = (stats.args[0], stats.args[1], spare)
    info.layers.append(p)


def run(gm: GraphModule, spec: Spec) -> PassResult:
    e = spec.echo
    if not e.enabled:
        return PassResult(gm, EchoInfo(False, reason="echo.enabled is false"))
    if spec.backends.dispatch != "torch":
        raise EchocError(f"echo.enabled needs backends.dispatch 'torch' (got '{spec.backends.dispatch}')")
    decision = clone_decision(spec)
    info = EchoInfo(True, e.spare_slots_per_rank, decision.domain_ranks, e.spare_slots_per_rank,
                    decision.min_clone_rows, e.recompute_clone_dispatch, reason=decision.explain)
    for layout in [n for n in gm.graph.nodes if n.target is torch.ops.echo.layout.default]:
        _rewrite(gm, layout, spec, info)
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, info)
