"""One memory model for the whole rank: what one rank holds at each phase of an iteration.

    static        weights, fp32 master weights, AdamW moments (by parallel.zero), and the
                    backend's symmetric exchange pools (allocated once; placement 'symmetric')
    (arena)       + the MoE arena: each layer's saved regions from its forward to its backward
                    (under recompute only its routing decisions' region through the loss),
                    the transient region during each pass (given back around the loss)
    last forward  + every layer's kept activations (after train.recompute), the last layer's
                    working set and MoE buffers, gathered weights (zero 3)
    loss          + every layer's kept activations + logits, and the chunked loss's backward:
                    the logits' gradient and one fp32 chunk (runtime/loss.py)
    output head   + kept activations + the logits' gradient, the head's input gradient and
                    weight gradient (zero 2: and its reduce-scatter buffer; zero 3: the gathered
                    head weight and its whole gradient)
    backward      + recomputed layer's activations + gradients so far + MoE buffers' peak
    grad reduce   + every gradient (model dtype) + the reduction's flat buffers
    optimizer     + the fp32 gradients the update reads

The peak is the largest phase; `MemoryPrediction` holds it by category and names the phase.
Parameter groups and ZeRO follow runtime/train_state.py (echoc/memory_state.py counts them):
dense parameters are sharded over all ranks, expert parameters (after EP) over expert-DP; at
zero ≥ 1 the fp32 master and both moments are sharded (a float32 model's unsharded weight is its
own master); gradients are the model's dtype until the reduction, which concatenates them in
train.grad_reduce_dtype and hands the optimizer fp32 copies (this rank's shard at zero ≥ 1); at
zero 3 weights and gradients are shards, and a unit's weights are gathered just before use
(three units' worth in the forward: the current one, the prefetched next and its receive buffer).

Activations per layer: the dense parts from echoc/memory_census.py (autograd's saved tensors,
counted on the meta device), the MoE machinery from the buffer plan (passes/buffer_plan.py):
buffers live from forward into backward are saved activations, the rest the plan's transient
peak. Under recompute a layer keeps its input [T, H] and the routing decisions, and in backward
one layer at a time holds its whole activations again.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from echoc.errors import EchocError
from echoc.memory_census import LayerCensus
from echoc.memory_state import (FP32, ParamGroups, backward_unit_bytes, gradient_bytes, held_grad_bytes, layer_parts,
                                shard_counts, static_bytes, zero3_gathered_bytes, zero_level)
from echoc.spec import Spec
from passes.memory_plan import ALLOCATOR, MemoryPlan
from runtime.loss import fused_planned, loss_bytes

INT64 = 8
GIB = 2**30
POLICIES = ("none", "moe", "full")


# What the CUDA caching allocator needs beyond the predicted peak (the live bytes) for the run
# to go through: the blocks a captured graph's private pool cannot reuse within the capture, and
# fragmentation. Measured (bench/memory.py --cap, H200, one CUDA graph, with expandable segments,
# which `echoc run` sets): on one GPU, under recompute 1.10× is too little and 1.15× enough;
# without recompute the arena ran in 1.05× but the allocator needed 1.10×, with 30 MiB to spare.
# One factor for every setting: 1.15×. On two GPUs a sharded reduction (zero >= 1 over a group of
# more than one rank: its buckets' buffers and kept shards interleave in the graph's pool) ran
# out at 1.15× (ep 1 × dp 2, zero 1) and went through at 1.25×: SHARDED_HEADROOM
# (docs/BENCHMARKS.md). It multiplies the whole peak, static state included, which barely
# fragments: conservative for plans whose peak is mostly weights and optimizer state (glm5:
# 8 GiB of 54); not re-measured there.
ALLOCATOR_HEADROOM = {"none": 1.15, "moe": 1.15, "full": 1.15}
SHARDED_HEADROOM = 1.25


@dataclass
class MemoryPrediction:
    """The predicted peak of one rank (bytes), where it falls, and every phase's total."""
    recompute: str
    zero: int
    peak_bytes: int
    peak_phase: str
    by_category: dict[str, int]                      # at the peak phase
    phases: dict[str, int] = field(default_factory=dict)
    budget_bytes: int | None = None
    sharded: bool = False                            # zero >= 1 over a group of more than one rank

    @property
    def headroom(self) -> float:
        return max(ALLOCATOR_HEADROOM[self.recompute], SHARDED_HEADROOM if self.sharded else 0.0)

    @property
    def needs_bytes(self) -> int:
        """The memory the run needs: the peak and the allocator's headroom on it."""
        return math.ceil(self.peak_bytes * self.headroom)

    @property
    def fits(self) -> bool:
        return self.budget_bytes is None or self.needs_bytes <= self.budget_bytes


