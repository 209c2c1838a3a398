"""A simulation's result for people: one rich table, a JSON file, a plot of straggler per step."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

from rich.console import Console
from rich.table import Table

from echoc.errors import MissingDependencyError
from echoc.simulate.result import SimResult, Stat

COLUMNS = ("strategy", "token straggler", "GEMM straggler", "overflow %", "tokens MiB", "weights MiB", "MoE ms")


def _fmt(s: Optional[Stat], scale: float = 1.0, digits: int = 3) -> str:
    if s is None:
        return "-"
    return f"{s.mean * scale:.{digits}f} ({s.max * scale:.{digits}f})"


def print_table(result: SimResult, console: Console) -> None:
    """One rich table: a row per strategy, mean (max) of each metric; then the notes."""
    r = result
    table = Table(title=f"{r.spec_name}: ep {r.ep}, {r.experts} experts, {r.spares} spare slot(s)/rank, "
                        f"{r.steps} steps × {r.layers} layer(s), {r.source} — mean (max)")
    for col in COLUMNS:
        table.add_column(col, justify="left" if col == "strategy" else "right")
    for name, m in r.metrics.items():
        table.add_row(name, _fmt(m.token_straggler), _fmt(m.gemm_straggler), _fmt(m.overflow_rate, 100, 2),
                      _fmt(m.token_bytes, 2**-20, 1), _fmt(m.weight_bytes, 2**-20, 1), _fmt(m.moe_ms))
    console.print(table)
    for note in r.notes:
        console.print(f"  note: {note}")


def write_json(result: SimResult, path: str | Path) -> None:
    """The whole result as JSON (dataclasses as objects), creating the parent directory."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(asdict(result), indent=2) + "\n")


def plot(result: SimResult, path: str | Path) -> None:
    """Token straggler per step, one line per strategy, saved to `path` (needs matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise MissingDependencyError("--plot", "pip install 'echoc[plot]'") from None
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, ys in result.series.items():
        ax.plot(range(len(ys)), ys, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("token straggler (max / mean rank rows)")
    ax.set_title(f"{result.spec_name}: ep {result.ep}, {result.source}")
    ax.axhline(1.0, color="grey", linewidth=0.5)
    ax.legend()
    fig.tight_layout()
    fig.savefig(str(path))
    plt.close(fig)
