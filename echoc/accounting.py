"""Parameter counts, from a meta-device model (nothing is allocated): by category, active per
token, and this rank's share by data-parallel group and layer (what echoc/memory_model.py reads).

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

from echoc.memory_state import ParamGroups
from echoc.spec import Spec
from runtime.model import MLP, GQAAttention, GroupedExperts, MLAAttention, MoE, RMSNorm, Router, meta_transformer

CATEGORIES = ("embedding", "attention", "dense_mlp", "shared_experts", "routed_experts", "router", "norms",
              "lm_head")


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


def param_groups(spec: Spec, model: nn.Module) -> ParamGroups:
    """This rank's parameters (routed experts after EP) by data-parallel group, per layer, and
    outside the layers, from the unsharded (meta) model."""
    ep = spec.parallel.ep

    def local(module: nn.Module) -> tuple[int, int]:
        dense = expert = 0
        for sub in module.modules():
            n = sum(p.numel() for p in sub.parameters(recurse=False))
            if isinstance(sub, GroupedExperts):
                expert += n // ep
            else:
                dense += n
        return dense, expert

    per_layer = [local(layer) for layer in model.layers]
    dense, expert = local(model)
    largest = max((p.numel() // (ep if isinstance(m, GroupedExperts) else 1)
                   for m in model.modules() for p in m.parameters(recurse=False)), default=0)
    layers = tuple(d + e for d, e in per_layer)
    return ParamGroups(dense, expert, layers, dense + expert - sum(layers), largest, tuple(e for _, e in per_layer))
