"""Buffer plan: every static buffer of the MoE machinery, its lifetime over one training
iteration, and, for each buffer an echo op writes itself, a byte offset in ONE arena per
rank (allocated once by runtime/arena.py; the ops write into their planned views).

Runs after `propagate_shapes` (it reads `node.meta['tensor_meta']`); reads the graph,
changes nothing. All ranks have the same buffer shapes under the `torch` backend (equal
[ep·C] chunks, El + S expert slots, the same T, K, H, F), so the plan is computed once
and holds for every rank. The `sync` backend has data-dependent shapes: not planned.

Timeline (integer steps). With N nodes in graph order, node i runs in forward at steps
4i … 4i+3 and its backward at 4(2N−1−i) … +3 (the exact mirror: layers 1…L forward, L…1
backward); step 8N is the gradient reduction, 8N+1 the optimizer. The sub-steps order a
token movement: gather into send (0), exchange send → recv (1), gather recv into the
result (2). A lifetime is a closed interval of steps; a buffer may have several (the shared
spare-slot buffer below).

Placement. ARENA buffers are written by the op itself (out= views) and looked up by their
keys: the node name, `node[i]` for the i-th output of a tuple, `node.part` for internals.
ALLOCATOR buffers come out of kernels without an output argument (grouped_mm's products,
the graph's torch.stack outputs): listed and bounded, not placed.

What is a buffer here, per MoE layer (shapes for the torch backend; R = ep·C rows):

  node outputs (shape from tensor_meta)
    counts        echo::count [E] / [ep·L], echo::all_gather_counts [ep, E] / [ep, ep·L]
    plan          echo::plan spare_expert [ep, S], quota [E, 1+ep·S]; assign_slots [T, K]
    index         layout send_copy [ep·C], copy_slot [T·K], sorted_src [R], recv_sorted [ep·C], offs [L]
    stats         layout stats [3], layer_stats [4], and the graph's moe_stats / moe_counts
    activation    dispatch → sorted rows [R, H]; expert_ffn → [R, H]; combine → per-copy [T·K, H]
    clone_weights clone_weights w13 [El+S, H, 2F] + w2 [El+S, F, H], one buffer per layer
                  (the op returns home + spare experts concatenated, as grouped_mm takes one
                  [L, ...] weight tensor, so the buffer holds El+S experts of which S are clones)
  inside an op (shape from its inputs' tensor_meta)
    exchange      dispatch and combine: send [ep·C, H] and receive [ep·C, H]
    activation    expert_ffn: h13 [R, 2F], silu(gate) [R, F], act = silu(gate)·up [R, F]
    clone_exchange clone_weights: send [offer, ...] and all-gather [dom·offer, ...] per weight
                  (offer: experts each rank offers; dom: ranks of the clone domain);
                  backward: reduce-scatter in [dom·offer+1, ...] and out [offer, ...]
  backward
    gradient      one twin per float activation that crosses ops (grad of sorted rows, of the
                  FFN output, of the per-copy output), the op-internal twins (exchange
                  send/receive of the backward dispatch and combine, grad of h13 and act, the
                  per-copy grad of dispatch's backward)
    clone_grad    the clone weights' gradient (same shape), one buffer per layer

Lifetime rules
  * A node output lives from its node's forward step to the last forward user's step.
  * Saved for backward: if a user saves it (dispatch and combine save the four index maps;
    expert_ffn saves rows, weights and offs; clone_weights saves counts_all and
    spare_expert; the recompute FFN keeps rows, offs, counts_all, spare_expert and the
    home weights, never the cloned ones; weighted_sum (one bmm) saves the copies in their own
    dtype) it lives until that user's backward.
  * A graph output (moe_stats, moe_counts) lives until the end of the iteration.
  * Op internals live at their op's step only: forward twins at the forward step,
    the backward twins (the gradient exchange) at the backward step; a token movement's
    send, recv and result at their sub-steps. The FFN's h13, silu(gate) and act are saved:
    op step → backward.
  * A gradient twin lives from the backward step of the op that produces it (the last
    differentiable user) to the backward step of the op that consumes it.
  * Clone weights without recompute: saved from the clone to the FFN's backward; their
    gradient lives from the FFN's backward to the clone's backward (the gradient reduction).
    With recompute_clone_dispatch: ONE buffer `spare_weights` for all layers, live only at
    each layer's FFN step in forward and again at its backward step (recomputed there);
    clone gradients and the clone all-gather / reduce-scatter buffers live at those steps.

Not modelled (outside the arena): the dense part (embedding, attention, norms, router,
shared expert, dense FFN, logits) and the token-sized [T, H] tensors at the MoE boundary;
parameters, parameter gradients (the home experts' gradients that the clone backward
adds into) and optimizer state; router weights saved by weighted_sum; grouped-GEMM
workspaces. Inside ops other than the token movements every internal buffer is taken as
live for the whole step, which over-counts slightly. The backward order is the mirror of the forward order; parallel
branches (the shared expert) may interleave differently at run time.

Allocator: a networkx interference graph (buffers whose lifetimes share a step interfere;
buffers with identical lifetimes are folded into one graph node, which loses nothing and
cuts the edges ~3.5x on glm5). First-fit by decreasing size: sort buffers by aligned size
(then longer lifetime, earlier start), place each at the lowest 256-byte-aligned offset
where it overlaps no already placed buffer that interferes with it. Reported: arena bytes
(max offset + aligned size), the naive sum of all aligned sizes (every buffer its own
bytes), and the lower bound: max over steps of the live aligned bytes (no placement can
beat it, since live buffers occupy disjoint aligned ranges).
"""
from __future__ import annotations

