"""What the training state of one rank holds (bytes), by parallel.zero, as runtime/train_state.py
lays it out: weights, fp32 master weights and AdamW moments, the gradients and the reduction's
buffers, and ZeRO 3's gathered weights. echoc/memory_model.py puts these into its phases.

Dense parameters are sharded over all ranks, expert parameters (after EP) over expert-DP; a
group of one rank is never gathered or reduce-scattered by the graph (passes/zero.py).
"""
from __future__ import annotations

from dataclasses import dataclass

from echoc.spec import Spec
from runtime.train_state import REDUCE_BUCKET_BYTES

FP32 = 4


@dataclass(frozen=True)
class ParamGroups:
    """Parameters this rank computes with (experts after EP), by data-parallel group."""
    dense: int
    expert: int
    layers: tuple[int, ...]      # each transformer layer's local parameters, in order
    outside_layers: int          # embedding, final norm, lm_head
    largest: int = 0             # the largest local parameter (a reduction bucket holds at least it)
    layer_experts: tuple[int, ...] = ()   # of `layers`, each layer's local expert parameters


def zero_level(spec: Spec) -> int:
    return getattr(spec.parallel, "zero", 0)


def shard_counts(spec: Spec) -> tuple[int, int]:
    """(ranks a dense tensor is sharded over, ranks an expert tensor is sharded over)."""
    return spec.parallel.ep * spec.parallel.dp, spec.parallel.dp


def zero3_gathered_bytes(spec: Spec, p: ParamGroups) -> int:
    """Zero 3's forward: the largest unit's gathered weights, counting only groups of more than
    one rank (passes/zero.py gathers nothing for a group of one): a unit's weights, the next
    unit's (prefetched one ahead) and that gather's receive buffer [n, m], three units' worth
    (the output head is the last unit). The backward's are in backward_unit_bytes."""
    if zero_level(spec) != 3:
        return 0
    nd, _ = shard_counts(spec)
    units = [layer_parts(spec, p, i) for i in range(len(p.layers))]
    units.append([(spec.model.vocab_size * spec.model.hidden_size, nd)])       # lm_head
    return 3 * spec.model.dtype_bytes * max((sum(m for m, n in u if n > 1) for u in units), default=0)


def layer_parts(spec: Spec, p: ParamGroups, layer: int) -> list[tuple[int, int]]:
    """A layer's local parameters by group: [(dense, ranks it is sharded over), (experts, ...)]."""
    nd, ne = shard_counts(spec)
    experts = p.layer_experts[layer] if p.layer_experts else 0
    return [(p.layers[layer] - experts, nd), (experts, ne)]