@dataclass(frozen=True)
class LayerActivations:
    """Bytes one layer holds between its forward and its backward, and what recompute adds back."""
    kept: int          # held from the layer's forward to its backward
    working: int       # recomputed in backward, on top of `kept` (0 without recompute)


def _moe_saved(plan: MemoryPlan, placements: tuple[str, ...]) -> dict[int, int]:
    """Per MoE layer, bytes of plan buffers live across the forward/backward boundary (saved for
    backward), of the given placements."""
    out: dict[int, int] = {}
    if not plan.planned:
        return out
    fwd_end = plan.timeline.forward[1]
    for buf in plan.buffers:
        if buf.layer is not None and buf.placement in placements and buf.first <= fwd_end < buf.last:
            out[buf.layer] = out.get(buf.layer, 0) + buf.nbytes
    return out


def layer_activations(spec: Spec, census: LayerCensus, plan: MemoryPlan, policy: str) -> list[LayerActivations]:
    """Every layer's activations under `policy` (one of POLICIES)."""
    m, T = spec.model, spec.budgets.tokens
    arena = spec.backends.uses_arena and plan.planned
    moe = _moe_saved(plan, (ALLOCATOR,) if arena else ("arena", ALLOCATOR))
    x_in = T * m.hidden_size * m.dtype_bytes
    routing = T * m.moe.top_k * (FP32 + INT64)                  # the saved top-k (values, indices)
    out = []
    for layer in range(m.num_layers):
        dense = layer < m.first_dense_layers
        mlp = census.dense_mlp if dense else census.router + census.shared + moe.get(layer, 0)
        saved = census.attention + mlp
        keep = {"none": saved, "moe": saved if dense else census.attention + x_in + routing,
                "full": x_in + (0 if dense else routing)}[policy]
        working = 0 if policy == "none" else saved - (keep - x_in - (0 if dense else routing))
        out.append(LayerActivations(keep, working))
    return out


@dataclass(frozen=True)
class MoEBuffers:
    """The MoE buffers beyond what layer_activations counts: the arena's regions when the runtime
    uses one (each layer's saved regions, held from its forward to its backward; under recompute
    only its routing decisions' region through the loss, the rest taken again by the recomputing
    backward; the transient region, held during each pass), and the peak of those the allocator
    provides (exchange buffers, GEMM products)."""
    held: dict[int | None, int] = field(default_factory=dict)   # layer (None: no layer) → bytes
    kept: dict[int | None, int] = field(default_factory=dict)   # layer → its routing decisions' bytes
    transient_region: int = 0
    allocator_transient: int = 0

    def _between(self, layer: int | None, recomputed: bool) -> int:
        """What `layer`'s regions hold between its forward and its backward."""
        return self.kept.get(layer, 0) if recomputed and layer is not None else self.held[layer]

    def through_loss(self, recomputed: bool) -> int:
        """Saved regions held while the loss runs."""
        return sum(self._between(k, recomputed) for k in self.held)

    def in_last_forward(self, recomputed: bool) -> int:
        """Held in the last MoE layer's forward: what earlier layers keep, all of its own regions,
        and the transient region."""
        last = max((k for k in self.held if k is not None), default=None)
        own = 0 if last is None else self.held[last] - self._between(last, recomputed)
        return self.through_loss(recomputed) + own + self.transient_region

    def held_through(self, layer: int, recomputed: bool) -> int:
        """Saved regions held in `layer`'s backward: all of its own, earlier layers' (what they
        hold between forward and backward), and the shared one."""
        return sum(self.held[k] if k == layer else self._between(k, recomputed)
                   for k in self.held if k is None or k <= layer)


