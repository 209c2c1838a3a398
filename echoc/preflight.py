"""What `echoc run` and `echoc compile` check before any worker starts, so a run never fails at
its end for something knowable at its start: every output path is writable (probed by creating
a file), every input is usable, and a resume has a checkpoint of this spec to resume from."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

from echoc.errors import EchocError
from echoc.spec import Spec
from runtime import p2p
from runtime.checkpoint import check_fresh_dir
from runtime.checkpoint_files import (CheckpointError, check_spec, check_steps, check_unlocked, newest_whole,
                                      read_marker)
from runtime.data import check_text_file


class OutputPathError(EchocError):
    """An output path that cannot be written."""


def _existing_ancestor(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def short_path(p: str | Path, limit: int = 200) -> str:
    """A path as a message shows it: at most `limit` characters (a name too long is the error)."""
    text = str(p)
    return text[:limit] + ("…" if len(text) > limit else "")


def _os_error(what: str, p: Path, e: OSError) -> OutputPathError:
    return OutputPathError(f"{what} {short_path(p)} cannot be used "
                           f"({e.strerror or type(e).__name__}); give another path")


def check_output_dir(path: str | Path, what: str) -> Path:
    """Create directory `path` (and parents) and prove a file can be written in it."""
    p = Path(path)
    try:
        base = _existing_ancestor(p)
        if p.exists() and not p.is_dir():
            raise OutputPathError(f"{what} {p} is a file, not a directory; give a directory path")
        if not base.is_dir():
            raise OutputPathError(f"{what} {p} cannot be created: {base} is a file, not a directory")
    except OSError as e:            # a name too long, a loop of links
        raise _os_error(what, p, e) from None
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=p, prefix=".echoc-probe-"):
            pass
    except OSError as e:
        raise OutputPathError(f"{what} {p} is not writable ({e.strerror or type(e).__name__}); "
                              "choose a directory you can write to") from None
    return p


# what an existing output file must look like for echoc to write over it: its own earlier output
_OWN = {"jsonl": "echoc's JSON lines", "json": "an echoc JSON result", "torch": "an echoc routing trace",
        "png": "a PNG image"}


def _looks_like(p: Path, kind: str) -> bool:
    with open(p, "rb") as f:
        head = f.read(8)
    if not head:
        return True
    return {"jsonl": head[:1] == b"{", "json": head[:1] == b"{", "torch": head[:4] == b"PK\x03\x04",
            "png": head == b"\x89PNG\r\n\x1a\n"}[kind]


def check_output_file(path: str | Path, what: str, kind: str | None = None,
                      inputs: dict[str, str | None] | None = None) -> Path:
    """The parent directory of file `path` is writable; `path` is not a directory, a FIFO or a
    device, not one of the run's `inputs` ({what it is: path}), not read-only, and, when it exists
    and `kind` is given, holds what echoc writes there (never a file of the user's)."""
    p = Path(path)
    try:
        if p.is_dir():
            raise OutputPathError(f"{what} {p} is a directory; give a file path")
        if p.exists() and not p.is_file():
            raise OutputPathError(f"{what} {p} is not a regular file (a FIFO, device or socket); give a file path")
        for name, src in (inputs or {}).items():
            if src and (p.resolve() == Path(src).resolve()
                        or (p.exists() and Path(src).exists() and os.path.samefile(p, src))):
                raise OutputPathError(f"{what} {p} is {name}: writing it would destroy it; give another path")
    except OSError as e:
        raise _os_error(what, p, e) from None
    check_output_dir(p.parent, f"{what}'s directory")
    if p.exists() and not os.access(p, os.W_OK):
        raise OutputPathError(f"{what} {p} exists and is read-only")
    if kind and p.exists() and not _looks_like(p, kind):
        raise OutputPathError(f"{what} {p} exists and does not hold {_OWN[kind]}: echoc does not write over "
                              "other files; give a new path or remove it")
    return p


def run_inputs(spec: Spec, spec_path: str | None) -> dict[str, str | None]:
    """The files a run reads, which no output may name."""
    data = spec.train.data.path if spec.train.data.kind == "text" else None
    return {"the spec file": spec_path, "the training data (train.data.path)": data}


def check_outputs(spec: Spec, metrics: str | None, record_routing: str | None, tensorboard: str | None,
                  spec_path: str | None = None) -> None:
    """Every path the run will write, before it starts."""
    inputs = run_inputs(spec, spec_path)
    if metrics:
        check_output_file(metrics, "--metrics", "jsonl", inputs)
    if record_routing:
        if not spec.model.num_moe_layers:
            raise OutputPathError("--record-routing: every layer of this model is dense (model.first_dense_layers = "
                                  "model.num_layers): there is no routing to record")
        check_output_file(record_routing, "--record-routing", "torch", {**inputs, "the --metrics file": metrics})
    if tensorboard:
        check_output_dir(tensorboard, "--tensorboard")
    if spec.train.checkpoint.dir:
        check_output_dir(spec.train.checkpoint.dir, "train.checkpoint.dir")


def check_inputs(spec: Spec) -> None:
    if spec.train.data.kind == "text":
        check_text_file(spec.train.data.path, spec.budgets.seq_len)


def check_resume(spec: Spec, mode: str, allow_changes: bool, check_lock: bool = True) -> str | None:
    """The checkpoint a resume will start from (a line for the user), or None for a fresh start.
    The same rules the workers apply (runtime/checkpoint.py), without hashing every byte."""
    d = spec.train.checkpoint.dir
    if mode != "no" and not d:
        raise CheckpointError("--resume needs train.checkpoint.dir in the spec")
    if not d:
        return None
    if check_lock:    # one node: no other launcher of this run can hold it (a late elastic node could)
        check_unlocked(d)
    if mode == "no":
        check_fresh_dir(d)
        return None
    found, damaged = newest_whole(d)
    if found is None:
        if mode == "must":
            raise CheckpointError(f"--resume: no whole checkpoint in {d}"
                                  + (f" (damaged: {'; '.join(reversed(damaged))})" if damaged else "")
                                  + "; use --resume-or-start to start from step 0 when there is none")
        return None
    step, path = found
    check_spec(path, read_marker(path), spec, allow_changes)
    check_steps(path, step, spec.train.steps)
    return f"resuming from {path.name}" + (f" (newer but damaged: {'; '.join(damaged)})" if damaged else "")


def check_exchange(spec: Spec, nproc: int) -> None:
    """backends.exchange 'p2p' (set, or what 'auto' chose from the spec) needs this host's GPUs to
    reach each other directly and torch's symmetric memory; say so before any worker starts."""
    if spec.token_exchange != "p2p" or not torch.cuda.is_available():
        return   # no GPU on the launching host: each worker checks for itself (runtime/p2p.setup)
    chosen = "'auto' chose 'p2p' (cuda, each EP group on one node)" if spec.backends.exchange == "auto" else "'p2p'"
    why = p2p.missing()
    ep, n = spec.parallel.ep, min(nproc, torch.cuda.device_count())
    if why is None and nproc > torch.cuda.device_count():
        why = f"{nproc} processes on this host but {torch.cuda.device_count()} GPUs"
    for first in range(0, n - n % ep, ep):
        far = [(a, b) for a in range(first, first + ep) for b in range(first, first + ep)
               if why is None and a != b and not torch.cuda.can_device_access_peer(a, b)]
        if far:
            why = f"GPU {far[0][0]} cannot access GPU {far[0][1]} directly (no peer access)"
    if why:
        raise EchocError(f"backends.exchange {chosen}, which cannot run here: {why}; "
                         "set backends.exchange 'nccl'")
