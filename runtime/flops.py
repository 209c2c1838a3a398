"""Model FLOPs per token and the device's measured bf16 peak: the TFLOP/s per GPU and MFU that
`echoc run` and the benches report, the figures users compare with Megatron-Core.

Model FLOPs count the useful matrix products of one training step, as Megatron-Core and PaLM
do: 2 FLOPs per multiply-add, forward + backward = 3 × forward, for every weight a token
meets (attention projections, dense MLPs, the router, the top-k routed experts and the shared
experts, the LM head; not the embedding lookup) plus causal attention's two products over the
keys before each query (S/2 on average). Padding rows, dropped copies, recomputation and ECHO's
clone traffic are not model FLOPs: they cost time, and MFU shows it.

MFU = achieved model TFLOP/s per GPU ÷ the device's bf16 peak, *measured* here with one large
bf16 matmul (`measure_bf16_peak_tflops`), not the datasheet figure.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from echoc.spec import GQAConfig, ModelConfig

TRAIN_PASSES = 3          # forward + backward (input and weight gradients)
FLOPS_PER_MAC = 2


def _attention_macs(cfg: ModelConfig) -> tuple[int, int]:
    """(projection weights, per-key score + value MACs per head summed over heads) of one layer."""
    a, H = cfg.attention, cfg.hidden_size
    if isinstance(a, GQAConfig):
        proj = H * a.num_heads * a.head_dim * 2 + H * a.num_kv_heads * a.head_dim * 2
        return proj, a.num_heads * 2 * a.head_dim
    qk = a.qk_nope_head_dim + a.qk_rope_head_dim
    q = H * a.num_heads * qk if a.q_lora_rank == 0 else H * a.q_lora_rank + a.q_lora_rank * a.num_heads * qk
    kv = H * (a.kv_lora_rank + a.qk_rope_head_dim) + a.kv_lora_rank * a.num_heads * (a.qk_nope_head_dim + a.v_head_dim)
    return q + kv + a.num_heads * a.v_head_dim * H, a.num_heads * (qk + a.v_head_dim)


@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs (forward + backward) per token, by part of the model."""
    attention: float       # projections
    attention_core: float  # causal QKᵀ and PV
    dense_mlp: float
    router: float
    routed_experts: float  # top_k experts
    shared_experts: float
    lm_head: float

    @property
    def total(self) -> float:
        return (self.attention + self.attention_core + self.dense_mlp + self.router + self.routed_experts
                + self.shared_experts + self.lm_head)


def model_flops_per_token(cfg: ModelConfig, seq_len: int) -> FlopsPerToken:
    """The training FLOPs one token costs in `cfg` at sequence length `seq_len`."""
    per_mac = TRAIN_PASSES * FLOPS_PER_MAC
    H, L, m = cfg.hidden_size, cfg.num_layers, cfg.moe
    proj, core_per_key = _attention_macs(cfg)
    swiglu = 3 * H                                    # w13 (H·2F) + w2 (F·H) per unit of F
    moe_layers = cfg.num_moe_layers
    return FlopsPerToken(
        attention=per_mac * L * proj,
        attention_core=per_mac * L * core_per_key * seq_len / 2,
        dense_mlp=per_mac * cfg.first_dense_layers * swiglu * cfg.dense_intermediate_size,
        router=per_mac * moe_layers * H * m.num_experts,
        routed_experts=per_mac * moe_layers * m.top_k * swiglu * m.expert_intermediate_size,
        shared_experts=per_mac * moe_layers * m.shared_experts * swiglu * m.expert_intermediate_size,
        lm_head=per_mac * H * cfg.vocab_size)


def measure_bf16_peak_tflops(device: torch.device, n: int = 8192, iters: int = 10) -> float | None:
    """The bf16 matmul rate this GPU reaches on an n×n×n product of random data (TFLOP/s, mean of
    `iters` after warm-up); None on a device that is not a GPU."""
    if device.type != "cuda":
        return None
    with torch.cuda.device(device):
        g = torch.Generator(device=device).manual_seed(0)
        a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16, generator=g) for _ in range(2))
        for _ in range(3):
            a @ b
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            a @ b
        end.record()
        end.synchronize()
    return 2 * n ** 3 * iters / (start.elapsed_time(end) / 1e3) / 1e12


@dataclass(frozen=True)
class Throughput:
    """Turns tokens/s per GPU into model TFLOP/s per GPU and MFU."""
    flops_per_token: float
    peak_tflops: float | None     # measured bf16 peak of this GPU (None: no GPU, no MFU)

    def metrics(self, tokens_per_s_per_gpu: float) -> dict:
        tflops = tokens_per_s_per_gpu * self.flops_per_token / 1e12
        return {"tflops_per_gpu": tflops, "mfu": tflops / self.peak_tflops if self.peak_tflops else None}


def throughput(cfg: ModelConfig, seq_len: int, device: torch.device) -> Throughput:
    """The model's FLOPs per token and, on a GPU, its measured bf16 peak (a fraction of a second, once)."""
    return Throughput(model_flops_per_token(cfg, seq_len).total, measure_bf16_peak_tflops(device))
