"""ZeRO in the graph. Level 3: gather a layer's sharded weights just before use, free them
after. Level 2: reduce-scatter a layer's gradients as soon as its backward has made them.

`zero_gather(shards, shapes, group, reduce_dtype, buf)` is the node passes/zero.py inserts
per layer and group ("world" for dense weights, "expert_dp" for the EP-sharded experts):

    forward   shards [m_i] (each parameter's flat shard, runtime/shards.py) → one all-gather
              → the whole weights, shaped `shapes[i]`; nothing is saved
    backward  the weights' gradients → one reduce-scatter (summed in `reduce_dtype`) → the
              shards' gradients [m_i]

The ops that use the weights would keep them alive until backward (a linear saves its
weight). `regather_in_backward()` (the Trainer's forward runs inside it) stops that: a
saved tensor that is a view of gathered weights is stored as a small handle instead, and
the first backward use of a layer gathers its weights again (one all-gather), kept until
that layer's zero_gather backward has reduce-scattered the gradient. So whole weights live
from a layer's gather to its last forward use, and from its first backward use to its
gradient's reduce-scatter.

`module_call(module, names, weights, *args)` runs a submodule with some parameters
replaced by gathered weights (torch.func.functional_call): how the pass rewrites a
`call_module` whose weights are sharded.

`zero_reduce(weights, names, group, reduce_dtype, buf)` is level 2's node, per layer and group:

    forward   the whole weights, passed through (views)
    backward  the weights' gradients → one reduce-scatter → this rank's shards, added to
              SHARD_GRADS[name]; the whole gradients are dropped (no `param.grad`)

so a layer's whole gradients live only from its backward to its reduce-scatter, and the
optimizer (runtime/train_state.py) reads the shards.
"""
from __future__ import annotations

import math
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from runtime import contracts
from runtime.contracts import OpContract
from runtime.dtypes import torch_dtype
from runtime.shards import (PendingGather, ShardSpec, gather_full, gather_full_start, reduce_scatter_full,
                            shard_spec, split_rows)

# no role: the MoE buffer plan does not place its output (the allocator does); `weights` is a tuple
ZERO_GATHER = OpContract("zero_gather", ("shards", "shapes", "group", "reduce_dtype", "buf"), ("weights",),
                         grads=("shards",), output_in_arena=False)

ZERO_WAIT = OpContract("zero_wait", ("weights", "buf"), ("weights",), output_in_arena=False)
ZERO_REDUCE = OpContract("zero_reduce", ("weights", "names", "group", "reduce_dtype", "buf"), ("weights",),
                         output_in_arena=False)

REGATHERS = [0]   # units gathered again in backward since the process started (tests read it)


@dataclass
class _Unit:
    """One zero_gather call's weights: enough to gather them again in backward."""
    shards: tuple[Tensor, ...]
    specs: list[ShardSpec]
    shapes: tuple[tuple[int, ...], ...]
    again: list[Tensor] | None = None

    def gather(self) -> list[Tensor]:
        s0 = self.shards[0]
        fulls = [torch.empty(shape, dtype=s0.dtype, device=s0.device) for shape in self.shapes]
        gather_full(list(self.shards), self.specs, fulls)
        return fulls

    def regathered(self) -> list[Tensor]:
        if self.again is None:
            self.again = self.gather()
            REGATHERS[0] += 1
        return self.again


@dataclass
class _Live:
    """Storages of gathered weights seen in this forward: data_ptr → (unit, weight index)."""
    by_ptr: dict[int, tuple[_Unit, int]] = field(default_factory=dict)
    active: bool = False


_LIVE = _Live()


def _track(unit: _Unit, fulls: list[Tensor]) -> None:
    for i, t in enumerate(fulls):
        ptr = t.untyped_storage().data_ptr()
        _LIVE.by_ptr[ptr] = (unit, i)
        weakref.finalize(t, _untrack, ptr, unit, i)


def _untrack(ptr: int, unit: _Unit, i: int) -> None:
    hit = _LIVE.by_ptr.get(ptr)
    if hit is not None and hit[0] is unit and hit[1] == i:
        del _LIVE.by_ptr[ptr]


@dataclass(frozen=True)
class _Packed:
    unit: _Unit
    index: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int


def _pack(t: Tensor):
    if t.is_meta or not _LIVE.by_ptr:
        return t
    hit = _LIVE.by_ptr.get(t.untyped_storage().data_ptr())
    if hit is None:
        return t
    return _Packed(hit[0], hit[1], tuple(t.size()), tuple(t.stride()), t.storage_offset())


def _unpack(p):
    if not isinstance(p, _Packed):
        return p
    return p.unit.regathered()[p.index].as_strided(p.size, p.stride, p.offset)


@contextmanager
def regather_in_backward():
    """Run a forward in here: saved views of gathered weights become handles (see module doc)."""
    with torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        yield


_PENDING: dict[str, PendingGather] = {}     # zero_gather's buf → its all-gather in flight


class _ZeroGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shapes, group, reduce_dtype, buf, *shards):
        unit = _Unit(shards, [shard_spec(math.prod(s), group) for s in shapes], shapes)
        s0 = shards[0]
        fulls = [torch.empty(shape, dtype=s0.dtype, device=s0.device) for shape in shapes]
        _PENDING[buf] = gather_full_start(list(shards), unit.specs, fulls)
        _track(unit, fulls)
        ctx.unit, ctx.reduce_dtype = unit, torch_dtype(reduce_dtype)
        return tuple(fulls)

    @staticmethod
    def backward(ctx, *grads):
        unit = ctx.unit
        unit.again = None   # this layer's backward is over: free the weights gathered again
        grads = [g if g is not None else torch.zeros(shape, dtype=unit.shards[0].dtype, device=unit.shards[0].device)
                 for g, shape in zip(grads, unit.shapes)]
        flat = reduce_scatter_full(grads, unit.specs, ctx.reduce_dtype)
        shard_grads = [g.to(s.dtype).view_as(s) for g, s in zip(split_rows(flat, unit.specs), unit.shards)]
        return (None, None, None, None) + tuple(shard_grads)


