"""The cost model: moving tokens vs moving experts, and what a clone must save to pay off.

Units: bytes, seconds, GB/s (the spec's `*_gbps` fields are gigaBYTES per second).

  row_bytes          = H · dtype_bytes                   one token row
  expert_bytes       = 3 · H · F · dtype_bytes           w13 [H, 2F] + w2 [F, H]
  row_compute_s      = 3 · (2 · 3 · H · F) / flops       fwd + bwd (≈ 3× fwd) of one row through one expert
  clone_s(link)      = 2 · expert_bytes / link           weights out, gradient back home
  token_move_s(link) = 4 · row_bytes / link              dispatch + combine, in fwd and in bwd

Token traffic per backend (`moe_ms_by_backend`): `torch` with backends.exchange 'nccl' moves
its full per-peer chunks (ep−1)·C rows per exchange whatever the routing; `torch` with 'p2p'
(`torch_p2p`), `symm_mem` and `deepep` move only the kept real rows, so at capacity 1.5 they
move about 1/1.5 of the padded bytes.

A clone with r rows saves r · row_compute_s on the overloaded rank (the rows go to the
clone's rank instead of the home rank: no extra token traffic), so it pays off when
r ≥ min_clone_rows = ceil(clone_s / row_compute_s). The planner drops smaller clones.
HybridEP's question — move the expert or the tokens? — is answered per link: cloning
an expert across a link pays for itself once it saves more than
clone_s / token_move_s rows of cross-link traffic; the compile output states both.

`flops` is the dense bf16 rate measured on the GPU machines here (≈ 790 TFLOP/s on
H100/H200, see docs/BENCHMARKS.md); CPU runs use a nominal 100 GFLOP/s.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from echoc.spec import Spec
from runtime.planner import plan, rank_rows

DEVICE_FLOPS = {"cuda": 790e12, "cpu": 100e9}


@dataclass
class CloneDecision:
    domain_ranks: int
    link_gbps: float
    min_clone_rows: int
    row_compute_us: float
    clone_ms: float
    token_move_us: float
    explain: str


def row_bytes(spec: Spec) -> int:
    return spec.model.hidden_size * spec.model.dtype_bytes


def expert_bytes(spec: Spec) -> int:
    return 3 * spec.model.hidden_size * spec.model.moe.expert_intermediate_size * spec.model.dtype_bytes


def row_compute_s(spec: Spec) -> float:
    m = spec.model
    return 3 * 2 * 3 * m.hidden_size * m.moe.expert_intermediate_size / DEVICE_FLOPS[spec.cluster.device]


def clone_domain_ranks(spec: Spec) -> int:
    """EP ranks per clone domain (Spec.clone_domain_ranks: the one definition)."""
    return spec.clone_domain_ranks


def link_gbps(spec: Spec, domain_ranks: int) -> float:
    c = spec.cluster
    if domain_ranks <= c.gpus_per_node:
        return c.intra_node_gbps
    if c.domains is not None and c.inter_domain_gbps is not None and len(c.domains) > 1:
        return c.inter_domain_gbps
    return c.inter_node_gbps


def clone_decision(spec: Spec) -> CloneDecision:
    dom = clone_domain_ranks(spec)
    gbps = link_gbps(spec, dom)
    clone_s = 2 * expert_bytes(spec) / (gbps * 1e9)
    row_s = row_compute_s(spec)
    move_s = 4 * row_bytes(spec) / (gbps * 1e9)
    min_rows = max(1, math.ceil(clone_s / row_s))
    explain = (f"clone domain {dom} ranks over {gbps:g} GB/s: a clone moves {2 * expert_bytes(spec) / 2**20:.1f} MiB "
               f"(weights + gradient) in {clone_s * 1e3:.3f} ms; one row costs {row_s * 1e6:.3f} µs of expert "
               f"compute, so a clone must take ≥ {min_rows} rows to pay off. Moving a token row over this link "
               f"costs {move_s * 1e6:.3f} µs (fwd+bwd), so cloning beats moving tokens for an expert that "
               f"would otherwise send ≥ {math.ceil(clone_s / move_s)} rows across it.")
    return CloneDecision(dom, gbps, min_rows, row_s * 1e6, clone_s * 1e3, move_s * 1e6, explain)


def zipf_counts(ep: int, experts: int, tokens: int, top_k: int, skew: float, seed: int = 0) -> torch.Tensor:
    """Expected per-(rank, expert) copies under a zipf(skew) expert popularity, [ep, E] int64."""
    g = torch.Generator().manual_seed(seed)
    w = torch.arange(1, experts + 1, dtype=torch.float64) ** -skew
    w = (w / w.sum())[torch.randperm(experts, generator=g)]
    return torch.round(w * tokens * top_k).to(torch.int64).expand(ep, experts).contiguous()


def predicted_moe_ms(spec: Spec, counts: torch.Tensor, spares: int, decision: CloneDecision) -> float:
    """Straggler rank's expert compute + its clone traffic (not overlapped), per layer, ms."""
    El = spec.experts_per_rank
    if spares == 0:
        rows = counts.sum(0).view(spec.parallel.ep, El).sum(1)
        clones = torch.zeros(spec.parallel.ep)
    else:
        p = plan(counts, El, spares, decision.domain_ranks, min(spares, El), decision.min_clone_rows)
        rows = rank_rows(counts, p, El, spares)
        clones = (p.spare_expert >= 0).sum(1).double()
    t = rows.double() * decision.row_compute_us * 1e-3 + clones * decision.clone_ms
    return float(t.max())