import heapq
import operator
import re
from dataclasses import dataclass, field

import networkx as nx
import torch
from torch.fx import GraphModule, Node

from echoc.spec import Spec
from passes.cost_model import clone_domain_ranks
from passes.manager import PassResult
from runtime import clone as _clone_ops  # noqa: F401  (registers echo::plan, clone_weights, ...)
from runtime import grouped_gemm, ops
from runtime.arena import ArenaLayout, View

ALIGN_BYTES = 256
SUB_STEPS = 4              # steps per node and pass: a token movement is gather · exchange · gather
LAST_SUB = SUB_STEPS - 1
_GATHER_SUB = 2            # the sub-step where a token movement writes its result
Span = tuple[int, int]

_E = torch.ops.echo
_FFN = (grouped_gemm.expert_ffn, grouped_gemm.expert_ffn_recompute_clone)
_OUT_ROLE = {
    _E.count.default: "counts", _E.all_gather_counts.default: "counts",
    _E.plan.default: "plan", _E.assign_slots.default: "plan", _E.layout.default: "index",
    _E.dispatch.default: "activation", _E.clone_weights.default: "clone_weights",
    grouped_gemm.expert_ffn: "activation", grouped_gemm.expert_ffn_recompute_clone: "activation",
    _E.combine.default: "activation", ops.layer_stats: "stats",
}
_GRAPH_OUTPUTS = {"moe_stats": "stats", "moe_counts": "counts"}
_LAYOUT_STATS = 5
# which args an op's autograd keeps for its backward (see runtime/ops.py, clone.py, grouped_gemm.py)
_SAVED_ARGS = {
    _E.dispatch.default: {1, 2, 3, 4}, _E.combine.default: {1, 2, 3, 4},
    grouped_gemm.expert_ffn: {0, 1, 2, 3}, grouped_gemm.expert_ffn_recompute_clone: {0, 1, 2, 3, 5, 6},
    _E.clone_weights.default: {1, 2},
    ops.weighted_sum: {0, 1},  # one bmm: saves the copies and the router weights as they are
}
_DIFFERENTIABLE = {_E.dispatch.default, _E.combine.default, ops.weighted_sum, *_FFN}
_WRITES_GRAD_IN = {_E.combine.default, ops.weighted_sum}   # backward writes `node.bwd.grad_in`
_ALLOCATES_OUTPUT = set(_FFN)                               # grouped_mm has no out= variant
_MOVES = {_E.dispatch.default, _E.combine.default}         # send · exchange · gather, in sub-steps


ARENA, ALLOCATOR = "arena", "allocator"


