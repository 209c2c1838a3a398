"""Allocation: interference graph, first-fit placement and the lower bound (pure: sizes and
lifetimes in, offsets out).

Buffers whose lifetimes share a step interfere. Buffers with identical lifetimes are folded
into one graph node, which loses nothing; the graph is a dense boolean matrix (torch).
First-fit by decreasing size: sort buffers by aligned size (then longer lifetime, earlier
start) and place each at the lowest 256-byte aligned offset where it overlaps no already placed buffer that interferes with it. The lower
bound is the maximum over steps of the live aligned bytes: live buffers occupy disjoint
aligned ranges, so no placement can beat it.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from passes.memory_plan import ALIGN_BYTES, Buffer, Span, aligned


@dataclass
class Interference:
    """The interference graph, with buffers of identical lifetime folded into one node.

    Node k: one distinct lifetime `lives[k]` and its buffers `members[k]`. `adjacent[k, j]`
    is true when lifetimes k and j share a step (the diagonal is true: a node's members
    interfere with each other). Folding is lossless and cuts the graph (an op's send/receive
    pair, the FFN's saved intermediates, the index maps share lifetimes); plan.json reports
    both counts (`interfering_pairs` unfolded, `interference_edges` folded). A dense boolean
    matrix: glm5 has ~2,000 lifetimes and ~570,000 edges, which Python sets build slowly.
    """
    lives: list[tuple[Span, ...]]
    members: list[list[int]]
    adjacent: torch.Tensor      # [K, K] bool

    def number_of_nodes(self) -> int:
        return len(self.lives)

    def number_of_edges(self) -> int:
        return int(self.adjacent.triu(1).sum())


def interference_graph(buffers: list[Buffer]) -> Interference:
    by_live: dict[tuple[Span, ...], list[int]] = {}
    for i, b in enumerate(buffers):
        by_live.setdefault(b.live, []).append(i)
    lives = list(by_live)
    spans = [(s, e, k) for k, live in enumerate(lives) for s, e in live]
    adjacent = torch.zeros(len(lives), len(lives), dtype=torch.bool)
    if spans:
        s, e, k = torch.tensor(spans, dtype=torch.int64).unbind(1)
        i, j = ((s[:, None] <= e[None, :]) & (s[None, :] <= e[:, None])).nonzero(as_tuple=True)
        adjacent[k[i], k[j]] = True
    adjacent.fill_diagonal_(True)
    return Interference(lives, list(by_live.values()), adjacent)


def interfering_pairs(graph: Interference) -> int:
    """Pairs of buffers whose lifetimes overlap (the unfolded graph's edge count)."""
    c = torch.tensor([len(m) for m in graph.members], dtype=torch.float64)
    within = int((c * (c - 1) / 2).sum())
    return within + int(c @ graph.adjacent.triu(1).double() @ c)


def _lowest_gap(lo: torch.Tensor, hi: torch.Tensor, size: int) -> int:
    """The lowest offset ≥ 0 where [at, at + size) overlaps none of the ranges [lo, hi): the
    candidates are 0 and the running maximum of `hi` in `lo` order; a candidate fits when the
    next range starts at or after its end."""
    if lo.numel() == 0:
        return 0
    order = torch.sort(lo, stable=True).indices
    lo = lo[order]
    cand = torch.cat([lo.new_zeros(1), torch.cummax(hi[order], 0).values])
    nxt = torch.cat([lo, lo.new_full((1,), torch.iinfo(torch.int64).max)])
    return int(cand[int(torch.nonzero(cand + size <= nxt)[0])])


def first_fit(buffers: list[Buffer], graph: Interference, align: int = ALIGN_BYTES) -> list[int]:
    """Aligned offsets by first-fit in decreasing size: sort by aligned size (then longer
    lifetime, earlier start), put each buffer at the lowest offset where it overlaps no
    already placed buffer that interferes with it (empty buffers occupy nothing)."""
    size = [aligned(b.nbytes, align) for b in buffers]
    span = [sum(e - s + 1 for s, e in b.live) for b in buffers]
    node = [0] * len(buffers)
    for k, members in enumerate(graph.members):
        for i in members:
            node[i] = k
    node_t = torch.tensor(node, dtype=torch.int64)
    lo = torch.zeros(len(buffers), dtype=torch.int64)
    hi = torch.zeros(len(buffers), dtype=torch.int64)
    placed = torch.zeros(len(buffers), dtype=torch.bool)
    offset: list[int] = [0] * len(buffers)
    for i in sorted(range(len(buffers)), key=lambda i: (-size[i], -span[i], buffers[i].first, i)):
        if size[i]:
            taken = placed & graph.adjacent[node[i]][node_t]
            offset[i] = _lowest_gap(lo[taken], hi[taken], size[i])
            lo[i], hi[i], placed[i] = offset[i], offset[i] + size[i], True
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


def allocate(buffers: list[Buffer], align: int = ALIGN_BYTES) -> Interference:
    """Set every buffer's offset; return the interference graph it was placed on."""
    g = interference_graph(buffers)
    for b, at in zip(buffers, first_fit(buffers, g, align)):
        b.offset = at
    return g
