"""The `torch` dispatch's token rows under backends.exchange 'p2p' (runtime/p2p.py), each token
crossing to a rank once, whatever its number of copies there: four exchanges a layer.

Top-k sends a token to several experts of one rank (top-8 of 64 experts at ep 2: about four).
The padded exchange moves one row per copy; here every movement moves one row per (token, rank):

    dispatch      (dispatch_weighted) x [T, H] → one row per token and rank; beside the rows, each
                  copy's router weight and place cross too. The expert side gathers each sorted
                  row from its token's row and returns the weight of each sorted row (`row_weight`)
                  and the layer's index maps (`routes`), which the three movements below reuse
    combine       (combine_weighted) each rank returns Σ w · y over the copies of a token it holds,
                  the token side sums those ≤ ep rows: the combine and the weighted sum in one op
    combine bwd   the output's gradient crosses once per (token, rank); the expert side forms
                  w · g per copy and ⟨g, y⟩, the gradient of `row_weight`
    dispatch bwd  the expert side sums the gradient of a token's copies it holds and returns it
                  with the router weights' gradient per copy; the token side sums the ≤ ep rows

Sums accumulate in fp32; a rank's partial sum is rounded to the rows' dtype before it crosses,
so results are the padded exchange's up to that rounding (within bf16 tolerance, not bitwise).

The maps: the token side's `unique_tokens` (runtime/p2p.py) names, per send row, its token's
first row in its chunk (lead) and that row's place among the chunk's distinct tokens (upos:
U = min(T, C) places at most); `where` gives every copy its token's place. Pushed beside the rows
as where·K + k, it lets the expert side file each sorted row under (place, k): a table
[ep·U, K] of sorted rows, -1 where none.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from runtime import arena, comm, contracts, p2p, rows
from runtime.contracts import P2P_COMBINE, P2P_DISPATCH
from runtime.layout import token_of


class Routes(NamedTuple):
    """One layer's maps under p2p: dispatch_weighted's `routes` output cut into its parts (n = ep·C)."""
    lead: Tensor          # [n] token side: the token whose first row in its chunk this send row is, else -1
    upos: Tensor          # [n] that row's place among its chunk's distinct tokens
    token_index: Tensor   # [T, K] token side: the pool rows to sum per token (one per rank reached), -1 elsewhere
    row_index: Tensor     # [n] expert side: each sorted row's pool row (its token's), -1 at padding
    table: Tensor         # [ep·U, K] expert side: sorted rows filed by (chunk, place, copy), -1 where none


def _sizes(n: int, T: int, K: int, ep: int) -> tuple[int, ...]:
    return n, n, T * K, n, ep * min(T, n // ep) * K


def routes_numel(n: int, T: int, K: int, ep: int) -> int:
    """Elements of the `routes` output for n = ep·C send rows, T tokens, top-k K."""
    return sum(_sizes(n, T, K, ep))


def split_routes(routes: Tensor, n: int, T: int, K: int, ep: int) -> Routes:
    lead, upos, token_index, row_index, table = routes.split(_sizes(n, T, K, ep))
    return Routes(lead, upos, token_index.view(T, K), row_index, table.view(-1, K))


def _sorted_index(sorted_src: Tensor, place: Tensor, C: int) -> Tensor:
    """Expert side: each sorted row's pool row, chunk s·C + its token's place (`place`: the pushed
    place of each receive row); -1 for padding."""
    s = sorted_src.clamp(min=0)
    return torch.where(sorted_src >= 0, s - s % C + place[s], -1)


def _at_sorted(pushed: Tensor, sorted_src: Tensor) -> Tensor:
    """Expert side: a value pushed per receive row ([ep·C, 1] pool), at each sorted row; 0 at padding."""
    return torch.where(sorted_src >= 0, pushed.view(-1)[sorted_src.clamp(min=0)], 0)


def _table(sorted_src: Tensor, packed: Tensor, C: int, U: int, K: int, table: Tensor) -> Tensor:
    """Expert side: [ep·U, K] sorted rows filed by (chunk s, place u, copy k); -1 where none."""
    s = sorted_src.clamp(min=0)
    p = packed[s]
    slot = torch.where(sorted_src >= 0, (s // C * U + p // K) * K + p % K, table.numel())
    flat = torch.full((table.numel() + 1,), -1, dtype=torch.int64, device=sorted_src.device)
    flat.scatter_(0, slot, torch.arange(sorted_src.shape[0], device=sorted_src.device))
    return table.view(-1).copy_(flat[:-1])


def _token_index(copy_slot: Tensor, lead: Tensor, upos: Tensor, C: int, T: int) -> Tensor:
    """Token side: [T, K] pool rows to sum for each token, one per rank its copies reached (the
    copy whose send row is its token's first in that chunk), -1 elsewhere."""
    j = copy_slot.clamp(min=0)
    first = (copy_slot >= 0) & (lead[j] >= 0)
    return torch.where(first, j - j % C + upos[j], -1).view(T, -1)


def token_maps(send_copy: Tensor, copy_slot: Tensor, K: int, ep: int, T: int, r: Routes) -> tuple[Tensor, Tensor]:
    """Token side, before the exchange: fills r.lead, r.upos, r.token_index; returns (packed [n]:
    each send row's token place·K + k, -1 at padding; its push index: the real rows)."""
    if p2p.p2p_triton is not None and send_copy.is_cuda:
        return p2p.p2p_triton.token_maps(send_copy, copy_slot, ep, T, K, r.lead, r.upos, r.token_index.view(-1))
    lead, upos, where = p2p.unique_tokens(token_of(send_copy, K), ep, T)
    r.lead.copy_(lead)
    r.upos.copy_(upos)
    r.token_index.copy_(_token_index(copy_slot, lead, upos, send_copy.shape[0] // ep, T))
    packed = torch.where(where >= 0, where * K + send_copy % K, -1)
    return packed, p2p.real_rows(packed)


def sorted_maps(sorted_src: Tensor, got: Tensor, w_recv: Tensor, C: int, K: int, r: Routes, row_weight: Tensor) -> None:
    """Expert side, after the exchange (`got`: each receive row's pushed place·K + k, `w_recv` its
    copy's weight): fills r.row_index, r.table and row_weight (0 at padding)."""
    U = r.table.shape[0] // (sorted_src.shape[0] // C)
    if p2p.p2p_triton is not None and sorted_src.is_cuda:
        p2p.p2p_triton.sorted_maps(sorted_src, got, w_recv.view(-1), C, U, K, r.row_index, row_weight, r.table)
        return
    r.row_index.copy_(_sorted_index(sorted_src, got // K, C))
    row_weight.copy_(_at_sorted(w_recv, sorted_src))
    _table(sorted_src, got, C, U, K, r.table)


def _requires_p2p(op: str, group: str) -> None:
    if not p2p.enabled(group):
        raise RuntimeError(f"echo::{op}: the graph was compiled for backends.exchange 'p2p' at ep > 1, "
                           f"but this process has no p2p exchange on group {group!r} (runtime/p2p.setup)")


# --- dispatch, carrying the router weights and the maps ----------------------------------------

@torch.library.custom_op("echo::dispatch_weighted", mutates_args=())
def dispatch_weighted(x: Tensor, weights: Tensor, send_copy: Tensor, copy_slot: Tensor, sorted_src: Tensor,
                      recv_sorted: Tensor, top_k: int, group: str, group_size: int,
                      buf: str) -> tuple[Tensor, Tensor, Tensor]:
    """x [T, H], router weights [T, K] → (rows [R, H] expert-sorted (padding undefined), row_weight
    [R] each sorted row's weight in x's dtype (0 at padding), routes: the layer's maps, Routes)."""
    _requires_p2p("dispatch_weighted", group)
    assert comm.group_size(group) == group_size, (group, comm.group_size(group), group_size)
    n, K, T = send_copy.shape[0], top_k, x.shape[0]
    C = n // group_size
    rows_key, weight_key, routes_key = P2P_DISPATCH.output_keys(buf)
    routes = arena.out(routes_key, (routes_numel(n, T, K, group_size),), torch.int64, x.device)
    r = split_routes(routes, n, T, K, group_size)
    packed, packed_rows = token_maps(send_copy, copy_slot, K, group_size, T, r)
    recv, got, w_recv = p2p.exchange([p2p.Push(x.contiguous(), r.lead, r.upos),
                                      p2p.Push(packed.view(n, 1), packed_rows),
                                      p2p.Push(weights.to(x.dtype).reshape(-1, 1), send_copy)], group, n)
    row_weight = arena.out(weight_key, (n,), x.dtype, x.device)
    sorted_maps(sorted_src, got.view(n), w_recv, C, K, r, row_weight)
    out = rows.gather(recv, r.row_index, out=arena.out_like(rows_key, (n, x.shape[1]), x), zero_missing=False)
    return out, row_weight, routes


@dispatch_weighted.register_fake
def _(x, weights, send_copy, copy_slot, sorted_src, recv_sorted, top_k, group, group_size, buf):
    n = sorted_src.shape[0]
    return (x.new_empty((n, x.shape[1])), x.new_empty(n),
            x.new_empty(routes_numel(send_copy.shape[0], x.shape[0], top_k, group_size), dtype=torch.int64))


def _dispatch_weighted_backward(ctx, grad_rows, grad_row_weight, _grad_routes):
    """Each rank sums the gradient of a token's copies it holds (one row per (token, rank)) and
    returns the router weights' gradient per copy, in one exchange: grad x [T, H], grad weights [T, K]."""
    saved = P2P_DISPATCH.saved_by_name(ctx)
    (T, _), K, n = ctx.x_shape, ctx.top_k, saved["recv_sorted"].shape[0]
    r = split_routes(saved["routes"], n, T, K, ctx.group_size)
    pushes = [p2p.Push(grad_rows.contiguous(), r.table, sum_rows=r.table.shape[0] // ctx.group_size)]
    if grad_row_weight is not None:
        pushes.append(p2p.Push(grad_row_weight.contiguous().view(-1, 1), saved["recv_sorted"]))
    back, *w_back = p2p.exchange(pushes, ctx.group, n)
    grad_w = None
    if w_back:
        grad_w = rows.gather(w_back[0], saved["copy_slot"]).view(T, K).to(ctx.weights_dtype)
    return P2P_DISPATCH.input_grads(x=rows.gather_sum(back, r.token_index), weights=grad_w)


def _dispatch_weighted_setup(ctx, inputs, output):
    P2P_DISPATCH.setup_context("x", "top_k", "group", "group_size")(ctx, inputs, output)
    ctx.weights_dtype = P2P_DISPATCH.named(inputs)["weights"].dtype


dispatch_weighted.register_autograd(_dispatch_weighted_backward, setup_context=_dispatch_weighted_setup)


# --- combine and weighted sum in one op --------------------------------------------------------

@torch.library.custom_op("echo::combine_weighted", mutates_args=())
def combine_weighted(y: Tensor, row_weight: Tensor, routes: Tensor, copy_slot: Tensor, top_k: int, group: str,
                     buf: str) -> Tensor:
    """Expert outputs y [R, H], each sorted row's router weight [R] (dispatch_weighted's) →
    Σ_k w[t, k] · y(copy t·K + k) [T, H] at the token's rank (dropped copies add nothing)."""
    _requires_p2p("combine_weighted", group)
    ep, n = comm.group_size(group), y.shape[0]
    r = split_routes(routes, n, copy_slot.shape[0] // top_k, top_k, ep)
    wt = torch.where(r.table >= 0, row_weight[r.table.clamp(min=0)], 0)
    back = p2p.exchange([p2p.Push(y.contiguous(), r.table, weights=wt, sum_rows=r.table.shape[0] // ep)], group, n)
    return rows.gather_sum(back[0], r.token_index)


@combine_weighted.register_fake
def _(y, row_weight, routes, copy_slot, top_k, group, buf):
    return y.new_empty((copy_slot.shape[0] // top_k, y.shape[1]))


def _combine_weighted_backward(ctx, grad):
    """The output's gradient g to each rank once per token; there grad y = w · g and grad w = ⟨g, y⟩
    per sorted row (rows.scaled_gather_dot); grad w goes back in dispatch_weighted's backward."""
    saved = P2P_COMBINE.saved_by_name(ctx)
    y, row_weight = saved["y"], saved["row_weight"]
    n, K = y.shape[0], ctx.top_k
    r = split_routes(saved["routes"], n, ctx.copy_slot_shape[0] // K, K, comm.group_size(ctx.group))
    g_rows = p2p.exchange([p2p.Push(grad.contiguous(), r.lead, r.upos)], ctx.group, n)[0]
    key = None if ctx.buf is None else P2P_COMBINE.key(ctx.buf, P2P_COMBINE.input_grad)
    grad_y, grad_w = rows.scaled_gather_dot(g_rows, r.row_index, y, row_weight, arena.out_like(key, y.shape, y))
    return P2P_COMBINE.input_grads(y=grad_y, row_weight=grad_w)


combine_weighted.register_autograd(_combine_weighted_backward,
                                   setup_context=P2P_COMBINE.setup_context("copy_slot", "top_k", "group", "buf"))
contracts.bind(P2P_DISPATCH, torch.ops.echo.dispatch_weighted.default)
contracts.bind(P2P_COMBINE, torch.ops.echo.combine_weighted.default)