@dataclass(frozen=True)
class Part:
    """A named view inside a composite buffer (e.g. w13 and w2 of the spare slots)."""
    name: str
    shape: tuple[int, ...]
    offset_bytes: int
    keys: tuple[str, ...] = ()     # the runtime keys that resolve to this part


@dataclass
class Buffer:
    name: str
    layer: int | None          # transformer layer index; None for buffers shared by all layers
    role: str
    shape: tuple[int, ...]
    dtype: str
    nbytes: int
    live: tuple[Span, ...]     # closed step intervals, sorted
    parts: tuple[Part, ...] = ()
    offset: int | None = None
    placement: str = ARENA     # ARENA: the op writes into its planned view; ALLOCATOR: a kernel without
                               # an output argument (grouped_mm, torch.stack) allocates it itself
    keys: tuple[str, ...] = () # the keys ops ask the runtime arena for (runtime/arena.py)

    @property
    def first(self) -> int:
        return self.live[0][0]

    @property
    def last(self) -> int:
        return self.live[-1][1]


@dataclass
class Timeline:
    steps: int                 # 8N + 2 (SUB_STEPS = 4 per node and pass)
    forward: Span              # (0, N-1)
    backward: Span             # (4N, 8N-1)
    grad_reduction: int
    optimizer: int
    layers: list[dict] = field(default_factory=list)   # {layer, forward, backward} at the dispatch


@dataclass
class BufferPlan:
    planned: bool
    reason: str = ""
    ranks: str = "all"
    note: str = ""
    align_bytes: int = ALIGN_BYTES
    recompute_clone_dispatch: bool = False
    timeline: Timeline | None = None
    buffers: list[Buffer] = field(default_factory=list)
    arena_bytes: int = 0
    naive_bytes: int = 0
    lower_bound_bytes: int = 0
    peak_step: int = 0
    allocator_lower_bound_bytes: int = 0   # peak live bytes of the ALLOCATOR buffers
    total_lower_bound_bytes: int = 0       # peak live bytes of every buffer, wherever it lives
    lifetimes: int = 0
    interference_edges: int = 0
    interfering_pairs: int = 0


# --- allocator (pure: sizes and lifetimes in, offsets out) -------------------------------------

