"""Refuse any node that would force a host sync or a data-dependent shape inside the step.

Runs only when `backends.cuda_graph` is 'full_iteration' (a captured iteration
cannot wait for the host); otherwise it reports what it found and passes.
Offenders: reading values to the host (.item, .tolist, .cpu, .numpy, int/float/bool
of a tensor), ops with data-dependent output shapes (nonzero, unique,
masked_select, bincount, repeat_interleave without output_size, …; and any op
tagged dynamic_output_shape or data_dependent_output), the `sync` backend's ops,
the host-looping grouped GEMM, and MoE blocks that were never rewritten.
"""
from __future__ import annotations

import builtins
from dataclasses import dataclass, field

import torch
from torch.fx import GraphModule, Node

from echoc.errors import EchocError
from echoc.spec import Spec
from passes.manager import PassResult
from runtime import contracts, grouped_gemm
from runtime.model import MoE

_HOST_METHODS = {"item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__", "nonzero",
                 "unique", "masked_select", "bincount", "repeat_interleave"}
_HOST_FUNCTIONS = {torch.nonzero, torch.unique, torch.masked_select, torch.bincount,
                   torch.repeat_interleave, torch.argwhere, builtins.int, builtins.float,
                   builtins.bool, torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu}


class SyncFreeError(EchocError):
    def __init__(self, offenders: list[tuple[str, str]]):
        self.offenders = offenders
        body = "\n".join(f"  {name}: {why}" for name, why in offenders)
        super().__init__("the step is not sync-free, so it cannot be captured as one CUDA graph "
                         f"(backends.cuda_graph 'full_iteration'):\n{body}")


@dataclass
class VerifyInfo:
    enforced: bool
    offenders: list[tuple[str, str]] = field(default_factory=list)


def _contract_why(node: Node) -> str | None:
    """What an echo op's contract says about host syncs: the `sync` backend's ops, and a grouped
    GEMM implementation that reads the expert offsets on the host."""
    c = contracts.of(node.target)
    if c is None:
        return None
    if c.host_sync:
        return f"{node.target} is the host-synced 'sync' backend (variable splits read on the host)"
    if "impl" in c.args and grouped_gemm.resolved_impl(c.arg(node, "impl")) in grouped_gemm.HOST_SYNC_IMPLS:
        return f"grouped_gemm '{c.arg(node, 'impl')}' reads expert offsets on the host"
    return None


def _why(node: Node, gm: GraphModule) -> str | None:
    t = node.target
    if node.op == "call_method" and t in _HOST_METHODS:
        return f"Tensor.{t}() reads data on the host or has a data-dependent shape"
    if node.op == "call_module" and isinstance(gm.get_submodule(t), MoE):
        return "MoE block not rewritten: the reference dropless MoE has data-dependent shapes"
    if node.op != "call_function":
        return None
    if (why := _contract_why(node)) is not None:
        return why
    if t is torch.repeat_interleave and "output_size" in node.kwargs:
        return None
    if t in _HOST_FUNCTIONS:
        return f"{getattr(t, '__name__', t)} reads data on the host or has a data-dependent shape"
    tags = getattr(t, "tags", ())
    if torch.Tag.dynamic_output_shape in tags or torch.Tag.data_dependent_output in tags:
        return f"{t} has a data-dependent output shape"
    return None


def find_offenders(gm: GraphModule) -> list[tuple[str, str]]:
    return [(n.name, why) for n in gm.graph.nodes if (why := _why(n, gm)) is not None]


def run(gm: GraphModule, spec: Spec) -> PassResult:
    enforced = spec.backends.cuda_graph == "full_iteration"
    offenders = find_offenders(gm)
    if enforced and offenders:
        raise SyncFreeError(offenders)
    return PassResult(gm, VerifyInfo(enforced, offenders))
