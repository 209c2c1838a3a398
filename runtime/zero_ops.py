"""ZeRO 3 in the graph: gather a layer's sharded weights just before use, free them after.

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
from runtime.shards import ShardSpec, gather_full, reduce_scatter_full, shard_spec, split_rows

# no role: the MoE buffer plan does not place its output (the allocator does); `weights` is a tuple
ZERO_GATHER = OpContract("zero_gather", ("shards", "shapes", "group", "reduce_dtype", "buf"), ("weights",),
                         grads=("shards",), output_in_arena=False)

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


class _ZeroGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, shapes, group, reduce_dtype, *shards):
        unit = _Unit(shards, [shard_spec(math.prod(s), group) for s in shapes], shapes)
        fulls = unit.gather()
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
        return (None, None, None) + tuple(shard_grads)


def zero_gather(shards, shapes, group, reduce_dtype, buf):
    """shards: this rank's flat shards [m_i]; → the whole weights (a tuple), shaped shapes[i].
    On the meta device (compile time: the meta model's weights are whole) only the shapes."""
    shards = tuple(shards)
    if shards[0].is_meta:
        return tuple(torch.empty(s, dtype=shards[0].dtype, device="meta") for s in shapes)
    return _ZeroGather.apply(tuple(tuple(s) for s in shapes), group, reduce_dtype, *shards)


def live_gathered() -> int:
    """How many gathered weights of the current forward are still alive (0 after a forward:
    every one was freed after its last use)."""
    return len(_LIVE.by_ptr)


def module_call(module: nn.Module, names: tuple[str, ...], weights, *args):
    """module(*args) with its parameters `names` replaced by `weights` (gathered tensors)."""
    return torch.func.functional_call(module, dict(zip(names, weights)), args)


def gathered_params(gm, inputs: dict | None = None) -> dict[str, str]:
    """{parameter name: group} of every parameter a zero_gather node of `gm` gathers, also inside
    recomputed regions (runtime/recompute.py: a body whose placeholders are the call's `inputs`)."""
    out, inputs = {}, inputs or {}
    for node in gm.graph.nodes:
        body = getattr(gm.get_submodule(node.target), "body", None) if node.op == "call_module" else None
        if body is not None:
            places = [p for p in body.graph.nodes if p.op == "placeholder"]
            out |= gathered_params(body, {p: inputs.get(a, a) for p, a in zip(places, node.args)})
        elif node.op == "call_function" and contracts.of(node.target) is ZERO_GATHER:
            group = ZERO_GATHER.arg(node, "group")
            for shard in (inputs.get(s, s) for s in ZERO_GATHER.arg(node, "shards")):
                assert shard.op == "get_attr", f"{node.name}: shard {shard.name} is not a parameter"
                out[shard.target] = group
    return out


contracts.bind(ZERO_GATHER, zero_gather)
