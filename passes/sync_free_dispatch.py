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

Under backends.exchange 'p2p' at ep > 1 (runtime/p2p_moves.py: one row per token and rank) the
dispatch carries the router weights, and combine and the weighted sum are one node:

    dispatch (rows [R, H], row_weight [R], routes)   echo::dispatch_weighted
    routed   [T, H]                                  echo::combine_weighted (reads row_weight, routes)

The shared expert is queued right after x_flat, on a side CUDA stream (runtime/streams.py,
`backends.shared_expert_overlap`), and joined before the add, so its GEMMs overlap the
routed path's small kernels. The expert FFN's weight gradients run on a third stream in
backward (`backends.wgrad_overlap`): `wgrad_fork` after x_flat hands a token to the FFN, and its
backward joins them back (runtime/streams.py).

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
from runtime import grouped_gemm, ops, p2p_moves, streams  # noqa: F401  (the op modules bind the contracts used below)
from runtime.backends import base, deepep, symm_mem, sync  # noqa: F401
from runtime.contracts import (ALL_GATHER_COUNTS, COMBINE, COUNT, DEEPEP_COMBINE, DEEPEP_DISPATCH, DEEPEP_LAYOUT,
                               DISPATCH, EXPERT_FFN, LAYER_STATS, LAYOUT, P2P_COMBINE, P2P_DISPATCH, SYMM_COMBINE,
                               SYMM_DISPATCH,
                               SYMM_LAYOUT, SYNC_COMBINE, SYNC_DISPATCH, SYNC_LAYOUT, WEIGHTED_SUM)
from runtime.model import MoE

MOE_STATS, MOE_COUNTS = "moe_stats", "moe_counts"    # the graph outputs this pass appends
FFN_NODE = "expert_ffn"                             # the expert FFN's node name in its block (its arena key)


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
    """Fail early, with what to do, for backends echoc cannot drive with this spec or install."""
    name = spec.backends.dispatch
    if name == "deepep" and base.installed("deepep") is None and not deepep.available():
        raise MissingDependencyError("backends.dispatch 'deepep' (DeepEP HybridEP)", deepep.BUILD_HINT)
    if name == "symm_mem":
        ep, slots = spec.parallel.ep, spec.experts_per_rank + (spec.echo.spare_slots_per_rank if spec.echo.enabled else 0)
        if ep > symm_mem.MAX_RANKS or slots > symm_mem.MAX_SLOTS:
            raise EchocError(f"backends.dispatch 'symm_mem': all_to_all_vdev_2d takes ≤ {symm_mem.MAX_RANKS} EP ranks "
                             f"and ≤ {symm_mem.MAX_SLOTS} expert slots per rank; this spec has ep {ep} and {slots} "
                             "slots per rank (home + spare): raise parallel.ep or use 'deepep' / 'torch'")


def moe_nodes(gm: GraphModule) -> list[Node]:
    return [n for n in gm.graph.nodes
            if n.op == "call_module" and isinstance(gm.get_submodule(n.target), MoE)]


def layer_index(module_path: str, ordinal: int) -> int:
    """The MoE block's transformer layer: the index of its entry in the model's layer list, the
    first numeric component of its module path (`layers.3.mlp` → 3, as nn.ModuleList names its
    entries); `ordinal` (its rank among the MoE blocks) when no list holds it."""
    return next((int(p) for p in module_path.split(".") if p.isdigit()), ordinal)


def _exchange(b: LayerBuilder, spec: Spec, x_flat: Node, slot: Node, counts: Node, counts_all: Node):
    """The layout, then (the layout's outputs by name, dispatch(weight) → the rows the experts read,
    finish(y, weight) → the routed output [T, H]: combine and weighted sum)."""
    be, L, K, C, A = spec.backends.dispatch, spec.experts_per_rank, spec.model.moe.top_k, spec.peer_chunk_rows, \
        spec.budgets.row_alignment
    common = dict(dest_slot=slot, counts=counts, counts_all=counts_all, slots_per_rank=L, group="ep")
    if be == "deepep":
        return _deepep_exchange(b, spec, x_flat, common)
    if be == "torch" and spec.token_exchange == "p2p" and spec.parallel.ep > 1:
        return _p2p_exchange(b, spec, x_flat, common)
    layout_c, dispatch_c, combine_c, lay, extra = {
        "sync": (SYNC_LAYOUT, SYNC_DISPATCH, SYNC_COMBINE, {}, {}),
        "symm_mem": (SYMM_LAYOUT, SYMM_DISPATCH, SYMM_COMBINE, dict(chunk_rows=C, major_align=A), dict(major_align=A)),
    }.get(be, (LAYOUT, DISPATCH, COMBINE, dict(chunk_rows=C), {}))
    maps = dict(zip(layout_c.outputs, b.outputs(b.op("layout", layout_c, **common, **lay), layout_c)))
    moved = {n: maps[n] for n in dispatch_c.args if n in maps}     # the index maps (and the sync splits)

    def dispatch(weight: Node) -> Node:
        return b.op("dispatch", dispatch_c, x=x_flat, top_k=K, group="ep", **moved, **extra)

    def finish(y: Node, weight: Node) -> Node:
        copies = b.op("combine", combine_c, y=y, group="ep", **moved, **extra)
        return b.op("routed", WEIGHTED_SUM, copies=copies, weights=weight)
    return maps, dispatch, finish


