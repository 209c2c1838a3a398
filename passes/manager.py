"""The pass manager: an ordered list of passes, each timed and named.

A pass is `run(gm: GraphModule, spec: Spec) -> PassResult`. It returns a module
(it may be the same object, rewritten) and a small dataclass of what it
decided; it never runs collectives or allocates device memory. The default
pipeline, in order, is in passes/pipeline.py.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from torch.fx import Graph, GraphModule

from echoc.spec import Spec

try:  # torch ≥ 2.2; private, so without it graph modules are simply generated eagerly
    from torch.fx._lazy_graph_module import _make_graph_module
except ImportError:  # pragma: no cover
    _make_graph_module = GraphModule


def graph_module(root, graph: Graph, class_name: str) -> GraphModule:
    """A GraphModule that is lazy under the compile driver's lazy mode: its Python code is
    generated when first read or run, not at every pass's recompile."""
    return _make_graph_module(root, graph, class_name=class_name)


@dataclass
class PassResult:
    gm: GraphModule
    info: Any = None


@dataclass
class PassRecord:
    name: str
    ms: float
    info: Any


@dataclass
class Pipeline:
    passes: list[tuple[str, Callable[[GraphModule, Spec], PassResult]]] = field(default_factory=list)

    def run(self, gm: GraphModule, spec: Spec) -> tuple[GraphModule, list[PassRecord]]:
        records = []
        for name, fn in self.passes:
            t0 = time.perf_counter()
            result = fn(gm, spec)
            records.append(PassRecord(name, (time.perf_counter() - t0) * 1e3, result.info))
            gm = result.gm
        return gm, records

