"""The `torch` dispatch's token rows under backends.exchange 'p2p' (runtime/p2p.py), each token
crossing to a rank once, whatever its number of copies there.

Top-k sends a token to several experts of one rank (top-8 of 64 experts at ep 2: about four).
The padded exchange moves one row per copy; here every movement moves one row per (token, rank):

    dispatch      x [T, H] → one row per token and rank (push_unique), the expert side gathers
                  each sorted row from its token's row
    dispatch bwd  the expert side sums the gradient of a token's copies it holds (sum_return),
                  the token side sums the ≤ ep rows it gets back
    combine       (combine_weighted) the router weights cross to the expert side with the map;
                  each rank returns Σ w · y over the copies of a token it holds, the token side
                  sums those rows: the combine and the weighted sum in one op
    combine bwd   the output's gradient crosses once per (token, rank); the expert side forms
                  w · g per copy and ⟨g, y⟩ for the router weight, which goes back per copy

Sums accumulate in fp32; a rank's partial sum is rounded to the rows' dtype before it crosses,
so results are the padded exchange's up to that rounding (within bf16 tolerance, not bitwise).

The maps: the token side's `unique_tokens` (runtime/p2p.py) names, per send row, its token's
first row in its chunk (lead) and that row's place among the chunk's distinct tokens (upos:
U = min(T, C) places at most); `where` gives every copy its token's place. Pushed beside the rows
as where·K + k, it lets the expert side file each sorted row under (place, k): a table
[ep·U, K] of sorted rows, -1 where none.
"""
from __future__ import annotations

import torch
from torch import Tensor

from runtime import arena, comm, contracts, p2p, rows
from runtime.contracts import P2P_COMBINE
from runtime.layout import token_of


def sorted_index(sorted_src: Tensor, got: Tensor, C: int) -> Tensor:
    """Expert side: each sorted row's pool row, chunk s·C + its token's place (`got`: the pushed
    `where` of each receive row); -1 for padding."""
    s = sorted_src.clamp(min=0)
    return torch.where(sorted_src >= 0, s - s % C + got[s], -1)


