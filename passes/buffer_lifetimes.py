"""Lifetimes: every static buffer of the MoE machinery and when it is live over one training
iteration (forward, backward, gradient reduction, optimizer), read from the graph and from
the op contracts (runtime/contracts.py: outputs, saved arguments, gradients, arena parts).

Timeline. With N graph nodes, node i runs in forward at steps 4i … 4i+3 and its backward
at 4(2N−1−i) … +3 (the exact mirror); step 8N is the gradient reduction, 8N+1 the
optimizer. A token movement uses the sub-steps: gather into `send` (0), exchange `send` →
`recv` (1), gather `recv` into the result (2).

Rules:
  * A node output lives from its node's forward step to its last forward user; to that
    user's backward when the user's contract saves it; to the end when it is a graph output;
    a routing decision (count, counts all-gather, plan, slots, layout) at least to its own
    backward, where a recomputed region replays it.
  * A float output with a differentiable user has a gradient twin, live from the user's
    backward to the op's backward. It is in the arena when the one user's contract writes
    it (`input_grad`, e.g. combine's `bwd.grad_in`); else autograd or grouped_mm allocates it.
  * Op parts (send/recv, the FFN's SwiGLU, clone exchanges) live at their op's step, the
    `bwd.` parts at its backward step; the FFN's h13 and act are saved (op → backward).
  * An FFN whose weight gradients run on the wgrad stream (`wgrad` token, runtime/streams.py)
    keeps what they read (rows, offs, act, grad_h13, its output's gradient) to the backward of
    the layer's wgrad fork, where the main stream waits for them. At ep 1
    a token movement has no exchange parts (one gather, straight into its result).
  * Clone weights: one buffer per layer (w13 and w2 back to back), saved until the FFN's
    backward; with recompute_clone_dispatch ONE `spare_weights` buffer for all layers, live
    only at each FFN's forward and backward step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from echoc.spec import Spec
from passes.cost_model import clone_domain_ranks
from passes.layer_builder import moe_block, moe_layer, output_nodes
from passes.memory_plan import (ALLOCATOR, ARENA, Buffer, Span, Timeline, composite, dtype_name,
                                nbytes_of)
from passes.sync_free_dispatch import MOE_COUNTS, MOE_STATS
from runtime import contracts, grouped_gemm, streams
from runtime.contracts import (CLONE_WEIGHTS, COMBINE, DISPATCH, EXPERT_FFN, EXPERT_FFN_RECOMPUTE_CLONE, LAYOUT,
                               P2P_DISPATCH, OpContract)
from runtime.recompute import ROUTING_CONTRACTS

SUB_STEPS = 4              # steps per node and pass: a token movement is gather · exchange · gather
LAST_SUB = SUB_STEPS - 1
GATHER_SUB = 2             # the sub-step where a token movement writes its result
_GRAPH_OUTPUTS = {MOE_STATS: "stats", MOE_COUNTS: "counts"}


@dataclass
class _Spare:
    """The one spare-slot buffer of recompute_clone_dispatch, filled layer by layer."""
    shapes: list = field(default_factory=list)                 # [(part, shape)] for w13, w2
    dtype: torch.dtype | None = None
    live: list[Span] = field(default_factory=list)
    keys: dict[str, list[str]] = field(default_factory=dict)  # part → the clone calls keyed there


class _Collector:
    """The graph's steps and the buffers found so far."""

    def __init__(self, gm: GraphModule, spec: Spec):
        self.spec, self.nodes = spec, list(gm.graph.nodes)
        self.local = spec.parallel.ep == 1   # token movements are one gather, no exchange
        self.p2p = spec.token_exchange == "p2p"   # rows pushed into the symmetric pool: no send/recv
        self.n = len(self.nodes)
        self.step = {node: i for i, node in enumerate(self.nodes)}
        self.end = SUB_STEPS * 2 * self.n + 1
        self.buffers: list[Buffer] = []
        self.spare = _Spare()

    def fwd(self, node: Node) -> int:
        """First sub-step of the node's forward."""
        return SUB_STEPS * self.step[node]

    def bwd(self, node: Node) -> int:
        """First sub-step of the node's backward (the mirror of the forward)."""
        return SUB_STEPS * (2 * self.n - 1 - self.step[node])

    def add(self, name, layer, role, shape, dt, live: list[Span], placement: str = ARENA, key: str | None = None,
            kept: bool = False):
        """One buffer; an ARENA buffer is looked up at run time by `key` (default: its name)."""
        keys = (key or name,) if placement == ARENA else ()
        self.buffers.append(Buffer(name, layer, role, tuple(int(s) for s in shape), dtype_name(dt),
                                   nbytes_of(shape, dt), tuple(sorted(live)), placement=placement, keys=keys,
                                   kept=kept))

    def timeline(self) -> Timeline:
        m = SUB_STEPS * self.n
        layers = [{"layer": moe_layer(x), "forward": self.fwd(x), "backward": self.bwd(x)}
                  for x in self.nodes if contracts.of(x.target) in (DISPATCH, P2P_DISPATCH)]
        return Timeline(2 * m + 2, (0, m - 1), (m, 2 * m - 1), 2 * m, 2 * m + 1, layers)


