"""What a simulation returns: per-strategy metrics over steps × layers, and a per-step series."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional


@dataclass
class Stat:
    """Mean and max of one metric over steps × layers."""
    mean: float
    max: float


@dataclass
class StrategyMetrics:
    """One strategy's metrics over steps × layers; None where the strategy does not define it."""
    token_straggler: Stat
    gemm_straggler: Optional[Stat] = None
    overflow_rate: Optional[Stat] = None
    token_bytes: Optional[Stat] = None   # per layer per step
    weight_bytes: Optional[Stat] = None  # per layer per step
    moe_ms: Optional[Stat] = None        # per layer per step


@dataclass
class SimResult:
    """The simulation of one spec on one trace: metrics per strategy, in the order simulated."""
    spec_name: str
    source: str
    steps: int
    layers: int
    ep: int
    experts: int
    spares: int
    metrics: dict[str, StrategyMetrics]
    series: dict[str, list[float]]  # token straggler per step (mean over layers)
    notes: list[str] = field(default_factory=list)
