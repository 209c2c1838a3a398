"""What a checkpoint directory holds on disk, and how it is checked: no collectives here.

    ckpt_dir/step_00000040/          DCP's files (.metadata, __<rank>_0.distcp) and COMPLETE
    ckpt_dir/step_00000042.tmp/      a save in progress, or one that died: never loaded
    ckpt_dir/step_00000038.damaged/  failed its check at resume: kept for a look, never loaded
    ckpt_dir/step_00000036.deleting/ being pruned
    ckpt_dir/.echoc-lock             flock'd by the run writing here (pid, host): one run a directory

COMPLETE (json) is written last, by rank 0, after every rank's files are on disk:
    {"format": 2, "step", "ep", "dp", "world", "spec_hash", "spec": the spec as a dict,
     "files": {name: [bytes, sha256]}}
A checkpoint is *whole* when COMPLETE parses and every listed file has its size (cheap:
stat only), and *verified* when every file also has its sha256 (reads every byte; done once,
at resume). Resume refuses a checkpoint of another spec, naming the fields that differ,
unless the caller allows changes and all of them are in SAFE_CHANGES.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from echoc.errors import EchocError
from echoc.spec import Spec
from echoc.spec_io import spec_hash

COMPLETE = "COMPLETE"
FORMAT = 2
_STEP_DIR = re.compile(r"^step_(\d{8})$")

SAFE_CHANGES = ("train.steps", "train.log_interval", "train.optimizer.lr", "train.optimizer.warmup_steps",
                "train.checkpoint.interval", "train.checkpoint.dir", "train.metrics_path",
                "train.collective_timeout_s", "train.on_nonfinite", "backends.exchange",
                "backends.shared_expert_overlap", "backends.wgrad_overlap")
"""Spec fields a resume may change with --resume-with-changes: the schedule, how long to train,
where and how often to log and save, how rows move between ranks (the exchanges give the same
numbers bitwise), which stream runs the shared expert and the expert weight gradients (the same
kernels on the same data). Nothing that shapes the model, its data or its state."""


class CheckpointError(EchocError):
    """A checkpoint that cannot be written or resumed; the message says what to do."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint written by another spec (or parallel layout) than the one resuming it."""


@dataclass
class Marker:
    """The parsed COMPLETE file of one checkpoint."""
    step: int
    spec: dict
    spec_hash: str
    files: dict[str, tuple[int, str]]   # name → (bytes, sha256 hex)
    layout: dict                        # ep, dp, world


def step_dir(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}"


def file_digest(path: Path, chunk_bytes: int = 1 << 22) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of one file."""
    h, n = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
            n += len(block)
    return n, h.hexdigest()


def marker_json(step: int, spec: Spec, files: dict[str, tuple[int, str]], layout: dict) -> dict:
    return {"format": FORMAT, "step": step, **layout, "spec_hash": spec_hash(spec),
            "spec": spec.model_dump(mode="json"), "files": {k: list(v) for k, v in sorted(files.items())}}


def read_marker(d: Path) -> Marker:
    """COMPLETE of checkpoint `d`; CheckpointError when it is missing, unreadable or of an old format."""
    try:
        m = json.loads((d / COMPLETE).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{d}: its COMPLETE marker cannot be read ({type(e).__name__})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise CheckpointError(f"{d}: written without spec and checksums (an older echoc); it cannot be checked")
    try:
        marker = _marker(m)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as e:
        raise CheckpointError(f"{d}: its COMPLETE marker is malformed ({type(e).__name__}: {e})") from None
    named = _STEP_DIR.match(d.name)
    if named and int(named.group(1)) != marker.step:
        raise CheckpointError(f"{d}: its COMPLETE marker says step {marker.step}, its name another (renamed?)")
    return marker


def _marker(m: dict) -> Marker:
    files = {str(k): (int(v[0]), str(v[1])) for k, v in m["files"].items()}
    layout = {k: int(m[k]) for k in ("ep", "dp", "world")}
    if not isinstance(m["spec"], dict) or not isinstance(m["spec_hash"], str) or not isinstance(m["step"], int):
        raise TypeError("spec must be a mapping, spec_hash a string and step an integer")
    if any(size < 0 or "/" in name or name in ("", ".", "..") for name, (size, _) in files.items()):
        raise ValueError("a file entry names a path outside the checkpoint or a negative size")
    return Marker(m["step"], m["spec"], m["spec_hash"], files, layout)


def damage(d: Path, names: list[str] | None = None, hash_files: bool = True) -> str | None:
    """Why checkpoint `d` is not whole (or, with hash_files, not verified), or None when it is.

    names: check only these of its files (to split the hashing over ranks); default all."""
    try:
        marker = read_marker(d)
    except CheckpointError as e:
        return str(e).split(": ", 1)[1]
    if not marker.files:
        return "its COMPLETE marker lists no files"
    for name in sorted(marker.files) if names is None else names:
        size, sha = marker.files[name]
        path = d / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written"
        if hash_files and file_digest(path)[1] != sha:
            return f"{name} does not match its checksum"
    return None


def complete_steps(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Published checkpoints, oldest first: `step_NNNNNNNN` directories holding COMPLETE."""
    root = Path(ckpt_dir)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _STEP_DIR.match(d.name)
        if m and d.is_dir() and (d / COMPLETE).is_file():
            found.append((int(m.group(1)), d))
    return sorted(found)


