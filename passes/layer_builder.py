"""The one node builder of the MoE passes (sync_free_dispatch, echo_clone).

Every node it inserts is named `<block>_<name>` (block: the MoE module's path with
dots as underscores, `layers_3_mlp`) and carries its layer in `node.meta`:

    node.meta[MOE_LAYER]  the transformer layer index of the MoE block (3 for `layers.3.mlp`)
    node.meta[MOE_BLOCK]  the block's name prefix (`layers_3_mlp`)

Later passes and the memory plan read the layer from there, never from node names.
Ops are created from their contracts (runtime/contracts.py): arguments by name, an op's
`buf` (its arena key) filled with the node's own name.
"""
from __future__ import annotations

import operator
from typing import Any

from torch.fx import Graph, Node

from runtime import contracts
from runtime.contracts import OpContract

MOE_LAYER = "moe_layer"
MOE_BLOCK = "moe_block"


def moe_layer(node: Node) -> int | None:
    """The transformer layer index of an MoE node (None: not part of an MoE block)."""
    return node.meta.get(MOE_LAYER)


def moe_block(node: Node) -> str | None:
    """The MoE block's name prefix of a node (`layers_3_mlp`), None outside MoE blocks."""
    return node.meta.get(MOE_BLOCK)


class LayerBuilder:
    """Inserts one MoE layer's nodes at the graph's current insertion point."""

    def __init__(self, graph: Graph, block: str, layer: int):
        self.graph, self.block, self.layer = graph, block, layer

    def _node(self, kind: str, name: str, target, args: tuple = ()) -> Node:
        full = f"{self.block}_{name}"
        node = self.graph.create_node(kind, target, args, {}, name=full)
        assert node.name == full, f"node {full!r} was renamed to {node.name!r}: its arena key would not match"
        node.meta[MOE_LAYER], node.meta[MOE_BLOCK] = self.layer, self.block
        return node

    def op(self, name: str, contract: OpContract, **values: Any) -> Node:
        """A call of `contract`'s op; `buf`, when the op has one, is the node's own name."""
        if "buf" in contract.args:
            values["buf"] = f"{self.block}_{name}"
        return self._node("call_function", name, contracts.target(contract), contract.call_args(**values))

    def outputs(self, node: Node, contract: OpContract) -> list[Node]:
        """One getitem node per output of a tuple-returning op, named after the output."""
        return self.items(node, contract.outputs)

    def items(self, node: Node, names) -> list[Node]:
        return [self._node("call_function", n, operator.getitem, (node, i)) for i, n in enumerate(names)]

    def fn(self, name: str, target, *args) -> Node:
        return self._node("call_function", name, target, args)

    def method(self, name: str, target: str, *args) -> Node:
        return self._node("call_method", name, target, args)

    def module(self, name: str, target: str, *args) -> Node:
        return self._node("call_module", name, target, args)

    def attr(self, name: str, target: str) -> Node:
        return self._node("get_attr", name, target)


def output_nodes(node: Node, contract: OpContract) -> dict[str, Node]:
    """The getitem nodes that read `node`'s outputs (a tuple-returning op), by output name, in
    the contract's order; an output nobody reads is absent."""
    by_index = {u.args[1]: u for u in node.users if u.target is operator.getitem}
    return {name: by_index[i] for i, name in enumerate(contract.outputs) if i in by_index}


def output_node(node: Node, contract: OpContract, name: str) -> Node:
    """The getitem node that reads output `name` of `node`."""
    return output_nodes(node, contract)[name]


def user_of(node: Node, contract: OpContract) -> Node:
    """The one user of `node` that calls `contract`'s op."""
    users = [u for u in node.users if u.op == "call_function" and contracts.of(u.target) is contract]
    assert len(users) == 1, f"{node.name}: {len(users)} users call {contract.name}"
    return users[0]
