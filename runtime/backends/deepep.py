"""The `deepep` backend: DeepEP HybridEP (`hybrid-ep` branch), moving only real rows.

Legend: T tokens, K top-k, H hidden, ep ranks, L slots per rank (E = ep·L), C the per-peer
chunk (spec.peer_chunk_rows), P `pad_multiple` (spec.budgets.row_alignment), Rp the static
permuted rows (`permuted_rows`).

Why HybridEP and not DeepEP v1 `Buffer` with `num_worst_tokens`: v1's graph-safe mode is
intranode only and returns rows per token (the permute is ours); HybridEP's
`dispatch_with_permute(non_blocking=True, num_permuted_tokens=Rp)` hands the grouped GEMM
expert-major rows with device offsets, across NVLink domains, and is what the ECHO pull
request uses.

    layout    routing_map [T, E] bool of the copies that fit (the `torch` backend's overflow
              rule: the first C copies of each (source → rank) pair in slot order), kept_slot
              [T, K] (-1 dropped), offs [L] int32 (each slot padded up to P, 0 stays 0: HybridEP's
              rule), stats. With ≤ ep·C real rows Rp always suffices, so the library's own
              overflow flag never rises.
    dispatch  x [T, H], weights [T, K] → rows [Rp, H] expert-major, row_weight [Rp] (HybridEP
              carries one probability per permuted row)
    combine   y·row_weight [Rp, H] → [T, H], each token's rows summed (HybridEP's combine)

The handle of a layer's dispatch (its routing metadata, device tensors at fixed addresses)
is kept here, keyed by the dispatch node's name: the layer's combine and both backward
passes read it. One HybridEPBuffer per (group, H, T, L, dtype), made on first use.
"""
from __future__ import annotations

from typing import Any, Protocol

import torch
from torch import Tensor

from runtime import arena, comm, contracts
from runtime.backends import base
from runtime.contracts import DEEPEP_COMBINE, DEEPEP_DISPATCH, DEEPEP_LAYOUT
from runtime.layout import kept_counts, send_layout

PINNED_COMMIT = "94a9f8f6b146"
BUILD_HINT = (f"bench/build_deepep.sh SRC_DIR  (a checkout of github.com/deepseek-ai/DeepEP, branch hybrid-ep, "
              f"commit {PINNED_COMMIT}; builds deep_ep in place and prints the PYTHONPATH to use)")


def available() -> bool:
    """Whether `deep_ep.HybridEPBuffer` imports (DeepEP built from the hybrid-ep branch)."""
    try:
        from deep_ep import HybridEPBuffer  # noqa: F401  (optional: built from source)
    except ImportError:
        return False
    return True


class HybridEPTransport(Protocol):
    """deep_ep.HybridEPBuffer's two calls, with their contracts (hybrid-ep branch)."""

    def dispatch_with_permute(self, *, hidden: Tensor, routing_map: Tensor | None, probs: Tensor | None,
                              num_of_experts_per_rank: int, num_permuted_tokens: int, pad_multiple: int,
                              non_blocking: bool, handle: Any = None) -> tuple:
        """hidden [T, H], routing_map [T, E] bool, probs [T, E] fp32 → (rows [Rp, H] expert-major,
        each local expert's block padded to pad_multiple; row probs [Rp] or None; scaling factor;
        padded tokens per local expert [L]; handle). With `handle` the routing is reused."""

    def combine_with_unpermute(self, *, hidden: Tensor, probs: Tensor | None, handle: Any,
                               pad_multiple: int) -> tuple:
        """hidden [Rp, H], probs [Rp] or None → (each token's rows summed [T, H], probs [T, E] or None)."""


def _real(group: str, hidden: int, tokens: int, slots: int) -> HybridEPTransport:
    from deep_ep import HybridEPBuffer   # optional: built from source (bench/build_deepep.sh)
    return HybridEPBuffer(comm.get_group(group), hidden_dim=hidden, max_num_of_tokens_per_rank=tokens,
                          num_local_experts=slots)


