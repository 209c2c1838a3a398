"""The expert FFN over expert-sorted rows: grouped GEMMs driven by device offsets.

`torch`: torch.nn.functional.grouped_mm with int32 offsets on the device. It
multiplies only the rows inside offs[-1]; rows past it (padding) come out
undefined, which is fine because combine never reads them.
`loop`: one matmul per expert; reads the offsets on the host, so it is not
sync-free (verify_sync_free rejects it under a CUDA graph). Same numbers.
`te`: Transformer Engine (optional extra): not driven yet; says so.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor

from echoc.errors import EchocError, MissingDependencyError
from runtime import arena, clone, contracts, streams
from runtime.contracts import EXPERT_FFN, EXPERT_FFN_RECOMPUTE_CLONE
from runtime.model import swiglu

try:  # the fused SwiGLU needs triton; without it (CPU installs, CI) every device uses torch
    from runtime import swiglu_triton
except ImportError:
    swiglu_triton = None

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def _gmm(a: Tensor, b: Tensor, offs: Tensor) -> Tensor:
    return _grouped_mm(a, b, offs=offs)


class _GroupedSwiGLU(torch.autograd.Function):
    """y = swiglu(rows · W13[slot]) · W2[slot] on expert-sorted rows, with the saved tensors
    and the SwiGLU's output and gradient in planned buffers (runtime/arena.py):

      forward   h13 [R, 2F] (grouped_mm allocates it), `buf.act` = silu(gate)·up [R, F],
                y [R, H] (grouped_mm)
      backward  grad_act [R, F] (grouped_mm), `buf.bwd.grad_h13` [R, 2F] (the SwiGLU's backward,
                silu(gate) recomputed from h13), d rows [R, H] and d weights (grouped_mm)

    grouped_mm has no out= variant, so its products come from the caching allocator. The
    arithmetic is the one autograd would run (silu, mul, silu_backward, the grouped_mm
    transposes); on CUDA with triton the SwiGLU is one kernel each way over the real rows only
    (runtime/swiglu_triton.py), rows past offs[-1] staying undefined like grouped_mm's.
    With `clone` (echo.recompute_clone_dispatch) the weights passed are the home experts:
    forward clones them into the spare slots (`buf.clone_w13`, `buf.clone_w2`) without saving
    the clones; backward fetches them again (`....recompute`) and sends the spare slots'
    gradient home through the clone's own backward (the reduce-scatter).
    With a `stash` (of a wgrad token, runtime/streams.py) backward computes dx only, stashes what
    the weight gradients need there and returns zeros for the weights: `_WeightTap`, between the
    weights and this function, computes them on the wgrad stream.
    """

    @staticmethod
    def forward(ctx, rows, w13, w2, offs, buf, counts_all, spare_expert, offer, ep_group, stash):
        recompute = counts_all is not None
        c = EXPERT_FFN_RECOMPUTE_CLONE if recompute else EXPERT_FFN
        ctx.buf, ctx.contract, ctx.clone_args = buf, c, (offer, ep_group) if recompute else None
        ctx.stash = stash
        assert not (recompute and stash), "the recompute-clone FFN keeps its weight gradients on the main stream"
        w13f, w2f = (_clone_pair(buf, "", w13, w2, counts_all, spare_expert, offer, ep_group)
                     if recompute else (w13, w2))
        h13 = _gmm(rows, w13f, offs)
        act = swiglu_forward(h13, offs, arena.out_like(c.key(buf, "act"), (h13.shape[0], h13.shape[1] // 2), h13))
        kept = dict(rows=rows, w13=w13, w2=w2, offs=offs, counts_all=counts_all, spare_expert=spare_expert,
                    h13=h13, act=act)
        ctx.save_for_backward(*(kept[n] for n in c.saves + c.saved_parts))
        return _gmm(act, w2f, offs)

    @staticmethod
    def backward(ctx, dy):
        c = ctx.contract
        a = dict(zip(c.saves + c.saved_parts, ctx.saved_tensors))
        h13, act = a["h13"], a["act"]
        dy, buf, offs = dy.contiguous(), ctx.buf, a["offs"]
        if ctx.clone_args:
            home = (a["w13"].detach().requires_grad_(True), a["w2"].detach().requires_grad_(True))
            with torch.enable_grad():
                w13f, w2f = _clone_pair(buf, ".recompute", *home, a["counts_all"], a["spare_expert"], *ctx.clone_args)
        else:
            w13f, w2f = a["w13"], a["w2"]
        grad_act = _gmm(dy, w2f.detach().transpose(-2, -1), offs)
        grad_h13 = swiglu_backward(grad_act, h13, offs, arena.out_like(c.key(buf, "bwd.grad_h13"), h13.shape, h13))
        dx = _gmm(grad_h13, w13f.detach().transpose(-2, -1), offs)
        if ctx.stash is not None:
            ctx.stash.put(act=act, dy=dy, rows=a["rows"], grad_h13=grad_h13, offs=offs)
            zero = dy.new_zeros(())                  # the tap ignores it: the real gradients are its own
            return (dx, zero.expand(w13f.shape), zero.expand(w2f.shape)) + (None,) * 7
        dw2, dw13 = weight_grads(act, dy, a["rows"], grad_h13, offs)
        if ctx.clone_args:
            dw13, dw2 = torch.autograd.grad((w13f, w2f), home, (dw13, dw2))
        return (dx, dw13, dw2) + (None,) * 7    # apply's arguments: rows, w13, w2, then seven without gradient


def weight_grads(act: Tensor, dy: Tensor, rows: Tensor, grad_h13: Tensor, offs: Tensor) -> tuple[Tensor, Tensor]:
    """(dW2 = actᵀ·dy, dW13 = rowsᵀ·grad_h13) per slot, over the rows inside offs."""
    return _gmm(act.transpose(-2, -1), dy, offs), _gmm(rows.transpose(-2, -1), grad_h13, offs)


def _recheck(key: str, s: dict[str, Tensor], dw2: Tensor, dw13: Tensor) -> None:
    """streams.CHECK_LATE_READS: the stashed tensors still give the tap's gradients (nothing reused them)."""
    again2, again13 = weight_grads(s["act"], s["dy"], s["rows"], s["grad_h13"], s["offs"])
    assert torch.equal(again2, dw2) and torch.equal(again13, dw13), (
        f"{key}: a buffer the deferred weight gradients read changed before the layer's fork (the plan let it be reused)")


