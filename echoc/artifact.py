"""The build directory: what `echoc compile` writes and what `echoc run --from-build` executes.

    build/<name>/graph.txt     one node a line: name, op, target, output shape and dtype
                 graph.py      the compiled forward (torch.fx code)
                 plan.json     the memory plan: every buffer, its lifetime, its arena offset
                 spec.json     the exact spec compiled
                 summary.json  parameters, memory per rank, passes, and the sha256 of each file above

Loading a build checks every file against summary.json's hashes (an edited or truncated
file is refused), compiles its spec.json in memory, refuses the build if this echoc and
torch emit a different graph or plan than the files hold, and runs the arena layout read
from plan.json itself.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.fx

from echoc.compile import Build, compile_build
from echoc.errors import EchocError
from echoc.spec_io import spec_from_dict, spec_hash
from passes.buffer_plan import plan_to_json
from runtime.arena import ArenaLayout, View
from runtime.recompute import Recompute

HASHED = ("graph.txt", "graph.py", "plan.json", "spec.json")


class BuildError(EchocError):
    """A build directory that is missing, unreadable, edited, or from another compiler."""


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


def graph_listing(gm: torch.fx.GraphModule, indent: str = "") -> str:
    """One node a line: name, op, target, args, and the output shape and dtype. A recomputed
    region (passes/recompute.py) is followed by its body's nodes, indented."""
    lines = []
    for n in gm.graph.nodes:
        flat = list(n.args) + list(n.kwargs.values())
        args = ", ".join(a.name if isinstance(a, torch.fx.Node) else repr(a)
                         for a in flat if not isinstance(a, (list, tuple)))
        shape = _fmt_meta(n.meta.get("tensor_meta"))
        lines.append(f"{indent}{n.name:<40} {n.op:<13} {_fmt_target(n):<36} {shape:<28} ({args})")
        region = gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(region, Recompute):
            lines.append(graph_listing(region.body, indent + "    ").rstrip("\n"))
    return "\n".join(lines) + "\n"


def build_files(build: Build) -> dict[str, str]:
    """The text of every hashed file of `build`."""
    return {"graph.txt": graph_listing(build.program.gm), "graph.py": build.program.gm.code,
            "plan.json": json.dumps(plan_to_json(build.memory_plan), indent=1),
            "spec.json": build.spec.model_dump_json(indent=2)}


def _sha256(text: str | bytes) -> str:
    data = text.encode() if isinstance(text, str) else text
    return hashlib.sha256(data).hexdigest()


def check_build_target(out_dir: str | Path) -> None:
    """A build may go into a new or empty directory, or replace an earlier build; it never
    overwrites files of the same names that some other program wrote."""
    out = Path(out_dir)
    if str(out_dir).strip() == "":
        raise BuildError("-o is empty: give the build's directory (default build/<model.name>)")
    if not out.is_dir():
        return
    clash = sorted(name for name in HASHED + ("summary.json",) if (out / name).exists())
    if not clash:
        return
    try:
        summary = json.loads((out / "summary.json").read_text())
        ours = isinstance(summary, dict) and "spec_hash" in summary     # a build, or one cut short
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        ours = False
    if not ours:
        raise BuildError(f"-o {out}: holds {', '.join(clash)} that no `echoc compile` wrote; choose another "
                         "directory (a build never overwrites other files)")


