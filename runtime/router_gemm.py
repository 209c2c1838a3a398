"""The router's logits, x @ weight.T in float32, without float32 copies of x or of the weight.

    router_logits(x [T, H], weight [E, H]) → logits [T, E] float32

The product of two bf16 numbers is exact in float32, so a tensor-core GEMM that accumulates in
float32 and writes float32 (`torch.mm(..., out_dtype=torch.float32)`) computes the same logits as
the float32 GEMM of their upcast copies, up to summation order. That GEMM needs neither copy (at
H 6144, T 4096: a 100 MB upcast of x, kept for backward, and SIMT float32 GEMMs).

Backward: the logits' gradient g is float32. It is split into two bf16 parts, g = hi + lo
(hi = g rounded, lo = the remainder rounded; |g − hi − lo| ≤ 2⁻¹⁶ |g|), and both parts go
through the same tensor-core GEMM, stacked along the reduced dimension:

    grad x      = [hi | lo] @ [weight ; weight]          [T, 2E] @ [2E, H], in x's dtype
    grad weight = ([hi | lo]ᵀ @ x) summed over the two halves, in weight's dtype

Both gradients are rounded to bf16 at the end, as the float32 path rounds them, so the split adds
an error about 2⁸ times below that rounding. fp16 is left out: its range is too narrow for the
split (the remainder of a 1e-3 gradient is subnormal in fp16). Elsewhere (CPU, meta, float32 and
fp16 models, mixed dtypes) the same function runs the float32 GEMMs. Either way backward keeps x
and weight as they are (no float32 copy): the memory census measures that on the meta device.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Mm = Callable[[Tensor, Tensor], Tensor]
_MM_OUT_DTYPE = "dtype" in torch.ops.aten.mm.overloads()     # torch.mm(..., out_dtype=): not in every torch


def mm_f32(a: Tensor, b: Tensor) -> Tensor:
    """a @ b of two bf16 matrices, accumulated and returned in float32 (tensor cores)."""
    return torch.mm(a, b, out_dtype=torch.float32)


def tensor_core_path(x: Tensor, weight: Tensor) -> bool:
    return _MM_OUT_DTYPE and x.device.type == "cuda" and x.dtype == torch.bfloat16 and weight.dtype == x.dtype


def split_bf16(g: Tensor, dtype: torch.dtype) -> Tensor:
    """g [T, E] float32 → [T, 2E] in dtype (bf16): (hi | lo), hi + lo = g to within 2⁻¹⁶ |g|."""
    hi = g.to(dtype)
    return torch.cat([hi, (g - hi.float()).to(dtype)], dim=1)


def split_grads(g: Tensor, x: Tensor, weight: Tensor, mm: Mm = mm_f32, mm_bf16: Mm = torch.mm) -> tuple[Tensor, Tensor]:
    """The logits' gradient g [T, E] float32 → (grad x [T, H] in x's dtype, grad weight [E, H] in
    weight's dtype), through `mm` (bf16 inputs, float32 out) and `mm_bf16` (bf16 out, float32
    accumulation: no [T, H] float32 intermediate) on the split of g."""
    parts = split_bf16(g, x.dtype)                                   # [T, 2E]
    grad_x = mm_bf16(parts, torch.cat([weight, weight], dim=0))
    E = weight.shape[0]
    grad_w = mm(parts.t(), x).view(2, E, -1).sum(0).to(weight.dtype)
    return grad_x, grad_w


class _RouterLogits(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight)
        if tensor_core_path(x, weight):
            return mm_f32(x, weight.t())
        return F.linear(x.float(), weight.float())

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor, Tensor]:
        x, weight = ctx.saved_tensors
        g = g.float()
        if tensor_core_path(x, weight):
            return split_grads(g, x, weight)
        return (g @ weight.float()).to(x.dtype), (g.t() @ x.float()).to(weight.dtype)


def router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """x [T, H], weight [E, H] → x @ weight.T [T, E] in float32."""
    return _RouterLogits.apply(x, weight)
