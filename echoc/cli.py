"""The echoc command line. Thin: parse, call one function, print its result with rich.

Errors a user can cause (EchocError) are printed without a traceback and exit 2.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import List, Optional

import typer
from typer.exceptions import TyperException
from rich.console import Console
from rich.table import Table

from echoc import artifact, preflight
from echoc import simulate as sim
from echoc import views
from echoc.artifact import write_build
from echoc.compile import compile_build
from echoc.errors import EchocError, StoppedBySignal
from echoc.run import RunRequest, in_torchrun, start, stopped, worker
from echoc.spec_io import json_schema, load_spec

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="echoc: compile a YAML MoE training spec into a sync-free, load-balanced step.")
console = Console()
err_console = Console(stderr=True, soft_wrap=True)  # one error, one line

SetOpt = typer.Option(None, "--set", help="Override a spec field, e.g. --set parallel.ep=2 (repeatable).")


def _load(spec_path: str, overrides: Optional[List[str]]):
    return load_spec(spec_path, list(overrides or []))


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB"


def _streams_text(s: dict) -> str:
    """What runs beside the main stream: the shared expert, the expert weight gradients (or why not)."""
    if s["device"] != "cuda":
        return "none (cpu: one stream)"
    why = s["weight_gradients_inline"]
    return "; ".join(["shared expert" if s["shared_expert"] else "shared expert inline",
                      "expert weight gradients" if why is None else f"expert weight gradients inline ({why})"])


@app.command()
def validate(spec: str, set_: Optional[List[str]] = SetOpt):
    """Check a spec and print its derived sizes."""
    s = _load(spec, set_)
    console.print(f"[green]ok[/green] {spec}: {s.model.name}, world {s.cluster.world_size} "
                  f"(ep {s.parallel.ep} × dp {s.parallel.dp}), {s.budgets.tokens} tokens/rank, "
                  f"receive buffer {s.receive_rows} rows ({s.peer_chunk_rows} per peer)")


@app.command()
def schema():
    """Print the spec's JSON schema (for editor completion)."""
    print(json.dumps(json_schema(), indent=2))


@app.command("compile")
def compile_(spec: str, out: Optional[str] = typer.Option(None, "-o", "--out", help="Output directory."),
             set_: Optional[List[str]] = SetOpt):
    """Trace on the meta device, run the passes, write build/<name>/."""
    s = _load(spec, set_)
    target = Path("build") / s.model.name if out is None else out
    artifact.check_build_target(target)
    out_dir = preflight.check_output_dir(target, "-o")
    build = compile_build(s)
    out_dir = write_build(build, out_dir)
    _print_summary(build.summary)
    console.print(f"wrote {out_dir}/ (graph.txt, graph.py, plan.json, spec.json, summary.json) in "
                  f"{build.summary['compile_seconds']:.2f} s, peak RSS {build.summary['peak_rss_mib']:.0f} MiB")