def _places(send_copy: Tensor, top_k: int, T: int, group: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Token side: (tokens, lead, upos, packed = where·K + k per send row, -1 padding)."""
    tokens = token_of(send_copy, top_k)
    lead, upos, where = p2p.unique_tokens(tokens, comm.group_size(group), T)
    return tokens, lead, upos, torch.where(where >= 0, where * top_k + send_copy % top_k, -1)


def _at_sorted(pushed: Tensor, sorted_src: Tensor) -> Tensor:
    """Expert side: a value pushed per receive row ([ep·C, 1] pool), at each sorted row; 0 at padding."""
    return torch.where(sorted_src >= 0, pushed.view(-1)[sorted_src.clamp(min=0)], 0)


def _table(sorted_src: Tensor, packed: Tensor, C: int, U: int, K: int, ep: int) -> Tensor:
    """Expert side: [ep·U, K] sorted rows filed by (chunk s, place u, copy k); -1 where none."""
    s = sorted_src.clamp(min=0)
    p = packed[s]
    slot = torch.where(sorted_src >= 0, (s // C * U + p // K) * K + p % K, ep * U * K)
    table = torch.full((ep * U * K + 1,), -1, dtype=torch.int64, device=sorted_src.device)
    table.scatter_(0, slot, torch.arange(sorted_src.shape[0], device=sorted_src.device))
    return table[:-1].view(ep * U, K)


def _token_index(copy_slot: Tensor, lead: Tensor, upos: Tensor, C: int, T: int) -> Tensor:
    """Token side: [T, K] pool rows to sum for each token, one per rank its copies reached (the
    copy whose send row is its token's first in that chunk), -1 elsewhere."""
    j = copy_slot.clamp(min=0)
    first = (copy_slot >= 0) & (lead[j] >= 0)
    return torch.where(first, j - j % C + upos[j], -1).view(T, -1)


def sum_return(src: Tensor, send_copy: Tensor, copy_slot: Tensor, sorted_src: Tensor, top_k: int, group: str,
               weights: Tensor | None = None, out: Tensor | None = None) -> Tensor:
    """Expert-sorted rows src [R, H] → per token the sum over its copies [T, H] (Σ w · src with the
    router weights [T, K], rounded to src's dtype as weighted_sum does). Two exchanges: the maps
    (and weights) to the expert side, then one summed row per (token, rank) back."""
    ep, n, K = comm.group_size(group), send_copy.shape[0], top_k
    T, C = copy_slot.shape[0] // K, n // ep
    U = min(T, C)     # a chunk's distinct tokens; T is the token budget, the same static size on every rank
    _, lead, upos, packed = _places(send_copy, K, T, group)
    pushes = [p2p.Push(packed.view(n, 1), p2p.real_rows(packed))]
    if weights is not None:
        pushes.append(p2p.Push(weights.to(src.dtype).reshape(-1, 1), send_copy))
    got, *w = p2p.exchange(pushes, group, n)
    table = _table(sorted_src, got.view(n), C, U, K, ep)
    wt = None
    if weights is not None:   # the weight of each table entry (a sorted row): its copy's pushed weight
        wt = torch.where(table >= 0, _at_sorted(w[0], sorted_src)[table.clamp(min=0)], 0)
    back = p2p.exchange([p2p.Push(src.contiguous(), table, weights=wt, sum_rows=U)], group, n)[0]
    return rows.gather_sum(back, _token_index(copy_slot, lead, upos, C, T), out=out)


# --- combine and weighted sum in one op --------------------------------------------------------

def _requires_p2p(group: str) -> None:
    if not p2p.enabled(group):
        raise RuntimeError(f"echo::combine_weighted: the graph was compiled for backends.exchange 'p2p' at ep > 1, "
                           f"but this process has no p2p exchange on group {group!r} (runtime/p2p.setup)")


@torch.library.custom_op("echo::combine_weighted", mutates_args=())
def combine_weighted(y: Tensor, weights: Tensor, send_copy: Tensor, copy_slot: Tensor, sorted_src: Tensor,
                     recv_sorted: Tensor, top_k: int, group: str, buf: str) -> Tensor:
    """Expert outputs y [R, H], router weights [T, K] → Σ_k w[t, k] · y(copy t·K + k) [T, H] at the
    token's rank (dropped copies add nothing)."""
    _requires_p2p(group)
    return sum_return(y, send_copy, copy_slot, sorted_src, top_k, group, weights=weights)


@combine_weighted.register_fake
def _(y, weights, send_copy, copy_slot, sorted_src, recv_sorted, top_k, group, buf):
    return y.new_empty((weights.shape[0], y.shape[1]))


def _combine_weighted_backward(ctx, grad):
    """The output's gradient g to each rank once per token (with the weights); there
    grad y = w · g and grad w = ⟨g, y⟩ per copy (rows.scaled_gather_dot), grad w back per copy."""
    saved = P2P_COMBINE.saved_by_name(ctx)
    y, weights, send_copy = saved["y"], saved["weights"], saved["send_copy"]
    n, group = send_copy.shape[0], ctx.group
    C, K = n // comm.group_size(group), ctx.top_k
    tokens = token_of(send_copy, K)
    w_push = p2p.Push(weights.to(y.dtype).reshape(-1, 1), send_copy)
    g_rows, got, w_rows = p2p.push_unique(grad.contiguous(), tokens, group, extra=(w_push,))
    src = saved["sorted_src"]
    w = _at_sorted(w_rows, src)
    key = None if ctx.buf is None else P2P_COMBINE.key(ctx.buf, P2P_COMBINE.input_grad)
    grad_y = arena.out_like(key, y.shape, y)
    grad_y, grad_w = rows.scaled_gather_dot(g_rows, sorted_index(src, got, C), y, w, grad_y)
    back = p2p.push(grad_w.view(-1, 1), saved["recv_sorted"], group)
    grad_weights = rows.gather(back, saved["copy_slot"]).view(weights.shape).to(weights.dtype)
    return P2P_COMBINE.input_grads(y=grad_y, weights=grad_weights)


combine_weighted.register_autograd(_combine_weighted_backward,
                                   setup_context=P2P_COMBINE.setup_context("top_k", "group", "buf"))
contracts.bind(P2P_COMBINE, torch.ops.echo.combine_weighted.default)