REAL_ROW_BACKENDS = ("symm_mem", "deepep")
MOVEMENTS = ("torch", "torch_p2p") + REAL_ROW_BACKENDS    # torch_p2p: the torch backend, exchange 'p2p'


def rows_moved(spec: Spec, counts: torch.Tensor, backend: str) -> torch.Tensor:
    """Rows each rank sends across links per exchange, [ep]: the `torch` backend (exchange 'nccl')
    always sends its full [C] chunk to each of the ep−1 peers; `torch_p2p`, `symm_mem` and `deepep`
    send the kept real rows
    (copies; HybridEP's one-row-per-token-per-rank dedup is not modelled, so deepep is an upper bound)."""
    ep, C = spec.parallel.ep, spec.peer_chunk_rows
    if backend == "torch":
        return torch.full((ep,), float((ep - 1) * C), dtype=torch.float64)
    per_pair = torch.clamp(counts.view(ep, ep, -1).sum(2), max=C).double()   # [src, dst]
    return per_pair.sum(1) - per_pair.diagonal()


def moe_ms_by_backend(spec: Spec, skew: float = 1.2) -> dict[str, float]:
    """Predicted MoE ms per layer (fwd + bwd) under zipf(skew) routing, no cloning: the straggler
    rank's expert compute plus its token traffic (4 exchanges: dispatch and combine, fwd and bwd)."""
    ep = spec.parallel.ep
    if ep == 1:
        return {b: 0.0 for b in MOVEMENTS}
    counts = zipf_counts(ep, spec.model.moe.num_experts, spec.budgets.tokens, spec.model.moe.top_k, skew)
    gbps = link_gbps(spec, ep)
    compute_ms = counts.sum(0).view(ep, -1).sum(1).double() * row_compute_s(spec) * 1e3
    out = {}
    for b in MOVEMENTS:
        move_ms = 4 * rows_moved(spec, counts, b) * row_bytes(spec) / (gbps * 1e9) * 1e3
        out[b] = round(float((compute_ms + move_ms).max()), 4)
    return out


def recommend_spare_slots(spec: Spec, skew: float = 1.2, max_slots: int = 4) -> dict[int, float]:
    """Predicted MoE ms per layer for 0..max_slots spare slots under zipf(skew) routing."""
    if spec.parallel.ep == 1:
        return {0: 0.0}
    d = clone_decision(spec)
    counts = zipf_counts(spec.parallel.ep, spec.model.moe.num_experts, spec.budgets.tokens,
                         spec.model.moe.top_k, skew)
    return {s: round(predicted_moe_ms(spec, counts, s, d), 4) for s in range(max_slots + 1)}
