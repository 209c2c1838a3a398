"""Applying expert parallelism to a reference model from outside.

The model code stays parallelism-free (runtime/model.py); these functions act on it:
keep this rank's slice of every stacked expert tensor, name the expert tensors, and sum
the routers' loads over all ranks.

Loss scaling (gradients are summed, and sharded by the ZeRO level, in
runtime/train_state.py): each rank computes the mean loss over its own tokens and the
runtime multiplies it by 1/world before backward. Then the global-mean gradient is
  dense params:  SUM over all ranks,
  expert params: already summed over the EP group by the combine/dispatch
                 backward; SUM over expert-DP (ranks holding the same shard).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from runtime import comm
from runtime.model import moe_layers


def expert_param_names(model: nn.Module) -> set[str]:
    return {f"{name}.experts.{p}" for name, _ in moe_layers(model) for p in ("w13", "w2")}


def shard_experts(model: nn.Module, ep_rank: int, ep: int) -> None:
    """Replace every stacked expert tensor [E, ...] by this rank's slice [E/ep, ...] (in place)."""
    for _, moe in moe_layers(model):
        ex = moe.experts
        for pname in ("w13", "w2"):
            full = getattr(ex, pname)
            per = full.shape[0] // ep
            part = full.detach()[ep_rank * per:(ep_rank + 1) * per].clone()
            setattr(ex, pname, nn.Parameter(part, requires_grad=full.requires_grad))


def _flat_all_reduce(tensors: list[torch.Tensor], group) -> None:
    """One all-reduce for many tensors (bucketed by dtype) instead of one per tensor."""
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for t in tensors:
        by_dtype.setdefault(t.dtype, []).append(t)
    for ts in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in ts])
        dist.all_reduce(flat, group=group)
        offset = 0
        for t in ts:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


def all_reduce_load(model: nn.Module) -> dict[str, torch.Tensor]:
    """Each router's accumulated expert load, summed over all ranks (global token counts)."""
    loads = {name: moe.router.load for name, moe in moe_layers(model)}
    if dist.is_initialized() and dist.get_world_size() > 1 and loads:
        _flat_all_reduce(list(loads.values()), comm.get_group("world"))
    return loads

