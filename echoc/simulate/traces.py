"""Trace sources for the simulator: a recorded file, a zipf skew, or drifting hot experts.

Every source gives counts [steps, layers, ep, E] int64: copies each source EP rank routes to
each expert. The file format is runtime.routing_trace's (what `--record-routing` writes).
Synthetic traces: `zipf:S` — each step every rank draws tokens × top_k copies from a zipf(S)
popularity over a random permutation of the experts (one per layer); `zipf:S,rate:R` — the
same, with a fraction R of each permutation re-shuffled every step (hot experts move).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from echoc.spec import Spec
from runtime.routing_trace import TraceError, load_trace

DEFAULT_STEPS = 20
DEFAULT_SKEW = "zipf:1.2"
MAX_SYNTHETIC_COUNTS = 2**28  # steps · layers · ep · E of a synthetic trace: 2 GiB of int64
_FORMS = {"skew": "'zipf:S' with S a finite number >= 0 (e.g. zipf:1.2)",
          "drift": "'zipf:S,rate:R' with S a finite number >= 0 and R in [0, 1] (e.g. zipf:1.2,rate:0.1)"}


@dataclass(frozen=True)
class Trace:
    """Counts [steps, layers, ep, E] int64 and where they came from (for the report)."""
    counts: Tensor
    source: str


def parse_synthetic(text: str, option: str) -> tuple[float, float]:
    """The value of --skew ('zipf:1.2' → (1.2, 0.0)) or --drift ('zipf:1.2,rate:0.1' → (1.2, 0.1))."""
    assert option in _FORMS, option
    bad = TraceError(f"--{option} {text!r}: expected {_FORMS[option]}")
    items = [p.split(":", 1) for p in text.replace(" ", "").split(",")]
    keys = ["zipf", "rate"] if option == "drift" else ["zipf"]
    if any(len(k) != 2 for k in items) or [k[0] for k in items] != keys:
        raise bad
    try:
        values = [float(v) for _, v in items]
    except ValueError:
        raise bad from None
    skew, rate = values[0], (values[1] if option == "drift" else 0.0)
    if not (math.isfinite(skew) and skew >= 0 and math.isfinite(rate) and 0 <= rate <= 1):
        raise bad
    return skew, rate


def sample_counts(probs: Tensor, ep: int, copies: int, g: torch.Generator) -> Tensor:
    """Each of ep ranks draws `copies` experts from probs [E] (a multinomial) → [ep, E] int64.

    Sequential conditional binomials over experts, vectorised over ranks: O(E) small ops.
    """
    tail = torch.flip(torch.cumsum(torch.flip(probs, [0]), 0), [0])   # mass of experts e.. E-1
    cond = (probs / tail.clamp(min=1e-300)).clamp(0, 1).tolist()
    left = torch.full((ep,), float(copies), dtype=torch.float64)
    out = torch.zeros(ep, probs.numel(), dtype=torch.int64)
    for e, q in enumerate(cond[:-1]):
        x = torch.binomial(left, torch.full_like(left, q), generator=g)
        out[:, e] = x.long()
        left -= x
    out[:, -1] = left.long()
    return out


def synthetic_trace(ep: int, experts: int, copies: int, steps: int, layers: int, skew: float,
                    rate: float = 0.0, seed: int = 0) -> Tensor:
    """Zipf(skew) popularity over a random permutation of experts per layer → counts [steps, layers, ep, E].

    Each step a fraction `rate` of every layer's permutation is re-shuffled (hot experts move).
    """
    g = torch.Generator().manual_seed(seed)
    zipf = torch.arange(1, experts + 1, dtype=torch.float64) ** -skew
    zipf /= zipf.sum()
    perms = [torch.randperm(experts, generator=g) for _ in range(layers)]
    n_move = round(rate * experts)
    out = torch.empty(steps, layers, ep, experts, dtype=torch.int64)
    for t in range(steps):
        for layer, perm in enumerate(perms):
            if t > 0 and n_move > 1:
                pos = torch.randperm(experts, generator=g)[:n_move]
                perm[pos] = perm[pos[torch.randperm(n_move, generator=g)]]
            out[t, layer] = sample_counts(zipf[torch.argsort(perm)], ep, copies, g)
    return out


def check_trace(counts: Tensor, ep: int, experts: int, source: str, copies: int | None = None) -> None:
    """Refuse counts whose [ep, E] do not match the spec's parallel.ep and model.moe.num_experts,
    negative counts, and a rank routing more than `copies` (tokens × top_k) rows in one layer."""
    if counts.dim() != 4 or counts.shape[2:] != (ep, experts):
        raise TraceError(f"{source}: counts have shape {tuple(counts.shape)}; this spec needs "
                         f"[steps, layers, {ep}, {experts}] (ep, num_experts)")
    if counts.numel() and int(counts.min()) < 0:
        raise TraceError(f"{source}: counts must be >= 0; the smallest is {int(counts.min())}")
    if copies is not None and counts.numel():
        most = int(counts.sum(-1).max())
        if most > copies:
            raise TraceError(f"{source}: a rank routes {most} rows in one layer, more than this spec's "
                             f"{copies} (budgets tokens × model.moe.top_k); record the trace with this spec")


def _check_count(name: str, value: int | None) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise TraceError(f"--{name} must be a whole number >= 1, got {value!r}")


def trace_counts(spec: Spec, trace: str | Path | None, skew: str | None, drift: str | None,
                 steps: int | None, layers: int, seed: int) -> Trace:
    """The counts to simulate: the file `trace` (its first `steps`), else a synthetic trace from
    `drift` or `skew` (default zipf:1.2) of `steps` (default 20) × `layers` for the spec's ep and E."""
    _check_count("steps", steps)
    _check_count("layers", layers)
    ep, E = spec.parallel.ep, spec.model.moe.num_experts
    if sum(x is not None for x in (trace, skew, drift)) > 1:
        raise TraceError("give only one of --trace, --skew and --drift")
    if trace is not None:
        counts = load_trace(trace)
        check_trace(counts, ep, E, str(trace), spec.budgets.tokens * spec.model.moe.top_k)
        return Trace(counts[:steps] if steps else counts, str(trace))
    option, text = ("drift", drift) if drift is not None else ("skew", DEFAULT_SKEW if skew is None else skew)
    s, rate = parse_synthetic(text, option)
    n_steps = steps or DEFAULT_STEPS
    if n_steps * layers * ep * E > MAX_SYNTHETIC_COUNTS:
        raise TraceError(f"a synthetic trace of {n_steps} steps × {layers} layers × {ep} ranks × {E} experts "
                         f"is too large (> {MAX_SYNTHETIC_COUNTS} counts): lower --steps or --layers")
    copies = spec.budgets.tokens * spec.model.moe.top_k
    counts = synthetic_trace(ep, E, copies, n_steps, layers, s, rate, seed)
    return Trace(counts, f"{option} {text}, seed {seed}")
