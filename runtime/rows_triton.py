"""Token-row movement as Triton kernels: the same numbers as the torch path of runtime/rows.py.

Every kernel reads its index maps on the device and touches only the rows they name: a row
whose index is -1 (padding, an empty slot, a dropped copy) is neither read nor, unless the
caller asks for zeros, written. So a gather into a padded [ep·C, H] buffer moves the real
rows only, and nothing else has to zero the padding first.

Legend: H row width (elements), BR rows and BH columns per program, K copies per token.
Every 2-D operand is row-major with unit column stride (the launchers check it).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_BR, _BH = 4, 1024          # gather tile: 4 rows × 1024 columns (8 KiB of bf16) per program
_BT, _BHS = 2, 1024         # gather-sum tile: 2 tokens × 1024 columns, K rows summed into it
_BHW = 512                  # weighted-sum backward: one token's K rows × 512 columns per loop step


@triton.jit
def _gather(src, idx, out, n, H, s_src, s_out, ZERO: tl.constexpr, BR: tl.constexpr, BH: tl.constexpr):
    """out[r] = src[idx[r]] for idx[r] ≥ 0; zeros there (ZERO) or untouched otherwise."""
    r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    c = tl.program_id(1) * BH + tl.arange(0, BH)
    rows_in, cols_in = r < n, c < H
    i = tl.load(idx + r, mask=rows_in, other=-1)
    valid = i >= 0
    v = tl.load(src + i[:, None] * s_src + c[None, :], mask=valid[:, None] & cols_in[None, :], other=0)
    if ZERO:
        keep = rows_in
    else:
        keep = valid
    tl.store(out + r[:, None] * s_out + c[None, :], v, mask=keep[:, None] & cols_in[None, :])


@triton.jit
def _gather_sum(src, idx, w, out, T, H, K, s_src, s_out, HAS_IDX: tl.constexpr, HAS_W: tl.constexpr,
                BT: tl.constexpr, BH: tl.constexpr):
    """out[t] = Σ_k w[t, k] · src[idx[t, k]] (idx -1: skipped), summed in fp32, rounded once."""
    t = tl.program_id(0).to(tl.int64) * BT + tl.arange(0, BT)
    c = tl.program_id(1) * BH + tl.arange(0, BH)
    tok_in, cols_in = t < T, c < H
    acc = tl.zeros([BT, BH], dtype=tl.float32)
    for k in range(K):
        if HAS_IDX:
            i = tl.load(idx + t * K + k, mask=tok_in, other=-1)
        else:
            i = tl.where(tok_in, t * K + k, -1)
        valid = i >= 0
        v = tl.load(src + i[:, None] * s_src + c[None, :], mask=valid[:, None] & cols_in[None, :], other=0)
        v = v.to(tl.float32)
        if HAS_W:
            v = v * tl.load(w + t * K + k, mask=tok_in, other=0).to(tl.float32)[:, None]
        acc += v
    tl.store(out + t[:, None] * s_out + c[None, :], acc.to(out.dtype.element_ty),
             mask=tok_in[:, None] & cols_in[None, :])


@triton.jit
def _weighted_sum_backward(g, copies, w, grad_copies, grad_w, H, K, KB: tl.constexpr, BH: tl.constexpr):
    """One token t: grad_copies[t·K + k] = w[t, k] · g[t] and grad_w[t, k] = Σ_h g[t, h] · copies[t·K + k, h]
    (fp32 sums, rounded to the copies' dtype like the batched GEMM they replace)."""
    t = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, KB)
    k_in = k < K
    wk = tl.load(w + t * K + k, mask=k_in, other=0).to(tl.float32)
    rows = t * K + k
    dot = tl.zeros([KB], dtype=tl.float32)
    for h0 in range(0, H, BH):
        c = h0 + tl.arange(0, BH)
        cols_in = c < H
        gt = tl.load(g + t * H + c, mask=cols_in, other=0).to(tl.float32)
        m = k_in[:, None] & cols_in[None, :]
        cp = tl.load(copies + rows[:, None] * H + c[None, :], mask=m, other=0).to(tl.float32)
        dot += tl.sum(cp * gt[None, :], axis=1)
        tl.store(grad_copies + rows[:, None] * H + c[None, :],
                 (wk[:, None] * gt[None, :]).to(grad_copies.dtype.element_ty), mask=m)
    tl.store(grad_w + t * K + k, dot.to(grad_w.dtype.element_ty), mask=k_in)


