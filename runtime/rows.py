"""Token rows moved by index maps: gathers, per-token sums of gathered rows, the weighted sum.

Each function has two paths with the same numbers: Triton kernels (runtime/rows_triton.py)
for CUDA tensors where triton is installed, and plain torch everywhere else (CPU, gloo, CI).
Index maps use -1 for "no row here" (runtime/layout.py). A gather either writes zeros at
those rows (`zero_missing`, for buffers someone reads whole) or leaves them undefined (for
padded buffers whose padding nobody reads: the Triton path then neither reads nor writes
them). tests/runtime/test_kernels.py holds the two paths against each other.

Shapes: src [M, H]; index [n] or [T, K] int64; weights [T, K]; K copies per token.
"""
from __future__ import annotations

import torch
from torch import Tensor

try:  # the fused kernels need triton; without it (CPU installs, CI) every device uses torch
    from runtime import rows_triton as _fused
except ImportError:
    _fused = None


def fused(t: Tensor) -> bool:
    """Whether the Triton kernels serve tensors like t: CUDA and triton installed."""
    return _fused is not None and t.is_cuda


def compose(outer: Tensor, inner: Tensor) -> Tensor:
    """inner[outer] with -1 kept: two index maps as one (outer [n] into inner [m]) → [n]."""
    return torch.where(outer >= 0, inner[outer.clamp(min=0)], -1)


def gather(src: Tensor, index: Tensor, out: Tensor | None = None, zero_missing: bool = True) -> Tensor:
    """src [M, H], index [n] (-1: none) → [n, H] (into `out` when given); rows with index -1 are
    zero (`zero_missing`) or undefined."""
    if out is None:
        out = src.new_empty((index.shape[0], src.shape[1]))
    if fused(src):
        return _fused.gather(src, index, out, zero_missing)
    torch.index_select(src, 0, index.clamp(min=0), out=out)
    return out.masked_fill_((index < 0).unsqueeze(1), 0) if zero_missing else out


def gather_sum(src: Tensor, index: Tensor, out: Tensor | None = None) -> Tensor:
    """src [M, H], index [T, K] (-1: skipped) → Σ_k src[index[t, k]], [T, H]: summed in fp32,
    rounded once (as torch's sum over the K gathered rows)."""
    T, K = index.shape
    if out is None:
        out = src.new_empty((T, src.shape[1]))
    if fused(src):
        return _fused.gather_sum(src, index, None, out)
    rows = gather(src, index.reshape(-1)).view(T, K, -1)
    return torch.sum(rows, 1, out=out)


def weighted_sum(copies: Tensor, weights: Tensor) -> Tensor:
    """copies [T·K, H], weights [T, K] in the copies' dtype → Σ_k w[t, k] · copies[t·K + k], [T, H],
    summed in fp32 (the torch path: one batched GEMM [T, 1, K] @ [T, K, H])."""
    T, K = weights.shape
    if fused(copies):
        return _fused.gather_sum(copies, None, weights, copies.new_empty((T, copies.shape[1])))
    return torch.bmm(weights.unsqueeze(1), copies.view(T, K, -1)).squeeze(1)


def weighted_sum_backward(grad: Tensor, copies: Tensor, weights: Tensor, grad_copies: Tensor) -> tuple[Tensor, Tensor]:
    """The transpose of weighted_sum: grad [T, H] → (grad_copies [T·K, H] = w ⊗ grad, written into
    `grad_copies`; grad_weights [T, K] = per copy ⟨grad[t], copies[t·K + k]⟩ in the copies' dtype)."""
    T, K = weights.shape
    grad = grad.contiguous()
    if fused(copies):
        return _fused.weighted_sum_backward(grad, copies, weights, grad_copies)
    g = grad.unsqueeze(1)                                                    # [T, 1, H]
    torch.bmm(weights.unsqueeze(2), g, out=grad_copies.view(T, K, -1))       # [T, K, H]
    return grad_copies, torch.bmm(g, copies.view(T, K, -1).transpose(1, 2)).squeeze(1)


def scaled_gather_dot(g: Tensor, index: Tensor, y: Tensor, w: Tensor, grad_y: Tensor) -> tuple[Tensor, Tensor]:
    """The combine's backward on the expert side (runtime/p2p_moves.py): for each row i with
    index[i] ≥ 0, grad_y[i] = w[i] · g[index[i]] (written into `grad_y`; other rows left alone) and
    grad_w[i] = ⟨g[index[i]], y[i]⟩, summed in fp32 and rounded to y's dtype (0 where index -1).
    g [M, H], index [R], y [R, H], w [R] in y's dtype."""
    if fused(y):
        return _fused.scaled_gather_dot(g, index, y, w, grad_y)
    real = index >= 0
    gv = gather(g, index).float()                                           # [R, H], zero where none
    scaled = (w.float().unsqueeze(1) * gv).to(grad_y.dtype)
    grad_y[real] = scaled[real]
    dot = torch.where(real.unsqueeze(1), gv * y.float(), 0).sum(1)         # where, not *: NaN padding stays out
    return grad_y, dot.to(y.dtype)