def _print_summary(summary: dict) -> None:
    t = Table(title=f"{summary['name']}  (spec {summary['spec_hash']})")
    t.add_column("item")
    t.add_column("value", justify="right")
    params = summary["parameters"]
    t.add_row("layers (MoE)", f"{summary['layers']} ({summary['moe_layers']})")
    t.add_row("experts", str(summary["experts"]))
    t.add_row("world (ep × dp)", f"{summary['world_size']} ({summary['parallel']['ep']} × {summary['parallel']['dp']})")
    t.add_row("parameters (total)", f"{sum(params.values()) / 1e9:,.2f} B")
    t.add_row("active parameters / token", f"{summary['active_parameters_per_token'] / 1e9:,.2f} B")
    mem = summary["memory_per_rank_bytes"]
    for k, v in mem.items():
        if isinstance(v, (int, float)):
            t.add_row(f"memory/rank: {k}", _gib(v))
    d, moe = summary["dispatch"], summary["moe_layers"] > 0
    t.add_row("dispatch backend", d["backend"] + (f" (exchange {d['exchange']})" if d["backend"] == "torch" else "")
              if moe else "none (no MoE layer)")
    b = summary.get("buffers", {})
    if "arena_bytes" in b:
        t.add_row("MoE buffer arena / rank", f"{_gib(b['arena_bytes'])} for {b['arena_buffers']} buffers (lower bound "
                  f"{_gib(b['lower_bound_bytes'])}, naive {_gib(b['naive_bytes'])})")
        t.add_row("MoE buffers from the allocator", f"{b['allocator_buffers']} (grouped_mm outputs), peak "
                  f"{_gib(b['allocator_lower_bound_bytes'])}; all MoE buffers peak {_gib(b['total_lower_bound_bytes'])}")
    if b.get("symmetric_bytes"):
        t.add_row("symmetric exchange pools / rank", f"{_gib(b['symmetric_bytes'])} (held all run, outside the arena)")
    if moe:
        t.add_row("receive buffer rows/layer", f"{d['receive_rows']:,} ({d['peer_chunk_rows']:,} per peer)")
        if "streams" in summary:
            t.add_row("second CUDA streams", _streams_text(summary["streams"]))
    for p in summary["passes"]:
        t.add_row(f"pass {p['name']}", f"{p['ms']:.1f} ms")
    console.print(t)
    echo = summary.get("echo", {})
    if "recommended_spare_slots" in echo and moe:
        state = "on" if echo["enabled"] else "off"
        console.print(f"[bold]ECHO[/bold] ({state}, {echo['spec_spare_slots']} spare slot(s)/rank in the spec, "
                      f"cost model recommends {echo['recommended_spare_slots']}): {echo['explain']}")


@app.command()
def inspect(build_dir: str, graph: bool = typer.Option(False, "--graph", help="Print the graph listing."),
            grep: Optional[str] = typer.Option(None, "--filter", help="With --graph: only lines containing this."),
            layer: Optional[str] = typer.Option(None, "--layer", help="With --graph: one layer (3 or layers.3.mlp)."),
            op: Optional[str] = typer.Option(None, "--op", help="With --graph: one op kind or target (echo.dispatch)."),
            buffers: bool = typer.Option(False, "--buffers", help="The static buffers and their arena offsets."),
            sort: str = typer.Option("size", "--sort", help="With --buffers: size or layer."),
            limit: Optional[int] = typer.Option(None, "--limit", help="With --buffers: first N rows."),
            timeline: Optional[str] = typer.Option(None, "--timeline", help="Write a PNG of arena occupancy here."),
            memory: bool = typer.Option(False, "--memory", help="Where a rank's memory goes: the predicted peak "
                                                                 "by category and phase.")):
    """Show what `echoc compile` wrote."""
    d = Path(build_dir)
    if sort not in ("size", "layer"):
        raise EchocError(f"--sort must be 'size' or 'layer', not {sort!r}")
    if limit is not None and limit < 1:
        raise EchocError(f"--limit must be a positive number of rows, not {limit}")
    if (grep or layer or op) and not graph:
        raise EchocError("--filter, --layer and --op select lines of the graph listing: add --graph")
    summary, texts = artifact.read_build(d)        # every file there, checked against its hash
    if memory:
        _summary_view(d, views.memory_table, summary, console=console)
    elif graph:
        text = views.graph_listing(d / "graph.txt", layer=layer, op=op)
        lines = [line for line in text.splitlines() if grep is None or grep in line]
        for line in lines:
            console.print(line, markup=False, highlight=False)
        if not lines:
            raise EchocError("no line of the graph listing matches " + ", ".join(
                f"{k} {v!r}" for k, v in (("--layer", layer), ("--op", op), ("--filter", grep)) if v))
    elif buffers or timeline:
        plan = json.loads(texts["plan.json"])      # hash-checked: as compile wrote it
        if buffers:
            views.buffers_table(plan, sort=sort, console=console, limit=limit)
        if timeline:
            console.print(f"wrote {views.timeline_png(plan, timeline)}")
    else:
        _summary_view(d, _print_summary, summary)


