"""The `echo::` custom ops that the sync_free_dispatch pass puts into the graph.

Each op has a fake implementation (so graphs trace and shape-propagate on the
meta device at compile time) and, where it carries gradients, an autograd rule.
Groups are passed by name (see runtime/comm.py) together with their size, so the
fake implementations know every shape without a process group.

The `torch` backend lives here: token exchange is one all_to_all_single on
[ep·C, H] buffers with equal splits, so no split size ever comes from the host; at one
rank there is no exchange, and each movement is one gather.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from runtime import arena, comm, contracts, p2p_moves, rows  # noqa: F401  (p2p_moves binds its ops)
from runtime.contracts import ALL_GATHER_COUNTS, COMBINE, COUNT, DISPATCH, LAYER_STATS, LAYOUT, WEIGHTED_SUM
from runtime.layout import equal_chunk_rows, kept_counts, recv_layout, send_layout, slot_counts, token_of

try:  # the fused layout needs triton; without it (CPU installs, CI) every device uses torch
    from runtime import layout_triton as _layout_fused
except ImportError:
    _layout_fused = None


# --- count / exchange --------------------------------------------------------------------------
# Every op takes `buf`, its node's name: the key of its output (and `buf.send`, `buf.recv`, ...
# of its internals) in the planned arena (runtime/arena.py); runtime/contracts.py declares them.

@torch.library.custom_op("echo::count", mutates_args=())
def count(dest_slot: Tensor, n_slots: int, buf: str) -> Tensor:
    """dest_slot [T, K] int64 → copies per slot [n_slots] int64 (scatter_add_, not bincount)."""
    out = arena.out(COUNT.output_key(buf), (n_slots,), torch.int64, dest_slot.device)
    return slot_counts(dest_slot.reshape(-1), n_slots, out=out)


@count.register_fake
def _(dest_slot, n_slots, buf):
    return dest_slot.new_empty(n_slots, dtype=torch.int64)


@torch.library.custom_op("echo::all_gather_counts", mutates_args=())
def all_gather_counts(counts: Tensor, group: str, group_size: int, buf: str) -> Tensor:
    """counts [n] → [group_size, n] (row s = rank s's counts). Every rank gets the same tensor."""
    assert comm.group_size(group) == group_size, (
        f"group {group!r} has {comm.group_size(group)} ranks, the graph was compiled for {group_size}")
    out = arena.out_like(ALL_GATHER_COUNTS.output_key(buf), (group_size, counts.shape[0]), counts)
    return comm.all_gather_rows(counts, group, out=out)


@all_gather_counts.register_fake
def _(counts, group, group_size, buf):
    return counts.new_empty((group_size, counts.shape[0]))


# --- layout ------------------------------------------------------------------------------------

@torch.library.custom_op("echo::layout", mutates_args=())
def layout(dest_slot: Tensor, counts: Tensor, counts_all: Tensor, slots_per_rank: int,
           chunk_rows: int, group: str, buf: str) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Index maps for one exchange with fixed [ep·C] chunks (see runtime/layout.py).

    dest_slot [T, K]; counts [ep·L] (mine); counts_all [ep, ep·L] (everyone's).
    Returns send_copy [ep·C], copy_slot [N], sorted_src [R=ep·C], recv_sorted [ep·C],
    offs [L] int32, stats [3] int64 = (dropped copies, rows received, rows sent).
    """
    ep, C, L = counts_all.shape[0], chunk_rows, slots_per_rank
    rank = comm.group_rank(group)
    if _layout_fused is not None and dest_slot.is_cuda:
        maps = tuple(arena.out(key, t.shape, t.dtype, t.device) for key, t in
                     zip(LAYOUT.output_keys(buf), _layout_shapes(dest_slot, counts_all, L, C)))
        _layout_fused.layout(dest_slot.reshape(-1), counts, counts_all, rank, L, C, *maps)
        return maps
    snd = send_layout(dest_slot.reshape(-1), counts, ep, L, C)
    kept = kept_counts(counts_all, L, C)
    src, j = equal_chunk_rows(ep, C, dest_slot.device)
    rcv = recv_layout(kept[:, rank, :], src, j, ep * C)
    sent = kept[rank].sum()
    stats = torch.stack([snd.dropped, rcv.received, sent])
    maps = (snd.send_copy, snd.copy_slot, rcv.sorted_src, rcv.recv_sorted, rcv.offs, stats)
    return tuple(arena.place(key, t) for key, t in zip(LAYOUT.output_keys(buf), maps))


def _layout_shapes(dest_slot: Tensor, counts_all: Tensor, slots_per_rank: int, chunk_rows: int):
    """Empty tensors shaped like layout's six outputs."""
    ep, n = counts_all.shape[0], dest_slot.numel()
    i64 = dict(dtype=torch.int64)
    m = ep * chunk_rows
    return (dest_slot.new_empty(m, **i64), dest_slot.new_empty(n, **i64),
            dest_slot.new_empty(m, **i64), dest_slot.new_empty(m, **i64),
            dest_slot.new_empty(slots_per_rank, dtype=torch.int32), dest_slot.new_empty(3, **i64))


@layout.register_fake
def _(dest_slot, counts, counts_all, slots_per_rank, chunk_rows, group, buf):
    return _layout_shapes(dest_slot, counts_all, slots_per_rank, chunk_rows)


# --- token movement ----------------------------------------------------------------------------
# Across ranks a movement is gather into `send` · exchange into `recv` · gather into the result.
# At one rank the exchange is the identity: the two gathers compose into one (x → sorted rows).
# Only rows whose index is valid move (runtime/rows.py); padding is written only where someone
# reads a whole buffer (combine's copies, summed per token by weighted_sum).

class MoveKeys(NamedTuple):
    """The arena keys of one token movement: gather into `send`, exchange into `recv`,
    gather the result into `out` (None: the caller allocates it)."""
    send: str
    recv: str
    out: str | None


def move_keys(contract: contracts.OpContract, buf: str | None, backward: bool = False,
              out_part: str = "") -> MoveKeys | None:
    """The keys of `contract`'s forward (or backward) movement when called with `buf`; the
    result goes to its output key (forward), to part `out_part`, or nowhere planned (a backward
    without `out_part`). None (no `buf`): not planned."""
    if buf is None:
        return None
    pre = "bwd." if backward else ""
    out = contract.key(buf, out_part) if out_part else None if backward else contract.output_key(buf)
    return MoveKeys(contract.key(buf, pre + "send"), contract.key(buf, pre + "recv"), out)


def _moved(key: str | None, rows: int, like: Tensor) -> Tensor | None:
    """The arena view `key` [rows, H] for one step of a token movement (None: allocate)."""
    return None if key is None else arena.out_like(key, (rows, like.shape[1]), like)


def _exchanged(src: Tensor, send_rows: Tensor, exchange, keys: MoveKeys | None) -> Tensor:
    """Rows of `src` picked by send_rows [S] (-1 rows: padding nobody reads) → exchange(·) [S, H]."""
    send = rows.gather(src, send_rows, out=_moved(keys and keys.send, send_rows.shape[0], src), zero_missing=False)
    return exchange(send, _moved(keys and keys.recv, send.shape[0], src))


def to_experts(src: Tensor, send_rows: Tensor, sorted_src: Tensor, exchange, keys: MoveKeys | None = None,
               local: bool = False) -> Tensor:
    """Rows of `src` picked by send_rows [S] → exchange(·) → regrouped by slot [R, H]; padding rows
    (sorted_src -1) undefined. `local`: one rank, the exchange is the identity (one gather)."""
    out = _moved(keys and keys.out, sorted_src.shape[0], src)
    if local:
        return rows.gather(src, rows.compose(sorted_src, send_rows), out=out, zero_missing=False)
    return rows.gather(_exchanged(src, send_rows, exchange, keys), sorted_src, out=out, zero_missing=False)


def to_sources(y: Tensor, recv_sorted: Tensor, copy_slot: Tensor, exchange, keys: MoveKeys | None = None,
               local: bool = False) -> Tensor:
    """Expert-sorted rows y [R, H] → exchange(·) back to their sources → one row per copy [N, H]
    (dropped copies: zero). `local`: one rank, one gather."""
    out = _moved(keys and keys.out, copy_slot.shape[0], y)
    if local:
        return rows.gather(y, rows.compose(copy_slot, recv_sorted), out=out)
    return rows.gather(_exchanged(y, recv_sorted, exchange, keys), copy_slot, out=out)


class _Equal:
    """The `torch` backend's exchange of [ep·C] chunks: all_to_all_single with equal splits. (Under
    backends.exchange 'p2p' at ep > 1 the pass emits runtime/p2p_moves.py's ops instead.)"""

    def __init__(self, group: str):
        self.group = group

    def __call__(self, t: Tensor, out: Tensor | None = None) -> Tensor:
        return comm.all_to_all_equal(t, self.group, out=out)


def _equal(group: str) -> _Equal:
    return _Equal(group)


def _local(group: str) -> bool:
    return comm.group_size(group) == 1


@torch.library.custom_op("echo::dispatch", mutates_args=())
def dispatch(x: Tensor, send_copy: Tensor, copy_slot: Tensor, sorted_src: Tensor,
             recv_sorted: Tensor, top_k: int, group: str, buf: str) -> Tensor:
    """x [T, H] → expert-sorted rows [R, H] on the ranks that own the slots (padding rows
    undefined: no grouped GEMM reads past offs[-1])."""
    keys, tokens = move_keys(DISPATCH, buf), token_of(send_copy, top_k)
    return to_experts(x, tokens, sorted_src, _equal(group), keys, local=_local(group))


@dispatch.register_fake
def _(x, send_copy, copy_slot, sorted_src, recv_sorted, top_k, group, buf):
    return x.new_empty((sorted_src.shape[0], x.shape[1]))


def _dispatch_backward(ctx, grad):
    """The transpose of dispatch: the rows' gradient back to the sources (`buf.bwd.send/recv`),
    each token's K copies summed as they are gathered: grad x [T, H]."""
    maps = DISPATCH.saved_by_name(ctx)
    grad, copy_slot = grad.contiguous(), maps["copy_slot"]
    if _local(ctx.group):
        src, index = grad, rows.compose(copy_slot, maps["recv_sorted"])
    else:
        keys = move_keys(DISPATCH, ctx.buf, backward=True)
        src, index = _exchanged(grad, maps["recv_sorted"], _equal(ctx.group), keys), copy_slot
    return DISPATCH.input_grads(x=rows.gather_sum(src, index.view(ctx.x_shape[0], ctx.top_k)))


dispatch.register_autograd(_dispatch_backward, setup_context=DISPATCH.setup_context("x", "top_k", "group", "buf"))


@torch.library.custom_op("echo::combine", mutates_args=())
def combine(y: Tensor, send_copy: Tensor, copy_slot: Tensor, sorted_src: Tensor,
            recv_sorted: Tensor, group: str, buf: str) -> Tensor:
    """Expert outputs y [R, H] → one row per copy [N, H] at its source rank (dropped copies: zero)."""
    return to_sources(y, recv_sorted, copy_slot, _equal(group), move_keys(COMBINE, buf), local=_local(group))


@combine.register_fake
def _(y, send_copy, copy_slot, sorted_src, recv_sorted, group, buf):
    return y.new_empty((copy_slot.shape[0], y.shape[1]))


def _combine_backward(ctx, grad):
    """The transpose of combine: a dispatch of the copies' gradient, into `buf.bwd.grad_in` [R, H]."""
    maps = COMBINE.saved_by_name(ctx)
    keys = move_keys(COMBINE, ctx.buf, backward=True, out_part=COMBINE.input_grad)
    g = to_experts(grad.contiguous(), maps["send_copy"], maps["sorted_src"], _equal(ctx.group), keys,
                   local=_local(ctx.group))
    return COMBINE.input_grads(y=g)


combine.register_autograd(_combine_backward, setup_context=COMBINE.setup_context("group", "buf"))


class _WeightedSum(torch.autograd.Function):
    """Σ_k w[t, k] · copies[t·K + k] (runtime/rows.py: one Triton kernel on CUDA, one bmm elsewhere);
    backward writes the copies' gradient into `buf.bwd.grad_in` [T·K, H]."""

    @staticmethod
    def forward(ctx, copies, weights, buf):
        w = weights.to(copies.dtype)                                  # [T, K]
        ctx.save_for_backward(copies, w)                              # WEIGHTED_SUM.saves, w in the copies' dtype
        ctx.buf, ctx.weight_dtype = buf, weights.dtype
        return rows.weighted_sum(copies, w)

    @staticmethod
    def backward(ctx, grad):
        copies, w = ctx.saved_tensors
        key = None if ctx.buf is None else WEIGHTED_SUM.key(ctx.buf, WEIGHTED_SUM.input_grad)
        grad_copies, grad_w = rows.weighted_sum_backward(grad, copies, w, arena.out_like(key, copies.shape, copies))
        return WEIGHTED_SUM.input_grads(copies=grad_copies, weights=grad_w.to(ctx.weight_dtype))


def weighted_sum(copies: Tensor, weights: Tensor, buf: str | None = None) -> Tensor:
    """copies [N, H] (N = T·K), weights [T, K] → Σ_k w[t, k] · copies[t·K + k], [T, H].

    Accumulates in fp32 like the reference's float32 sum, with the weights rounded to the copies'
    dtype first, and saves the combine output in its own dtype (no fp32 copy).
    """
    return _WeightedSum.apply(copies, weights, buf)


def layer_stats(stats: Tensor, buf: str | None = None, spare_expert: Tensor | None = None) -> Tensor:
    """Per-layer stats row [4]: (dropped copies, rows received, rows sent, clones hosted by the plan)."""
    clones = stats.new_zeros(1) if spare_expert is None else (spare_expert >= 0).sum().view(1)
    if buf is None:
        return torch.cat([stats, clones])
    out = arena.out_like(LAYER_STATS.output_key(buf), (stats.shape[0] + 1,), stats)
    return torch.cat([stats, clones], out=out)


contracts.bind(COUNT, torch.ops.echo.count.default)
contracts.bind(ALL_GATHER_COUNTS, torch.ops.echo.all_gather_counts.default)
contracts.bind(LAYOUT, torch.ops.echo.layout.default)
contracts.bind(DISPATCH, torch.ops.echo.dispatch.default)
contracts.bind(COMBINE, torch.ops.echo.combine.default)
contracts.bind(WEIGHTED_SUM, weighted_sum)
contracts.bind(LAYER_STATS, layer_stats)