def zero_gather(shards, shapes, group, reduce_dtype, buf):
    """shards: this rank's flat shards [m_i]; → the whole weights (a tuple), shaped shapes[i],
    filled once `zero_wait(·, buf)` has run: the all-gather is only issued here, so the graph
    can issue it a layer early (prefetch). On the meta device only the shapes."""
    shards = tuple(shards)
    if shards[0].is_meta:
        return tuple(torch.empty(s, dtype=shards[0].dtype, device="meta") for s in shapes)
    return _ZeroGather.apply(tuple(tuple(s) for s in shapes), group, reduce_dtype, buf, *shards)


def zero_wait(weights, buf):
    """The weights of zero_gather `buf`, ready: waits for its all-gather (on NCCL the current
    stream waits; the host does not) and fills them. Returns the same tensors."""
    weights = tuple(weights)
    pending = _PENDING.pop(buf, None)
    if pending is not None:
        with torch.no_grad():
            pending.finish()
    return weights


def live_gathered() -> int:
    """How many gathered weights of the current forward are still alive (0 after a forward:
    every one was freed after its last use)."""
    return len(_LIVE.by_ptr)


def module_call(module: nn.Module, names: tuple[str, ...], weights, *args):
    """module(*args) with its parameters `names` replaced by `weights` (gathered tensors)."""
    return torch.func.functional_call(module, dict(zip(names, weights)), args)


class ShardGrads:
    """ZeRO 2's reduced gradient shards by parameter name ([m], the reduce dtype): zero_reduce's
    backward adds to them (micro-batches accumulate), TrainState takes them after backward."""

    def __init__(self):
        self.by_name: dict[str, Tensor] = {}

    def add(self, name: str, shard: Tensor) -> None:
        if name in self.by_name:
            self.by_name[name].add_(shard)
        else:
            self.by_name[name] = shard

    def take(self, name: str) -> Tensor | None:
        return self.by_name.pop(name, None)

    def clear(self) -> None:
        self.by_name.clear()


SHARD_GRADS = ShardGrads()


class _ZeroReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, names, group, reduce_dtype, *weights):
        ctx.names, ctx.reduce_dtype = names, torch_dtype(reduce_dtype)
        ctx.specs = [shard_spec(w.numel(), group) for w in weights]
        ctx.like = [(w.shape, w.dtype, w.device) for w in weights]
        return tuple(w.view_as(w) for w in weights)

    @staticmethod
    def backward(ctx, *grads):
        grads = [g if g is not None else torch.zeros(shape, dtype=dt, device=dev)
                 for g, (shape, dt, dev) in zip(grads, ctx.like)]
        flat = reduce_scatter_full(grads, ctx.specs, ctx.reduce_dtype)
        for name, shard in zip(ctx.names, split_rows(flat, ctx.specs)):
            SHARD_GRADS.add(name, shard)
        return (None, None, None) + (None,) * len(grads)


def zero_reduce(weights, names, group, reduce_dtype, buf):
    """weights: whole parameters → the same weights; their gradients are reduce-scattered into
    SHARD_GRADS in backward instead of reaching `param.grad`. On the meta device: the weights."""
    weights = tuple(weights)
    if weights[0].is_meta:
        return weights
    return _ZeroReduce.apply(tuple(names), group, reduce_dtype, *weights)


def graph_params(gm, contract: OpContract = ZERO_GATHER, inputs: dict | None = None) -> dict[str, str]:
    """{parameter name: group} of every parameter a zero_gather (or zero_reduce) node of `gm`
    takes, also inside recomputed regions (runtime/recompute.py: a body whose placeholders are
    the call's `inputs`)."""
    arg = "shards" if contract is ZERO_GATHER else "weights"
    out, inputs = {}, inputs or {}
    for node in gm.graph.nodes:
        body = getattr(gm.get_submodule(node.target), "body", None) if node.op == "call_module" else None
        if body is not None:
            places = [p for p in body.graph.nodes if p.op == "placeholder"]
            out |= graph_params(body, contract, {p: inputs.get(a, a) for p, a in zip(places, node.args)})
        elif node.op == "call_function" and contracts.of(node.target) is contract:
            group = contract.arg(node, "group")
            for param in (inputs.get(s, s) for s in contract.arg(node, arg)):
                assert param.op == "get_attr", f"{node.name}: {param.name} is not a parameter"
                out[param.target] = group
    return out


def gathered_params(gm) -> dict[str, str]:
    """{parameter name: group} of every parameter ZeRO 3 gathers in `gm`."""
    return graph_params(gm, ZERO_GATHER)


def reduced_params(gm) -> dict[str, str]:
    """{parameter name: group} of every parameter whose gradient ZeRO 2 reduces in `gm`'s backward."""
    return graph_params(gm, ZERO_REDUCE)


contracts.bind(ZERO_GATHER, zero_gather)
contracts.bind(ZERO_WAIT, zero_wait)
contracts.bind(ZERO_REDUCE, zero_reduce)
