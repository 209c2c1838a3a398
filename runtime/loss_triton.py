"""The chunked loss of runtime/loss.py as two Triton kernels: no fp32 copy of the logits at all.

    forward   per row: lse = log Σ_v exp(x_v) (one pass, a running maximum), and lse − x[label]
    backward  grad[r, v] = (exp(x_v − lse_r) − [v = label_r]) · scale      (model dtype)

logits [N, V] (model dtype, rows contiguous), labels [N] int64, lse / per-row losses [N]
float32, scale [] float32 on the device (∂loss / N): nothing is read on the host, so both
kernels can be captured. The forward reads the logits once; the backward reads them once and
writes the gradient once. The sums run in fp32 in another order than the torch path's, so the
two agree to rounding, not bitwise. A label outside [0, V) makes its row's loss and gradient
NaN (the Trainer's guard then skips or stops the step), where the torch path raises.
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

_BV_FORWARD, _BV_BACKWARD = 4096, 2048


@triton.jit
def _forward(logits, labels, lse, loss_rows, V, BV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = logits + row * V
    top = float("-inf")
    total = 0.0
    for start in range(0, V, BV):
        c = start + tl.arange(0, BV)
        x = tl.load(base + c, mask=c < V, other=float("-inf")).to(tl.float32)
        new_top = tl.maximum(top, tl.max(x, 0))
        shift = tl.where(new_top == float("-inf"), 0.0, new_top)    # all −inf so far: exp(−inf − −inf) is NaN
        total = total * tl.exp(top - shift) + tl.sum(tl.exp(x - shift), 0)
        top = new_top
    out = top + tl.log(total)
    label = tl.load(labels + row)
    valid = (label >= 0) & (label < V)       # a label outside the vocabulary: NaN, never another logit
    target = tl.load(base + tl.where(valid, label, 0)).to(tl.float32)
    tl.store(lse + row, out)
    tl.store(loss_rows + row, tl.where(valid, out - target, float("nan")))


@triton.jit
def _backward(logits, labels, lse, scale, grad, V, BV: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BV + tl.arange(0, BV)
    m = c < V
    x = tl.load(logits + row * V + c, mask=m, other=0).to(tl.float32)
    p = tl.exp(x - tl.load(lse + row))
    label = tl.load(labels + row)
    p = tl.where(c == label, p - 1.0, p)
    p = tl.where((label >= 0) & (label < V), p, float("nan"))
    tl.store(grad + row * V + c, (p * tl.load(scale)).to(grad.dtype.element_ty), mask=m)


def forward(logits: Tensor, labels: Tensor, lse: Tensor, loss_rows: Tensor) -> None:
    """logits [N, V], labels [N] → lse [N], loss_rows [N] (float32, written in place)."""
    n, v = logits.shape
    assert logits.is_contiguous() and labels.is_contiguous()
    if n:
        _forward[(n,)](logits, labels, lse, loss_rows, v, BV=_BV_FORWARD, num_warps=8)


def backward(logits: Tensor, labels: Tensor, lse: Tensor, scale: Tensor, grad: Tensor) -> None:
    """grad [N, V] (the logits' dtype) = (softmax(logits) − onehot(labels)) · scale, in place."""
    n, v = logits.shape
    assert logits.is_contiguous() and grad.is_contiguous()
    if n and v:
        _backward[(n, triton.cdiv(v, _BV_BACKWARD))](logits, labels, lse, scale, grad, v, BV=_BV_BACKWARD,
                                                      num_warps=4)