def moe_buffer_bytes(spec: Spec, plan: MemoryPlan) -> MoEBuffers:
    if not plan.planned:
        return MoEBuffers()
    if spec.backends.uses_arena:
        saved = sum(_moe_saved(plan, (ALLOCATOR,)).values())
        held, kept = {}, {}
        for r in plan.held_regions:
            held[r.layer] = held.get(r.layer, 0) + r.hi - r.lo
            if r.kept:
                kept[r.layer] = kept.get(r.layer, 0) + r.hi - r.lo
        return MoEBuffers(held, kept, plan.arena_bytes - plan.held_bytes,
                          max(0, plan.allocator_lower_bound_bytes - saved))
    return MoEBuffers(allocator_transient=max(0, plan.total_lower_bound_bytes
                                              - sum(_moe_saved(plan, ("arena", ALLOCATOR)).values())))


def head_bytes(spec: Spec, census: LayerCensus) -> dict[str, int]:
    """The output head at the loss: logits [T, V] (model dtype, saved by the loss), the chunked
    loss's backward working set (runtime/loss.py: the logits' gradient, one fp32 chunk, per-row
    fp32), and what the final norm and lm_head save."""
    m, T = spec.model, spec.budgets.tokens
    fused = fused_planned(spec.cluster.device)
    return {"logits": T * m.vocab_size * m.dtype_bytes,
            "loss": sum(loss_bytes(T, m.vocab_size, m.dtype_bytes, fused).values()), "head_saved": census.head}


def _head_backward(spec: Spec) -> dict[str, int]:
    """lm_head's backward, the logits freed, the larger of two moments. Computing: the logits'
    gradient [T, V], the input gradient [T, H], the weight's whole gradient [V, H] (zero 3 over
    more than one rank: and the weight gathered again). Sharded in the graph (zero 2 and 3 over
    more than one rank), reducing: the logits' gradient and the gathered weight freed, the whole
    gradient beside the reduce-scatter's [n, VH/n] buffer and its result. The embedding's
    gradient comes last in backward."""
    m, b, T = spec.model, spec.model.dtype_bytes, spec.budgets.tokens
    head = m.vocab_size * m.hidden_size
    unit = backward_unit_bytes(spec, [(head, shard_counts(spec)[0])])
    computing = {"grad_logits": T * m.vocab_size * b, "grad_hidden": T * m.hidden_size * b, "model_grads": b * head,
                 "gathered_weights": unit["gathered_weights"]}
    if not unit["reduce_transient"]:
        return computing
    reducing = {"grad_hidden": T * m.hidden_size * b, "model_grads": b * head,
                "reduce_transient": unit["reduce_transient"]}
    return max(computing, reducing, key=lambda d: sum(d.values()))


def _head_forward(spec: Spec, kept: int, head: dict) -> dict[str, int]:
    """Zero 3 with the head sharded: its weight gathered (whole, and the receive buffer until the
    gather completes) beside the logits; nothing otherwise (the loss phase covers it)."""
    m, b, T = spec.model, spec.model.dtype_bytes, spec.budgets.tokens
    if zero_level(spec) != 3 or shard_counts(spec)[0] == 1:
        return {}
    return {"activations": kept, "head_saved": head["head_saved"], "logits": T * m.vocab_size * b,
            "gathered_weights": 2 * b * m.vocab_size * m.hidden_size}


