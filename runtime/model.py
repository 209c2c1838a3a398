"""The reference model: a GLM-5-style MoE decoder, built from `echoc.spec.ModelConfig`.

This is the correctness oracle. Every compiled, distributed, cloned run must
compute the same function, so it is written to be read, not to be fast: plain
`nn.Module`s, no parallelism, every `forward` top to bottom (gpt-fast / nanoGPT).

    tokens [B, S] ─ embed ─► h [B, S, H]
    for each Block:  h = h + attn(attn_norm(h))             causal GQA or MLA, RoPE
                     h = h + mlp(mlp_norm(h))               SwiGLU MLP (first layers) or MoE
    logits [B, S, V] = lm_head(norm(h))                     untied; loss is lm_loss(), outside

Attention is dense and causal. GLM-5's DSA sparse indexer (which picks the keys
each query reads) and its MTP layer are out of scope: they do not touch the MoE.

Tracing: the model traces with torch.fx when `MoE` is a leaf module; only
`MoE.forward` (the dropless reference, with data-dependent shapes) reads routing
on the host. It builds on the meta device (`with torch.device("meta")`).

Dtype: parameters are created in float32; callers cast with `.to(dtype)`. The
router's balancing state and RoPE frequencies stay float32 under any cast.
Init is deterministic given `torch.manual_seed` (same seed → same weights on
every rank): normal(0, 0.02) for linears, embedding, experts and router; norms 1.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from echoc.spec import ModelConfig

from runtime.attention import GQAAttention, MLAAttention
from runtime.layers import (MLP, RMSNorm, RotaryEmbedding, _FP32Buffers, _init_linear_children, _normal_,
                            swiglu)
from runtime.router_gemm import router_logits

# ----------------------------------------------------------------------------- mixture of experts

def expert_counts(topk_idx: Tensor, num_experts: int) -> Tensor:
    """topk_idx [T, K] int64 → tokens per expert [E] int64 (scatter_add_: no host sync, unlike bincount)."""
    flat = topk_idx.reshape(-1)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=topk_idx.device)
    return counts.scatter_add_(0, flat, torch.ones_like(flat))


class Router(_FP32Buffers):
    """Top-k router with aux-loss-free balancing (DeepSeek-V3 "noaux_tc").

    forward(x [T, H]) → (topk_idx [T, K] int64, topk_weight [T, K] in x.dtype):
      logits = x @ weight.T in float32; scores = sigmoid(logits) or softmax(logits)
      selection: top-k of scores + expert_bias, limited to the topk_groups best of
        num_groups expert groups (group score: sum of its top-2 biased scores for
        sigmoid, as DeepSeek-V3; its max for softmax)
      weights: the *unbiased* scores of the selected experts, normalised to sum 1
        when top_k > 1 (DeepSeek-V3's sigmoid, Mixtral's softmax renormalised over the
        chosen experts); at top-1 the raw score is kept (softmax probability, or the
        sigmoid as Llama 4), so the router still gets a gradient (one normalised weight
        is 1 whatever the logits); then × routed_scaling_factor.
    Buffers (float32 under any cast): `expert_bias` [E] (persistent; changes only
    selection) and `load` [E] (tokens per expert since the last bias update).
    """
    fp32_buffers = ("expert_bias", "load")

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m, r = cfg.moe, cfg.moe.router
        self.num_experts, self.top_k = m.num_experts, m.top_k
        self.score_fn, self.num_groups, self.topk_groups = r.score_fn, r.num_groups, r.topk_groups
        self.routed_scaling_factor, self.bias_update_rate = r.routed_scaling_factor, r.bias_update_rate
        self.normalize = m.top_k > 1
        self.weight = nn.Parameter(torch.empty(m.num_experts, cfg.hidden_size))
        self.register_buffer("expert_bias", torch.zeros(m.num_experts, dtype=torch.float32))
        self.register_buffer("load", torch.zeros(m.num_experts, dtype=torch.float32), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _normal_(self.weight)
        with torch.no_grad():
            self.expert_bias.zero_()
            self.load.zero_()

    def _limit_groups(self, biased: Tensor) -> Tensor:
        """biased [T, E] → the same with experts outside each token's topk_groups best groups at -inf."""
        T, G = biased.shape[0], self.num_groups
        grouped = biased.view(T, G, self.num_experts // G)
        if self.score_fn == "sigmoid":
            group_score = grouped.topk(min(2, grouped.shape[-1]), dim=-1).values.sum(-1)
        else:
            group_score = grouped.amax(-1)
        best = group_score.topk(self.topk_groups, dim=-1).indices                     # [T, topk_groups]
        keep = torch.zeros_like(group_score, dtype=torch.bool).scatter_(1, best, True)  # [T, G]
        return grouped.masked_fill(~keep.unsqueeze(-1), float("-inf")).view(T, self.num_experts)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        logits = router_logits(x, self.weight)                             # [T, E] float32
        scores = logits.sigmoid() if self.score_fn == "sigmoid" else logits.softmax(dim=-1)
        biased = scores.detach() + self.expert_bias                        # selection only
        if self.num_groups > 1:
            biased = self._limit_groups(biased)
        topk_idx = biased.topk(self.top_k, dim=-1).indices                 # [T, K]
        weight = scores.gather(-1, topk_idx)
        if self.normalize:
            weight = weight / weight.sum(-1, keepdim=True)
        return topk_idx, (weight * self.routed_scaling_factor).to(x.dtype)


class GroupedExperts(nn.Module):
    """E SwiGLU experts stored stacked: w13 [E, H, 2F] (x @ w13[e] = (gate, up)), w2 [E, F, H]."""

    def __init__(self, num_experts: int, dim: int, inter: int):
        super().__init__()
        self.num_experts = num_experts
        self.w13 = nn.Parameter(torch.empty(num_experts, dim, 2 * inter))
        self.w2 = nn.Parameter(torch.empty(num_experts, inter, dim))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _normal_(self.w13)
        _normal_(self.w2)

    def expert_forward(self, rows: Tensor, e: int) -> Tensor:
        """rows [N, H] → expert e's output [N, H]."""
        return swiglu(rows @ self.w13[e]) @ self.w2[e]

    def forward(self, x: Tensor, topk_idx: Tensor, topk_weight: Tensor) -> Tensor:
        """x [T, H], topk_idx / topk_weight [T, K] → Σ_k weight[t, k] · expert_{idx[t, k]}(x[t]), [T, H].

        Dropless: every expert takes all its tokens. Sums in float32, returns x.dtype.
        """
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for e in range(self.num_experts):
            token, slot = torch.where(topk_idx == e)   # a token picks an expert at most once
            y = self.expert_forward(x[token], e) * topk_weight[token, slot].unsqueeze(-1).to(x.dtype)
            out.index_add_(0, token, y.float())
        return out.to(x.dtype)


class MoE(nn.Module):
    """Router + routed experts + optional shared expert(s): [B, S, H] → [B, S, H]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        m = cfg.moe
        self.num_experts = m.num_experts
        self.router = Router(cfg)
        self.experts = GroupedExperts(m.num_experts, cfg.hidden_size, m.expert_intermediate_size)
        self.shared = (MLP(cfg.hidden_size, m.shared_experts * m.expert_intermediate_size)
                       if m.shared_experts else None)

    def forward(self, x: Tensor) -> Tensor:
        x_flat = x.reshape(-1, x.shape[-1])
        topk_idx, topk_weight = self.router(x_flat)
        with torch.no_grad():
            self.router.load.add_(expert_counts(topk_idx, self.num_experts).float())
        out = self.experts(x_flat, topk_idx, topk_weight)
        if self.shared is not None:
            out = out + self.shared(x_flat)
        return out.view_as(x)


# ----------------------------------------------------------------------------- the decoder

class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        attention = {"gqa": GQAAttention, "mla": MLAAttention}[cfg.attention.kind]
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = attention(cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.mlp = (MLP(cfg.hidden_size, cfg.dense_intermediate_size)
                    if layer_idx < cfg.first_dense_layers else MoE(cfg))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.attn_norm(x))
        return x + self.mlp(self.mlp_norm(x))


_SELF_INIT = (RMSNorm, MLP, RotaryEmbedding, GQAAttention, MLAAttention, Router, GroupedExperts)


class Transformer(nn.Module):
    """tokens [B, S] int64 → logits [B, S, V] in the model's dtype."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        _init_linear_children(self)

    def reset_parameters(self) -> None:
        """Re-initialise every weight and buffer, in module order, from the global RNG."""
        _init_linear_children(self)
        for m in self.modules():
            if isinstance(m, _SELF_INIT):
                m.reset_parameters()

    def init_weights(self, seed: int) -> None:
        """Deterministic init: torch.manual_seed(seed), then reset_parameters() (seeds the global RNG)."""
        torch.manual_seed(seed)
        self.reset_parameters()

    def forward(self, tokens: Tensor) -> Tensor:
        h = self.embed(tokens)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(self.norm(h))


# ----------------------------------------------------------------------------- training helpers

def lm_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """logits [B, S, V], labels [B, S] → mean cross entropy, float32 scalar."""
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1))


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every MoE block with its qualified name, in module order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, MoE)]


@torch.no_grad()
def update_expert_bias(model: nn.Module, load_by_layer: dict[str, Tensor] | None = None) -> None:
    """Aux-loss-free balancing, after an optimizer step: per router,
    expert_bias += bias_update_rate · sign(mean(load) − load), then load = 0.

    `load_by_layer` ({moe layer name: [E] loads}, e.g. all-reduced over ranks) replaces router.load.
    """
    for name, moe in moe_layers(model):
        r = moe.router
        load = r.load if load_by_layer is None else load_by_layer[name]
        load = load.to(device=r.expert_bias.device, dtype=torch.float32)
        r.expert_bias.add_(r.bias_update_rate * torch.sign(load.mean() - load))
        r.load.zero_()


def meta_transformer(cfg: ModelConfig, dtype: torch.dtype) -> Transformer:
    """The model on the meta device (no memory, no init values): what compile traces and counts."""
    with torch.device("meta"):
        return Transformer(cfg).to(dtype)
