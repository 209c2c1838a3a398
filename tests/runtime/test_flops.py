"""Model FLOPs per token (runtime/flops.py) against the model's own weights, and the MFU arithmetic."""
import pytest
import torch
from torch import nn

from echoc.spec_io import load_spec
from runtime import flops
from runtime.model import GroupedExperts, Router, meta_transformer
from support import ROOT


def weight_macs_per_token(model: nn.Module, top_k: int) -> float:
    """Multiply-adds per token of every matrix a token meets, read off the meta model's weights:
    linears and the router whole, the grouped experts at top_k of E; not the embedding."""
    macs = 0.0
    for m in model.modules():
        if isinstance(m, nn.Linear):
            macs += m.weight.numel()
        elif isinstance(m, Router):
            macs += m.weight.numel()
        elif isinstance(m, GroupedExperts):
            macs += (m.w13.numel() + m.w2.numel()) * top_k / m.num_experts
    return macs


@pytest.mark.parametrize("spec_file", ["tiny.yaml", "glm5-mini.yaml", "glm5.yaml"])
def test_flops_per_token_counts_every_weight_a_token_meets(spec_file):
    spec = load_spec(ROOT / "specs" / spec_file)
    cfg = spec.model
    f = flops.model_flops_per_token(cfg, spec.budgets.seq_len)
    weights = f.total - f.attention_core
    assert weights == pytest.approx(6 * weight_macs_per_token(meta_transformer(cfg, torch.bfloat16), cfg.moe.top_k))
    assert f.attention_core > 0 and f.routed_experts > f.shared_experts * min(1, cfg.moe.top_k)


def test_attention_core_is_causal_half_of_the_square():
    spec = load_spec(ROOT / "specs" / "tiny.yaml")
    a, cfg = spec.model.attention, spec.model
    f = flops.model_flops_per_token(cfg, 128)
    per_layer = 6 * a.num_heads * 2 * a.head_dim * 128 / 2     # QKᵀ and PV over 64 keys on average
    assert f.attention_core == pytest.approx(cfg.num_layers * per_layer)


def test_mfu_is_achieved_over_measured_peak():
    t = flops.Throughput(flops_per_token=1e9, peak_tflops=800.0)
    m = t.metrics(400_000.0)                                   # 4e5 tok/s × 1e9 = 400 TFLOP/s
    assert m["tflops_per_gpu"] == pytest.approx(400.0) and m["mfu"] == pytest.approx(0.5)
    assert flops.Throughput(1e9, None).metrics(1.0)["mfu"] is None
    assert flops.measure_bf16_peak_tflops(torch.device("cpu")) is None
