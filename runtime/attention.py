"""Causal attention of the reference model: grouped-query (GQA) and multi-head latent (MLA)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from echoc.spec import ModelConfig
from runtime.layers import RMSNorm, RotaryEmbedding, _init_linear_children


class GQAAttention(nn.Module):
    """Causal grouped-query attention: num_kv_heads key/value heads shared by num_heads queries."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a, H = cfg.attention, cfg.hidden_size
        self.num_heads, self.num_kv_heads, self.head_dim = a.num_heads, a.num_kv_heads, a.head_dim
        self.wq = nn.Linear(H, a.num_heads * a.head_dim, bias=False)
        self.wk = nn.Linear(H, a.num_kv_heads * a.head_dim, bias=False)
        self.wv = nn.Linear(H, a.num_kv_heads * a.head_dim, bias=False)
        self.wo = nn.Linear(a.num_heads * a.head_dim, H, bias=False)
        self.rope = RotaryEmbedding(a.head_dim, a.rope_theta)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_linear_children(self)

    def forward(self, x: Tensor) -> Tensor:
        B, S = x.shape[0], x.shape[1]          # indexed, not unpacked: unpacking an fx proxy is slow
        q = self.rope(self.wq(x).view(B, S, self.num_heads, self.head_dim))
        k = self.rope(self.wk(x).view(B, S, self.num_kv_heads, self.head_dim))
        v = self.wv(x).view(B, S, self.num_kv_heads, self.head_dim)
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True)
        return self.wo(o.transpose(1, 2).reshape(B, S, self.num_heads * self.head_dim))


class MLAAttention(nn.Module):
    """Causal multi-head latent attention (DeepSeek-V3 / GLM-5), without the DSA indexer.

    q = wq(x), or wq_b(q_norm(wq_a(x))) with a query low-rank (q_lora_rank > 0): [B, S, h, nope + rope].
    wkv_a(x) = (latent [kv_lora_rank], k_pe [rope]); wkv_b(kv_norm(latent)) = per head (k_nope, v).
    RoPE is applied to the rope parts only; k_pe is one head shared by all query heads.
    Softmax scale 1/sqrt(nope + rope) (no YaRN mscale: positions stay within the trained context).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        a, H = cfg.attention, cfg.hidden_size
        self.num_heads = a.num_heads
        self.nope, self.rope_dim, self.v_dim = a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim
        self.q_lora_rank, self.kv_lora_rank = a.q_lora_rank, a.kv_lora_rank
        qk_dim = self.nope + self.rope_dim
        if a.q_lora_rank == 0:
            self.wq = nn.Linear(H, a.num_heads * qk_dim, bias=False)
        else:
            self.wq_a = nn.Linear(H, a.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(a.q_lora_rank, cfg.norm_eps)
            self.wq_b = nn.Linear(a.q_lora_rank, a.num_heads * qk_dim, bias=False)
        self.wkv_a = nn.Linear(H, a.kv_lora_rank + self.rope_dim, bias=False)
        self.kv_norm = RMSNorm(a.kv_lora_rank, cfg.norm_eps)
        self.wkv_b = nn.Linear(a.kv_lora_rank, a.num_heads * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(a.num_heads * self.v_dim, H, bias=False)
        self.rope = RotaryEmbedding(self.rope_dim, a.rope_theta)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _init_linear_children(self)

    def forward(self, x: Tensor) -> Tensor:
        B, S = x.shape[0], x.shape[1]          # parts are indexed, not unpacked: unpacking an fx
        h = self.num_heads                     # proxy disassembles the caller (slow to trace)
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q_parts = q.view(B, S, h, self.nope + self.rope_dim).split([self.nope, self.rope_dim], dim=-1)
        q = torch.cat([q_parts[0], self.rope(q_parts[1])], dim=-1)

        kv_a = self.wkv_a(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        latent, k_pe = kv_a[0], kv_a[1]
        k_pe = self.rope(k_pe.view(B, S, 1, self.rope_dim)).expand(B, S, h, self.rope_dim)
        kv = self.wkv_b(self.kv_norm(latent)).view(B, S, h, self.nope + self.v_dim).split(
            [self.nope, self.v_dim], dim=-1)
        k, v = torch.cat([kv[0], k_pe], dim=-1), kv[1]

        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True)
        return self.wo(o.transpose(1, 2).reshape(B, S, h * self.v_dim))