def latest(ckpt_dir: str | Path) -> tuple[int, Path] | None:
    """(step, directory) of the newest published checkpoint, or None; .tmp and unmarked dirs never count."""
    found = complete_steps(ckpt_dir)
    return found[-1] if found else None


def newest_whole(ckpt_dir: str | Path) -> tuple[tuple[int, Path] | None, list[str]]:
    """((step, directory) of the newest whole checkpoint (sizes checked, no hashing), or None when
    there is none; a line for each newer one that is not whole). For checks before any worker starts."""
    skipped = []
    for step, d in reversed(complete_steps(ckpt_dir)):
        why = damage(d, hash_files=False)
        if why is None:
            return (step, d), skipped
        skipped.append(f"{d.name}: {why}")
    return None, skipped


def set_aside(d: Path) -> Path:
    """Rename a damaged checkpoint out of the step pattern (kept for a look, never loaded again)."""
    target = d.with_name(d.name + ".damaged")
    n = 1
    while target.exists():
        n += 1
        target = d.with_name(f"{d.name}.damaged{n}")
    os.rename(d, target)
    return target


def spec_changes(saved: dict, now: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted path, saved value, current value) for every field that differs."""
    out = []
    for key in sorted(saved.keys() | now.keys()):
        a, b = saved.get(key), now.get(key)
        path = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += spec_changes(a, b, path + ".")
        elif a != b:
            out.append((path, a, b))
    return out


def _with_defaults(saved: dict, spec: Spec) -> dict:
    """The saved spec with the fields added since it was written at their defaults (as read by this
    echoc); as written when this echoc no longer reads it."""
    try:
        return type(spec).model_validate(saved).model_dump(mode="json")
    except Exception:
        return saved


def check_spec(d: Path, marker: Marker, spec: Spec, allow_changes: bool) -> list[str]:
    """Refuse to resume checkpoint `d` under a different spec; returns the accepted changes as
    `path: old → new` lines (empty when the spec is the same)."""
    changes = spec_changes(_with_defaults(marker.spec, spec), spec.model_dump(mode="json"))
    lines = [f"{p}: {a!r} → {b!r}" for p, a, b in changes]
    unsafe = [line for (p, _, _), line in zip(changes, lines) if p not in SAFE_CHANGES]
    if unsafe or (changes and not allow_changes):
        named = unsafe or lines
        shown = "; ".join(named[:6]) + (f"; and {len(named) - 6} more" if len(named) > 6 else "")
        hint = ("only these may change: " + ", ".join(SAFE_CHANGES) if unsafe
                else "pass --resume-with-changes to accept them")
        raise CheckpointMismatchError(f"{d} was written by a different spec ({shown}); {hint}")
    return lines


def check_steps(d: Path, step: int, steps: int) -> None:
    """Resuming at `step` must leave something to train (of `steps`): the step labels stay real."""
    if step >= steps:
        raise CheckpointError(f"{d} is at step {step} and train.steps is {steps}: nothing is left to "
                              "train, so nothing is run or written; raise train.steps (with --resume-with-changes) "
                              "to train on")


def keep_last(ckpt_dir: str | Path, n: int) -> list[Path]:
    """Delete every published checkpoint with at least n whole checkpoints newer than it, and .tmp
    leftovers older than the newest. So the n newest whole ones stay, and the newest whole one is
    never deleted, whatever is damaged. One process only (rank 0). A directory is first renamed out
    of the step pattern, so a deletion cut short never looks like a checkpoint. Returns what went."""
    assert n >= 1, "keep_last needs n >= 1: the newest checkpoint is never deleted"
    found = complete_steps(ckpt_dir)
    if not found:
        return []
    doomed, whole_newer = [], 0
    for _, d in reversed(found):
        if whole_newer >= n:
            doomed.append(d)
        elif damage(d, hash_files=False) is None:
            whole_newer += 1
    newest = found[-1][0]
    for d in Path(ckpt_dir).glob("step_*.tmp"):
        m = _STEP_DIR.match(d.name[:-len(".tmp")])
        if m and int(m.group(1)) < newest:
            doomed.append(d)
    for d in doomed:
        gone = d.with_name(d.name + ".deleting")
        os.rename(d, gone)
        shutil.rmtree(gone)
    return doomed


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path, marker: dict) -> None:
    """After every rank wrote into `tmp`: COMPLETE into it, fsync, then the atomic rename to `final`."""
    with open(tmp / COMPLETE, "w") as f:
        json.dump(marker, f)
        f.flush()
        os.fsync(f.fileno())
    fsync_dir(tmp)
    if final.exists():  # unpublished or not whole (latest never took it): garbage
        shutil.rmtree(final)
    os.rename(tmp, final)
    fsync_dir(final.parent)


LOCK = ".echoc-lock"


def lock_dir(ckpt_dir: str | Path):
    """Hold `ckpt_dir`'s lock for this process's lifetime (the OS drops it when the process ends,
    however it ends). Returns the open lock file (keep it), or None where the file system has no
    locks. CheckpointError naming the holder when another live process holds it, or when the lock
    file cannot be made (a read-only directory, a file of another user)."""
    path = Path(ckpt_dir) / LOCK
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        f = open(path, "a+")
    except OSError as e:
        raise CheckpointError(f"train.checkpoint.dir {ckpt_dir}: its lock file cannot be made "
                              f"({e.strerror or type(e).__name__}); make the directory writable") from None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        f.seek(0)
        holder = f.read().strip() or "unknown"
        f.close()
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise CheckpointError(f"train.checkpoint.dir {ckpt_dir} is in use by another run ({holder}); give each "
                                  "run its own directory, or wait for that one to end") from None
        return None    # no locks here (some network file systems): nothing to hold
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def check_unlocked(ckpt_dir: str | Path) -> None:
    """Before a run starts: CheckpointError when another run holds `ckpt_dir` (the lock is let go at once)."""
    if (Path(ckpt_dir) / LOCK).exists():
        held = lock_dir(ckpt_dir)
        if held is not None:
            held.close()


# ----------------------------------------------------------------------------- DCP's errors (one line each)

def _dcp_errors() -> tuple[type[BaseException], ...]:
    try:   # a collective save or load that failed on some rank raises this, a BaseException
        from torch.distributed.checkpoint.api import CheckpointException
        return (Exception, CheckpointException)
    except ImportError:
        return (Exception,)


DCP_ERRORS = _dcp_errors()


def dcp_reason(e: BaseException) -> str:
    """One line from a DCP error: a collective one's first failing rank's own exception."""
    failures = getattr(e, "failures", None)
    if isinstance(failures, dict) and failures:
        rank, inner = sorted(failures.items())[0]
        inner = inner[0] if isinstance(inner, tuple) else inner
        return f"rank {rank}: {dcp_reason(inner)}"
    first = str(e).splitlines()[0] if str(e) else ""
    return f"{type(e).__name__}: {first[:200]}"