def _meta(node: Node):
    tm = node.meta.get("tensor_meta")
    assert tm is not None, f"{node.name} has no tensor_meta: run buffer_plan after propagate_shapes"
    return tm


def _saves(user: Node, val: Node) -> bool:
    """Whether `user`'s backward keeps `val` (its contract saves the argument `val` is passed as)."""
    c = contracts.of(user.target)
    return c is not None and any(c.arg(user, n) is val for n in c.saves)


def _differentiates(user: Node, val: Node) -> bool:
    """Whether `user`'s backward returns a gradient for `val`."""
    c = contracts.of(user.target)
    return c is not None and any(c.arg(user, n) is val for n in c.grads)


def _kept_until(col: _Collector, user: Node, val: Node | None = None) -> int:
    """The last step at which `user`'s backward reads what it keeps (`val`, one of its arguments; None:
    its parts and its output's gradient): its own backward's, or, for what the weight gradients of
    an expert FFN read when they run on the wgrad stream (runtime/streams.py: its rows, offs, act,
    grad_h13 and output gradient, not its weights), the backward of the wgrad fork at the layer's
    input, where the main stream waits for them."""
    c = contracts.of(user.target)
    token = c.arg(user, "wgrad") if c is EXPERT_FFN else None
    if token is None or (val is not None and all(val is not c.arg(user, n) for n in ("rows", "offs"))):
        return col.bwd(user) + LAST_SUB
    fork = token.args[0]                      # the token is getitem(wgrad_fork(x_flat, key), 1)
    assert fork.target is streams.wgrad_fork, fork
    return col.bwd(fork) + LAST_SUB


def _moves(node: Node) -> bool:
    c = contracts.of(node.target)
    return c is not None and c.moves_tokens


# --- node outputs ------------------------------------------------------------------------------

def _outputs(col: _Collector, node: Node) -> None:
    tm, c = _meta(node), contracts.of(node.target)
    if c is None:                                         # moe_stats / moe_counts (torch.stack)
        _value(col, node, node, tm, _GRAPH_OUTPUTS[node.name], ALLOCATOR, node.name)
        return
    placement = ARENA if c.output_in_arena else ALLOCATOR
    if len(c.outputs) == 1:
        _value(col, node, node, tm, c.roles[0], placement, c.output_key(node.name), c.outputs[0] in c.keeps)
        return
    for name, item in output_nodes(node, c).items():
        i = c.output_index(name)
        _value(col, node, item, tm[i], c.roles[i], placement, c.output_key(node.name, name), name in c.keeps)


def _value(col: _Collector, op: Node, val: Node, tm, role: str, placement: str, key: str,
           kept_by_op: bool = False) -> None:
    """The buffer of one output `val` of `op` (`kept_by_op`: the op's own backward reads it) and,
    for a float one with a differentiable user, its gradient twin."""
    users = list(val.users)
    last = max([col.fwd(u) + LAST_SUB for u in users], default=col.fwd(op) + LAST_SUB)
    for u in users:
        if u.op == "output":
            last = col.end
        elif _saves(u, val):
            last = max(last, _kept_until(col, u, val))
    kept = contracts.of(op.target) in ROUTING_CONTRACTS
    if kept or kept_by_op:
        # a recomputed region keeps the routing decisions from its forward and replays them in
        # its backward (runtime/recompute.py): live until the op's own backward step, whatever
        # train.recompute resolves to (the plan is made before `auto` picks a policy)
        last = max(last, col.bwd(op) + LAST_SUB)
    first = col.fwd(op) + (GATHER_SUB if _moves(op) else 0)
    col.add(val.name, moe_layer(op), role, tm.shape, tm.dtype, [(first, last)], placement, key, kept)
    grad_users = [u for u in users if _differentiates(u, val)]
    if tm.dtype.is_floating_point and grad_users:
        _gradient(col, op, val, tm, role, grad_users)


