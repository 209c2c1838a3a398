"""Rewrite each MoE node into route · count · exchange counts · layout · dispatch ·
expert FFN · combine · weighted sum (+ shared expert), on static shapes.

Before: `mlp = call_module[layers.3.mlp](x)` (the reference dropless MoE, one node).
After (torch backend), per layer, every buffer sized by the capacity budget:

    x_flat   [T, H]          reshape
    route    ([T, K], [T, K]) call_module router          (top-k slots and weights)
    count    [E]             echo::count                   (scatter_add, not bincount)
    load     router.load += count                          (aux-loss-free bias statistics)
    counts   [ep, E]         echo::all_gather_counts       (EP group)
    layout   6 index maps    echo::layout                  (send rows, receive rows, offsets)
    dispatch [R, H]          echo::dispatch                (all_to_all, equal [ep·C] chunks)
    ffn      [R, H]          expert_ffn                    (grouped GEMM, device offsets)
    combine  [T·K, H]        echo::combine                 (all_to_all back)
    routed   [T, H]          weighted_sum                  (router weights)
    + shared expert, reshape back

Every inserted node carries its layer in `node.meta` (passes/layer_builder.py).
The graph's output becomes (logits, moe_stats [num_moe_layers, 4], moe_counts
[num_moe_layers, ep, E]): per layer (dropped copies, rows received, rows sent,
clones) on this rank, and the EP group's routing counts (for --record-routing).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from echoc.errors import EchocError, MissingDependencyError
from echoc.spec import Spec
from passes.layer_builder import LayerBuilder
from passes.manager import PassResult
from runtime import grouped_gemm, ops  # noqa: F401  (the op modules bind the contracts used below)
from runtime.backends import sync  # noqa: F401
from runtime.contracts import (ALL_GATHER_COUNTS, COMBINE, COUNT, DISPATCH, EXPERT_FFN, LAYER_STATS, LAYOUT,
                               SYNC_COMBINE, SYNC_DISPATCH, SYNC_LAYOUT, WEIGHTED_SUM)
from runtime.model import MoE

MOE_STATS, MOE_COUNTS = "moe_stats", "moe_counts"    # the graph outputs this pass appends


@dataclass
class LayerDispatch:
    name: str
    tokens: int
    top_k: int
    slots_per_rank: int
    chunk_rows: int
    receive_rows: int


@dataclass
class DispatchInfo:
    backend: str
    layers: list[LayerDispatch] = field(default_factory=list)


def check_backend(spec: Spec) -> None:
    """Fail early, with what to install, for backends echoc cannot drive here."""
    name = spec.backends.dispatch
    if name == "deepep":
        try:
            import deep_ep  # noqa: F401
        except ImportError:
            raise MissingDependencyError("backends.dispatch 'deepep'", "pip install 'echoc[deepep]'  (deep-ep)") from None
        raise EchocError("backends.dispatch 'deepep': DeepEP is installed but echoc does not drive it yet; "
                         "use 'torch' (sync-free) or 'sync' (baseline)")
    if name == "symm_mem":
        raise EchocError("backends.dispatch 'symm_mem' is not implemented yet; use 'torch' (sync-free) or 'sync'")


def moe_nodes(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), MoE)]


def layer_index(module_path: str, ordinal: int) -> int:
    """The MoE block's transformer layer: the index of its entry in the model's layer list, the
    first numeric component of its module path (`layers.3.mlp` → 3, as nn.ModuleList names its
    entries); `ordinal` (its rank among the MoE blocks) when no list holds it."""
    return next((int(p) for p in module_path.split(".") if p.isdigit()), ordinal)


def _exchange(b: LayerBuilder, spec: Spec, x_flat: Node, slot: Node, counts: Node, counts_all: Node):
    """layout + dispatch: (the layout's outputs by name, expert-sorted rows, the matching combine)."""
    L, K, C = spec.experts_per_rank, spec.model.moe.top_k, spec.peer_chunk_rows
    common = dict(dest_slot=slot, counts=counts, counts_all=counts_all, slots_per_rank=L, group="ep")
    if spec.backends.dispatch == "sync":
        layout_c, dispatch_c, combine_c, lay = SYNC_LAYOUT, SYNC_DISPATCH, SYNC_COMBINE, {}
    else:
        layout_c, dispatch_c, combine_c, lay = LAYOUT, DISPATCH, COMBINE, dict(chunk_rows=C)
    maps = dict(zip(layout_c.outputs, b.outputs(b.op("layout", layout_c, **common, **lay), layout_c)))
    moved = {n: maps[n] for n in dispatch_c.args if n in maps}     # the index maps (and the sync splits)
    rows = b.op("dispatch", dispatch_c, x=x_flat, top_k=K, group="ep", **moved)
    return maps, rows, lambda y: b.op("combine", combine_c, y=y, group="ep", **moved)


def _rewrite_layer(gm: GraphModule, node: Node, spec: Spec, layer: int) -> tuple[Node, Node, Node, LayerDispatch]:
    moe_name, (x,) = node.target, node.args       # MoE.forward(x)
    moe_cfg, ep = spec.model.moe, spec.parallel.ep
    b = LayerBuilder(gm.graph, moe_name.replace(".", "_"), layer)
    x_flat = b.method("x_flat", "reshape", x, (-1, spec.model.hidden_size))
    slot, weight = b.items(b.module("route", f"{moe_name}.router", x_flat), ["slot", "weight"])
    counts = b.op("count", COUNT, dest_slot=slot, n_slots=moe_cfg.num_experts)
    b.method("load_add", "add_", b.attr("load", f"{moe_name}.router.load"), counts)
    counts_all = b.op("counts_all", ALL_GATHER_COUNTS, counts=counts, group="ep", group_size=ep)
    maps, rows, combine = _exchange(b, spec, x_flat, slot, counts, counts_all)
    y = b.op("expert_ffn", EXPERT_FFN, rows=rows, w13=b.attr("w13", f"{moe_name}.experts.w13"),
             w2=b.attr("w2", f"{moe_name}.experts.w2"), offs=maps["offs"], impl=spec.backends.grouped_gemm)
    out = b.op("routed", WEIGHTED_SUM, copies=combine(y), weights=weight)
    if gm.get_submodule(moe_name).shared is not None:
        out = b.fn("add_shared", operator.add, out, b.module("shared", f"{moe_name}.shared", x_flat))
    out = b.method("out", "view_as", out, x)
    stats = b.op("layer_stats", LAYER_STATS, stats=maps["stats"], spare_expert=None)
    info = LayerDispatch(moe_name, spec.budgets.tokens, moe_cfg.top_k, spec.experts_per_rank,
                         spec.peer_chunk_rows, ep * spec.peer_chunk_rows)
    return out, stats, counts_all, info


def _append_outputs(gm: GraphModule, stats: list[Node], counts: list[Node]) -> None:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        st = gm.graph.create_node("call_function", torch.stack, (stats,), {}, name=MOE_STATS)
        ct = gm.graph.create_node("call_function", torch.stack, (counts,), {}, name=MOE_COUNTS)
    (result,) = output.args
    output.args = ((result, st, ct),)


def run(gm: GraphModule, spec: Spec) -> PassResult:
    check_backend(spec)
    info = DispatchInfo(spec.backends.dispatch)
    stats, counts = [], []
    for ordinal, node in enumerate(moe_nodes(gm)):
        with gm.graph.inserting_before(node):
            out, layer_stats, layer_counts, layer = _rewrite_layer(
                gm, node, spec, layer_index(node.target, ordinal))
        node.replace_all_uses_with(out)
        gm.graph.erase_node(node)
        stats.append(layer_stats)
        counts.append(layer_counts)
        info.layers.append(layer)
    if stats:
        _append_outputs(gm, stats, counts)
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, info)
