"""What `echoc inspect` shows, as plain functions over the artifacts `echoc compile` wrote:
the buffer table and the arena timeline (from plan.json) and the filtered graph listing
(from graph.txt). No compile-time objects needed, so they work on any build directory."""
from __future__ import annotations

from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from echoc.errors import EchocError, MissingDependencyError

SORTS = ("size", "layer")
_ROLE_COLORS = {
    "activation": "tab:blue", "gradient": "tab:orange", "exchange": "tab:green",
    "clone_weights": "tab:red", "clone_grad": "tab:pink", "clone_exchange": "tab:purple",
    "index": "tab:brown", "counts": "tab:gray", "plan": "tab:olive", "stats": "tab:cyan",
}


def human_bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{int(n)} B"


def _planned(plan_json: dict) -> dict:
    if not plan_json.get("planned"):
        raise EchocError(f"no buffer plan in this build: {plan_json.get('reason') or 'not planned'}")
    return plan_json


def _lifetime(b: dict) -> str:
    first, last = b["lifetime"]
    spans = len(b.get("live", [])) or 1
    return f"{first}–{last}" + (f" ({spans} spans)" if spans > 1 else "")


def _offset(b: dict) -> str:
    if b.get("placement", "arena") != "arena":
        return "alloc"
    return human_bytes(b["offset"]) if b["offset"] else "0"


def _sorted(buffers: list[dict], sort: str) -> list[dict]:
    if sort not in SORTS:
        raise EchocError(f"sort must be one of {', '.join(SORTS)} (got {sort!r})")
    if sort == "size":
        return sorted(buffers, key=lambda b: (-b["bytes"], b["name"]))
    return sorted(buffers, key=lambda b: (b["layer"] is not None, b["layer"] or 0, b["lifetime"][0], b["name"]))


def buffers_table(plan_json: dict, sort: str = "size", console: Console | None = None,
                  limit: int | None = None) -> Table:
    """Every planned buffer, one row each (sorted by size or by layer), totals in the caption.

    Prints to `console` when given; returns the rich Table either way."""
    plan = _planned(plan_json)
    t = plan["totals"]
    table = Table(title=f"buffer plan — ranks: {plan['ranks']}  ({t['arena_buffers']} of {t['buffers']} "
                        "buffers in one arena)",
                  caption=escape(f"arena {human_bytes(t['arena_bytes'])} · its lower bound "
                                 f"{human_bytes(t['lower_bound_bytes'])} (×{t['arena_over_lower_bound']:.4f}) · "
                                 f"naive sum {human_bytes(t['naive_bytes'])} · allocator-owned buffers "
                                 f"(offset 'alloc': grouped_mm outputs, graph outputs) peak at "
                                 f"{human_bytes(t['allocator_lower_bound_bytes'])} · all buffers together peak at "
                                 f"{human_bytes(t['total_lower_bound_bytes'])} · symmetric exchange pools "
                                 f"{human_bytes(t.get('symmetric_bytes', 0))} · {plan['note']}"))
    for col, justify in (("buffer", "left"), ("layer", "right"), ("role", "left"), ("shape", "left"),
                         ("dtype", "left"), ("bytes", "right"), ("lifetime (steps)", "right"),
                         ("offset", "right")):
        table.add_column(col, justify=justify)
    rows = _sorted(plan["buffers"], sort)
    for b in rows[:limit]:
        table.add_row(escape(b["name"]), "all" if b["layer"] is None else str(b["layer"]), b["role"],
                      escape(str(b["shape"])), b["dtype"], human_bytes(b["bytes"]),
                      _lifetime(b), _offset(b))
    if limit is not None and len(rows) > limit:
        table.add_row(f"… {len(rows) - limit} more", *[""] * 7)
    if console is not None:
        console.print(table)
    return table