class _WeightTap(torch.autograd.Function):
    """(token, w13, w2) → (w13, w2), made on the wgrad stream (runtime/streams.py). Backward runs
    there, after the FFN's (whose zeros it ignores): the weight gradients from the FFN's stash, and
    a gradient for the token, queued after them, that the fork's backward waits for."""

    @staticmethod
    def forward(ctx, token, w13, w2):
        ctx.stash = streams.stash_of(token)
        return w13.view_as(w13), w2.view_as(w2)

    @staticmethod
    def backward(ctx, _zeros13, _zeros2):
        s = ctx.stash.get()
        dw2, dw13 = weight_grads(s["act"], s["dy"], s["rows"], s["grad_h13"], s["offs"])
        if streams.CHECK_LATE_READS:
            ctx.stash.recheck = functools.partial(_recheck, ctx.stash.key, s, dw2, dw13)
        return s["dy"].new_zeros(()), dw13, dw2


def swiglu_forward(h13: Tensor, offs: Tensor, act: Tensor) -> Tensor:
    """h13 [R, 2F] = (gate, up), offs [L] int32 → act [R, F] = silu(gate)·up, written into `act`
    (the Triton path writes rows < offs[-1] only)."""
    if swiglu_triton is not None and h13.is_cuda:
        return swiglu_triton.forward(h13.contiguous(), offs, act)
    f = act.shape[1]
    return torch.mul(F.silu(h13[:, :f]), h13[:, f:], out=act)


def swiglu_backward(grad_act: Tensor, h13: Tensor, offs: Tensor, grad_h13: Tensor) -> Tensor:
    """grad_act [R, F], h13 [R, 2F] → grad_h13 [R, 2F] = (silu_backward(grad_act·up, gate),
    grad_act·silu(gate)), written into `grad_h13` (the Triton path: rows < offs[-1] only)."""
    if swiglu_triton is not None and h13.is_cuda:
        return swiglu_triton.backward(grad_act.contiguous(), h13.contiguous(), offs, grad_h13)
    f = grad_act.shape[1]
    gate, up = h13[:, :f], h13[:, f:]
    torch.mul(grad_act, F.silu(gate), out=grad_h13[:, f:])
    torch.ops.aten.silu_backward.grad_input(grad_act * up, gate, grad_input=grad_h13[:, :f])
    return grad_h13


