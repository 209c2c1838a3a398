"""The compile driver: spec → meta-device model → FX trace → passes → shapes → memory plan.

`compile_build(spec)` is the one compile: it returns a `Build` holding the runtime's
`Program` (the graph, the meta model it calls, the arena layout) and everything
`echoc compile` writes (echoc/artifact.py). `echoc run` executes a Build's Program; no
process compiles the same spec twice. Nothing here allocates real weights or runs a
collective: the 744B-parameter spec compiles on a laptop.
"""
from __future__ import annotations

import contextlib
import platform
import resource
import time
from dataclasses import asdict, dataclass, is_dataclass

import torch
import torch.fx
from torch.fx import GraphModule

try:  # torch ≥ 2.2; a private switch, so without it everything still works, only slower
    from torch.fx._lazy_graph_module import _use_lazy_graph_module
except ImportError:  # pragma: no cover
    _use_lazy_graph_module = None

import echoc
from echoc import accounting, memory_model
from echoc.memory_census import layer_census
from echoc.shapes import example_tokens, propagate_shapes  # noqa: F401  (part of the driver's API)
from echoc.spec import Spec
from echoc.spec_io import spec_hash
from passes import buffer_plan, cost_model, recompute, sync_free_dispatch
from passes.manager import PassRecord, graph_module
from passes.pipeline import default_pipeline
from runtime.dtypes import torch_dtype
from runtime.layers import RotaryEmbedding
from runtime.model import MoE, meta_transformer
from runtime.parallel import shard_experts
from runtime.program import Program


def _lazy_graph_modules():
    return _use_lazy_graph_module(True) if _use_lazy_graph_module else contextlib.nullcontext()


class MoELeafTracer(torch.fx.Tracer):
    """Keeps each MoE block as one call_module node (the passes rewrite it). Parameters and
    buffers are found by identity in a dict: fx's own lookup scans every parameter of the
    model on each attribute read, quadratic in the model's size (~1 s of glm5's trace)."""

    def __init__(self):
        super().__init__()
        self._names: tuple[dict[int, str], dict[int, str]] | None = None  # id → first name: params, buffers

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        # RoPE is a leaf too: no parameters, nothing a pass rewrites, and a third of a layer's
        # nodes inline (glm5: 40 % of the trace, shape-propagation and recompute-pass time)
        return isinstance(m, (MoE, RotaryEmbedding)) or super().is_leaf_module(m, qualname)

    def _name(self, t: torch.Tensor, kind: int) -> str | None:
        if self._names is None:
            self._names = ({}, {})
            for names, items in zip(self._names, (self.root.named_parameters(), self.root.named_buffers())):
                for n, v in items:
                    names.setdefault(id(v), n)
        return self._names[kind].get(id(t))

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        name = None
        if isinstance(attr_val, torch.nn.Parameter):
            name = self._name(attr_val, 0)
        if name is None and self.proxy_buffer_attributes and isinstance(attr_val, torch.Tensor):
            name = self._name(attr_val, 1)
        if name is None:
            return attr_val
        if name not in parameter_proxy_cache:
            parameter_proxy_cache[name] = self.create_proxy("get_attr", name, (), {})
        return parameter_proxy_cache[name]

    def create_arg(self, a):
        if isinstance(a, torch.Tensor):
            name = self._name(a, 0 if isinstance(a, torch.nn.Parameter) else 1)
            if name is not None:
                return self.create_node("get_attr", name, (), {})
        return super().create_arg(a)


def trace(model: torch.nn.Module) -> GraphModule:
    graph = MoELeafTracer().trace(model)
    return graph_module(model, graph, type(model).__name__)


def compile_graph(model: torch.nn.Module, spec: Spec) -> tuple[GraphModule, list[PassRecord]]:
    """Trace `model` (meta or real) and run the pass pipeline. Pure: no collectives, no allocation."""
    return default_pipeline().run(trace(model), spec)


@dataclass
class Build:
    """One compile of one spec: what `echoc run` executes and what `echoc compile` writes."""
    spec: Spec
    program: Program            # graph + meta model + arena layout (runtime/program.py)
    records: list[PassRecord]   # each pass: name, ms, what it decided
    memory_plan: object         # passes/buffer_plan's plan (lifetimes, offsets, totals)
    summary: dict               # summary.json


def compile_build(spec: Spec) -> Build:
    """Plan rank 0 on the meta device (every rank has the same shapes under the sync-free backends).
    Graph modules are lazy while the passes run: each pass's recompile only marks the code stale,
    and the Python code is generated once, when first read or run (saves ~1.5 s on glm5)."""
    with _lazy_graph_modules():
        return _compile_build(spec)


