"""Gloo stand-ins for the device collectives of the real-row backends (a test seam).

Each class follows the contract of ONE library call, as read from the library's source and
tests, so the backends' own arithmetic runs on CPU and only the call itself is left for the
GPU (tests/gpu/test_backends_cuda.py):

  VdevStandIn      torch.ops.symm_mem.all_to_all_vdev_2d / _2d_offset
                   (torch test/distributed/test_nvshmem.py: in_splits → out_splits_offsets,
                   expert-major output, each expert's block aligned up to major_align and at
                   least major_align rows; the _offset variant packs rank-major, no alignment)
  HybridEPStandIn  deep_ep.HybridEPBuffer.dispatch_with_permute(non_blocking=True,
                   num_permuted_tokens=N) / combine_with_unpermute (DeepEP hybrid-ep branch,
                   tests/test_graphed_hybrid_ep.py: expert-major permuted rows padded to
                   pad_multiple (0 stays 0), one probability per permuted row, overflow flagged;
                   combine sums each token's rows and routes the probabilities back)

They may read splits on the host (gloo needs host splits): they stand in for the call's
result, not for its sync-freedom, which verify_sync_free and the GPU tests check.
Selected by `install()` (runtime/backends/base.py), never by a spec.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from runtime import comm
from runtime.backends import base


def _a2a_rows(chunks: list[torch.Tensor], recv_rows: list[int], group: str) -> list[torch.Tensor]:
    """chunks[p] → rank p; returns what each source sent me (variable splits, gloo)."""
    tail, like = tuple(chunks[0].shape[1:]), chunks[0]
    send = torch.cat(chunks).contiguous()
    out = like.new_empty((sum(recv_rows),) + tail)
    dist.all_to_all_single(out, send, recv_rows, [c.shape[0] for c in chunks], group=comm.get_group(group))
    return list(out.split(recv_rows))


def _a2a_counts(x: torch.Tensor, group: str) -> torch.Tensor:
    out = torch.empty_like(x)
    dist.all_to_all_single(out, x.contiguous(), group=comm.get_group(group))
    return out


class VdevStandIn:
    """all_to_all_vdev_2d / _2d_offset over gloo."""

    def empty(self, shape, dtype, device):
        return torch.full(shape, -7, dtype=dtype, device=device)   # poison: nothing may read unwritten rows

    def all_to_all_vdev_2d(self, inp, out, in_splits, out_splits_offsets, group, major_align):
        ep = comm.group_size(group)
        assert ep > 1, "all_to_all_vdev_2d: Expected global_ranks.size() > 1"
        assert major_align > 0 and in_splits.dtype == out_splits_offsets.dtype == torch.int64
        L = in_splits.numel() // ep
        assert L * ep == in_splits.numel() and tuple(out_splits_offsets.shape) == (2, ep * L)
        splits = in_splits.view(ep, L)
        assert int(splits.sum()) <= inp.shape[0], "sum of splits is larger than input dim"
        got = _a2a_counts(splits, group)                                  # [src, L]
        starts = torch.cumsum(splits.sum(1), 0) - splits.sum(1)
        chunks = [inp[int(starts[p]): int(starts[p]) + int(splits[p].sum())] for p in range(ep)]
        recv = _a2a_rows(chunks, got.sum(1).tolist(), group)
        per_slot = got.sum(0)
        padded = torch.clamp(-(-per_slot // major_align) * major_align, min=major_align)
        slot_start = torch.cumsum(padded, 0) - padded
        offsets = slot_start.unsqueeze(1) + torch.cumsum(got.t(), 1) - got.t()   # [L, src]
        assert int(slot_start[-1] + padded[-1]) <= out.shape[0], "output buffer too small"
        for s in range(ep):
            pieces = recv[s].split(got[s].tolist())
            for slot in range(L):
                at = int(offsets[slot, s])
                out[at: at + pieces[slot].shape[0]] = pieces[slot]
        out_splits_offsets[0] = got.t().reshape(-1)
        out_splits_offsets[1] = offsets.reshape(-1)

    def all_to_all_vdev_2d_offset(self, inp, out, in_splits_offsets, out_splits_offsets, group):
        ep = comm.group_size(group)
        assert ep > 1, "all_to_all_vdev_2d_offset: Expected global_ranks.size() > 1"
        n = in_splits_offsets.shape[1]
        L = n // ep
        splits, offsets = in_splits_offsets[0].view(L, ep), in_splits_offsets[1].view(L, ep)
        assert int((offsets + splits).max()) <= inp.shape[0]
        chunks = [torch.cat([inp[int(offsets[e, p]): int(offsets[e, p] + splits[e, p])] for e in range(L)])
                  for p in range(ep)]
        got = _a2a_counts(splits.t().contiguous(), group)                   # [src, L]
        recv = torch.cat(_a2a_rows(chunks, got.sum(1).tolist(), group))
        assert recv.shape[0] <= out.shape[0], "output buffer too small"
        out[: recv.shape[0]] = recv
        flat = got.reshape(-1)
        out_splits_offsets[0] = flat
        out_splits_offsets[1] = torch.cumsum(flat, 0) - flat


class HybridEPStandIn:
    """HybridEPBuffer.dispatch_with_permute / combine_with_unpermute over gloo. The handle is
    where each (source, token, local expert) landed; rows are ordered (expert, source, token)."""

    def dispatch_with_permute(self, *, hidden, routing_map, probs, num_of_experts_per_rank, num_permuted_tokens,
                              pad_multiple, non_blocking, handle=None):
        assert non_blocking and num_permuted_tokens % pad_multiple == 0
        if handle is None:
            handle = self._handle(routing_map, num_of_experts_per_rank, num_permuted_tokens, pad_multiple)
        pos, valid = handle["pos"], handle["pos"] >= 0                     # [src, T, L]
        src, tok, _ = valid.nonzero(as_tuple=True)
        rows = hidden.new_zeros((num_permuted_tokens, hidden.shape[1]))   # padding rows zero
        rows[pos[valid]] = _all_gather(hidden, handle["group"])[src, tok]
        row_probs = None
        if probs is not None:
            L, rank = pos.shape[2], comm.group_rank(handle["group"])
            mine = _all_gather(probs, handle["group"])[:, :, rank * L:(rank + 1) * L]
            row_probs = probs.new_zeros(num_permuted_tokens)
            row_probs[pos[valid]] = mine[valid]
        return rows, row_probs, None, handle["tokens_per_expert"], handle

    def combine_with_unpermute(self, *, hidden, probs, handle, pad_multiple):
        pos, valid, group = handle["pos"], handle["pos"] >= 0, handle["group"]
        ep, T, L = pos.shape
        part = hidden.new_zeros((ep, T, hidden.shape[1]))
        part.index_put_(tuple(valid.nonzero(as_tuple=True)[:2]), hidden[pos[valid]], accumulate=True)
        combined = _a2a_equal(part, group).sum(0)
        if probs is None:
            return combined, None
        rank = comm.group_rank(group)
        p = probs.new_zeros((ep, T, ep * L))
        s, t, e = valid.nonzero(as_tuple=True)
        p[s, t, rank * L + e] = probs[pos[valid]]
        return combined, _a2a_equal(p, group).sum(0)

    @staticmethod
    def _handle(routing_map, L, rows, pad):
        group = "ep"
        ep, rank = comm.group_size(group), comm.group_rank(group)
        assert ep > 1, "HybridEPBuffer at world size 1 is not supported"
        assert routing_map.dtype == torch.bool and routing_map.shape[1] == ep * L
        mine = _all_gather(routing_map.to(torch.uint8), group)[:, :, rank * L:(rank + 1) * L].bool()
        order = mine.permute(2, 0, 1).reshape(L, -1)                      # (expert, source, token)
        per_expert = order.sum(1)
        padded = -(-per_expert // pad) * pad
        start = torch.cumsum(padded, 0) - padded
        at = start.unsqueeze(1) + torch.cumsum(order.long(), 1) - 1
        fits = order & (at < rows)                                        # beyond num_permuted_tokens: dropped
        pos = torch.where(fits, at, -1).view(L, ep, -1).permute(1, 2, 0).contiguous()
        return {"pos": pos, "tokens_per_expert": padded, "overflow_flag": (order & ~fits).any(), "group": group}


def _all_gather(x: torch.Tensor, group: str) -> torch.Tensor:
    return comm.all_gather_rows(x.contiguous(), group)


def _a2a_equal(x: torch.Tensor, group: str) -> torch.Tensor:
    return comm.all_to_all_equal(x.reshape(x.shape[0] * x.shape[1], -1), group).view(x.shape)


def install_all() -> None:
    """Every real-row backend runs over its gloo stand-in in this process."""
    base.install("symm_mem", VdevStandIn())
    base.install("deepep", HybridEPStandIn())
