"""Parameter counts and per-rank memory (echoc/accounting.py), on meta-device models."""
import pytest
import torch

from echoc import accounting
from echoc.spec import ModelConfig, Spec
from runtime.model import Transformer

GLM5 = {
    "name": "glm5", "vocab_size": 154880, "hidden_size": 6144, "num_layers": 78, "first_dense_layers": 3,
    "dense_intermediate_size": 12288, "dtype": "bfloat16",
    "attention": {"kind": "mla", "num_heads": 64, "q_lora_rank": 2048, "kv_lora_rank": 512,
                  "qk_nope_head_dim": 192, "qk_rope_head_dim": 64, "v_head_dim": 256},
    "moe": {"num_experts": 256, "top_k": 8, "expert_intermediate_size": 2048, "shared_experts": 1,
            "router": {"score_fn": "sigmoid", "routed_scaling_factor": 2.5}},
}

TINY = {
    "name": "tiny", "vocab_size": 64, "hidden_size": 32, "num_layers": 3, "first_dense_layers": 1,
    "dense_intermediate_size": 48, "dtype": "float32",
    "attention": {"kind": "gqa", "num_heads": 4, "num_kv_heads": 2, "head_dim": 8},
    "moe": {"num_experts": 8, "top_k": 2, "expert_intermediate_size": 16, "shared_experts": 1},
}


def spec_for(model: dict, ep=64, dp=4, gpus=8, echo=None, seq_len=4096, device="cuda") -> Spec:
    nodes = ep * dp // gpus
    return Spec.model_validate({
        "model": model,
        "cluster": {"device": device, "nodes": nodes, "gpus_per_node": gpus},
        "parallel": {"ep": ep, "dp": dp},
        "budgets": {"seq_len": seq_len, "micro_batch": 1, "received_token_capacity": 1.25},
        "echo": echo or {"enabled": False},
    })


def meta_model(cfg: dict, dtype=torch.bfloat16) -> Transformer:
    with torch.device("meta"):
        return Transformer(ModelConfig.model_validate(cfg)).to(dtype)


@pytest.fixture(scope="module")
def glm5():
    return meta_model(GLM5)


def test_glm5_total_and_active_match_the_published_figures(glm5):
    assert all(p.is_meta for p in glm5.parameters())            # nothing was allocated
    counts = accounting.count_parameters(glm5)
    total = sum(counts.values())
    # GLM-5: 744B total, ~40B active. We build neither the MTP layer nor the DSA indexer.
    assert abs(total - 744e9) / 744e9 < 0.02, total
    active = accounting.active_parameters_per_token(spec_for(GLM5))
    assert abs(active - 40e9) / 40e9 < 0.05, active
    H, F, E, moe_layers = 6144, 2048, 256, 75
    assert counts["routed_experts"] == moe_layers * E * 3 * H * F
    assert counts["shared_experts"] == moe_layers * 3 * H * F
    assert counts["router"] == moe_layers * E * H
    assert counts["dense_mlp"] == 3 * 3 * H * 12288
    assert counts["embedding"] == counts["lm_head"] == 154880 * H
    mla = H * 2048 + 2048 * 64 * 256 + H * (512 + 64) + 512 * 64 * (192 + 256) + 64 * 256 * H
    assert counts["attention"] == 78 * mla
    assert counts["norms"] == 78 * (2 * H + 2048 + 512) + H
    assert active == total - counts["routed_experts"] + moe_layers * 8 * 3 * H * F


def test_counts_cover_every_parameter_once():
    model = meta_model(TINY, torch.float32)
    counts = accounting.count_parameters(model)
    assert set(counts) == set(accounting.CATEGORIES)
    assert sum(counts.values()) == sum(p.numel() for p in model.parameters())
    attn = 32 * 32 + 2 * 32 * 16 + 32 * 32
    assert counts == {"embedding": 64 * 32, "attention": 3 * attn, "dense_mlp": 3 * 32 * 48,
                      "shared_experts": 2 * 3 * 32 * 16, "routed_experts": 2 * 8 * 3 * 32 * 16,
                      "router": 2 * 8 * 32, "norms": 7 * 32, "lm_head": 64 * 32}


def test_memory_per_rank_shards_routed_experts_over_ep(glm5):
    spec = spec_for(GLM5, ep=64, dp=4)
    mem = accounting.memory_per_rank(spec, glm5)
    counts = accounting.count_parameters(glm5)
    local = sum(counts.values()) - counts["routed_experts"] + counts["routed_experts"] // 64
    assert mem["weights"] == mem["grads"] == 2 * local                    # bf16
    assert mem["optimizer"] == 12 * local                                  # 2 × fp32 moments + fp32 master
    assert mem["by_category"]["routed_experts"] == counts["routed_experts"] // 64 * 16
    assert mem["by_category"]["attention"] == counts["attention"] * 16      # replicated
    assert mem["spare_slots"] == 0
    assert mem["total"] == sum(v for k, v in mem.items() if k not in ("total", "by_category"))
    assert sum(mem["by_category"].values()) == mem["weights"] + mem["grads"] + mem["optimizer"]
    more_ep = accounting.memory_per_rank(spec_for(GLM5, ep=128, dp=2), glm5)
    assert more_ep["weights"] < mem["weights"]


def test_spare_slots_once_with_recompute_else_per_layer(glm5):
    one_expert = 3 * 6144 * 2048 * 2
    echo = {"enabled": True, "spare_slots_per_rank": 2}
    shared = accounting.memory_per_rank(spec_for(GLM5, echo={**echo, "recompute_clone_dispatch": True}), glm5)
    per_layer = accounting.memory_per_rank(spec_for(GLM5, echo=echo), glm5)
    assert shared["spare_slots"] == 2 * one_expert
    assert per_layer["spare_slots"] == 75 * 2 * one_expert


def test_fp32_has_no_master_copy():
    model = meta_model(TINY, torch.float32)
    spec = spec_for(TINY, ep=2, dp=1, gpus=2, seq_len=64, device="cpu")
    mem = accounting.memory_per_rank(spec, model)
    assert mem["optimizer"] == 2 * mem["weights"]                          # 8 bytes vs 4 per param


def test_activation_estimate_scales_with_tokens_and_capacity():
    small = accounting.activation_bytes(spec_for(GLM5, seq_len=2048))
    big = accounting.activation_bytes(spec_for(GLM5, seq_len=4096))
    assert 1.9 < big / small < 2.1
    # at 4096 tokens GLM-5 keeps ~1-4 GiB per layer without recomputation (order of magnitude check)
    per_layer = big / 78 / 2**30
    assert 1 < per_layer < 4, per_layer