def timeline_png(plan_json: dict, path: str | Path) -> Path:
    """Arena occupancy over the iteration: one band per buffer (x: its live steps, y: its
    bytes in the arena), coloured by role, with the lower bound and the arena size drawn."""
    plan = _planned(plan_json)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.collections import PolyCollection
        from matplotlib.patches import Patch
    except ImportError:
        raise MissingDependencyError("--timeline", "pip install 'echoc[plot]'") from None
    tot, tl = plan["totals"], plan["timeline"]
    unit, scale = next((u, s) for u, s in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10), ("B", 1))
                       if tot["arena_bytes"] >= s or s == 1)
    polys, colors = [], []
    placed = [b for b in plan["buffers"] if b.get("placement", "arena") == "arena"]
    for b in placed:
        lo, hi = b["offset"] / scale, (b["offset"] + b["bytes"]) / scale
        for first, last in b.get("live", [b["lifetime"]]):
            polys.append([(first, lo), (last + 1, lo), (last + 1, hi), (first, hi)])
            colors.append(_ROLE_COLORS.get(b["role"], "black"))
    fig, ax = plt.subplots(figsize=(15, 6))
    ax.add_collection(PolyCollection(polys, facecolors=colors, edgecolors="white", linewidths=0.2))
    ax.axhline(tot["lower_bound_bytes"] / scale, color="red", ls="--", lw=1,
               label=f"lower bound {human_bytes(tot['lower_bound_bytes'])}")
    ax.axhline(tot["arena_bytes"] / scale, color="black", lw=1, label=f"arena {human_bytes(tot['arena_bytes'])}")
    ax.axvline(tl["backward"][0], color="gray", lw=0.8)
    ax.set_xlim(0, tl["steps"])
    ax.set_ylim(0, tot["arena_bytes"] / scale * 1.05 or 1)
    ax.set_xlabel(f"step: forward 0–{tl['forward'][1]}, backward {tl['backward'][0]}–{tl['backward'][1]}, "
                  f"grad reduction {tl['grad_reduction']}, optimizer {tl['optimizer']}")
    ax.set_ylabel(f"arena offset ({unit})")
    ax.set_title(f"arena of the buffer plan, ranks: {plan['ranks']} — {len(placed)} of {tot['buffers']} buffers "
                 f"(the other {tot['buffers'] - len(placed)}, grouped_mm and graph outputs, come from the "
                 f"allocator: {human_bytes(tot['allocator_lower_bound_bytes'])} at their peak)")
    roles = sorted({b["role"] for b in placed})
    handles = [Patch(color=_ROLE_COLORS.get(r, "black"), label=r) for r in roles]
    ax.legend(handles=ax.get_legend_handles_labels()[0] + handles, loc="upper left", bbox_to_anchor=(1.0, 1.0),
              fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _layer_prefix(layer: int | str) -> str:
    text = str(layer)
    return f"layers_{text}_" if text.isdigit() else text.replace(".", "_").rstrip("_") + "_"


def graph_listing(graph_txt: str | Path, layer: int | str | None = None, op: str | None = None) -> str:
    """The lines of graph.txt (text, or a Path to it) whose node belongs to `layer` (3, '3' or
    'layers.3.mlp': node names start with 'layers_3_') and whose op column equals `op` or whose
    target contains it ('call_module', 'echo.dispatch', 'expert_ffn')."""
    text = graph_txt.read_text() if isinstance(graph_txt, Path) else graph_txt
    prefix = None if layer is None else _layer_prefix(layer)
    out = []
    for line in text.splitlines():
        cols = line.split(None, 3)
        if len(cols) < 3:
            continue
        name, kind, target = cols[:3]
        if prefix is not None and not name.startswith(prefix):
            continue
        if op is not None and kind != op and op not in target:
            continue
        out.append(line)
    return "\n".join(out) + ("\n" if out else "")


def memory_table(summary: dict, console: Console | None = None) -> Table:
    """The predicted peak of one rank (summary.json's `memory`): bytes by category at the peak
    phase, then every phase's total. Prints to `console` when given; returns the table."""
    mem = summary.get("memory")
    if not mem:
        raise EchocError("this build has no memory prediction; recompile it with `echoc compile`")
    budget = mem.get("budget_bytes")
    needs = (f", needs {human_bytes(mem['needs_bytes'])} with the allocator's headroom"
             if "needs_bytes" in mem else "")
    t = Table(title=f"{summary.get('name', '')}: predicted peak {human_bytes(mem['peak_bytes'])} per rank at "
                    f"{mem['peak_phase']}{needs} (recompute {mem['recompute']}, zero {mem['zero']}"
                    + (f", budget {human_bytes(budget)}" if budget else "") + ")")
    t.add_column("at the peak / phase")
    t.add_column("bytes", justify="right")
    t.add_column("share", justify="right")
    for name, n in sorted(mem["by_category"].items(), key=lambda kv: -kv[1]):
        t.add_row(name, human_bytes(n), f"{n / mem['peak_bytes']:.1%}")
    t.add_section()
    backward = {k: v for k, v in mem["phases"].items() if k.startswith("backward")}
    worst = max(backward, key=backward.get, default=None)      # one row for the layers' backward
    for name, n in mem["phases"].items():
        if name in backward and name != worst:
            continue
        mark = " [bold](peak)[/bold]" if name == mem["peak_phase"] else ""
        t.add_row(f"phase: {escape(name)}{mark}", human_bytes(n), f"{n / mem['peak_bytes']:.1%}")
    if console is not None:
        console.print(t)
    return t
