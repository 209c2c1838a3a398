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
from passes.manager import PassResult
from runtime import grouped_gemm, ops
from runtime.backends import sync as sync_backend
from runtime.model import MoE


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


class _Builder:
    """Inserts one layer's nodes before the MoE node, named after the layer."""

    def __init__(self, gm: GraphModule, prefix: str):
        self.g, self.prefix = gm.graph, prefix

    def fn(self, name, target, *args):
        return self.g.create_node("call_function", target, args, {}, name=f"{self.prefix}_{name}")

    def op(self, name, target, *args):
        """An op that writes into planned buffers: its last argument is its own node name (`buf`),
        the key of its output in the arena (runtime/arena.py)."""
        node = self.fn(name, target, *args, f"{self.prefix}_{name}")
        assert node.name == node.args[-1], f"node {node.name!r} was renamed: its buffer key would not match"
        return node

    def method(self, name, target, *args):
        return self.g.create_node("call_method", target, args, {}, name=f"{self.prefix}_{name}")

    def module(self, name, target, *args):
        return self.g.create_node("call_module", target, args, {}, name=f"{self.prefix}_{name}")

    def attr(self, name, target):
        return self.g.create_node("get_attr", target, (), {}, name=f"{self.prefix}_{name}")

    def items(self, node, names):
        return [self.fn(n, operator.getitem, node, i) for i, n in enumerate(names)]


_LAYOUT_OUTS = ["send_copy", "copy_slot", "sorted_src", "recv_sorted", "offs", "stats"]


def _rewrite_layer(gm: GraphModule, node: Node, spec: Spec) -> tuple[Node, Node, Node, LayerDispatch]:
    moe_name, x = node.target, node.args[0]
    moe_cfg, ep = spec.model.moe, spec.parallel.ep
    L, K, C = spec.experts_per_rank, moe_cfg.top_k, spec.peer_chunk_rows
    b = _Builder(gm, moe_name.replace(".", "_"))
    x_flat = b.method("x_flat", "reshape", x, (-1, spec.model.hidden_size))
    route = b.module("route", f"{moe_name}.router", x_flat)
    slot, weight = b.items(route, ["slot", "weight"])
    counts = b.op("count", torch.ops.echo.count.default, slot, moe_cfg.num_experts)
    load = b.attr("load", f"{moe_name}.router.load")
    b.method("load_add", "add_", load, counts)
    counts_all = b.op("counts_all", torch.ops.echo.all_gather_counts.default, counts, "ep", ep)
    if spec.backends.dispatch == "sync":
        lay = b.fn("layout", torch.ops.echo.sync_layout.default, slot, counts, counts_all, L, "ep")
        maps = b.items(lay, _LAYOUT_OUTS + ["splits"])
        idx, offs, stats, splits = maps[:4], maps[4], maps[5], maps[6]
        rows = b.fn("dispatch", torch.ops.echo.sync_dispatch.default, x_flat, *idx, splits, K, "ep")
    else:
        lay = b.op("layout", torch.ops.echo.layout.default, slot, counts, counts_all, L, C, "ep")
        maps = b.items(lay, _LAYOUT_OUTS)
        idx, offs, stats = maps[:4], maps[4], maps[5]
        rows = b.op("dispatch", torch.ops.echo.dispatch.default, x_flat, *idx, K, "ep")
    w13 = b.attr("w13", f"{moe_name}.experts.w13")
    w2 = b.attr("w2", f"{moe_name}.experts.w2")
    y = b.op("expert_ffn", grouped_gemm.expert_ffn, rows, w13, w2, offs, spec.backends.grouped_gemm)
    if spec.backends.dispatch == "sync":
        copies = b.fn("combine", torch.ops.echo.sync_combine.default, y, *idx, splits, "ep")
    else:
        copies = b.op("combine", torch.ops.echo.combine.default, y, *idx, "ep")
    out = b.op("routed", ops.weighted_sum, copies, weight)
    if gm.get_submodule(moe_name).shared is not None:
        shared = b.module("shared", f"{moe_name}.shared", x_flat)
        out = b.fn("add_shared", operator.add, out, shared)
    out = b.method("out", "view_as", out, x)
    stats = b.op("layer_stats", ops.layer_stats, stats)
    info = LayerDispatch(moe_name, spec.budgets.tokens, K, L, C, ep * C)
    return out, stats, counts_all, info


def _append_outputs(gm: GraphModule, stats: list[Node], counts: list[Node]) -> None:
    output = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(output):
        st = gm.graph.create_node("call_function", torch.stack, (stats,), {}, name="moe_stats")
        ct = gm.graph.create_node("call_function", torch.stack, (counts,), {}, name="moe_counts")
    output.args = ((output.args[0], st, ct),)


def run(gm: GraphModule, spec: Spec) -> PassResult:
    check_backend(spec)
    info = DispatchInfo(spec.backends.dispatch)
    stats, counts = [], []
    for node in moe_nodes(gm):
        with gm.graph.inserting_before(node):
            out, layer_stats, layer_counts, layer = _rewrite_layer(gm, node, spec)
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


HOST_SYNC_TARGETS = sync_backend.HOST_SYNC_OPS
HOST_SYNC_FFN = grouped_gemm.HOST_SYNC_IMPLS