def _summary_view(d: Path, view, summary: dict, **kw) -> None:
    """A view of summary.json (not hash-checked: it holds the hashes): a field it lacks is an
    error naming the file, not a traceback."""
    try:
        view(summary, **kw)
    except (KeyError, TypeError, AttributeError) as e:
        raise artifact.BuildError(f"{d}/summary.json lacks what this view needs ({type(e).__name__}: {e}): made "
                                  "by another echoc or edited; recompile with `echoc compile`") from None


@app.command()
def run(spec: Optional[str] = typer.Argument(None, help="Spec YAML (or use --from-build)."),
        nproc: Optional[int] = typer.Option(None, "--nproc", help="Processes per node."),
        nnodes: str = typer.Option("1", "--nnodes", help="Nodes (torchrun syntax, e.g. 2 or 1:4)."),
        rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="host:port for multi-node."),
        max_restarts: int = typer.Option(0, "--max-restarts", help="torchrun elastic restarts."),
        from_build: Optional[str] = typer.Option(None, "--from-build", help="Run what `echoc compile` built here."),
        metrics: Optional[str] = typer.Option(None, "--metrics", help="JSONL metrics file (rank 0)."),
        tensorboard: Optional[str] = typer.Option(None, "--tensorboard", help="Also write TensorBoard events here."),
        record_routing: Optional[str] = typer.Option(None, "--record-routing",
                                                     help="Write routing counts [steps, layers, ep, E] here."),
        resume: bool = typer.Option(False, "--resume", help="Continue from the newest verified checkpoint "
                                    "(an error when there is none)."),
        resume_or_start: bool = typer.Option(False, "--resume-or-start",
                                             help="Like --resume, but start from step 0 when there is no checkpoint."),
        resume_with_changes: bool = typer.Option(False, "--resume-with-changes",
                                                 help="Resume although the spec changed, if only lr, the schedule, "
                                                      "steps, log or checkpoint settings did."),
        set_: Optional[List[str]] = SetOpt):
    """Train: launches torchrun (or, inside torchrun, runs this rank)."""
    mode = _resume_mode(resume, resume_or_start, resume_with_changes)
    req = _run_request(spec, from_build, set_, metrics, record_routing, tensorboard, mode)
    req.resume_with_changes = resume_with_changes
    req.launcher = {"nproc": nproc, "nnodes": nnodes, "rdzv_endpoint": rdzv_endpoint, "max_restarts": max_restarts}
    if not in_torchrun():
        start(req, _worker_argv(req, spec, set_))
        return
    try:
        hist = worker(req)
    except StoppedBySignal as e:
        stopped(e)
        return
    if int(os.environ.get("RANK", "0")) == 0 and hist:
        console.print(f"done: {len(hist)} steps, loss {hist[0]['loss']:.4f} → {hist[-1]['loss']:.4f}, "
                      f"overflow {sum(h['overflow'] for h in hist)}, reruns {sum(h['rerun'] for h in hist)}, "
                      f"skipped {sum(h['skipped'] for h in hist)}; metrics in {req.metrics}")


def _resume_mode(resume: bool, or_start: bool, with_changes: bool) -> str:
    if resume and or_start:
        raise EchocError("give --resume or --resume-or-start, not both")
    if with_changes and not (resume or or_start):
        raise EchocError("--resume-with-changes needs --resume or --resume-or-start")
    return "must" if resume else "or_start" if or_start else "no"


def _run_request(spec, from_build, overrides, metrics, record_routing, tensorboard, resume) -> RunRequest:
    if spec is not None and from_build is not None:
        raise EchocError("give a SPEC or --from-build DIR, not both: a build already holds its spec")
    if spec is None and from_build is None:
        raise EchocError("echoc run needs a SPEC file or --from-build DIR")
    if from_build is not None and overrides:
        raise EchocError("--set cannot change a compiled build; recompile with the override instead")
    s = _load(spec, overrides) if spec is not None else None
    name = s.model.name if s is not None else Path(from_build).name
    metrics = metrics or (s.train.metrics_path if s is not None else None) or str(Path("runs") / name / "metrics.jsonl")
    absolute = lambda p: str(Path(p).resolve()) if p else None  # noqa: E731
    return RunRequest(s, absolute(from_build), absolute(metrics), absolute(record_routing),
                      absolute(tensorboard), resume, spec_path=absolute(spec))