def _gradient(col: _Collector, op: Node, val: Node, tm, role: str, grad_users: list[Node]) -> None:
    """Written by a user's backward (a token movement's at its gather sub-step), read by the op's
    backward (a token movement reads it at its first sub-step, into `send`; at ep 1, where the
    movement is one gather straight into its result, until that gather; the others throughout)."""
    first = min(col.bwd(u) + (GATHER_SUB if _moves(u) else 0) for u in grad_users)
    if _moves(op):
        last = col.bwd(op) + (GATHER_SUB if col.local else 0)
    else:
        last = _kept_until(col, op)
    # with several users autograd sums the gradients; one user whose contract writes this
    # input's gradient itself (`input_grad`) puts it in the arena
    (u, *more) = grad_users
    uc = contracts.of(u.target)
    placed = not more and bool(uc.input_grad) and uc.arg(u, uc.grads[0]) is val
    col.add(f"{val.name}.grad", moe_layer(op), "clone_grad" if role == "clone_weights" else "gradient",
            tm.shape, tm.dtype, [(first, last)], ARENA if placed else ALLOCATOR,
            uc.key(u.name, uc.input_grad) if placed else None)


# --- op parts ----------------------------------------------------------------------------------

def _exchange(col: _Collector, node: Node, c: OpContract, rows: int, h: int, dt) -> None:
    """A token movement in sub-steps: gather into `send` (0), exchange `send` → `recv` (1),
    gather `recv` into the result (2); the same in backward. At ep 1 the exchange parts are
    unused (the op gathers straight into its result) and not planned; under backends.exchange
    'p2p' neither are they: the rows go straight into the symmetric pool (backend_buffers.py)."""
    t, b, layer = col.fwd(node), col.bwd(node), moe_layer(node)
    for pre, at in (("", t), ("bwd.", b)):
        for part, span in (("send", (at, at + 1)), ("recv", (at + 1, at + 2))):
            if c.part(pre + part).exchange and (col.local or col.p2p):
                continue
            col.add(c.key(node.name, pre + part), layer, "exchange", (rows, h), dt, [span])


def _dispatch(col: _Collector, node: Node) -> None:
    x, send_copy = (_meta(DISPATCH.arg(node, n)) for n in ("x", "send_copy"))
    _exchange(col, node, DISPATCH, send_copy.shape[0], x.shape[1], x.dtype)


def _combine(col: _Collector, node: Node) -> None:
    y, recv_sorted = _meta(COMBINE.arg(node, "y")), _meta(COMBINE.arg(node, "recv_sorted"))
    _exchange(col, node, COMBINE, recv_sorted.shape[0], y.shape[1], y.dtype)


