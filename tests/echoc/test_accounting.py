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


def test_deepseek_v3_spec_matches_the_published_figures():
    """specs/deepseek-v3.yaml: 671B parameters (without the MTP module), 37B active per token."""
    from echoc.spec_io import load_spec
    from support import ROOT
    spec = load_spec(ROOT / "specs" / "deepseek-v3.yaml")
    counts = accounting.count_parameters(meta_model(spec.model.model_dump()))
    total = sum(counts.values())
    assert abs(total - 671e9) / 671e9 < 0.005, total
    active = accounting.active_parameters_per_token(spec)
    assert abs(active - 37e9) / 37e9 < 0.02, active
    H, F, moe_layers = 7168, 2048, 58
    assert counts["routed_experts"] == moe_layers * 256 * 3 * H * F
    assert counts["dense_mlp"] == 3 * 3 * H * 18432
    assert spec.model.moe.router.num_groups == 8 and spec.model.moe.router.topk_groups == 4


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


def test_param_groups_shard_routed_experts_over_ep(glm5):
    counts = accounting.count_parameters(glm5)
    g = accounting.param_groups(spec_for(GLM5, ep=64, dp=4), glm5)
    assert g.expert == counts["routed_experts"] // 64
    assert g.dense == sum(counts.values()) - counts["routed_experts"]
    assert len(g.layers) == 78 and sum(g.layers) + g.outside_layers == g.dense + g.expert
    assert g.outside_layers == counts["embedding"] + counts["lm_head"] + 6144      # + the final norm
    H, F = 6144, 2048
    assert g.layers[3] == g.layers[77] and g.layers[0] == g.layers[2]             # alike within a kind
    assert g.layers[3] == g.layers[0] - 3 * H * 12288 + 4 * 3 * H * F + 3 * H * F + 256 * H
    more_ep = accounting.param_groups(spec_for(GLM5, ep=128, dp=2), glm5)
    assert more_ep.expert * 2 == g.expert and more_ep.dense == g.dense