def aligned(nbytes: int, align: int = ALIGN_BYTES) -> int:
    return -(-nbytes // align) * align


def interference_graph(buffers: list[Buffer]) -> nx.Graph:
    """The interference graph, with buffers of identical lifetime folded into one node.

    Node k: one distinct lifetime, attributes `live` and `members` (buffer indices). An edge
    joins two nodes whose lifetimes share a step. Buffers interfere when they are members of
    one node or of two adjacent nodes. (Folding is lossless and cuts the edges ~4x on glm5:
    an op's send/receive pair, the FFN's saved intermediates, the index maps share lifetimes.)
    """
    by_live: dict[tuple[Span, ...], list[int]] = {}
    for i, b in enumerate(buffers):
        by_live.setdefault(b.live, []).append(i)
    g = nx.Graph()
    for k, (live, members) in enumerate(by_live.items()):
        g.add_node(k, live=live, members=members)
    spans = sorted((s, e, k) for k, live in enumerate(by_live) for s, e in live)
    active: list[tuple[int, int]] = []          # heap of (end, node)
    edges = []
    for s, e, k in spans:
        while active and active[0][0] < s:
            heapq.heappop(active)
        edges.extend((k, j) for _, j in active if j != k)
        heapq.heappush(active, (e, k))
    g.add_edges_from(edges)
    return g


def interfering_pairs(graph: nx.Graph) -> int:
    """Pairs of buffers whose lifetimes overlap (the unfolded graph's edge count)."""
    n = {k: len(m) for k, m in graph.nodes(data="members")}
    return sum(c * (c - 1) // 2 for c in n.values()) + sum(n[u] * n[v] for u, v in graph.edges)


def first_fit(buffers: list[Buffer], graph: nx.Graph, align: int = ALIGN_BYTES) -> list[int]:
    """Aligned offsets by first-fit in decreasing size: sort by aligned size (then longer
    lifetime, earlier start), put each buffer at the lowest offset where it overlaps no
    already placed buffer that interferes with it."""
    size = [aligned(b.nbytes, align) for b in buffers]
    span = [sum(e - s + 1 for s, e in b.live) for b in buffers]
    node_of = {i: k for k, members in graph.nodes(data="members") for i in members}
    placed: dict[int, list[tuple[int, int]]] = {k: [] for k in graph}
    offset: list[int] = [0] * len(buffers)
    for i in sorted(range(len(buffers)), key=lambda i: (-size[i], -span[i], buffers[i].first, i)):
        k = node_of[i]
        taken = sorted(placed[k] + [r for j in graph[k] for r in placed[j]])
        at = 0
        for lo, hi in taken:
            if at + size[i] <= lo:
                break
            at = max(at, hi)
        offset[i] = at
        placed[k].append((at, at + size[i]))
    return offset


def lower_bound(buffers: list[Buffer], align: int = ALIGN_BYTES) -> tuple[int, int]:
    """(max over steps of the live aligned bytes, the first step where it is reached)."""
    delta: dict[int, int] = {}
    for b in buffers:
        for s, e in b.live:
            delta[s] = delta.get(s, 0) + aligned(b.nbytes, align)
            delta[e + 1] = delta.get(e + 1, 0) - aligned(b.nbytes, align)
    live, best, at = 0, 0, 0
    for step in sorted(delta):
        live += delta[step]
        if live > best:
            best, at = live, step
    return best, at


def arena_bytes(buffers: list[Buffer], align: int = ALIGN_BYTES) -> int:
    return max((b.offset + aligned(b.nbytes, align) for b in buffers), default=0)


def allocate(buffers: list[Buffer], align: int = ALIGN_BYTES) -> nx.Graph:
    """Set every buffer's offset; return the interference graph it was placed on."""
    g = interference_graph(buffers)
    for b, at in zip(buffers, first_fit(buffers, g, align)):
        b.offset = at
    return g


# --- collecting the buffers from the graph -----------------------------------------------------

def _dtype(dt: torch.dtype) -> str:
    return str(dt).removeprefix("torch.")


def _nbytes(shape, dt: torch.dtype) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n * dt.itemsize


def _meta(node: Node):
    tm = node.meta.get("tensor_meta")
    assert tm is not None, f"{node.name} has no tensor_meta: run buffer_plan after propagate_shapes"
    return tm


def _composite(name, layer, role, tensors, dt, live, placement=ARENA) -> Buffer:
    """One buffer holding several tensors back to back (each part 256-byte aligned).
    tensors: (part name, shape, runtime keys of the part)."""
    parts, at = [], 0
    for pname, shape, keys in tensors:
        parts.append(Part(pname, tuple(shape), at, tuple(keys)))
        at += aligned(_nbytes(shape, dt))
    last = parts[-1]
    total = last.offset_bytes + _nbytes(last.shape, dt)
    return Buffer(name, layer, role, (total // dt.itemsize,), _dtype(dt), total, tuple(live), tuple(parts),
                  placement=placement)


class _Collector:
    def __init__(self, gm: GraphModule, spec: Spec):
        self.spec = spec
        nodes = list(gm.graph.nodes)
        self.n = len(nodes)
        self.step = {node: i for i, node in enumerate(nodes)}
        self.end = SUB_STEPS * 2 * self.n + 1
        self.recompute = spec.echo.enabled and spec.echo.recompute_clone_dispatch
        self.buffers: list[Buffer] = []
        self.spare: dict = {}
        layouts = [x for x in nodes if x.target is _E.layout.default]
        self.prefixes = [x.name.removesuffix("_layout") + "_" for x in layouts]
        self.layer_no = {p: _layer_number(p, k) for k, p in enumerate(self.prefixes)}
        self.nodes = nodes

    def fwd(self, node: Node) -> int:
        """First sub-step of the node's forward."""
        return SUB_STEPS * self.step[node]

    def bwd(self, node: Node) -> int:
        """First sub-step of the node's backward (the mirror of the forward)."""
        return SUB_STEPS * (2 * self.n - 1 - self.step[node])

    def prefix(self, node: Node) -> str:
        """The layer's node-name prefix ('layers_3_mlp_'), '' outside the MoE layers."""
        return next((p for p in self.prefixes if node.name.startswith(p)), "")

    def layer(self, node: Node) -> int | None:
        return self.layer_no.get(self.prefix(node))

    def add(self, name, layer, role, shape, dt, live: list[Span], placement: str = ARENA, key: str | None = None):
        """One buffer; an ARENA buffer is looked up at run time by `key` (default: its name)."""
        live = tuple(sorted(live))
        keys = (key or name,) if placement == ARENA else ()
        self.buffers.append(Buffer(name, layer, role, tuple(int(s) for s in shape), _dtype(dt),
                                   _nbytes(shape, dt), live, placement=placement, keys=keys))

    # node outputs ---------------------------------------------------------------------------
    def outputs(self, node: Node) -> None:
        tm = _meta(node)
        role = _OUT_ROLE.get(node.target) or _GRAPH_OUTPUTS[node.name]
        placement = ALLOCATOR if node.target in _ALLOCATES_OUTPUT or node.name in _GRAPH_OUTPUTS else ARENA
        if not hasattr(tm, "shape"):          # a tuple of TensorMetadata: one buffer per getitem
            for g in node.users:
                assert g.target is operator.getitem, g
                i = g.args[1]
                r = "stats" if node.target is _E.layout.default and i == _LAYOUT_STATS else role
                self.value(node, g, tm[i], r, placement, f"{node.name}[{i}]")
        else:
            self.value(node, node, tm, role, placement, node.name)

    def value(self, op: Node, val: Node, tm, role: str, placement: str, key: str) -> None:
        users, moves = list(val.users), op.target in _MOVES
        last = max([self.fwd(u) + LAST_SUB for u in users], default=self.fwd(op) + LAST_SUB)
        for u in users:
            if u.op == "output":
                last = self.end
            elif _saves(u, val):
                last = max(last, self.bwd(u) + LAST_SUB)
        first = self.fwd(op) + (_GATHER_SUB if moves else 0)
        self.add(val.name, self.layer(op), role, tm.shape, tm.dtype, [(first, last)], placement, key)
        grad_users = [u for u in users if u.target in _DIFFERENTIABLE]
        if tm.dtype.is_floating_point and grad_users:
            # written by a user's backward (a token movement's at its gather sub-step), read by the
            # op's backward (a token movement reads it at its first sub-step, the others throughout)
            first = min(self.bwd(u) + (_GATHER_SUB if u.target in _MOVES else 0) for u in grad_users)
            last = self.bwd(op) + (0 if moves else LAST_SUB)
            r = "clone_grad" if role == "clone_weights" else "gradient"
            # combine's and weighted_sum's backward write their input's gradient into `user.bwd.grad_in`;
            # the FFN's come out of grouped_mm; a value with several users has its gradients summed by autograd
            (u, *more) = grad_users
            placed = not more and u.target in _WRITES_GRAD_IN
            self.add(f"{val.name}.grad", self.layer(op), r, tm.shape, tm.dtype, [(first, last)],
                     ARENA if placed else ALLOCATOR, f"{u.name}.bwd.grad_in")

    # op internals ---------------------------------------------------------------------------
    def exchange(self, node: Node, rows: int, h: int, dt, backward_copies: int = 0) -> None:
        """A token movement in sub-steps: gather into `send` (0), exchange `send` → `recv` (1),
        gather `recv` into the result (2); the same in backward."""
        t, b, layer = self.fwd(node), self.bwd(node), self.layer(node)
        for when, at in (("", t), (".bwd", b)):
            self.add(f"{node.name}{when}.send", layer, "exchange", (rows, h), dt, [(at, at + 1)])
            self.add(f"{node.name}{when}.recv", layer, "exchange", (rows, h), dt, [(at + 1, at + 2)])
        if backward_copies:   # dispatch's backward: one gradient row per copy, then summed per token
            g = b + _GATHER_SUB
            self.add(f"{node.name}.bwd.grad_copies", layer, "gradient", (backward_copies, h), dt, [(g, g + 1)])

    def dispatch(self, node: Node) -> None:
        x, send_copy, copy_slot = (_meta(a) for a in node.args[:3])
        self.exchange(node, send_copy.shape[0], x.shape[1], x.dtype, backward_copies=copy_slot.shape[0])

    def combine(self, node: Node) -> None:
        y, recv_sorted = _meta(node.args[0]), _meta(node.args[4])
        self.exchange(node, recv_sorted.shape[0], y.shape[1], y.dtype)

    def ffn(self, node: Node) -> None:
        """grouped_mm (no out= variant) allocates h13, the output and grad_act; the SwiGLU writes
        gate_act, act and grad_h13 into the arena. The `loop` fallback is not planned at all."""
        rows, w13 = _meta(node.args[0]), _meta(node.args[1])
        r, f2, dt, layer = rows.shape[0], w13.shape[2], rows.dtype, self.layer(node)
        t, b, e = self.fwd(node), self.bwd(node), self.bwd(node) + LAST_SUB
        swiglu = ARENA if grouped_gemm.resolved_impl(node.args[4]) == "torch" else ALLOCATOR
        self.add(f"{node.name}.h13", layer, "activation", (r, f2), dt, [(t, e)], ALLOCATOR)
        self.add(f"{node.name}.gate_act", layer, "activation", (r, f2 // 2), dt, [(t, e)], swiglu)
        self.add(f"{node.name}.act", layer, "activation", (r, f2 // 2), dt, [(t, e)], swiglu)
        self.add(f"{node.name}.bwd.grad_act", layer, "gradient", (r, f2 // 2), dt, [(b, e)], ALLOCATOR)
        self.add(f"{node.name}.bwd.grad_h13", layer, "gradient", (r, f2), dt, [(b, e)], swiglu)
        if node.target is grouped_gemm.expert_ffn_recompute_clone:
            self.recomputed_clone(node)

    def recomputed_clone(self, node: Node) -> None:
        """The clone inside the checkpointed FFN: run at the forward step, again at the backward."""
        w13, w2, spare = _meta(node.args[1]), _meta(node.args[2]), _meta(node.args[6])
        offer, dom, layer, p = node.args[7], clone_domain_ranks(self.spec), self.layer(node), self.prefix(node)
        t, b, slots = self.fwd(node), self.bwd(node), w13.shape[0] + spare.shape[1]
        shapes = [("w13", (slots,) + tuple(w13.shape[1:])), ("w2", (slots,) + tuple(w2.shape[1:]))]
        assert self.spare.get("shapes", shapes) == shapes, "MoE layers with different expert shapes"
        self.spare.update(shapes=shapes, dtype=w13.dtype)
        self.spare.setdefault("live", []).extend([(t, t + LAST_SUB), (b, b + LAST_SUB)])
        for wname, _ in shapes:   # every layer's clone (forward and recomputed) lands in the one buffer
            self.spare.setdefault(wname, []).extend([f"{node.name}.clone_{wname}",
                                                     f"{node.name}.clone_{wname}.recompute"])
        self.buffers.append(_composite(f"{p}clone_weights.grad", layer, "clone_grad",
                                       [(n, s, ()) for n, s in shapes], w13.dtype, [(b, b + LAST_SUB)], ALLOCATOR))
        for wname, w in (("w13", w13), ("w2", w2)):
            self.clone_exchange(f"{node.name}.clone_{wname}", layer, w, offer, dom, t, None)
            self.clone_exchange(f"{node.name}.clone_{wname}.recompute", layer, w, offer, dom, b, b)

    def clone_exchange(self, buf: str, layer, w, offer: int, dom: int, at: int, backward_at: int | None):
        """The internals of one echo::clone_weights call keyed `buf`, run at step `at`, and of its
        backward (the gradient reduction) at `backward_at` when it has one."""
        tail, whole = tuple(w.shape[1:]), [(at, at + LAST_SUB)]
        self.add(f"{buf}.send", layer, "clone_exchange", (offer,) + tail, w.dtype, whole)
        self.add(f"{buf}.gather", layer, "clone_exchange", (dom * offer,) + tail, w.dtype, whole)
        if backward_at is not None:
            whole = [(backward_at, backward_at + LAST_SUB)]
            self.add(f"{buf}.bwd.rs_in", layer, "clone_exchange", (dom * offer + 1,) + tail, w.dtype, whole)
            self.add(f"{buf}.bwd.rs_out", layer, "clone_exchange", (offer,) + tail, w.dtype, whole)

    def clone(self, node: Node) -> None:
        w, offer = _meta(node.args[0]), node.args[3]
        self.clone_exchange(node.name, self.layer(node), w, offer, clone_domain_ranks(self.spec),
                            self.fwd(node), self.bwd(node))

    def collect(self) -> list[Buffer]:
        internals = {_E.dispatch.default: self.dispatch, _E.combine.default: self.combine,
                     grouped_gemm.expert_ffn: self.ffn, grouped_gemm.expert_ffn_recompute_clone: self.ffn,
                     _E.clone_weights.default: self.clone}
        for node in self.nodes:
            if node.op != "call_function":
                continue
            if node.target in _OUT_ROLE or (node.target is torch.stack and node.name in _GRAPH_OUTPUTS):
                self.outputs(node)
            if node.target in internals:
                internals[node.target](node)
        buffers = _merge_clones(self.buffers)
        if self.spare:
            parts = [(n, shape, self.spare[n]) for n, shape in self.spare["shapes"]]
            buffers.append(_composite("spare_weights", None, "clone_weights", parts, self.spare["dtype"],
                                      sorted(self.spare["live"])))
        return buffers

    def timeline(self) -> Timeline:
        m = SUB_STEPS * self.n
        layers = [{"layer": self.layer(x), "forward": self.fwd(x), "backward": self.bwd(x)}
                  for x in self.nodes if x.target is _E.dispatch.default]
        return Timeline(2 * m + 2, (0, m - 1), (m, 2 * m - 1), 2 * m, 2 * m + 1, layers)


def _layer_number(prefix: str, ordinal: int) -> int:
    m = re.search(r"layers_(\d+)_", prefix)
    return int(m.group(1)) if m else ordinal


def _saves(user: Node, val: Node) -> bool:
    args = {i for i, a in enumerate(user.args) if a is val}
    return bool(args & _SAVED_ARGS.get(user.target, set()))


def _merge_clones(buffers: list[Buffer]) -> list[Buffer]:
    """The clone_w13 and clone_w2 outputs of a layer become one buffer `<layer>_clone_weights`
    (w13 and w2 back to back), and their gradients one `<layer>_clone_weights.grad`."""
    groups: dict[tuple, list[Buffer]] = {}
    for b in buffers:
        if b.role in ("clone_weights", "clone_grad") and not b.parts:
            groups.setdefault((b.layer, b.role), []).append(b)
    merged = {}
    for (layer, role), bs in groups.items():
        name = bs[0].name.removesuffix(".grad").rsplit("_clone_", 1)[0] + "_clone_weights"
        name += ".grad" if role == "clone_grad" else ""
        live = [(min(b.first for b in bs), max(b.last for b in bs))]
        merged[id(bs[0])] = _composite(name, layer, role, [(b.name, b.shape, b.keys) for b in bs],
                                       getattr(torch, bs[0].dtype), live, bs[0].placement)
    grouped = {id(b) for bs in groups.values() for b in bs}
    return [merged.get(id(b), b) for b in buffers if id(b) in merged or id(b) not in grouped]


# --- the pass ----------------------------------------------------------------------------------

def plan_buffers(gm: GraphModule, spec: Spec) -> BufferPlan:
    if spec.backends.dispatch != "torch":
        return BufferPlan(False, f"backends.dispatch '{spec.backends.dispatch}' has data-dependent "
                                 "shapes: only the 'torch' backend's static buffers are planned")
    col = _Collector(gm, spec)
    if not col.prefixes:
        return BufferPlan(False, "no MoE layers in the graph")
    buffers = col.collect()
    placed = [b for b in buffers if b.placement == ARENA]
    g = allocate(placed)
    lb, peak = lower_bound(placed)
    world = spec.parallel.ep * spec.parallel.dp
    note = (f"one plan for all {world} ranks: under the torch backend every rank has the same "
            f"buffer shapes (equal [ep·C] chunks, {spec.experts_per_rank} home + "
            f"{spec.echo.spare_slots_per_rank if spec.echo.enabled else 0} spare slots)")
    return BufferPlan(
        True, "", "all", note, ALIGN_BYTES, col.recompute, col.timeline(), buffers,
        arena_bytes=arena_bytes(placed), naive_bytes=sum(aligned(b.nbytes) for b in placed),
        lower_bound_bytes=lb, peak_step=peak, lifetimes=g.number_of_nodes(),
        interference_edges=g.number_of_edges(), interfering_pairs=interfering_pairs(g),
        allocator_lower_bound_bytes=lower_bound([b for b in buffers if b.placement == ALLOCATOR])[0],
        total_lower_bound_bytes=lower_bound(buffers)[0])


def arena_layout(plan: BufferPlan) -> ArenaLayout:
    """What the runtime allocates: the arena size and, for every key, its view (offset, shape, dtype)."""
    assert plan.planned, plan.reason
    views = {}
    for b in plan.buffers:
        if b.placement != ARENA:
            continue
        dt = getattr(torch, b.dtype)
        for p in b.parts or (Part(b.name, b.shape, 0, b.keys),):
            for key in p.keys:
                assert key not in views, f"arena key {key!r} planned twice"
                views[key] = View(b.offset + p.offset_bytes, p.shape, dt)
    return ArenaLayout(plan.arena_bytes, views)


def run(gm: GraphModule, spec: Spec) -> PassResult:
    """Plan the MoE buffers of `gm` (shape-propagated). The graph is returned unchanged."""
    return PassResult(gm, plan_buffers(gm, spec))


def plan_to_json(plan: BufferPlan) -> dict:
    """The plan as written to build/<name>/plan.json."""
    out = {"version": 1, "planned": plan.planned, "reason": plan.reason, "ranks": plan.ranks,
           "note": plan.note, "align_bytes": plan.align_bytes,
           "recompute_clone_dispatch": plan.recompute_clone_dispatch}
    if not plan.planned:
        return out
    tl = plan.timeline
    out["timeline"] = {"steps": tl.steps, "forward": list(tl.forward), "backward": list(tl.backward),
                       "grad_reduction": tl.grad_reduction, "optimizer": tl.optimizer, "layers": tl.layers}
    placed = sum(b.placement == ARENA for b in plan.buffers)
    out["totals"] = {"buffers": len(plan.buffers), "arena_buffers": placed,
                     "allocator_buffers": len(plan.buffers) - placed, "arena_bytes": plan.arena_bytes,
                     "lower_bound_bytes": plan.lower_bound_bytes, "naive_bytes": plan.naive_bytes,
                     "arena_over_lower_bound": round(plan.arena_bytes / max(plan.lower_bound_bytes, 1), 4),
                     "allocator_lower_bound_bytes": plan.allocator_lower_bound_bytes,
                     "total_lower_bound_bytes": plan.total_lower_bound_bytes,
                     "peak_step": plan.peak_step, "lifetimes": plan.lifetimes,
                     "interference_edges": plan.interference_edges, "interfering_pairs": plan.interfering_pairs}
    out["buffers"] = [_buffer_json(b) for b in plan.buffers]
    return out


def _buffer_json(b: Buffer) -> dict:
    d = {"name": b.name, "layer": b.layer, "role": b.role, "shape": list(b.shape), "dtype": b.dtype,
         "bytes": b.nbytes, "lifetime": [b.first, b.last], "placement": b.placement, "offset": b.offset}
    if b.keys and list(b.keys) != [b.name]:
        d["keys"] = list(b.keys)
    if len(b.live) > 1:
        d["live"] = [list(s) for s in b.live]
    if b.parts:
        d["parts"] = [{"name": p.name, "shape": list(p.shape), "offset_bytes": p.offset_bytes}
                      | ({"keys": list(p.keys)} if p.keys and list(p.keys) != [p.name] else {}) for p in b.parts]
    return d