def _worker_argv(req: RunRequest, spec_path: Optional[str], overrides) -> list[str]:
    argv = ["run"] + ([str(Path(spec_path).resolve())] if spec_path else [])
    argv += ["--metrics", req.metrics]
    for flag, value in (("--from-build", req.from_build), ("--record-routing", req.record_routing),
                        ("--tensorboard", req.tensorboard)):
        if value:
            argv += [flag, value]
    argv += {"must": ["--resume"], "or_start": ["--resume-or-start"], "no": []}[req.resume]
    if req.resume_with_changes:
        argv += ["--resume-with-changes"]
    for o in overrides or []:
        argv += ["--set", o]
    return argv


@app.command()
def simulate(spec: str,
             trace: Optional[str] = typer.Option(None, "--trace", help="Routing trace (echoc run --record-routing)."),
             skew: Optional[str] = typer.Option(None, "--skew", help="Synthetic zipf skew, e.g. zipf:1.2."),
             drift: Optional[str] = typer.Option(None, "--drift", help="Drifting hot experts, e.g. zipf:1.2,rate:0.1."),
             steps: Optional[int] = typer.Option(None, "--steps"),
             layers: int = typer.Option(1, "--layers", help="Layers of a synthetic trace."),
             out: Optional[str] = typer.Option(None, "--out", help="JSON result file."),
             plot_path: Optional[str] = typer.Option(None, "--plot", help="Write a PNG of straggler per step."),
             set_: Optional[List[str]] = SetOpt):
    """Planner + cost model on routing traces, no GPU: stragglers, overflow, bytes, time per strategy."""
    s = _load(spec, set_)
    if not s.model.num_moe_layers:
        raise EchocError(f"{spec}: every layer is dense (model.first_dense_layers = model.num_layers = "
                         f"{s.model.num_layers}): no routing to simulate")
    out = out or str(Path("build") / s.model.name / "simulate.json")
    inputs = {"the spec file": spec, "the routing trace (--trace)": trace}
    preflight.check_output_file(out, "--out", "json", inputs)          # before the simulation, not after it
    if plot_path:
        kind = "png" if Path(plot_path).suffix.lower() == ".png" else None    # matplotlib writes svg, pdf, ...
        preflight.check_output_file(plot_path, "--plot", kind, {**inputs, "the --out file": out})
    res = sim.simulate(s, trace=trace, skew=skew, drift=drift, steps=steps, layers=layers)
    sim.print_table(res, console)
    sim.write_json(res, out)
    if plot_path:
        sim.plot(res, plot_path)
    console.print(f"wrote {out}" + (f" and {plot_path}" if plot_path else ""))


def main():
    try:
        app(standalone_mode=False)
    except EchocError as e:
        _error(str(e), e.exit_code)
    except TyperException as e:  # the command line itself: an unknown option, a bad value
        if type(e).__name__ == "NoArgsIsHelpError":  # `echoc` alone prints the help
            e.show()
            sys.exit(0)
        _error(f"{e.format_message()} (see `echoc --help`)")
    except (KeyboardInterrupt, typer.Abort):
        err_console.print("interrupted")
        sys.exit(130)
    except OSError as e:   # the file system refused a path the user gave (a name too long, a loop of links)
        _error(f"{e.strerror or type(e).__name__}: {preflight.short_path(e.filename or '')}")


def _error(message: str, code: int = 2) -> None:
    """One line on stderr, exit 2 (or `code`), no traceback."""
    err_console.print("[red]error:[/red] ", end="")
    err_console.print(message, markup=False, highlight=False)  # messages hold [brackets]
    sys.exit(code)
