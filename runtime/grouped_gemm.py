"""The expert FFN over expert-sorted rows: grouped GEMMs driven by device offsets.

`torch`: torch.nn.functional.grouped_mm with int32 offsets on the device. It
multiplies only the rows inside offs[-1]; rows past it (padding) come out
undefined, which is fine because combine never reads them.
`loop`: one matmul per expert; reads the offsets on the host, so it is not
sync-free (verify_sync_free rejects it under a CUDA graph). Same numbers.
`te`: Transformer Engine (optional extra): not driven yet; says so.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from echoc.errors import EchocError, MissingDependencyError

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _swiglu(h: Tensor) -> Tensor:
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def ffn_grouped(rows: Tensor, w13: Tensor, w2: Tensor, offs: Tensor) -> Tensor:
    """rows [R, H], w13 [L, H, 2F], w2 [L, F, H], offs [L] int32 → [R, H] (rows ≥ offs[-1] undefined)."""
    h = _grouped_mm(rows, w13, offs=offs)
    return _grouped_mm(_swiglu(h), w2, offs=offs)


def ffn_loop(rows: Tensor, w13: Tensor, w2: Tensor, offs: Tensor) -> Tensor:
    """Same contract as ffn_grouped, one matmul per slot; padding rows come out zero."""
    ends = offs.tolist()  # host sync: this fallback is not capturable
    out = torch.zeros_like(rows)
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            out[start:end] = _swiglu(rows[start:end] @ w13[e]) @ w2[e]
        start = end
    return out


def ffn_te(rows: Tensor, w13: Tensor, w2: Tensor, offs: Tensor) -> Tensor:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        raise MissingDependencyError("backends.grouped_gemm 'te'",
                                     "pip install 'echoc[te]'  (transformer-engine[pytorch])") from None
    raise EchocError("backends.grouped_gemm 'te': Transformer Engine is installed, but echoc does not "
                     "drive its grouped GEMM yet (it takes host-side splits); use 'torch'")


def expert_ffn(rows: Tensor, w13: Tensor, w2: Tensor, offs: Tensor, impl: str) -> Tensor:
    """The routed experts' SwiGLU FFN on expert-sorted rows, by implementation name."""
    if impl == "torch" and _grouped_mm is None:
        impl = "loop"
    return {"torch": ffn_grouped, "loop": ffn_loop, "te": ffn_te}[impl](rows, w13, w2, offs)


HOST_SYNC_IMPLS = {"loop"}


def expert_ffn_recompute_clone(rows: Tensor, w13: Tensor, w2: Tensor, offs: Tensor, impl: str,
                               counts_all: Tensor, spare_expert: Tensor, offer: int, ep_group: str) -> Tensor:
    """Clone + expert FFN under selective activation checkpointing: only the clone is
    recomputed in backward (its all-gather runs again), everything else is saved, so the
    cloned weights [El + S, ...] are never kept alive between forward and backward."""
    from functools import partial

    from torch.utils.checkpoint import (CheckpointPolicy, checkpoint,
                                        create_selective_checkpoint_contexts)

    clone_op = torch.ops.echo.clone_weights.default

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.PREFER_RECOMPUTE if op is clone_op else CheckpointPolicy.MUST_SAVE

    def body(rows, w13, w2):
        c13 = clone_op(w13, counts_all, spare_expert, offer, "clone", ep_group)
        c2 = clone_op(w2, counts_all, spare_expert, offer, "clone", ep_group)
        return expert_ffn(rows, c13, c2, offs, impl)

    return checkpoint(body, rows, w13, w2, use_reentrant=False,
                      context_fn=partial(create_selective_checkpoint_contexts, policy))
