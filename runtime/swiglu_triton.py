"""The expert FFN's SwiGLU as two Triton kernels, on the real rows only.

h13 [R, 2F] holds (gate, up) per expert-sorted row; rows past offs[-1] (the real rows,
read on the device) are padding that no grouped GEMM reads, so both kernels skip them.

  forward   act = silu(gate) · up                                   [R, F]
  backward  grad_h13 = (silu'(gate) · (grad_act · up), grad_act · silu(gate))   [R, 2F]

Rounding follows the torch path of runtime/grouped_gemm.py step by step (silu rounded to the
dtype, then the product; grad_act · up rounded before silu's backward), so the two agree to
the last bit wherever exp agrees.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

_BR, _BF = 8, 512


@triton.jit
def _real_rows(offs, L):
    return tl.load(offs + L - 1).to(tl.int64)


@triton.jit
def _swiglu_forward(h13, act, offs, L, F, BR: tl.constexpr, BF: tl.constexpr):
    n = _real_rows(offs, L)
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BF + tl.arange(0, BF)
    m = (r < n)[:, None] & (c < F)[None, :]
    row = h13 + r[:, None] * (2 * F) + c[None, :]
    gate = tl.load(row, mask=m, other=0).to(tl.float32)
    up = tl.load(row + F, mask=m, other=0).to(tl.float32)
    dt = act.dtype.element_ty
    silu = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    tl.store(act + r[:, None] * F + c[None, :], (silu * up).to(dt), mask=m)


@triton.jit
def _swiglu_backward(grad_act, h13, grad_h13, offs, L, F, BR: tl.constexpr, BF: tl.constexpr):
    n = _real_rows(offs, L)
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BF + tl.arange(0, BF)
    m = (r < n)[:, None] & (c < F)[None, :]
    row = h13 + r[:, None] * (2 * F) + c[None, :]
    gate = tl.load(row, mask=m, other=0).to(tl.float32)
    up = tl.load(row + F, mask=m, other=0).to(tl.float32)
    ga = tl.load(grad_act + r[:, None] * F + c[None, :], mask=m, other=0).to(tl.float32)
    dt = grad_h13.dtype.element_ty
    e = tl.exp(-gate)
    silu = (gate / (1.0 + e)).to(dt).to(tl.float32)
    sig = 1.0 / (1.0 + e)
    g_silu = (ga * up).to(dt).to(tl.float32)
    out = grad_h13 + r[:, None] * (2 * F) + c[None, :]
    tl.store(out, (g_silu * sig * (1.0 + gate * (1.0 - sig))).to(dt), mask=m)
    tl.store(out + F, (ga * silu).to(dt), mask=m)


def _grid(rows: int, f: int) -> tuple[int, int]:
    return triton.cdiv(rows, _BR), triton.cdiv(f, _BF)


def forward(h13: Tensor, offs: Tensor, act: Tensor) -> Tensor:
    """h13 [R, 2F], offs [L] int32 → act [R, F] (rows ≥ offs[-1] untouched)."""
    R, F = act.shape
    assert h13.is_contiguous() and act.is_contiguous() and h13.shape == (R, 2 * F)
    if R and F:
        _swiglu_forward[_grid(R, F)](h13, act, offs, offs.shape[0], F, BR=_BR, BF=_BF, num_warps=4)
    return act


def backward(grad_act: Tensor, h13: Tensor, offs: Tensor, grad_h13: Tensor) -> Tensor:
    """grad_act [R, F], h13 [R, 2F] → grad_h13 [R, 2F] (rows ≥ offs[-1] untouched)."""
    R, F = grad_act.shape
    assert grad_act.is_contiguous() and h13.is_contiguous() and grad_h13.is_contiguous()
    if R and F:
        _swiglu_backward[_grid(R, F)](grad_act, h13, grad_h13, offs, offs.shape[0], F, BR=_BR, BF=_BF,
                                      num_warps=4)
    return grad_h13
