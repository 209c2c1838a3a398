"""The compile driver: meta-device model → FX trace → passes → shapes → artifacts.

`compile_graph` is shared with the runtime, which runs the same passes on the
real (sharded) model; `compile_spec` is what `echoc compile` calls: it never
allocates real weights.
"""
from __future__ import annotations

import json
import platform
import resource
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path

import torch
import torch.fx
from torch.fx import GraphModule
from torch.fx.passes.shape_prop import ShapeProp

import echoc
from echoc.spec import Spec
from passes.manager import PassRecord, default_pipeline
from runtime import grouped_gemm
from runtime.model import MoE, Transformer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


class MoELeafTracer(torch.fx.Tracer):
    """Keeps each MoE block as one call_module node (the passes rewrite it)."""

    def is_leaf_module(self, m: torch.nn.Module, qualname: str) -> bool:
        return isinstance(m, MoE) or super().is_leaf_module(m, qualname)


def trace(model: torch.nn.Module) -> GraphModule:
    graph = MoELeafTracer().trace(model)
    return GraphModule(model, graph, class_name=type(model).__name__)


def compile_graph(model: torch.nn.Module, spec: Spec) -> tuple[GraphModule, list[PassRecord]]:
    """Trace `model` (meta or real) and run the pass pipeline. Pure: no collectives, no allocation."""
    return default_pipeline().run(trace(model), spec)


def build_meta_model(spec: Spec) -> Transformer:
    with torch.device("meta"):
        return Transformer(spec.model).to(DTYPES[spec.model.dtype])


def example_tokens(spec: Spec, device="meta") -> torch.Tensor:
    b = spec.budgets
    return torch.zeros((b.micro_batch, b.seq_len), dtype=torch.int64, device=device)


class _PlanShapes(ShapeProp):
    """ShapeProp that takes the expert FFN's output shape from its contract ([R, H] like its
    input rows) instead of running the grouped GEMM, whose meta kernel insists on the CUDA
    dtype rules even for a CPU float32 plan."""

    def call_function(self, target, args, kwargs):
        if target in (grouped_gemm.expert_ffn, grouped_gemm.expert_ffn_recompute_clone):
            return torch.empty_like(args[0])
        return super().call_function(target, args, kwargs)


def propagate_shapes(gm: GraphModule, spec: Spec) -> None:
    """Fill node.meta['tensor_meta'] without real memory: meta tensors (fast), or fake tensors
    with a shape environment when the `sync` backend makes shapes data-dependent."""
    if spec.backends.dispatch != "sync":
        _PlanShapes(gm).propagate(example_tokens(spec))
        return
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True, static_shapes=True)
    _PlanShapes(gm, fake_mode=mode).propagate(example_tokens(spec))


def _fmt_meta(meta) -> str:
    if meta is None:
        return ""
    if hasattr(meta, "shape"):
        dt = str(meta.dtype).replace("torch.", "")
        return f"{dt}[{', '.join(str(s) for s in meta.shape)}]"
    if isinstance(meta, (tuple, list)):
        return "(" + ", ".join(_fmt_meta(m) for m in meta) + ")"
    return ""


def _fmt_target(node) -> str:
    t = node.target
    if node.op == "call_function":
        return getattr(t, "__qualname__", None) if not hasattr(t, "_schema") else str(t).replace(".default", "")
    return str(t)


def graph_listing(gm: GraphModule) -> str:
    """One node a line: name, op, target, args, and the output shape and dtype."""
    lines = []
    for n in gm.graph.nodes:
        args = ", ".join(a.name if isinstance(a, torch.fx.Node) else repr(a)
                         for a in torch.fx.node.map_arg(n.args, lambda x: x) if not isinstance(a, (list, tuple)))
        shape = _fmt_meta(n.meta.get("tensor_meta"))
        lines.append(f"{n.name:<40} {n.op:<13} {_fmt_target(n):<36} {shape:<28} ({args})")
    return "\n".join(lines) + "\n"


