"""Parameter counts and per-rank memory, from a meta-device model (nothing is allocated).

Categories: embedding, attention, dense_mlp, shared_experts, routed_experts,
router, norms (every RMSNorm, including MLA's q/kv norms), lm_head.

Against GLM-5's published 744B total / ~40B active: this model counts ~743B and
~41B. Not built here: GLM-5's MTP layer and the DSA indexer (≈ 0.7B over 78
layers); the active count includes the embedding and lm_head (DeepSeek-V3's
convention for its "37B activated").
"""
from __future__ import annotations

import torch
from torch import nn

from echoc.spec import ModelConfig, Spec
from runtime.model import MLP, GQAAttention, GroupedExperts, MLAAttention, MoE, RMSNorm, Router, meta_transformer

CATEGORIES = ("embedding", "attention", "dense_mlp", "shared_experts", "routed_experts", "router", "norms",
              "lm_head")
FP32_BYTES = 4


def _category_of(module: nn.Module, inherited: str | None, model: nn.Module) -> str | None:
    """The category of `module`'s own parameters, given its parent's (checked innermost-first)."""
    if isinstance(module, RMSNorm):
        return "norms"
    if isinstance(module, Router):
        return "router"
    if isinstance(module, GroupedExperts):
        return "routed_experts"
    if isinstance(module, (GQAAttention, MLAAttention)):
        return "attention"
    if isinstance(module, MoE):
        return "shared_experts"   # what is left in an MoE once router and experts are claimed
    if isinstance(module, MLP) and inherited is None:
        return "dense_mlp"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if module is getattr(model, "lm_head", None):
        return "lm_head"
    return inherited


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameters by category (every category present, possibly 0); the values sum to the total."""
    counts = dict.fromkeys(CATEGORIES, 0)
    seen: set[int] = set()

    def visit(module: nn.Module, inherited: str | None) -> None:
        category = _category_of(module, inherited, model)
        for p in module.parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            assert category is not None, f"uncategorised parameter {tuple(p.shape)} in {type(module).__name__}"
            counts[category] += p.numel()
        for child in module.children():
            visit(child, category)

    visit(model, None)
    return counts


def active_parameters_per_token(spec: Spec, counts: dict[str, int] | None = None) -> int:
    """Parameters one token's forward touches: everything but the routed experts, plus top_k of them
    per MoE layer (embedding and lm_head counted in full, as DeepSeek-V3 counts them).
    `counts`: count_parameters of the unsharded model, when the caller already has it."""
    counts = counts or count_parameters(meta_transformer(spec.model, torch.float32))
    moe = spec.model.moe
    routed = counts["routed_experts"]
    return sum(counts.values()) - routed + routed // moe.num_experts * moe.top_k


def _attention_width(cfg: ModelConfig) -> int:
    """Elements per token that attention saves for backward (its input norm not included)."""
    a = cfg.attention
    if a.kind == "gqa":
        q, kv = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        return 2 * q + 2 * kv                                      # q, k, v, attention output
    h, qk = a.num_heads, a.qk_nope_head_dim + a.qk_rope_head_dim
    low_rank = 2 * a.q_lora_rank + 2 * a.kv_lora_rank + a.qk_rope_head_dim  # wq_a, q_norm, wkv_a, kv_norm outs
    return low_rank + 2 * h * qk + h * (a.qk_nope_head_dim + a.v_head_dim) + h * a.v_head_dim
    #                 q and k      wkv_b output (k_nope, v)                  attention output


def activation_bytes(spec: Spec) -> int:
    """Activations kept for backward by one micro-batch on one rank (no recomputation, no PP).

    With T = budgets.tokens (tokens per rank), H = hidden, b = dtype bytes, R = spec.receive_rows
    (the static receive buffer of one MoE layer: capacity × T × top_k, rounded):

      every layer      T·(4H + A)          residual in and normed input of both sub-blocks (4H),
                                           attention's saved tensors (A, `_attention_width`)
      dense layer      + T·3F_dense        SwiGLU: w13 output (2F) and swiglu output (F)
      MoE layer        + T·(E + 3F_shared + K·H)    router scores, shared expert, combined copies
                       + R·(2H + 3F_expert)         dispatched rows, expert hidden, expert output
      head             T·V·b + T·V·4       logits and their float32 copy in the loss

    i.e. T·H·b × a per-layer factor (4 + A/H + 3F/H for a dense layer; for an MoE layer the
    routed part counts capacity-sized static buffers, not just the T·K real rows).
    """
    m, b = spec.model, spec.model.dtype_bytes
    T, H, R, moe = spec.budgets.tokens, m.hidden_size, spec.receive_rows, m.moe
    common = T * (4 * H + _attention_width(m))
    dense = common + T * 3 * m.dense_intermediate_size
    shared = 3 * moe.shared_experts * moe.expert_intermediate_size
    moe_layer = (common + T * (moe.num_experts + shared + moe.top_k * H)
                 + R * (2 * H + 3 * moe.expert_intermediate_size))
    elements = m.first_dense_layers * dense + m.num_moe_layers * moe_layer
    return elements * b + T * m.vocab_size * (b + FP32_BYTES)


def _optimizer_bytes_per_param(dtype: str) -> int:
    """AdamW's two moments in float32, plus a float32 master copy when the params are bf16."""
    return 2 * FP32_BYTES + (FP32_BYTES if dtype != "float32" else 0)


def memory_per_rank(spec: Spec, model: nn.Module) -> dict:
    """Bytes per rank under spec.parallel, from a (meta) model built from spec.model.

    Routed experts are sharded over ep (E/ep per rank; replicated over dp); everything
    else is replicated. Params and grads in the model dtype; AdamW state 2 × fp32, plus
    a fp32 master copy when the dtype is bf16. Spare slots (echo enabled):
    spare_slots_per_rank × one expert's weights, once with recompute_clone_dispatch
    (one buffer for all layers) else per MoE layer; their transient gradients are not
    counted. Activations: see `activation_bytes`.

    Returns {"weights", "grads", "optimizer", "spare_slots", "activations", "total": bytes,
             "by_category": {category: weights + grads + optimizer bytes}}.
    """
    m, ep = spec.model, spec.parallel.ep
    b = m.dtype_bytes
    params = count_parameters(model)
    local = {cat: (n // ep if cat == "routed_experts" else n) for cat, n in params.items()}
    per_param = 2 * b + _optimizer_bytes_per_param(m.dtype)
    n_local = sum(local.values())
    expert_bytes = 3 * m.hidden_size * m.moe.expert_intermediate_size * b
    slots = spec.echo.spare_slots_per_rank if spec.echo.enabled else 0
    copies = 1 if spec.echo.recompute_clone_dispatch else m.num_moe_layers
    out = {
        "weights": n_local * b,
        "grads": n_local * b,
        "optimizer": n_local * _optimizer_bytes_per_param(m.dtype),
        "spare_slots": slots * expert_bytes * copies,
        "activations": activation_bytes(spec),
    }
    out["total"] = sum(out.values())
    out["by_category"] = {cat: n * per_param for cat, n in local.items()}
    return out