@triton.jit
def _scaled_gather_dot(g, gidx, y, w, grad_y, grad_w, H, s_g, BH: tl.constexpr):
    """One row i with gidx[i] ≥ 0: grad_y[i] = w[i] · g[gidx[i]] and grad_w[i] = Σ_h g[gidx[i], h] · y[i, h]
    (fp32, rounded to y's dtype); a row with gidx -1 is left alone."""
    i = tl.program_id(0).to(tl.int64)
    j = tl.load(gidx + i)
    if j >= 0:
        wi = tl.load(w + i).to(tl.float32)
        dot = tl.zeros([BH], dtype=tl.float32)
        for h0 in range(0, H, BH):
            c = h0 + tl.arange(0, BH)
            cols = c < H
            gv = tl.load(g + j * s_g + c, mask=cols, other=0).to(tl.float32)
            dot += gv * tl.load(y + i * H + c, mask=cols, other=0).to(tl.float32)
            tl.store(grad_y + i * H + c, (wi * gv).to(grad_y.dtype.element_ty), mask=cols)
        tl.store(grad_w + i, tl.sum(dot, 0).to(grad_w.dtype.element_ty))


def _rows_major(*ts: Tensor) -> None:
    for t in ts:
        assert t.dim() == 2 and t.stride(1) == 1, f"row-major [n, H] expected, got {tuple(t.shape)} {t.stride()}"


def gather(src: Tensor, index: Tensor, out: Tensor, zero_missing: bool) -> Tensor:
    """src [M, H], index [n] int64 (-1: none) → out [n, H] (see _gather)."""
    _rows_major(src, out)
    n, H = out.shape
    if n:
        grid = (triton.cdiv(n, _BR), triton.cdiv(H, _BH))
        _gather[grid](src, index.contiguous(), out, n, H, src.stride(0), out.stride(0),
                      ZERO=zero_missing, BR=_BR, BH=_BH, num_warps=4)
    return out


def gather_sum(src: Tensor, index: Tensor | None, weights: Tensor | None, out: Tensor) -> Tensor:
    """src [M, H]; index [T, K] int64 (-1: skip) or None (row t·K + k); weights [T, K] or None
    → out [T, H] = Σ_k weights · src[index]."""
    _rows_major(src, out)
    T, H = out.shape
    K = (index if index is not None else weights).shape[1]
    if T:
        grid = (triton.cdiv(T, _BT), triton.cdiv(H, _BHS))
        _gather_sum[grid](src, index.contiguous() if index is not None else src,
                          weights.contiguous() if weights is not None else src, out, T, H, K,
                          src.stride(0), out.stride(0), HAS_IDX=index is not None,
                          HAS_W=weights is not None, BT=_BT, BH=_BHS, num_warps=4)
    return out


def weighted_sum_backward(grad: Tensor, copies: Tensor, weights: Tensor, grad_copies: Tensor) -> tuple[Tensor, Tensor]:
    """grad [T, H], copies [T·K, H], weights [T, K] (copies' dtype) → (grad_copies [T·K, H] written in
    place, grad_weights [T, K] in the copies' dtype)."""
    T, K = weights.shape
    H = grad.shape[1]
    assert grad.is_contiguous() and copies.is_contiguous() and grad_copies.is_contiguous()
    grad_w = torch.empty((T, K), dtype=copies.dtype, device=copies.device)
    if T:
        _weighted_sum_backward[(T,)](grad, copies, weights.contiguous(), grad_copies, grad_w, H, K,
                                     KB=triton.next_power_of_2(K), BH=_BHW, num_warps=4)
    return grad_copies, grad_w


def scaled_gather_dot(g: Tensor, index: Tensor, y: Tensor, w: Tensor, grad_y: Tensor) -> tuple[Tensor, Tensor]:
    """g [M, H], index [R] (-1: none), y [R, H], w [R] (y's dtype) → (grad_y [R, H] written in place
    where index ≥ 0, grad_w [R] in y's dtype, 0 where index -1)."""
    _rows_major(g)
    R, H = y.shape
    assert y.is_contiguous() and grad_y.is_contiguous()
    grad_w = torch.zeros(R, dtype=y.dtype, device=y.device)
    if R:
        _scaled_gather_dot[(R,)](g, index.contiguous(), y, w.contiguous(), grad_y, grad_w, H, g.stride(0),
                                 BH=_BHW, num_warps=4)
    return grad_y, grad_w