def _compile_build(spec: Spec) -> Build:
    t0 = time.perf_counter()
    model = meta_transformer(spec.model, torch_dtype(spec.model.dtype))
    params = accounting.count_parameters(model)
    groups, census = accounting.param_groups(spec, model), layer_census(spec)
    shard_experts(model, 0, spec.parallel.ep)
    gm, records = compile_graph(model, spec)
    propagate_shapes(gm, spec)
    t_plan = time.perf_counter()
    plan = buffer_plan.run(gm, spec).info
    records.append(PassRecord("buffer_plan", (time.perf_counter() - t_plan) * 1e3, None))
    layout = buffer_plan.arena_layout(plan) if spec.backends.uses_arena and plan.planned else None
    memory = memory_model.choose(spec, groups, census, plan)     # resolves train.recompute: auto
    memory_model.check_budget(spec, memory)
    t_rc = time.perf_counter()
    records.append(PassRecord("recompute", 0.0, recompute.apply(gm, memory.recompute).info))
    records[-1].ms = (time.perf_counter() - t_rc) * 1e3
    program = Program(spec, model, gm, layout)
    summary = _summary(spec, params, memory_model.to_json(memory), records, buffer_plan.plan_to_json(plan))
    summary["compile_seconds"] = round(time.perf_counter() - t0, 3)
    summary["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return Build(spec, program, records, plan, summary)


def _jsonable(x):
    return asdict(x) if is_dataclass(x) else x


def _summary(spec: Spec, params: dict, memory: dict, records: list[PassRecord], plan_json: dict) -> dict:
    return {
        "name": spec.model.name,
        "spec_hash": spec_hash(spec),
        "versions": {"echoc": echoc.__version__, "torch": torch.__version__, "python": platform.python_version()},
        "layers": spec.model.num_layers,
        "moe_layers": spec.model.num_moe_layers,
        "experts": spec.model.moe.num_experts,
        "world_size": spec.cluster.world_size,
        "parallel": {"ep": spec.parallel.ep, "dp": spec.parallel.dp},
        "parameters": params,
        "active_parameters_per_token": accounting.active_parameters_per_token(spec, params),
        "memory_per_rank_bytes": dict(memory["by_category"], total=memory["peak_bytes"]),
        "memory": memory,
        "dispatch": {"backend": spec.backends.dispatch, "exchange": spec.token_exchange,
                     "tokens_per_rank": spec.budgets.tokens,
                     "peer_chunk_rows": spec.peer_chunk_rows, "receive_rows": spec.receive_rows},
        "streams": {"device": spec.cluster.device, "shared_expert": sync_free_dispatch.overlap_shared(spec),
                    "weight_gradients_inline": sync_free_dispatch.wgrad_inline_reason(spec)},
        "echo": _echo_decision(spec),
        "passes": [{"name": r.name, "ms": round(r.ms, 2),
                    "info": _jsonable(r.info) if r.name != "buffer_plan"
                    else plan_json.get("totals", plan_json.get("reason"))} for r in records],
        "buffers": plan_json.get("totals", {"planned": False, "reason": plan_json.get("reason")}),
    }


def _echo_decision(spec: Spec) -> dict:
    """The cost model's view: what a clone costs and must save, and how many spare slots pay
    off under zipf(1.2) routing (predicted MoE ms per layer for 0..4 slots)."""
    if spec.parallel.ep == 1:
        return {"explain": "ep = 1: every expert is local, nothing to clone"}
    d = cost_model.clone_decision(spec)
    predicted = cost_model.recommend_spare_slots(spec)
    best = min(predicted, key=predicted.get)
    by_backend = cost_model.moe_ms_by_backend(spec)
    moved = ", ".join(f"{b} {ms:.3f}" for b, ms in by_backend.items())
    return {"clone_domain_ranks": d.domain_ranks, "link_gbps": d.link_gbps, "min_clone_rows": d.min_clone_rows,
            "predicted_moe_ms_by_spare_slots": predicted, "recommended_spare_slots": best,
            "predicted_moe_ms_by_backend": by_backend,
            "spec_spare_slots": spec.echo.spare_slots_per_rank, "enabled": spec.echo.enabled,
            "explain": d.explain + f" Under zipf(1.2) routing {best} spare slot(s) per rank minimise the "
                       f"predicted MoE time ({predicted[best]:.3f} ms/layer vs {predicted[0]:.3f} without cloning). "
                       f"Predicted MoE ms/layer by backend (no cloning; torch with exchange 'nccl' moves padded chunks, "
                       f"torch_p2p (exchange 'p2p'; this spec: '{spec.token_exchange}'), symm_mem and deepep only "
                       f"real rows): {moved}."}