def _transport(group: str, hidden: int, tokens: int, slots: int) -> HybridEPTransport:
    return base.transport("deepep", (group, hidden, tokens, slots), lambda: _real(group, hidden, tokens, slots))


_HANDLES: dict[str, tuple] = {}    # dispatch node name → (transport, handle, Rp, P)


def permuted_rows(ep: int, chunk_rows: int, slots_per_rank: int, pad_multiple: int) -> int:
    """Rp: ≥ every real row (≤ ep·C) plus each slot's padding, a multiple of P (HybridEP asks it)."""
    P = pad_multiple
    return -(-(ep * chunk_rows + slots_per_rank * (P - 1)) // P) * P


def padded_offsets(counts_all: Tensor, rank: int, slots_per_rank: int, chunk_rows: int, pad_multiple: int):
    """(offs [L] int32 over the padded per-slot rows, rows received, rows sent) under the overflow rule."""
    kept = kept_counts(counts_all, slots_per_rank, chunk_rows)
    mine = kept[:, rank, :].sum(0)
    padded = -(-mine // pad_multiple) * pad_multiple
    return torch.cumsum(padded, 0).to(torch.int32), mine.sum(), kept[rank].sum()


@torch.library.custom_op("echo::deepep_layout", mutates_args=())
def deepep_layout(dest_slot: Tensor, counts: Tensor, counts_all: Tensor, slots_per_rank: int, chunk_rows: int,
                  pad_multiple: int, group: str, buf: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """dest_slot [T, K] → routing_map [T, E] bool, kept_slot [T, K] (-1 dropped), offs [L] int32,
    stats [3] = (dropped copies, rows received, rows sent)."""
    ep, L = counts_all.shape[0], slots_per_rank
    t, E = dest_slot.shape[0], ep * L
    snd = send_layout(dest_slot.reshape(-1), counts, ep, L, chunk_rows)
    kept_slot = torch.where(snd.copy_slot >= 0, dest_slot.reshape(-1), -1).view_as(dest_slot)
    routing = torch.zeros((t, E + 1), dtype=torch.bool, device=dest_slot.device)
    routing.scatter_(1, torch.where(kept_slot >= 0, kept_slot, E), True)
    offs, received, sent = padded_offsets(counts_all, comm.group_rank(group), L, chunk_rows, pad_multiple)
    out = (routing[:, :E].contiguous(), kept_slot, offs, torch.stack([snd.dropped, received, sent]))
    return tuple(arena.place(key, v) for key, v in zip(DEEPEP_LAYOUT.output_keys(buf), out))


@deepep_layout.register_fake
def _(dest_slot, counts, counts_all, slots_per_rank, chunk_rows, pad_multiple, group, buf):
    E = counts_all.shape[0] * slots_per_rank
    return (dest_slot.new_empty((dest_slot.shape[0], E), dtype=torch.bool), torch.empty_like(dest_slot),
            dest_slot.new_empty(slots_per_rank, dtype=torch.int32), dest_slot.new_empty(3, dtype=torch.int64))


def slot_probs(weights: Tensor, kept_slot: Tensor, n_slots: int) -> Tensor:
    """weights [T, K] at their kept slots → probs [T, E] fp32 (0 elsewhere)."""
    p = torch.zeros((weights.shape[0], n_slots + 1), dtype=torch.float32, device=weights.device)
    p.scatter_(1, torch.where(kept_slot >= 0, kept_slot, n_slots), weights.float())
    return p[:, :n_slots]


@torch.library.custom_op("echo::deepep_dispatch", mutates_args=())
def deepep_dispatch(x: Tensor, weights: Tensor, routing_map: Tensor, kept_slot: Tensor, permuted_rows: int,
                    pad_multiple: int, group: str, buf: str) -> tuple[Tensor, Tensor]:
    """x [T, H], weights [T, K] → rows [Rp, H] expert-major (padding rows zero), row_weight [Rp] fp32."""
    E = routing_map.shape[1]
    L = E // comm.group_size(group)
    t = _transport(group, x.shape[1], x.shape[0], L)
    rows, row_w, _, _, handle = t.dispatch_with_permute(
        hidden=x, routing_map=routing_map, probs=slot_probs(weights, kept_slot, E), num_of_experts_per_rank=L,
        num_permuted_tokens=permuted_rows, pad_multiple=pad_multiple, non_blocking=True)
    _HANDLES[buf] = (t, handle, permuted_rows, pad_multiple)
    rows_key, w_key = DEEPEP_DISPATCH.output_keys(buf)
    return arena.place(rows_key, rows.clone()), arena.place(w_key, row_w.float().clone())


@deepep_dispatch.register_fake
def _(x, weights, routing_map, kept_slot, permuted_rows, pad_multiple, group, buf):
    return x.new_empty((permuted_rows, x.shape[1])), x.new_empty(permuted_rows, dtype=torch.float32)


def _dispatch_backward(ctx, grad_rows, grad_row_w):
    """combine_with_unpermute of the rows' gradient and of the row weights' gradient: the tokens'
    gradient [T, H] and, read at each kept slot, the router weights' gradient [T, K]."""
    t, handle, _, P = _HANDLES[ctx.buf]
    (kept_slot,) = ctx.saved_tensors
    g_x, g_p = t.combine_with_unpermute(hidden=grad_rows.contiguous(), probs=grad_row_w.float().contiguous(),
                                        handle=handle, pad_multiple=P)
    g_w = torch.where(kept_slot >= 0, g_p.gather(1, kept_slot.clamp(min=0)), 0.0)
    return DEEPEP_DISPATCH.input_grads(x=g_x, weights=g_w.to(ctx.weights_dtype))


def _dispatch_setup(ctx, inputs, output):
    DEEPEP_DISPATCH.setup_context("buf")(ctx, inputs, output)
    ctx.weights_dtype = DEEPEP_DISPATCH.named(inputs)["weights"].dtype


@torch.library.custom_op("echo::deepep_combine", mutates_args=())
def deepep_combine(y: Tensor, handle: str, tokens: int, group: str, buf: str) -> Tensor:
    """Weighted expert rows y [Rp, H] → each token's rows summed [T, H] (dropped copies add nothing)."""
    t, h, _, P = _HANDLES[handle]
    out, _ = t.combine_with_unpermute(hidden=y.contiguous(), probs=None, handle=h, pad_multiple=P)
    return arena.place(DEEPEP_COMBINE.output_key(buf), out.clone())


@deepep_combine.register_fake
def _(y, handle, tokens, group, buf):
    return y.new_empty((tokens, y.shape[1]))


def _combine_backward(ctx, grad):
    """dispatch_with_permute of the tokens' gradient with the layer's handle → [Rp, H]."""
    t, h, rp, P = _HANDLES[ctx.handle]
    rows = t.dispatch_with_permute(hidden=grad.contiguous(), routing_map=None, probs=None,
                                   num_of_experts_per_rank=None, num_permuted_tokens=rp, pad_multiple=P,
                                   non_blocking=True, handle=h)[0]
    return DEEPEP_COMBINE.input_grads(y=rows)


def weigh_rows(y: Tensor, row_weight: Tensor) -> Tensor:
    """y [Rp, H] · row_weight [Rp] (fp32 product, y's dtype)."""
    return (y.float() * row_weight.unsqueeze(1)).to(y.dtype)


deepep_dispatch.register_autograd(_dispatch_backward, setup_context=_dispatch_setup)
deepep_combine.register_autograd(_combine_backward, setup_context=DEEPEP_COMBINE.setup_context("handle"))
contracts.bind(DEEPEP_LAYOUT, torch.ops.echo.deepep_layout.default)
contracts.bind(DEEPEP_DISPATCH, torch.ops.echo.deepep_dispatch.default)
contracts.bind(DEEPEP_COMBINE, torch.ops.echo.deepep_combine.default)
