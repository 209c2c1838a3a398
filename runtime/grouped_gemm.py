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


class _CloneMM(torch.autograd.Function):
    """y = grouped_mm(x, clone(w_home)) where the cloned weights [El + S, ...] are NOT saved:
    backward fetches them again (the clone's all-gather runs a second time), computes
    dx = grouped_mm(dy, cloneᵀ) and the per-slot weight gradient grouped_mm(xᵀ, dy), and
    sends the spare slots' part home through the clone's own backward (reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, w_home, offs, counts_all, spare_expert, offer, ep_group):
        clone_args = (counts_all, spare_expert, offer, "clone", ep_group)
        with torch.no_grad():
            w = torch.ops.echo.clone_weights.default(w_home, *clone_args)
            y = _grouped_mm(x, w, offs=offs)
        ctx.save_for_backward(x, w_home, offs, counts_all, spare_expert)
        ctx.clone_args = clone_args
        return y

    @staticmethod
    def backward(ctx, dy):
        x, w_home, offs, counts_all, spare_expert = ctx.saved_tensors
        _, _, offer, group, ep_group = ctx.clone_args
        with torch.enable_grad():
            home = w_home.detach().requires_grad_(True)
            w = torch.ops.echo.clone_weights.default(home, counts_all, spare_expert, offer, group, ep_group)
        dy = dy.contiguous()
        dx = _grouped_mm(dy, w.detach().transpose(-2, -1), offs=offs)
        dw = _grouped_mm(x.transpose(-2, -1), dy, offs=offs)
        (dw_home,) = torch.autograd.grad(w, home, dw)
        return dx, dw_home, None, None, None, None, None


def expert_ffn_recompute_clone(rows: Tensor, w13: Tensor, w2: Tensor, offs: Tensor, impl: str,
                               counts_all: Tensor, spare_expert: Tensor, offer: int, ep_group: str) -> Tensor:
    """The expert FFN on home + spare slots whose cloned weights are fetched again in backward
    instead of being saved: between a layer's forward and backward only the home weights are
    alive, so one spare-slot buffer serves every layer (echo.recompute_clone_dispatch).
    Activations are saved as usual; the only extra work is the clone's all-gather in backward."""
    if impl != "torch" or _grouped_mm is None:
        raise EchocError("echo.recompute_clone_dispatch needs backends.grouped_gemm 'torch' (grouped_mm)")
    args = (offs, counts_all, spare_expert, offer, ep_group)
    h = _CloneMM.apply(rows, w13, *args)
    return _CloneMM.apply(_swiglu(h), w2, *args)