def _p2p_exchange(b: LayerBuilder, spec: Spec, x_flat: Node, common: dict):
    """`torch` under backends.exchange 'p2p': the router weights and the maps cross with the rows;
    combine_weighted reads them (row_weight, routes) and returns one summed row per token and rank."""
    K, ep = spec.model.moe.top_k, spec.parallel.ep
    maps = dict(zip(LAYOUT.outputs, b.outputs(b.op("layout", LAYOUT, **common, chunk_rows=spec.peer_chunk_rows),
                                              LAYOUT)))
    moved = {n: maps[n] for n in P2P_DISPATCH.args if n in maps}
    holder = {}

    def dispatch(weight: Node) -> Node:
        node = b.op("dispatch", P2P_DISPATCH, x=x_flat, weights=weight, top_k=K, group="ep", group_size=ep, **moved)
        holder.update(zip(P2P_DISPATCH.outputs, b.outputs(node, P2P_DISPATCH)))
        return holder["rows"]

    def finish(y: Node, weight: Node) -> Node:
        return b.op("routed", P2P_COMBINE, y=y, row_weight=holder["row_weight"], routes=holder["routes"],
                    copy_slot=maps["copy_slot"], top_k=K, group="ep")
    return maps, dispatch, finish


def _deepep_exchange(b: LayerBuilder, spec: Spec, x_flat: Node, common: dict):
    """HybridEP: the router weights travel with the rows (one per permuted row), the expert
    outputs are weighted on the expert side and combine sums each token's rows."""
    P, C = spec.budgets.row_alignment, spec.peer_chunk_rows
    lay = b.op("layout", DEEPEP_LAYOUT, **common, chunk_rows=C, pad_multiple=P)
    maps = dict(zip(DEEPEP_LAYOUT.outputs, b.outputs(lay, DEEPEP_LAYOUT)))
    moved = dict(routing_map=maps["routing_map"], kept_slot=maps["kept_slot"])
    permuted = receive_rows(spec)                  # with ECHO's spare slots: the layout's L after echo_clone
    holder = {}

    def dispatch(weight: Node) -> Node:
        node = b.op("dispatch", DEEPEP_DISPATCH, x=x_flat, weights=weight, permuted_rows=permuted, pad_multiple=P,
                    group="ep", **moved)
        holder["rows"], holder["row_weight"] = b.outputs(node, DEEPEP_DISPATCH)
        return holder["rows"]

    def finish(y: Node, weight: Node) -> Node:
        scaled = b.fn("weigh_rows", deepep.weigh_rows, y, holder["row_weight"])
        return b.op("routed", DEEPEP_COMBINE, y=scaled, handle=f"{b.block}_dispatch", tokens=spec.budgets.tokens,
                    group="ep")
    return maps, dispatch, finish


