"""The real-row backends' own buffers in the memory plan (placement 'symmetric').

`symm_mem` exchanges through one symmetric pool per rank (runtime/backends/symm_mem.py),
shared by every dispatch and combine, forward and backward: rows `inp`/`out` [M, H] with
M = max(N, R), and the int64 splits/offsets. `deepep` exchanges through HybridEPBuffer's
registered buffers; their exact size is the library's, so the plan lists the least they
must hold: every EP rank's tokens [ep·T, H] (dispatch stages whole tokens) and the permuted
rows [Rp, H]. The `torch` dispatch under backends.exchange 'p2p' pushes rows into one
symmetric receive pool per rank, [ep·C, H], dispatch's token map into one [ep·C] int64 pool and
the router weights (and their gradient) into one [ep·C] pool (runtime/p2p.py, p2p_moves.py); it
plans no send or receive buffer.
Symmetric buffers are allocated once by the backend, outside the arena and the caching allocator:
they are listed with placement 'symmetric' in plan.json, summed in its `symmetric_bytes`, and
counted by the memory model as held all run (echoc/memory_model.py), not placed.
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from echoc.spec import Spec
from passes.buffer_lifetimes import LAST_SUB, SUB_STEPS
from passes.memory_plan import Buffer, composite
from runtime import contracts
from runtime.contracts import (COMBINE, DEEPEP_COMBINE, DEEPEP_DISPATCH, DISPATCH, P2P_COMBINE, P2P_DISPATCH,
                               SYMM_COMBINE, SYMM_DISPATCH, SYMM_LAYOUT)

SYMMETRIC = "symmetric"


def _live(gm: GraphModule, ops) -> tuple[list, list]:
    """(the nodes calling `ops`, the closed step spans of their forward and backward)."""
    nodes = list(gm.graph.nodes)
    n, spans, users = len(nodes), [], []
    for i, node in enumerate(nodes):
        if contracts.of(node.target) in ops:
            users.append(node)
            spans += [(SUB_STEPS * i, SUB_STEPS * i + LAST_SUB),
                      (SUB_STEPS * (2 * n - 1 - i), SUB_STEPS * (2 * n - 1 - i) + LAST_SUB)]
    return users, sorted(spans)


def _meta(node):
    return node.meta["tensor_meta"]


def _symm_mem(gm: GraphModule) -> list[Buffer]:
    users, live = _live(gm, (SYMM_DISPATCH, SYMM_COMBINE))
    if not users:
        return []
    d = next(u for u in users if contracts.of(u.target) is SYMM_DISPATCH)
    x, send, recv = (_meta(SYMM_DISPATCH.arg(d, a)) for a in ("x", "send_copy", "recv_row"))
    n_splits = _meta(SYMM_DISPATCH.arg(d, "in_splits")).shape[0]
    m, h = max(send.shape[0], recv.shape[0]), x.shape[1]
    keys = {p: tuple(contracts.of(u.target).key(u.name, p) for u in users)
            for p in ("inp", "out", "in_splits", "in_splits_offsets", "out_splits_offsets")}
    rows = composite("symm_mem.rows", None, "exchange", [(p, (m, h), keys[p]) for p in ("inp", "out")],
                     x.dtype, live, SYMMETRIC)
    splits = composite("symm_mem.splits", None, "exchange",
                       [("in_splits", (n_splits,), keys["in_splits"]),
                        ("in_splits_offsets", (2, n_splits), keys["in_splits_offsets"]),
                        ("out_splits_offsets", (2, n_splits), keys["out_splits_offsets"])], torch.int64, live,
                       SYMMETRIC)
    return [rows, splits]


def _deepep(gm: GraphModule, spec: Spec) -> list[Buffer]:
    users, live = _live(gm, (DEEPEP_DISPATCH, DEEPEP_COMBINE))
    if not users:
        return []
    d = next(u for u in users if contracts.of(u.target) is DEEPEP_DISPATCH)
    x = _meta(DEEPEP_DISPATCH.arg(d, "x"))
    rp, h, ep = DEEPEP_DISPATCH.arg(d, "permuted_rows"), x.shape[1], spec.parallel.ep
    keys = tuple(contracts.of(u.target).key(u.name, "hybrid_ep") for u in users)
    return [composite("hybrid_ep", None, "exchange", [("tokens", (ep * x.shape[0], h), keys),
                                                      ("permuted", (rp, h), ())], x.dtype, live, SYMMETRIC)]


def _p2p(gm: GraphModule, spec: Spec) -> list[Buffer]:
    if spec.token_exchange != "p2p":
        return []
    users, live = _live(gm, (DISPATCH, COMBINE, P2P_DISPATCH, P2P_COMBINE))
    if not users:
        return []
    d = next(u for u in users if contracts.of(u.target) in (DISPATCH, P2P_DISPATCH))
    c = contracts.of(d.target)
    x, send = _meta(c.arg(d, "x")), _meta(c.arg(d, "send_copy"))
    keys = tuple(c.key(u.name, p) for u in users for c in [contracts.of(u.target)] for p in ("recv", "bwd.recv")
                 if p in c.part_names)
    n = send.shape[0]
    # every movement pushes its rows (one per token and rank) into the one row pool; dispatch_weighted
    # pushes beside them each copy's place (p2p.map) and router weight (p2p.weights), and its
    # backward returns the weights' gradient through that pool
    pools = [composite("p2p.recv", None, "exchange", [("recv", (n, x.shape[1]), keys)], x.dtype, live, SYMMETRIC)]
    if c is P2P_DISPATCH:
        pools += [composite("p2p.map", None, "exchange", [("map", (n, 1), ())], torch.int64, live, SYMMETRIC),
                  composite("p2p.weights", None, "exchange", [("weights", (n, 1), ())], x.dtype, live, SYMMETRIC)]
    return pools


def symmetric_buffers(gm: GraphModule, spec: Spec) -> list[Buffer]:
    """The backend's symmetric buffers of `gm` (shape-propagated); none under `torch` with
    backends.exchange 'nccl'."""
    return _symm_mem(gm) + _deepep(gm, spec) + _p2p(gm, spec)


def has_token_layouts(gm: GraphModule) -> bool:
    return any(contracts.of(n.target) in contracts.TOKEN_LAYOUTS for n in gm.graph.nodes)


assert SYMM_LAYOUT in contracts.TOKEN_LAYOUTS
