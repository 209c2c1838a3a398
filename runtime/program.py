"""What the runtime executes: the compiled graph of one rank, and where its buffers live.

The compile driver (echoc/compile.py) produces a `Program` from a spec; the runtime
never compiles. `model` is the meta-device model the graph was traced from (this rank's
expert-shard shapes); `gm` calls into `model`'s submodules, so materializing `model` on a
device (`materialize`) makes `gm` runnable there with no second trace.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.fx import GraphModule

from echoc.spec import Spec
from runtime.arena import ArenaLayout


@dataclass
class Program:
    spec: Spec
    model: nn.Module                   # meta device until materialize(); shared with gm
    gm: GraphModule                    # the compiled iteration's forward (passes applied)
    arena_layout: ArenaLayout | None   # the memory plan's arena, or None (allocator / sync)


@torch.no_grad()
def materialize(program: Program, init: nn.Module, device: torch.device) -> nn.Module:
    """Allocate `program.model` on `device`, copy every parameter and buffer from `init` (a
    model of the same structure with this rank's expert shard, e.g. the seeded reference after
    shard_experts), and point the graph at the same tensors. Returns the model."""
    model, gm = program.model, program.gm
    model.to_empty(device=device)
    src = dict(init.named_parameters()) | dict(init.named_buffers())
    dst = dict(model.named_parameters()) | dict(model.named_buffers())
    assert src.keys() == dst.keys(), f"model and init differ: {sorted(src.keys() ^ dst.keys())[:6]}"
    for name, t in dst.items():
        assert t.shape == src[name].shape, f"{name}: compiled {tuple(t.shape)}, init {tuple(src[name].shape)}"
        t.copy_(src[name])
    _share_tensors(gm, model)
    return model


def _share_tensors(gm: GraphModule, model: nn.Module) -> None:
    """The trace gave the graph module its own holder modules for attributes read inside
    inlined modules (a norm's weight, a rope table); make every one of them hold the model's
    tensor of the same qualified name, so training updates what the graph reads."""
    tensors = dict(model.named_parameters()) | dict(model.named_buffers())
    for mod_name, mod in gm.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for table in (mod._parameters, mod._buffers):
            for field, t in table.items():
                if t is not None:
                    table[field] = tensors[prefix + field]
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        assert t is tensors[name], f"graph tensor {name} is not the model's"


@torch.no_grad()
def alias(program: Program, model: nn.Module) -> nn.Module:
    """Make `program` run on a model another program materialized: every parameter and buffer
    of `program.model` (and the graph's holders) becomes the very tensor of `model` with the
    same name (no copy), so an optimizer over `model` also trains `program`. Returns program.model."""
    src = dict(model.named_parameters()) | dict(model.named_buffers())
    for mod_name, mod in program.model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for table in (mod._parameters, mod._buffers):
            for field, t in table.items():
                if t is not None:
                    other = src[prefix + field]
                    assert t.shape == other.shape, f"{prefix}{field}: {tuple(t.shape)} vs {tuple(other.shape)}"
                    table[field] = other
    _share_tensors(program.gm, program.model)
    return program.model