def _ffn(col: _Collector, node: Node) -> None:
    """grouped_mm (no out= variant) allocates h13, the output and grad_act; the SwiGLU writes
    act and grad_h13 into the arena. The `loop` fallback is not planned at all."""
    c = contracts.of(node.target)
    rows, w13 = _meta(c.arg(node, "rows")), _meta(c.arg(node, "w13"))
    r, f2, dt, layer = rows.shape[0], w13.shape[2], rows.dtype, moe_layer(node)
    t, b, e = col.fwd(node), col.bwd(node), col.bwd(node) + LAST_SUB
    waits = {"act": _kept_until(col, node), "bwd.grad_h13": _kept_until(col, node)}   # the weight gradients read them
    swiglu_in_arena = grouped_gemm.resolved_impl(c.arg(node, "impl")) == "torch"
    shapes = {"h13": (r, f2), "act": (r, f2 // 2),
              "bwd.grad_act": (r, f2 // 2), "bwd.grad_h13": (r, f2)}
    for part, shape in shapes.items():   # saved parts live from the forward, the others in the backward
        role = "activation" if c.part(part).saved else "gradient"
        placement = ARENA if c.part(part).arena and swiglu_in_arena else ALLOCATOR
        col.add(c.key(node.name, part), layer, role, shape, dt, [(t if c.part(part).saved else b, waits.get(part, e))],
                placement)
    if c is EXPERT_FFN_RECOMPUTE_CLONE:
        _recomputed_clone(col, node)


def _clone_exchange(col: _Collector, buf: str, layer, w, offer: int, at: int, backward_at: int | None) -> None:
    """The parts of one echo::clone_weights call keyed `buf`, run at step `at`, and of its
    backward (the gradient reduction) at `backward_at` when it has one."""
    tail, whole, dom = tuple(w.shape[1:]), [(at, at + LAST_SUB)], clone_domain_ranks(col.spec)
    col.add(CLONE_WEIGHTS.key(buf, "send"), layer, "clone_exchange", (offer,) + tail, w.dtype, whole)
    col.add(CLONE_WEIGHTS.key(buf, "gather"), layer, "clone_exchange", (dom * offer,) + tail, w.dtype, whole)
    if backward_at is not None:
        whole = [(backward_at, backward_at + LAST_SUB)]
        col.add(CLONE_WEIGHTS.key(buf, "bwd.rs_in"), layer, "clone_exchange", (dom * offer + 1,) + tail,
                w.dtype, whole)
        col.add(CLONE_WEIGHTS.key(buf, "bwd.rs_out"), layer, "clone_exchange", (offer,) + tail, w.dtype, whole)


def _recomputed_clone(col: _Collector, node: Node) -> None:
    """The clone inside the checkpointed FFN: run at the forward step, again at the backward."""
    c, layer = EXPERT_FFN_RECOMPUTE_CLONE, moe_layer(node)
    w13, w2, spare = (_meta(c.arg(node, n)) for n in ("w13", "w2", "spare_expert"))
    t, b, slots = col.fwd(node), col.bwd(node), w13.shape[0] + spare.shape[1]
    shapes = [("w13", (slots,) + tuple(w13.shape[1:])), ("w2", (slots,) + tuple(w2.shape[1:]))]
    assert col.spare.shapes in ([], shapes), "MoE layers with different expert shapes"
    col.spare.shapes, col.spare.dtype = shapes, w13.dtype
    col.spare.live.extend([(t, t + LAST_SUB), (b, b + LAST_SUB)])
    for wname, _ in shapes:   # every layer's clone (forward and recomputed) lands in the one buffer
        col.spare.keys.setdefault(wname, []).extend(
            [c.key(node.name, f"clone_{wname}"), c.key(node.name, f"clone_{wname}.recompute")])
    col.buffers.append(composite(f"{moe_block(node)}_clone_weights.grad", layer, "clone_grad",
                                 [(n, s, ()) for n, s in shapes], w13.dtype, [(b, b + LAST_SUB)], ALLOCATOR))
    for wname, w in (("w13", w13), ("w2", w2)):
        _clone_exchange(col, c.key(node.name, f"clone_{wname}"), layer, w, c.arg(node, "offer"), t, None)
        _clone_exchange(col, c.key(node.name, f"clone_{wname}.recompute"), layer, w, c.arg(node, "offer"), b, b)


def _clone(col: _Collector, node: Node) -> None:
    w = _meta(CLONE_WEIGHTS.arg(node, "w"))
    _clone_exchange(col, node.name, moe_layer(node), w, CLONE_WEIGHTS.arg(node, "offer"), col.fwd(node), col.bwd(node))


_PARTS = {DISPATCH.name: _dispatch, COMBINE.name: _combine, EXPERT_FFN.name: _ffn,
          EXPERT_FFN_RECOMPUTE_CLONE.name: _ffn, CLONE_WEIGHTS.name: _clone}


# --- the whole graph ---------------------------------------------------------------------------

def _merge_clones(buffers: list[Buffer]) -> list[Buffer]:
    """The clone_w13 and clone_w2 outputs of a layer become one buffer `<block>_clone_weights`
    (w13 and w2 back to back), and their gradients one `<block>_clone_weights.grad`."""
    groups: dict[tuple, list[Buffer]] = {}
    for b in buffers:
        if b.role in ("clone_weights", "clone_grad") and not b.parts:
            groups.setdefault((b.layer, b.role), []).append(b)
    merged = {}
    for (layer, role), bs in groups.items():
        name = bs[0].name.removesuffix(".grad").rsplit("_clone_", 1)[0] + "_clone_weights"
        name += ".grad" if role == "clone_grad" else ""
        live = [(min(b.first for b in bs), max(b.last for b in bs))]
        merged[id(bs[0])] = composite(name, layer, role, [(b.name, b.shape, b.keys) for b in bs],
                                      getattr(torch, bs[0].dtype), live, bs[0].placement)
    grouped = {id(b) for bs in groups.values() for b in bs}
    return [merged.get(id(b), b) for b in buffers if id(b) in merged or id(b) not in grouped]


def has_moe_layers(gm: GraphModule) -> bool:
    return any(contracts.of(n.target) is LAYOUT for n in gm.graph.nodes)


def collect(gm: GraphModule, spec: Spec) -> tuple[list[Buffer], Timeline]:
    """Every MoE buffer of `gm` (shape-propagated, after the passes) with its lifetimes."""
    col = _Collector(gm, spec)
    for node in col.nodes:
        if node.op != "call_function":
            continue
        c = contracts.of(node.target)
        if (c is not None and c.roles) or (node.target is torch.stack and node.name in _GRAPH_OUTPUTS):
            _outputs(col, node)
        if c is not None and c.name in _PARTS:
            _PARTS[c.name](col, node)
    buffers = _merge_clones(col.buffers)
    if col.spare.shapes:
        parts = [(n, shape, col.spare.keys[n]) for n, shape in col.spare.shapes]
        buffers.append(composite("spare_weights", None, "clone_weights", parts, col.spare.dtype,
                                 sorted(col.spare.live)))
    return buffers, col.timeline()
