"""ZeRO 3: weights stay sharded; each layer's weights are all-gathered just before use.
ZeRO 2: weights stay whole; each layer's gradients are reduce-scattered as its backward ends.

With `parallel.zero: 3` every parameter the graph reads is owned by a *unit* — a
transformer layer (`layers.<i>`), or a top-level module (`embed`, `norm`, `lm_head`) — and
a data-parallel group: experts (the `w` of a clone, the `w13` / `w2` of an expert FFN) over
"expert_dp", every other weight over "world". Per unit and group of more than one rank, the
pass inserts, before the unit's first use of a weight:

    shards   get_attr of each parameter        at run time this rank's flat shard [m_i]
    zero_gather(shards, shapes, group, …)      runtime/zero_ops.py: issues one all-gather →
                                               the whole weights; backward: one reduce-scatter
    zero_wait(weights, buf)                    waits for it (the weights are ready)
    getitem  one per weight                    replaces every use of that parameter

and then moves each unit's gather up to right after the previous unit's wait (per group):
the next layer's weights are gathered while this layer computes (prefetch, one layer ahead).

A `get_attr` of a parameter is replaced by its gathered weight; a `call_module` of a module
that owns gathered weights (a linear, the embedding, a router, a shared expert) becomes
`module_call(module, names, weights, *args)`. Weights are freed after their last forward
use and gathered again in backward (zero_ops.regather_in_backward). Groups of one rank keep
their weights whole: nothing is inserted for them.

With `parallel.zero: 2` the same units get, before their first use,

    weights  get_attr of each (whole) parameter
    zero_reduce(weights, names, group, …)      runtime/zero_ops.py: forward passes the
                                               weights through; backward reduce-scatters
                                               their gradients into this rank's shards
    getitem  one per weight                    replaces every use of that parameter

so no whole gradient outlives its layer's backward (levels 0 and 1 keep them all until the
step, and reduce after backward).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

from torch.fx import GraphModule, Node

from echoc.spec import Spec
from passes.manager import PassResult
from runtime import contracts, zero_ops
from runtime.contracts import CLONE_WEIGHTS, EXPERT_FFN, EXPERT_FFN_RECOMPUTE_CLONE
from runtime.zero_ops import ZERO_GATHER, ZERO_REDUCE, ZERO_WAIT


@dataclass
class ZeroUnit:
    node: str                  # the zero_gather (level 3) or zero_reduce (level 2) node's name
    group: str                 # "world" or "expert_dp"
    params: list[str]
    numel: int                 # whole weights' elements gathered (per rank: numel / group size, padded)


@dataclass
class ZeroInfo:
    level: int
    units: list[ZeroUnit] = field(default_factory=list)
    reason: str = ""


def unit_of(name: str) -> str:
    """`layers.3.attn.wq.weight` → `layers.3`; `lm_head.weight` → `lm_head`."""
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "layers" else parts[0]


def _expert_params(gm: GraphModule) -> set[str]:
    """Parameters that are expert weights: what clones and expert FFNs take as weights."""
    out = set()
    for node in gm.graph.nodes:
        c = contracts.of(node.target) if node.op == "call_function" else None
        names = {CLONE_WEIGHTS: ("w",), EXPERT_FFN: ("w13", "w2"), EXPERT_FFN_RECOMPUTE_CLONE: ("w13", "w2")}.get(c, ())
        for arg in (c.arg(node, n) for n in names):
            if isinstance(arg, Node) and arg.op == "get_attr":
                out.add(arg.target)
    return out


def _uses(gm: GraphModule) -> dict[str, list[Node]]:
    """Parameter name → the get_attr / call_module nodes that read it, in graph order."""
    params = dict(gm.named_parameters())
    uses: dict[str, list[Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in params:
            uses.setdefault(node.target, []).append(node)
        elif node.op == "call_module":
            for local, _ in gm.get_submodule(node.target).named_parameters():
                uses.setdefault(f"{node.target}.{local}", []).append(node)
    return uses


def _units(gm: GraphModule, spec: Spec, uses: dict[str, list[Node]]) -> dict[tuple[str, str], list[str]]:
    """(unit, group) → its parameters, for groups of more than one rank, in first-use order."""
    sizes = {"world": spec.cluster.world_size, "expert_dp": spec.parallel.dp}
    experts, units = _expert_params(gm), {}
    for name in uses:
        group = "expert_dp" if name in experts else "world"
        if sizes[group] > 1:
            units.setdefault((unit_of(name), group), []).append(name)
    return units


def _insert(gm: GraphModule, unit: str, group: str, names: list[str], spec: Spec,
            uses: dict[str, list[Node]], order) -> tuple[Node, dict[str, Node]]:
    """Insert get_attrs · zero_gather (level 3: the shards) or zero_reduce (level 2: the whole
    weights) · getitems before the unit's first use; → (the op node, name → weight node).
    `uses` and `order` are of the graph before any insertion (insertions keep the others' order)."""
    g, gather = gm.graph, spec.parallel.zero == 3
    first = min((n for name in names for n in uses[name]), key=order)
    node_name = f"zero_{unit.replace('.', '_')}_{group}"
    with g.inserting_before(first):
        params = [g.get_attr(name) for name in names]
        common = dict(group=group, reduce_dtype=spec.train.grad_reduce_dtype, buf=node_name)
        if gather:
            shapes = tuple(tuple(gm.get_parameter(name).shape) for name in names)
            args = ZERO_GATHER.call_args(shards=params, shapes=shapes, **common)
        else:
            args = ZERO_REDUCE.call_args(weights=params, names=tuple(names), **common)
        op = g.create_node("call_function", contracts.target(ZERO_GATHER if gather else ZERO_REDUCE), args,
                           name=node_name)
        weights = {name: g.call_function(operator.getitem, (op, i)) for i, name in enumerate(names)}
    return op, weights


def _prefetch(gm: GraphModule, gathers: list[Node]) -> None:
    """A zero_wait right after each gather reads its weights (the getitems now read the wait);
    then, per group, each gather (with its shard get_attrs) moves to right after the previous
    unit's wait: a layer's all-gather is in flight while the layer before it computes. Under
    recompute a moved gather joins its own layer's region again (passes/recompute.py)."""
    g, last_wait = gm.graph, {}
    for gather in gathers:                                  # graph order
        group = ZERO_GATHER.arg(gather, "group")
        items = list(gather.users)
        with g.inserting_after(gather):
            wait = g.create_node("call_function", contracts.target(ZERO_WAIT),
                                 ZERO_WAIT.call_args(weights=gather, buf=gather.name), name=f"{gather.name}_wait")
        for item in items:
            item.replace_input_with(gather, wait)
        if group in last_wait:
            anchor = last_wait[group]
            for n in list(ZERO_GATHER.arg(gather, "shards")) + [gather]:
                anchor.append(n)
                anchor = n
        last_wait[group] = wait


def _order(graph):
    index = {n: i for i, n in enumerate(graph.nodes)}
    return index.__getitem__


def _rewrite_uses(gm: GraphModule, weights: dict[str, Node], skip: set[Node]) -> None:
    """Every get_attr of a gathered parameter → its weight; every call_module owning one → module_call."""
    g = gm.graph
    for node in list(g.nodes):
        if node in skip:
            continue
        if node.op == "get_attr" and node.target in weights:
            node.replace_all_uses_with(weights[node.target])
            g.erase_node(node)
        elif node.op == "call_module":
            owned = [local for local, _ in gm.get_submodule(node.target).named_parameters()
                     if f"{node.target}.{local}" in weights]
            if owned:
                _module_call(g, node, owned, [weights[f"{node.target}.{local}"] for local in owned])


def _module_call(g, node: Node, names: list[str], weights: list[Node]) -> None:
    with g.inserting_before(node):
        module = g.get_attr(node.target)
        call = g.call_function(zero_ops.module_call, (module, tuple(names), weights) + tuple(node.args),
                               dict(node.kwargs))
    call.meta.update(node.meta)
    node.replace_all_uses_with(call)
    g.erase_node(node)


def run(gm: GraphModule, spec: Spec) -> PassResult:
    level = spec.parallel.zero
    if level < 2:
        return PassResult(gm, ZeroInfo(level, reason=f"parallel.zero is {level}: weights and gradients "
                                                      "stay whole in the graph"))
    info, weights, param_nodes = ZeroInfo(level), {}, set()
    uses, order = _uses(gm), _order(gm.graph)
    contract, arg = (ZERO_GATHER, "shards") if level == 3 else (ZERO_REDUCE, "weights")
    for (unit, group), names in _units(gm, spec, uses).items():
        op, unit_weights = _insert(gm, unit, group, names, spec, uses, order)
        weights.update(unit_weights)
        param_nodes.update(contract.arg(op, arg))
        numel = sum(gm.get_parameter(n).numel() for n in names)
        info.units.append(ZeroUnit(op.name, group, names, numel))
    if not info.units:
        info.reason = "every data-parallel group has one rank: nothing to shard"
    _rewrite_uses(gm, weights, param_nodes)
    if level == 3:
        _prefetch(gm, [n for n in gm.graph.nodes if contracts.of(n.target) is ZERO_GATHER])
    gm.graph.lint()
    gm.recompile()
    return PassResult(gm, info)