def _clone_pair(buf, tag, w13, w2, counts_all, spare_expert, offer, ep_group):
    """Home experts + spare-slot clones of both weights (echo::clone_weights), keyed by the
    parts `clone_w13<tag>` and `clone_w2<tag>` of the recompute FFN's contract."""
    return tuple(clone.clone_weights(w=w, counts_all=counts_all, spare_expert=spare_expert, offer=offer,
                                     group="clone", ep_group=ep_group,
                                     buf=EXPERT_FFN_RECOMPUTE_CLONE.key(buf, f"clone_{name}{tag}"))
                 for name, w in (("w13", w13), ("w2", w2)))


def ffn_grouped(rows: Tensor, w13: Tensor, w2: Tensor, offs: Tensor, buf: str = "expert_ffn",
                wgrad: Tensor | None = None) -> Tensor:
    """rows [R, H], w13 [L, H, 2F], w2 [L, F, H], offs [L] int32 → [R, H] (rows ≥ offs[-1] undefined).
    `wgrad`: a token of streams.wgrad_fork: the weight gradients run on the wgrad stream."""
    stash = None
    if wgrad is not None:
        stash = streams.stash_of(wgrad)
        with streams.on_wgrad_stream(w13.device):
            w13, w2 = _WeightTap.apply(wgrad, w13, w2)
    return _GroupedSwiGLU.apply(rows, w13, w2, offs, buf, None, None, 0, "", stash)


def ffn_loop(rows: Tensor, w13: Tensor, w2: Tensor, offs: Tensor, buf: str = "") -> Tensor:
    """Same contract as ffn_grouped, one matmul per slot; padding rows come out zero. Not planned.
    The output hangs off rows and weights even when no slot has a row (empty slices: zero
    gradients), so every rank's backward runs the same ops, and the same collectives."""
    ends = offs.tolist()  # host sync: this fallback is not capturable
    out = torch.zeros_like(rows) + (rows[:0].sum() + w13[:0].sum() + w2[:0].sum()).to(rows.dtype)
    start = 0
    for e, end in enumerate(ends):
        if end > start:
            out[start:end] = swiglu(rows[start:end] @ w13[e]) @ w2[e]
        start = end
    return out


def ffn_te(rows: Tensor, w13: Tensor, w2: Tensor, offs: Tensor, buf: str = "") -> Tensor:
    try:
        import transformer_engine.pytorch  # noqa: F401
    except ImportError:
        raise MissingDependencyError("backends.grouped_gemm 'te'",
                                     "pip install 'echoc[te]'  (transformer-engine[pytorch])") from None
    raise EchocError("backends.grouped_gemm 'te': Transformer Engine is installed, but echoc does not "
                     "drive its grouped GEMM yet (it takes host-side splits); use 'torch'")


def resolved_impl(impl: str) -> str:
    """`torch` falls back to `loop` where this torch has no grouped_mm."""
    return "loop" if impl == "torch" and _grouped_mm is None else impl


def expert_ffn(rows: Tensor, w13: Tensor, w2: Tensor, offs: Tensor, impl: str, wgrad: Tensor | None = None,
               buf: str = "expert_ffn") -> Tensor:
    """The routed experts' SwiGLU FFN on expert-sorted rows, by implementation name; `wgrad` (a
    streams.wgrad_fork token): its weight gradients on the wgrad stream (`torch` only)."""
    if wgrad is not None:
        assert resolved_impl(impl) == "torch", "deferred weight gradients need the grouped FFN"
        return ffn_grouped(rows, w13, w2, offs, buf, wgrad)
    return {"torch": ffn_grouped, "loop": ffn_loop, "te": ffn_te}[resolved_impl(impl)](rows, w13, w2, offs, buf)


HOST_SYNC_IMPLS = {"loop"}


def expert_ffn_recompute_clone(rows: Tensor, w13: Tensor, w2: Tensor, offs: Tensor, impl: str,
                               counts_all: Tensor, spare_expert: Tensor, offer: int, ep_group: str,
                               buf: str = "expert_ffn") -> Tensor:
    """The expert FFN on home + spare slots whose cloned weights are fetched again in backward
    instead of being saved: between a layer's forward and backward only the home weights are
    alive, so one spare-slot buffer serves every layer (echo.recompute_clone_dispatch).
    Activations are saved as usual; the only extra work is the clone's all-gather in backward."""
    if resolved_impl(impl) != "torch":
        raise EchocError("echo.recompute_clone_dispatch needs backends.grouped_gemm 'torch' (grouped_mm)")
    return _GroupedSwiGLU.apply(rows, w13, w2, offs, buf, counts_all, spare_expert, offer, ep_group, None)


contracts.bind(EXPERT_FFN, expert_ffn)
contracts.bind(EXPERT_FFN_RECOMPUTE_CLONE, expert_ffn_recompute_clone)
