"""The on-disk routing trace: `echoc run --record-routing` writes it, `echoc simulate --trace` reads it.

A trace is counts [steps, layers, ep, E] int64: how many token copies each source EP rank
routed to each expert, per step and MoE layer. On disk it is a `torch.save` of
{"counts": LongTensor}, or an `.npz` with the array "counts" (read only). A 3-D array
[steps, ep, E] is read as one layer.
"""
from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from echoc.errors import EchocError

FORMAT = "a torch.save of {'counts': LongTensor [steps, layers, ep, E]} or an .npz with array 'counts'"


class TraceError(EchocError):
    """A routing trace, or an option describing one, that cannot be used."""


def save_trace(counts: Tensor, path: str | Path) -> None:
    """Write counts [steps, layers, ep, E] (integers >= 0) to `path`, atomically."""
    assert counts.dim() == 4, f"routing counts must be [steps, layers, ep, E], got {tuple(counts.shape)}"
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    torch.save({"counts": counts.to(torch.int64).cpu()}, str(tmp))
    os.replace(tmp, path)


def load_trace(path: str | Path) -> Tensor:
    """Read a trace file → counts [steps, layers, ep, E] int64, checked: integers >= 0, no size 0."""
    path = Path(path)
    if not path.is_file():
        what = ("is a directory" if path.is_dir() else "is not a regular file (a FIFO, device or socket)"
                if path.exists() else "does not exist")
        raise TraceError(f"trace file {path} {what}; expected {FORMAT}")
    raw = _read_npz(path) if path.suffix == ".npz" else _read_torch(path)
    counts = _as_counts(raw, path)
    return counts.unsqueeze(1) if counts.dim() == 3 else counts


def _read_torch(path: Path) -> Tensor:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:   # torch.load of arbitrary bytes raises anything (KeyError, UnpicklingError, ...)
        raise TraceError(f"cannot read trace file {path} ({type(e).__name__}); expected {FORMAT}") from None
    if not isinstance(data, dict) or "counts" not in data:
        raise TraceError(f"{path} holds no key 'counts'; expected {FORMAT}")
    if not isinstance(data["counts"], Tensor):
        raise TraceError(f"{path}: 'counts' is a {type(data['counts']).__name__}, not a tensor; expected {FORMAT}")
    return data["counts"]


def _read_npz(path: Path) -> Tensor:
    try:
        with np.load(path, allow_pickle=False) as f:
            if "counts" not in f.files:
                raise TraceError(f"{path} has no array 'counts' (found: {', '.join(f.files) or 'none'})")
            array = f["counts"]
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as e:
        raise TraceError(f"cannot read trace file {path} ({type(e).__name__}); expected {FORMAT}") from None
    if array.dtype.kind not in "iuf":
        raise TraceError(f"{path}: 'counts' has dtype {array.dtype}; expected integers")
    if array.dtype.kind == "u" and array.size and int(array.max()) > np.iinfo(np.int64).max:
        raise TraceError(f"{path}: counts must be < 2**63 (found {int(array.max())})")
    return torch.from_numpy(np.ascontiguousarray(array))


def _as_counts(counts: Tensor, path: Path) -> Tensor:
    """Integer, finite, >= 0, [steps, layers, ep, E] or [steps, ep, E] with no size 0."""
    if counts.dim() not in (3, 4) or counts.numel() == 0:
        raise TraceError(f"{path}: counts have shape {tuple(counts.shape)}; expected [steps, layers, ep, E] "
                         f"(or [steps, ep, E]) with at least one step and one MoE layer")
    if counts.layout != torch.strided or counts.device.type != "cpu":
        raise TraceError(f"{path}: counts are a {counts.layout} tensor on {counts.device}; "
                         "expected a dense CPU tensor")
    if counts.dtype == torch.bool or counts.is_complex() or (counts.is_floating_point() and counts.dtype not in
                                                            (torch.float16, torch.bfloat16, torch.float32, torch.float64)):
        raise TraceError(f"{path}: counts have dtype {counts.dtype}; expected integers")
    if counts.is_floating_point():
        whole = torch.isfinite(counts) & (counts == counts.round()) & (counts.abs() <= 2**53)
        if not bool(whole.all()):
            raise TraceError(f"{path}: counts must be whole numbers (found NaN, inf, a fraction or > 2**53)")
    counts = counts.to(torch.int64)
    if bool((counts < 0).any()):
        raise TraceError(f"{path}: counts must be >= 0 (found {int(counts.min())})")
    return counts