def _rewrite_layer(gm: GraphModule, node: Node, spec: Spec, layer: int) -> tuple[Node, Node, Node, LayerDispatch]:
    moe_name, (x,) = node.target, node.args       # MoE.forward(x)
    moe_cfg, ep = spec.model.moe, spec.parallel.ep
    b = LayerBuilder(gm.graph, moe_name.replace(".", "_"), layer)
    x_flat = b.method("x_flat", "reshape", x, (-1, spec.model.hidden_size))
    token = None
    if defer_wgrad(spec):
        x_flat, token = b.items(b.fn("wgrad_fork", streams.wgrad_fork, x_flat, f"{b.block}_{FFN_NODE}"),
                                ["x_in", "wgrad_token"])
    shared = _shared_expert(gm, b, spec, moe_name, x_flat)
    slot, weight = b.items(b.module("route", f"{moe_name}.router", x_flat), ["slot", "weight"])
    counts = b.op("count", COUNT, dest_slot=slot, n_slots=moe_cfg.num_experts)
    b.method("load_add", "add_", b.attr("load", f"{moe_name}.router.load"), counts)
    counts_all = b.op("counts_all", ALL_GATHER_COUNTS, counts=counts, group="ep", group_size=ep)
    maps, dispatch, finish = _exchange(b, spec, x_flat, slot, counts, counts_all)
    y = b.op(FFN_NODE, EXPERT_FFN, rows=dispatch(weight), w13=b.attr("w13", f"{moe_name}.experts.w13"),
             w2=b.attr("w2", f"{moe_name}.experts.w2"), offs=maps["offs"], impl=spec.backends.grouped_gemm,
             wgrad=token)
    out = finish(y, weight)
    if gm.get_submodule(moe_name).shared is not None:
        if shared is None:
            shared = b.module("shared", f"{moe_name}.shared", x_flat)
        elif overlap_shared(spec):
            shared = b.fn("shared_join", streams.side_join, shared)
        out = b.fn("add_shared", operator.add, out, shared)
    out = b.method("out", "view_as", out, x)
    stats = b.op("layer_stats", LAYER_STATS, stats=maps["stats"], spare_expert=None)
    info = LayerDispatch(moe_name, spec.budgets.tokens, moe_cfg.top_k, spec.experts_per_rank,
                         spec.peer_chunk_rows, receive_rows(spec))
    return out, stats, counts_all, info


def overlap_shared(spec: Spec) -> bool:
    """Whether the shared expert runs on a side stream (runtime/streams.py): on CUDA only (a CPU
    graph keeps the reference's op order, so its rounding is unchanged), and not at ZeRO 3 (its
    weights are gathered, and in backward gathered again, by collectives, which must stay on
    the main stream in one order on every rank)."""
    return spec.backends.shared_expert_overlap and spec.cluster.device == "cuda" and spec.parallel.zero < 3


def defer_wgrad(spec: Spec) -> bool:
    """Whether each expert FFN's weight gradients run on a stream of their own, beside the layer's
    dispatch backward (runtime/streams.py); wgrad_inline_reason says why not. On CPU the same
    nodes run on the one stream, with the same arithmetic, so the CPU oracle checks the fork and
    the stash, and the arena tests' late-read check (streams.CHECK_LATE_READS) the plan's lifetimes."""
    return wgrad_inline_reason(spec) is None


def wgrad_inline_reason(spec: Spec) -> str | None:
    """Why the expert weight gradients stay inside the FFN's backward, on the main stream (None:
    they do not). Where they feed collectives on the main stream (ZeRO 3's reduce-scatters, the
    ECHO clones' gradient reduction, queued before the dispatch's backward), the main stream
    would wait for them there and nothing would overlap."""
    if not spec.backends.wgrad_overlap:
        return "backends.wgrad_overlap is false"
    if grouped_gemm.resolved_impl(spec.backends.grouped_gemm) != "torch":
        return "the loop FFN"
    if spec.parallel.zero >= 3:
        return "parallel.zero 3: they feed its reduce-scatters"
    if spec.echo.enabled:
        return "ECHO: the clones send them home by collectives"
    return None


def _shared_expert(gm: GraphModule, b: LayerBuilder, spec: Spec, moe_name: str, x_flat: Node) -> Node | None:
    """On CUDA the shared expert's output [T, H], queued first (on a side stream when
    overlap_shared, so the routed path's small kernels run beside its GEMMs; queued first on
    one stream too, so both settings give the same numbers); on CPU None: it runs after the
    routed path, in the reference's order (the same rounding as the oracle)."""
    if gm.get_submodule(moe_name).shared is None or spec.cluster.device != "cuda":
        return None
    if not overlap_shared(spec):
        return b.module("shared", f"{moe_name}.shared", x_flat)
    y = b.module("shared", f"{moe_name}.shared", b.fn("shared_begin", streams.side_begin, x_flat))
    return b.fn("shared_end", streams.side_end, y)


def receive_rows(spec: Spec) -> int:
    """Rows of each rank's static receive buffer per layer under the spec's backend."""
    ep, C, L, A = spec.parallel.ep, spec.peer_chunk_rows, spec.experts_per_rank, spec.budgets.row_alignment
    L += spec.echo.spare_slots_per_rank if spec.echo.enabled else 0
    if spec.backends.dispatch == "symm_mem":
        return symm_mem.receive_rows(ep, C, L, A)
    if spec.backends.dispatch == "deepep":
        return deepep.permuted_rows(ep, C, L, A)
    return ep * C


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