def buffer_plan_of(spec: Spec):
    """The buffer plan (passes/buffer_plan.py) of rank 0's compiled graph, on the meta device.
    Every rank has the same buffer shapes under the torch backend, so it holds for all ranks."""
    from passes import buffer_plan
    from runtime.parallel import shard_experts
    model = build_meta_model(spec)
    shard_experts(model, 0, spec.parallel.ep)
    gm, _ = compile_graph(model, spec)
    propagate_shapes(gm, spec)
    return buffer_plan.run(gm, spec).info


@dataclass
class CompileResult:
    out_dir: Path
    summary: dict


def _jsonable(x):
    if is_dataclass(x):
        return asdict(x)
    return x


def _echo_decision(spec: Spec) -> dict:
    """The cost model's view: what a clone costs and must save, and how many spare slots pay
    off under zipf(1.2) routing (predicted MoE ms per layer for 0..4 slots)."""
    from passes import cost_model
    if spec.parallel.ep == 1:
        return {"explain": "ep = 1: every expert is local, nothing to clone"}
    d = cost_model.clone_decision(spec)
    predicted = cost_model.recommend_spare_slots(spec)
    best = min(predicted, key=predicted.get)
    return {"clone_domain_ranks": d.domain_ranks, "link_gbps": d.link_gbps, "min_clone_rows": d.min_clone_rows,
            "predicted_moe_ms_by_spare_slots": predicted, "recommended_spare_slots": best,
            "spec_spare_slots": spec.echo.spare_slots_per_rank, "enabled": spec.echo.enabled,
            "explain": d.explain + f" Under zipf(1.2) routing {best} spare slot(s) per rank minimise the "
                       f"predicted MoE time ({predicted[best]:.3f} ms/layer vs {predicted[0]:.3f} without cloning)."}


def compile_spec(spec: Spec, out_dir: str | Path | None = None) -> CompileResult:
    """`echoc compile`: plan on the meta device and write build/<name>/."""
    from echoc import accounting
    from echoc.spec_io import spec_hash
    t0 = time.perf_counter()
    from runtime.parallel import shard_experts
    model = build_meta_model(spec)
    params = accounting.count_parameters(model)
    memory = accounting.memory_per_rank(spec, model)
    shard_experts(model, 0, spec.parallel.ep)  # the graph lists rank 0's shapes
    gm, records = compile_graph(model, spec)
    propagate_shapes(gm, spec)
    out = Path(out_dir or Path("build") / spec.model.name)
    out.mkdir(parents=True, exist_ok=True)
    from passes import buffer_plan
    t_plan = time.perf_counter()
    plan = buffer_plan.plan_to_json(buffer_plan.run(gm, spec).info)
    plan_ms = (time.perf_counter() - t_plan) * 1e3
    (out / "plan.json").write_text(json.dumps(plan, indent=1))
    (out / "graph.txt").write_text(graph_listing(gm))
    (out / "graph.py").write_text(gm.code)
    summary = {
        "name": spec.model.name,
        "spec_hash": spec_hash(spec),
        "versions": {"echoc": echoc.__version__, "torch": torch.__version__,
                     "python": platform.python_version()},
        "layers": spec.model.num_layers,
        "moe_layers": spec.model.num_moe_layers,
        "experts": spec.model.moe.num_experts,
        "world_size": spec.cluster.world_size,
        "parallel": {"ep": spec.parallel.ep, "dp": spec.parallel.dp},
        "parameters": params,
        "active_parameters_per_token": accounting.active_parameters_per_token(spec, params),
        "memory_per_rank_bytes": memory,
        "dispatch": {"backend": spec.backends.dispatch, "tokens_per_rank": spec.budgets.tokens,
                     "peer_chunk_rows": spec.peer_chunk_rows, "receive_rows": spec.receive_rows},
        "echo": _echo_decision(spec),
        "passes": [{"name": r.name, "ms": round(r.ms, 2), "info": _jsonable(r.info)} for r in records]
                  + [{"name": "buffer_plan", "ms": round(plan_ms, 2), "info": plan.get("totals", plan.get("reason"))}],
        "buffers": plan.get("totals", {"planned": False, "reason": plan.get("reason")}),
        "compile_seconds": round(time.perf_counter() - t0, 3),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    (out / "spec.json").write_text(spec.model_dump_json(indent=2))
    return CompileResult(out, summary)
