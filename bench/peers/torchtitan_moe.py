"""torchtitan's MoE layer (torchtitan 0.3.0, `torchtitan.models.common.moe`) as a peer in the
layer bench: its TokenChoiceTopKRouter, GroupedExperts (torch._grouped_mm) and the EP = 1
LocalTokenDispatcher (argsort + gather, fp32 scores × rows, deterministic scatter_add), plus a
shared FeedForward, built with the same weights as an echoc `runtime.model.MoE`.

Same weights means same routing: the router gate, the experts and the shared expert are copied
(echoc stores the experts as w13 [E, H, 2F] with the gate half first and w2 [E, F, H];
torchtitan as w1/w3 [E, F, H] and w2 [E, H, F]), so both layers compute the same function up
to bf16 rounding and the bench can check it.

Install: `pip install torchtitan==0.3.0` (imports spmd_types, tyro, docstring-parser, typeguard).
"""
from __future__ import annotations

import torch
from torch import nn

from runtime.model import MoE as EchocMoE


def available() -> str | None:
    """None when torchtitan imports, else the reason (the bench skips the peer and says why)."""
    try:
        import torchtitan.models.common.moe  # noqa: F401
    except Exception as e:  # any import-time failure of the peer only skips the peer
        return f"{type(e).__name__}: {e}"
    return None


def build(echo_moe: EchocMoE, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """torchtitan MoE with echo_moe's config and weights; parameters in `dtype`, its fp32 buffers kept."""
    from torchtitan.models.common.feed_forward import FeedForward
    from torchtitan.models.common.linear import Linear
    from torchtitan.models.common.moe import GroupedExperts, MoE, RoutedExperts, TokenChoiceTopKRouter
    from torchtitan.models.common.token_dispatcher import LocalTokenDispatcher

    r, ex = echo_moe.router, echo_moe.experts
    E, H, F2 = ex.w13.shape
    F, K = F2 // 2, r.top_k
    assert r.num_groups == 1, "the peer is built without node-limited routing"
    shared = None
    if echo_moe.shared is not None:
        Fs = echo_moe.shared.w2.in_features
        shared = FeedForward.Config(w1=Linear.Config(in_features=H, out_features=Fs),
                                    w2=Linear.Config(in_features=Fs, out_features=H),
                                    w3=Linear.Config(in_features=H, out_features=Fs))
    cfg = MoE.Config(
        num_experts=E,
        routed_experts=RoutedExperts.Config(
            inner_experts=GroupedExperts.Config(dim=H, hidden_dim=F, num_experts=E),
            token_dispatcher=LocalTokenDispatcher.Config(num_experts=E, top_k=K)),
        router=TokenChoiceTopKRouter.Config(
            num_experts=E, gate=Linear.Config(in_features=H, out_features=E), top_k=K,
            score_func=r.score_fn, route_norm=r.normalize, route_scale=r.routed_scaling_factor),
        shared_experts=shared)
    device = ex.w13.device
    with torch.device(device):
        tt = cfg.build()
    _copy_weights(tt, echo_moe, dtype)
    return tt


def _copy_weights(tt: nn.Module, echo_moe: EchocMoE, dtype: torch.dtype) -> None:
    w13, w2 = echo_moe.experts.w13.detach(), echo_moe.experts.w2.detach()
    F = w2.shape[1]
    src = {
        "router.gate.weight": echo_moe.router.weight.detach(),
        "routed_experts.inner_experts.w1_EFD": w13[:, :, :F].transpose(1, 2),
        "routed_experts.inner_experts.w3_EFD": w13[:, :, F:].transpose(1, 2),
        "routed_experts.inner_experts.w2_EDF": w2.transpose(1, 2),
    }
    if echo_moe.shared is not None:
        sw13 = echo_moe.shared.w13.weight.detach()           # [2F, H], gate rows first
        Fs = sw13.shape[0] // 2
        src |= {"shared_experts.w1.weight": sw13[:Fs], "shared_experts.w3.weight": sw13[Fs:],
                "shared_experts.w2.weight": echo_moe.shared.w2.weight.detach()}
    params = dict(tt.named_parameters())
    assert set(params) == set(src), f"torchtitan parameters changed: {sorted(set(params) ^ set(src))}"
    for name, p in params.items():
        p.data = src[name].to(dtype).contiguous()
    with torch.no_grad():
        tt.expert_bias_E.copy_(echo_moe.router.expert_bias)