def _phases(spec: Spec, p: ParamGroups, acts: list[LayerActivations], static: dict, grads: dict,
            head: dict, moe: MoEBuffers, recomputed: bool) -> dict[str, dict[str, int]]:
    """Every phase's bytes by category (`recomputed`: the MoE layers are recomputed in backward)."""
    gathered_fwd = zero3_gathered_bytes(spec, p)
    kept = sum(a.kept for a in acts)
    # the last layer's forward: every layer's kept activations, its own recomputed working set, its
    # weights and the next unit's gathered (zero 3); the loss comes after the last gathered weights
    # are freed (the head's are gathered again in backward)
    phases = {"forward, last layer": dict(static, moe_arena=moe.in_last_forward(recomputed),
                                          activations=kept + (acts[-1].working if acts else 0),
                                          moe_transient=moe.allocator_transient, gathered_weights=gathered_fwd),
              "loss": dict(static, moe_arena=moe.through_loss(recomputed), activations=kept, **head)}
    head_fwd = _head_forward(spec, kept, head)
    if head_fwd:
        phases["output head forward"] = dict(static, moe_arena=moe.through_loss(recomputed), **head_fwd)
    phases["output head backward"] = dict(static, moe_arena=moe.through_loss(recomputed), activations=kept,
                                           head_saved=head["head_saved"], **_head_backward(spec))
    # the layers' backward follows the head's and the final norm's. The embedding's gradient comes
    # last, but is counted from here: without it the one-GPU runs measure 1.4-2.3 % above the
    # model (docs/BENCHMARKS.md), with it 0.6 %, and the allocator headroom was measured on it
    done = [(p.outside_layers, shard_counts(spec)[0]), (0, shard_counts(spec)[1])]
    for layer in reversed(range(len(acts))):
        phases[f"backward layer {layer}"] = _layer_backward(spec, p, static, acts, layer, moe, recomputed,
                                                            held_grad_bytes(spec, done))
        done = [(d + m, n) for (d, n), (m, _) in zip(done, layer_parts(spec, p, layer))]
    after = dict(static)          # the Trainer releases the arena after backward
    phases["gradient reduction"] = dict(after, model_grads=grads["model_grads"],
                                        reduce_transient=grads["reduce_transient"])
    phases["optimizer"] = dict(after, fp32_grads=grads["fp32_grads"])
    return phases


def _layer_backward(spec: Spec, p: ParamGroups, static: dict, acts: list[LayerActivations], layer: int,
                    moe: MoEBuffers, recomputed: bool, held: int) -> dict[str, int]:
    """A layer's backward, the largest of up to three moments. Computing: the activations kept
    through it and its working set, its weights gathered again (zero 3), its whole gradients.
    At zero 2 and 3 each group of more than one rank is reduce-scattered when its weights' last
    backward use is done (passes/zero.py puts the experts' node just before their first use):
    the experts' in the middle of the layer (its activations counted as still held), the dense
    weights' at its end (its own activations freed, the gradient flowing down, two [T, H], held
    instead); each beside the reduce-scatter's buffer and result, its own gathered weights freed
    (runtime/zero_ops.py). `held`: the gradients of the units after it (held_grad_bytes)."""
    b = spec.model.dtype_bytes
    (md, _), (me, ne) = parts = layer_parts(spec, p, layer)
    dense, experts = (backward_unit_bytes(spec, [part]) for part in parts)
    base = dict(static, moe_arena=moe.held_through(layer, recomputed) + moe.transient_region,
                moe_transient=moe.allocator_transient)
    through = sum(x.kept for x in acts[:layer + 1]) + acts[layer].working
    flow = 2 * spec.budgets.tokens * spec.model.hidden_size * b
    moments = [dict(base, activations=through, model_grads=held + b * (md + me),
                    gathered_weights=dense["gathered_weights"] + experts["gathered_weights"])]
    if experts["reduce_transient"]:
        moments.append(dict(base, activations=through + flow, model_grads=held + b * (md + me),
                            gathered_weights=dense["gathered_weights"],
                            reduce_transient=experts["reduce_transient"]))
    if dense["reduce_transient"]:
        moments.append(dict(base, activations=sum(x.kept for x in acts[:layer]) + flow,
                            model_grads=held + held_grad_bytes(spec, [(me, ne)]) + b * md,
                            reduce_transient=dense["reduce_transient"]))
    return max(moments, key=lambda d: sum(d.values()))


