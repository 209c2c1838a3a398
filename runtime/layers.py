"""Building blocks of the reference model: init helpers, RMSNorm, SwiGLU MLP, RoPE."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

INIT_STD = 0.02


def _normal_(w: Tensor) -> None:
    if w.is_meta:  # meta tensors hold no values; skipping keeps a 744B-parameter build fast
        return
    with torch.no_grad():
        w.normal_(0.0, INIT_STD)


def _init_linear_children(module: nn.Module) -> None:
    for child in module.children():
        if isinstance(child, (nn.Linear, nn.Embedding)):
            _normal_(child.weight)


class _FP32Buffers(nn.Module):
    """Keeps the buffers named in `fp32_buffers` in float32 when the module is cast.

    `model.to(torch.bfloat16)` casts every floating buffer; bf16 cannot hold a
    bias nudged by 1e-3 per step or token counts above 256, nor accurate RoPE
    frequencies. Device moves still apply.
    """
    fp32_buffers: tuple[str, ...] = ()

    def _apply(self, fn, recurse=True):
        before = {name: self._buffers[name] for name in self.fp32_buffers}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new is not None and new.dtype != torch.float32:
                self._buffers[name] = old.to(device=new.device, dtype=torch.float32)
        return self


# ----------------------------------------------------------------------------- building blocks

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.to(x.dtype) * self.weight


def swiglu(h: Tensor) -> Tensor:
    """[.., 2F] (gate, up) → [.., F]: silu(gate) · up."""
    halves = h.chunk(2, dim=-1)            # indexed, not unpacked (fx proxies unpack slowly)
    return F.silu(halves[0]) * halves[1]


class MLP(nn.Module):
    """SwiGLU FFN; `w13` fuses gate and up (first half gate)."""

    def __init__(self, dim: int, inter: int):
        super().__init__()
        self.w13 = nn.Linear(dim, 2 * inter, bias=False)
        self.w2 = nn.Linear(inter, dim, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_linear_children(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(swiglu(self.w13(x)))


class RotaryEmbedding(_FP32Buffers):
    """RoPE over the last dim of x [B, S, heads, dim], positions 0..S-1 (half-split pairs)."""
    fp32_buffers = ("inv_freq",)

    def __init__(self, dim: int, theta: float):
        super().__init__()
        self.dim, self.theta = dim, theta
        self.register_buffer("inv_freq", torch.empty(dim // 2), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        exponent = torch.arange(0, self.dim, 2, dtype=torch.float32, device=self.inv_freq.device) / self.dim
        with torch.no_grad():
            self.inv_freq.copy_(1.0 / self.theta ** exponent)

    def forward(self, x: Tensor) -> Tensor:
        pos = torch.arange(x.shape[1], device=x.device, dtype=torch.float32)
        angles = torch.outer(pos, self.inv_freq)                 # [S, dim/2]
        cos = angles.cos()[None, :, None, :]
        sin = angles.sin()[None, :, None, :]
        halves = x.float().chunk(2, dim=-1)    # indexed, not unpacked (fx proxies unpack slowly)
        x1, x2 = halves[0], halves[1]
        out = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
        return out.to(x.dtype)