def write_build(build: Build, out_dir: str | Path) -> Path:
    """Write build/<name>/ (or out_dir). summary.json first without the file hashes (the directory
    is an echoc build from then on: a compile cut short may be redone there), and whole last:
    a build cut short has no hashes, and loading it says so."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise BuildError(f"-o {out}: a file is in the way (a build is a directory)")
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"spec_hash": build.summary.get("spec_hash"),
                                                      "complete": False}))
        files = build_files(build)
        for name, text in files.items():
            (out / name).write_text(text)
        summary = dict(build.summary, files={name: _sha256(text) for name, text in files.items()})
        (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    except OSError as e:
        raise BuildError(f"cannot write the build to {out}: {e.strerror or e}") from None
    return out


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except FileNotFoundError:
        raise BuildError(f"{path.parent}: no {path.name} here; run `echoc compile SPEC -o {path.parent}` "
                         f"first ({what})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise BuildError(f"{path}: cannot read it ({e}); recompile with `echoc compile`") from None


def _json(path: Path, what: str) -> dict:
    try:
        data = json.loads(_read(path, what))
    except json.JSONDecodeError as e:
        raise BuildError(f"{path} is not valid JSON (line {e.lineno}): truncated or edited; "
                         "recompile with `echoc compile`") from None
    if not isinstance(data, dict):
        raise BuildError(f"{path}: expected a JSON object; recompile with `echoc compile`")
    return data


def read_build(build_dir: str | Path) -> tuple[dict, dict[str, str]]:
    """(summary, {file name: text}) of an earlier `echoc compile`, each file checked against
    summary.json's sha256: a missing, damaged or edited build is a BuildError naming the file."""
    d = Path(build_dir)
    if not d.is_dir():
        raise BuildError(f"{d}: not a build directory; run `echoc compile SPEC -o {d}` first")
    summary = _json(d / "summary.json", "the build's index")
    recorded = summary.get("files")
    if not isinstance(recorded, dict) or set(recorded) != set(HASHED):
        raise BuildError(f"{d}/summary.json lists no file hashes: a compile cut short, an older echoc's "
                         "build, or not a build; recompile")
    texts = {name: _read(d / name, "part of the build") for name in HASHED}
    for name in HASHED:
        if _sha256(texts[name]) != recorded[name]:
            raise BuildError(f"{d / name} was changed after `echoc compile` wrote it (sha256 differs from "
                             "summary.json); recompile instead of editing a build")
    return summary, texts


def load_build(build_dir: str | Path) -> Build:
    """The Build of an earlier `echoc compile`, verified: every file matches summary.json's sha256,
    and compiling its spec.json here gives the same graph and plan. Its Program's arena
    layout is read from plan.json."""
    d = Path(build_dir)
    summary, texts = read_build(d)
    try:
        raw = json.loads(texts["spec.json"])
    except ValueError as e:
        raise BuildError(f"{d / 'spec.json'} is not JSON ({e}); recompile with `echoc compile`") from None
    if not isinstance(raw, dict):
        raise BuildError(f"{d / 'spec.json'} holds a {type(raw).__name__}, not a spec; recompile with `echoc compile`")
    spec = spec_from_dict(raw, source=str(d / "spec.json"))
    if spec_hash(spec) != summary.get("spec_hash"):
        raise BuildError(f"{d}: spec.json does not match summary.json's spec hash; recompile")
    build = compile_build(spec)
    fresh = build_files(build)
    for name in ("graph.py", "plan.json"):
        if _sha256(fresh[name]) != summary["files"][name]:
            versions = summary.get("versions", {})
            raise BuildError(f"{d / name}: this echoc {summary.get('versions', {}).get('echoc', '?')} / torch "
                             f"{torch.__version__} compiles the spec to a different {name} than the build holds "
                             f"(built with torch {versions.get('torch', '?')}); recompile")
    if build.program.arena_layout is not None:
        build.program.arena_layout = arena_layout_from_json(json.loads(texts["plan.json"]))
    return build


def arena_layout_from_json(plan: dict) -> ArenaLayout:
    """The runtime's arena layout as plan.json states it (offsets, shapes, dtypes per key)."""
    views: dict[str, View] = {}
    for b in plan["buffers"]:
        if b["placement"] != "arena":
            continue
        dtype = getattr(torch, b["dtype"])
        parts = b.get("parts") or [{"name": b["name"], "shape": b["shape"], "offset_bytes": 0,
                                    "keys": b.get("keys", [b["name"]])}]
        for p in parts:
            for key in p.get("keys", [p["name"]]):
                assert key not in views, f"arena key {key!r} planned twice"
                views[key] = View(b["offset"] + p["offset_bytes"], tuple(p["shape"]), dtype)
    totals = plan["totals"]
    regions = totals.get("held_regions", [])
    bounds = tuple(r["lo"] for r in regions) + (totals.get("held_bytes", 0),)
    return ArenaLayout(totals["arena_bytes"], views, bounds, tuple(r["layer"] for r in regions))