def predict(spec: Spec, p: ParamGroups, census: LayerCensus, plan: MemoryPlan, policy: str) -> MemoryPrediction:
    """The predicted peak of one rank under recompute `policy` (one of POLICIES)."""
    assert policy in POLICIES, policy
    static = dict(static_bytes(spec, p), symmetric_pool=plan.symmetric_bytes)   # the backend's, held all run
    phases = _phases(spec, p, layer_activations(spec, census, plan, policy), static,
                     gradient_bytes(spec, p), head_bytes(spec, census), moe_buffer_bytes(spec, plan),
                     policy != "none")
    totals = {name: sum(c.values()) for name, c in phases.items()}
    worst = max(totals, key=totals.get)
    budget = spec.budgets.memory_gib
    return MemoryPrediction(policy, zero_level(spec), totals[worst], worst,
                            {k: v for k, v in phases[worst].items() if v}, totals,
                            None if budget is None else int(budget * GIB),
                            zero_level(spec) >= 1 and max(shard_counts(spec)) > 1)


def choose(spec: Spec, p: ParamGroups, census: LayerCensus, plan: MemoryPlan) -> MemoryPrediction:
    """spec.train.recompute, or for 'auto' the cheapest policy (none, moe, full) that fits the
    budget (the last one, not fitting, when none does; 'none' when no budget is set)."""
    if spec.train.recompute != "auto":
        return predict(spec, p, census, plan, spec.train.recompute)
    for policy in POLICIES:
        pred = predict(spec, p, census, plan, policy)
        if pred.fits:
            return pred
    return pred


class MemoryBudgetError(EchocError):
    """The predicted peak of a rank is over budgets.memory_gib."""


HELPFUL_FIELDS = ("parallel.zero", "train.recompute", "parallel.ep", "budgets.received_token_capacity")


def format_size(nbytes: int) -> str:
    """GiB to two decimals, or MiB / KiB where that would read 0.00."""
    for unit, scale in (("GiB", GIB), ("MiB", 2**20)):
        if nbytes >= scale // 100:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes / 1024:.2f} KiB"


def remedies(spec: Spec, pred: MemoryPrediction) -> list[str]:
    """The settings of HELPFUL_FIELDS that can still lower the peak, each with its value now."""
    zero, ep, cap = zero_level(spec), spec.parallel.ep, spec.budgets.received_token_capacity
    out = []
    if zero < 3:
        out.append(f"raise parallel.zero (now {zero})")
    if pred.recompute != "full":
        r = spec.train.recompute
        resolved = f", resolved to {pred.recompute}" if r == "auto" else ""
        out.append(f"set train.recompute 'full' (now {r}{resolved})")
    if ep < spec.model.moe.num_experts:
        out.append(f"raise parallel.ep (now {ep})")
    if cap > 1.0:
        out.append(f"lower budgets.received_token_capacity (now {cap:g})")
    return out + ["or run on more GPUs"]


def check_budget(spec: Spec, pred: MemoryPrediction) -> None:
    """Raise MemoryBudgetError (one line: the three largest categories, the settings that can still help)."""
    if pred.fits:
        return
    top = sorted(pred.by_category.items(), key=lambda kv: -kv[1])[:3]
    raise MemoryBudgetError(
        f"predicted peak {format_size(pred.peak_bytes)} per rank, {format_size(pred.needs_bytes)} with the "
        f"allocator's headroom (×{pred.headroom:g}), is over budgets.memory_gib "
        f"{spec.budgets.memory_gib:g} (at {pred.peak_phase}, recompute {pred.recompute}; largest: "
        + ", ".join(f"{k} {format_size(v)}" for k, v in top) + "); " + ", ".join(remedies(spec, pred)))


def to_json(pred: MemoryPrediction) -> dict:
    """The prediction as summary.json stores it (bytes)."""
    return {"recompute": pred.recompute, "zero": pred.zero, "peak_bytes": pred.peak_bytes,
            "needs_bytes": pred.needs_bytes, "allocator_headroom": pred.headroom,
            "peak_phase": pred.peak_phase, "by_category": pred.by_category, "phases": pred.phases,
            "budget_bytes": pred.budget_bytes, "fits": pred.fits}