def backward_unit_bytes(spec: Spec, parts: list[tuple[int, int]]) -> dict[str, int]:
    """One unit's backward at zero 2 and 3 (runtime/zero_ops.py), for the groups the graph
    reduce-scatters (more than one rank): zero 3's weights gathered again, and at the unit's
    reduce-scatter the [n, m/n] buffer and its [m/n] result (reduce dtype). The unit's whole
    gradients (model dtype) are the caller's, as at every level."""
    z, b, r = zero_level(spec), spec.model.dtype_bytes, reduce_dtype_bytes(spec)
    mine = [(m, n) for m, n in parts if n > 1 and z in (2, 3)]
    return {"gathered_weights": sum(b * m for m, _ in mine) if z == 3 else 0,
            "reduce_transient": sum(r * m + r * m // n for m, n in mine)}


def held_grad_bytes(spec: Spec, parts: list[tuple[int, int]]) -> int:
    """The gradients of parameters [(m, n)] whose backward (and, in the graph, reduce-scatter)
    is done: whole in the model dtype where the host reduces them (zero < 2, or a group of one),
    this rank's reduced shard at zero 2 (reduce dtype) and zero 3 (model dtype .grad)."""
    z, b, r = zero_level(spec), spec.model.dtype_bytes, reduce_dtype_bytes(spec)
    return sum(b * m if z < 2 or n == 1 else (r if z == 2 else b) * m // n for m, n in parts)


def reduce_dtype_bytes(spec: Spec) -> int:
    return FP32 if getattr(spec.train, "grad_reduce_dtype", "float32") == "float32" else 2


def static_bytes(spec: Spec, p: ParamGroups) -> dict[str, int]:
    """Weights, fp32 masters and moments held all the time (train_state.py's layout)."""
    b, z = spec.model.dtype_bytes, zero_level(spec)
    nd, ne = shard_counts(spec)
    out = {"weights": 0, "master_weights": 0, "optimizer_moments": 0}
    for n_params, n in ((p.dense, nd), (p.expert, ne)):
        shard = n if z >= 1 else 1
        out["weights"] += b * n_params // (n if z == 3 else 1)
        own = b == FP32 and (shard == 1 or z == 3)
        out["master_weights"] += 0 if own else FP32 * n_params // shard
        out["optimizer_moments"] += 2 * FP32 * n_params // shard
    return out


def gradient_bytes(spec: Spec, p: ParamGroups) -> dict[str, int]:
    """model_grads: every gradient after backward (held_grad_bytes: at zero 2 the reduced shards
    the graph's backward accumulates, which are the optimizer's own when fp32); reduce_transient:
    what the reduction after backward holds on top of them at its peak (`_bucketed_reduction`;
    at zero 3 the fp32 copies; zero 2's reduce-scatters run in backward: backward_unit_bytes);
    fp32_grads: the gradients the optimizer reads (fp32, this rank's shard at zero >= 1)."""
    b, z = spec.model.dtype_bytes, zero_level(spec)
    r = reduce_dtype_bytes(spec)
    nd, ne = shard_counts(spec)
    out = {"model_grads": 0, "reduce_transient": 0, "fp32_grads": 0}
    host_reduced = []
    for n_params, n in ((p.dense, nd), (p.expert, ne)):
        shard = n if z >= 1 else 1
        out["fp32_grads"] += FP32 * n_params // shard
        out["model_grads"] += held_grad_bytes(spec, [(n_params, n)])
        if z == 3 and n > 1:      # gathered: the reduced shard is .grad, its fp32 copy the optimizer's
            out["reduce_transient"] += FP32 * n_params // n
        elif not (z == 2 and n > 1):      # zero 2: reduce-scattered in the graph's backward
            host_reduced.append((n_params, n, shard))
    out["reduce_transient"] += _bucketed_reduction(host_reduced, b, r, z, p.largest)
    return out


def _bucketed_reduction(groups: list[tuple[int, int, int]], b: int, r: int, z: int, largest: int) -> int:
    """Bytes above the model-dtype gradients at the peak of TrainState.reduce_grads, which walks
    the groups [(params, group size, shard)] in order, one bucket at a time: a flat buffer in
    the reduce dtype r (a reduce-scatter's also its output shard), the fp32 gradients the
    optimizer reads (views of the flat buffer when it is fp32 and whole), each bucket's model-
    dtype gradients dropped. Buckets of REDUCE_BUCKET_BYTES, or the largest tensor alone."""
    cur = peak = 0
    for n_params, n, shard in groups:
        size = min(n_params, max(REDUCE_BUCKET_BYTES // r, largest))
        for start in range(0, n_params, max(size, 1)):
            m = min(size, n_params - start)
            if z >= 2:        # reduce_scatter_full: [n, m/n] buffer and the [m/n] result, then fp32 copies
                keep = FP32 * m // n          # the copies the optimizer reads (fp32 reduce: views of the result)
                peak = max(peak, cur + r * m + r * m // n, cur + r * m // n + (keep if r != FP32 else 0))
                cur += keep - b * m
                continue
            cur += r * m                                  # the flat buffer (the cast is in its copy)
            peak = max(peak, cur)
            cur -= b * m
            if shard > 1 or r != FP32:                    # fp32 copies (this rank's shard), flat freed
                cur += FP32 * m // shard
                peak = max(peak, cur)
                cur -= r * m
    return peak
