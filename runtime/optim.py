"""AdamW on fp32 master weights, capturable, with a device-side skip.

Mixed precision as Megatron-Core and torchtitan do it: the model computes on its own dtype
(bf16) weights, while the optimizer keeps an fp32 master copy of every weight (or of this
rank's shard of it, under ZeRO) and fp32 moments. An update smaller than bf16's resolution
of a weight is therefore not lost: it accumulates in the master until it shows.

Everything the step reads lives on the device: the learning rate (`lr`, [] float32, set by
the schedule), the step count (`step`, [] float32) and `found_inf` ([] float32, 1.0 = skip
this update, as GradScaler's found_inf). So the step never reads the host and can be
captured in a CUDA graph. One fused kernel (`torch._fused_adamw_`, CPU and CUDA) updates
every tensor; with found_inf = 1 it leaves masters and moments untouched, and the step count
does not advance.

For a float32 model without sharding the "master" is the weight itself: there is no copy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class AdamWConfig:
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.0
    eps: float = 1e-8


class MasterAdamW:
    """AdamW over a list of fp32 tensors (`masters`), updated in place.

    masters[i] and grads[i] (given to `step`) have the same shape and dtype float32; the
    moments `exp_avg[i]`, `exp_avg_sq[i]` are created here as zeros of that shape.
    """

    def __init__(self, masters: list[Tensor], lr: Tensor, config: AdamWConfig):
        assert all(m.dtype == torch.float32 for m in masters), "master weights must be float32"
        assert lr.dim() == 0 and lr.dtype == torch.float32, "lr is a [] float32 device tensor"
        self.masters, self.lr, self.config = masters, lr, config
        device = lr.device
        self.exp_avg = [torch.zeros_like(m) for m in masters]
        self.exp_avg_sq = [torch.zeros_like(m) for m in masters]
        self.step_count = torch.zeros((), dtype=torch.float32, device=device)

    @torch.no_grad()
    def step(self, grads: list[Tensor], found_inf: Tensor) -> None:
        """One update of every master from `grads` (float32, shaped like the masters), unless
        found_inf ([] float32 on the device) is 1.0. No host read."""
        if not self.masters:
            return
        assert len(grads) == len(self.masters)
        c = self.config
        self.step_count.add_(1.0 - found_inf)
        steps = [self.step_count] * len(self.masters)   # the kernel only reads the count
        torch._fused_adamw_(self.masters, grads, self.exp_avg, self.exp_avg_sq, [], steps,
                            lr=self.lr, beta1=c.betas[0], beta2=c.betas[1], weight_decay=c.weight_decay,
                            eps=c.eps, amsgrad=False, maximize=False, grad_scale=None, found_inf=found_inf)

    def state_tensors(self) -> dict[str, list[Tensor]]:
        """The optimizer's state by field (for checkpoints): lists parallel to the masters."""
        return {"exp_avg": self.exp_avg, "exp_avg_sq": self.exp_avg_sq}
