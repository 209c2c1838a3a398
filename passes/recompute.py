"""The recompute pass: move each recomputed region of the graph into a `Recompute` module.

    moe    one region per MoE block (the nodes passes/layer_builder.py tagged with its block)
    full   one region per transformer block (`layers.i`: its norms, attention, residuals and
           its MLP or MoE block); only the block's input is kept between forward and backward
    none   the graph is returned unchanged

Before:  h = ... ; x = mlp_norm(h) ; [route · count · ... · combine · out] ; h2 = h + out
After:   h = ... ; x = mlp_norm(h) ; r = recompute_layers_3_mlp(x, w13, w2) ; out = r[0] ; h2 = h + out

A region's body is the same nodes, moved into a GraphModule called under
runtime/recompute.py's selective checkpoint. Two kinds of node stay outside: `get_attr`
nodes (weights and buffers, passed in as inputs, so the body holds no tensor of its own and
materialising the model reaches every tensor) and in-place updates of module state (the
router's `load.add_(counts)`, which must run once per step, not again in backward).

Runs after shape propagation and the buffer plan (they read the flat graph; recompute
re-runs the same ops with the same arena keys, so the plan holds). `train.recompute: auto`
is resolved by the compile driver (echoc/memory_model.py) before this pass runs.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

from torch.fx import Graph, GraphModule, Node

from echoc.spec import Spec
from passes.layer_builder import moe_block, moe_layer
from passes.manager import PassResult, graph_module
from runtime.model import Block
from runtime.recompute import Recompute, saved_ops

POLICIES = ("none", "moe", "full")


@dataclass
class RecomputeInfo:
    policy: str
    regions: list[str] = field(default_factory=list)       # the Recompute modules, in graph order
    saved_ops: list[str] = field(default_factory=list)     # ops whose outputs the regions keep


def block_of(node: Node) -> str | None:
    """The transformer block (`layers.3`) a traced node belongs to, or None."""
    for path, (_, kind) in (node.meta.get("nn_module_stack") or {}).items():
        if kind is Block or getattr(kind, "__name__", "") == "Block":
            return path.split("@")[0]
    layer = moe_layer(node)
    return None if layer is None else f"layers.{layer}"


def _state_update(node: Node) -> bool:
    """An in-place method on a module's buffer (`load.add_(counts)`): must run once per step."""
    return (node.op == "call_method" and node.target.endswith("_") and bool(node.args)
            and isinstance(node.args[0], Node) and node.args[0].op == "get_attr")


def _region_of(gm: GraphModule, policy: str) -> dict[Node, str]:
    """Node → region name. Nodes a pass inserted without a module (ZeRO 3's weight gathers and
    their getitems) join the region of all their users when they have one, so a recomputed
    region gathers its weights again instead of keeping them from forward to backward."""
    key = moe_block if policy == "moe" else block_of
    skip = ("placeholder", "output", "get_attr")
    of = {n: key(n) for n in gm.graph.nodes if n.op not in skip and not _state_update(n) and key(n) is not None}
    for n in reversed(gm.graph.nodes):
        if n in of or n.op in skip or _state_update(n) or not n.users:
            continue
        owners = {of.get(u) for u in n.users}
        if len(owners) == 1 and None not in owners:
            of[n] = owners.pop()
    return of


def _regions(gm: GraphModule, policy: str) -> dict[str, list[Node]]:
    """Region name → its nodes in graph order (get_attr nodes and state updates left out)."""
    of = _region_of(gm, policy)
    regions: dict[str, list[Node]] = {}
    for n in gm.graph.nodes:
        if n in of:
            regions.setdefault(of[n], []).append(n)
    return regions


def _copy_for_state_updates(gm: GraphModule, nodes: list[Node]) -> None:
    """A state update runs after the region, later than in the flat graph, but the buffer plan
    gave its input (an arena view, e.g. the layer's counts) bytes only until its flat-graph
    last use: the region hands the update a copy taken right after the input is made."""
    inside = set(nodes)
    for update in [u for n in nodes for u in n.users if u not in inside and _state_update(u)]:
        for a in [a for a in update.all_input_nodes if a in inside]:
            with gm.graph.inserting_after(a):
                copy = gm.graph.call_method("clone", (a,))
            copy.meta = {k: v for k, v in a.meta.items() if k != "tensor_meta"}
            update.replace_input_with(a, copy)
            nodes.insert(nodes.index(a) + 1, copy)
            inside.add(copy)


def _boundary(nodes: list[Node]) -> tuple[list[Node], list[Node]]:
    """(inputs: nodes outside the region that it reads, outputs: its nodes read outside), in order."""
    inside = set(nodes)
    inputs: dict[Node, None] = {}
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside:
                inputs.setdefault(a)
    outputs = [n for n in nodes if any(u not in inside for u in n.users)]
    return list(inputs), outputs


def _body(gm: GraphModule, nodes: list[Node], inputs: list[Node], outputs: list[Node]) -> GraphModule:
    graph, env = Graph(), {}
    for a in inputs:
        env[a] = graph.placeholder(a.name)
        env[a].meta = dict(a.meta)
    for n in nodes:
        env[n] = graph.node_copy(n, lambda a: env[a])
    graph.output(tuple(env[o] for o in outputs))
    return graph_module(gm, graph, "RecomputedRegion")


def _extract(gm: GraphModule, name: str, nodes: list[Node]) -> str:
    """Replace `nodes` by one call of a Recompute module named after the region; returns its name."""
    _copy_for_state_updates(gm, nodes)
    inputs, outputs = _boundary(nodes)
    target = "recompute_" + name.replace(".", "_")
    gm.add_submodule(target, Recompute(_body(gm, nodes, inputs, outputs)))
    last = nodes[-1]
    with gm.graph.inserting_after(last):
        call = gm.graph.call_module(target, tuple(inputs))
    results = []
    for i, o in enumerate(outputs):
        with gm.graph.inserting_after(results[-1] if results else call):
            results.append(gm.graph.call_function(operator.getitem, (call, i)))
        results[-1].meta = dict(o.meta)
        o.replace_all_uses_with(results[-1], delete_user_cb=lambda u, inside=set(nodes): u not in inside)
    _after(gm, call, results, nodes)
    for n in reversed(nodes):
        gm.graph.erase_node(n)
    return target


def _after(gm: GraphModule, call: Node, results: list[Node], nodes: list[Node]) -> None:
    """Nodes between the region's first and last node that read a region output (a state
    update) now read the call's results: move them after the results."""
    inside, anchor = set(nodes), results[-1] if results else call
    n = nodes[0]
    while n is not call:
        nxt = n.next
        if n not in inside and any(a in results for a in n.all_input_nodes):
            anchor.append(n)
            anchor = n
        n = nxt


def apply(gm: GraphModule, policy: str) -> PassResult:
    """Wrap every region of `policy` ('none', 'moe' or 'full') in a Recompute module."""
    assert policy in POLICIES, f"recompute policy {policy!r} must be resolved to one of {POLICIES}"
    info = RecomputeInfo(policy)
    if policy == "none":
        return PassResult(gm, info)
    for name, nodes in _regions(gm, policy).items():
        info.regions.append(_extract(gm, name, nodes))
    info.saved_ops = sorted(str(op) for op in saved_ops()) if info.regions else []
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, info)


def run(gm: GraphModule, spec: Spec) -> PassResult:
    """`apply` with spec.train.recompute (which must not be 'auto': the compile driver resolves it)."""
    return apply(gm, spec.train.recompute)
