"""Checkpoints with torch.distributed.checkpoint (DCP): save, find the latest whole one,
load, prune, and stop cleanly on SIGTERM.

On disk:
    ckpt_dir/step_00000040/        .metadata, __<rank>_0.distcp   DCP's files
                                   COMPLETE                      json {step, ep, dp, world}
    ckpt_dir/step_00000042.tmp/    a save in progress, or one that died: never loaded

A save writes into `step_N.tmp/`; only after every rank has written (barrier) does
rank 0 put COMPLETE inside it, fsync, and rename it to `step_N/`. So a directory
named `step_N` always holds a whole checkpoint, and `latest` additionally requires
the COMPLETE marker, so neither a .tmp directory nor a stray one is ever resumed.

State: one flat dict, the same keys on every rank that holds the same data:
    model.<name>                 dense parameters and persistent buffers (routers'
                                 expert_bias): replicated on every rank
    model.<name>@ep<r>           stacked expert tensors [E/ep, ...] of EP rank r:
                                 replicated over expert-DP
    <key>@z<r>                   ZeRO: this rank's flat shard (rank r of the tensor's
                                 data-parallel group) of a weight (level 3) or its state
    optim.<param key>.<field>    exp_avg, exp_avg_sq and (unless the fp32 weight is its own)
                                 the fp32 master, under its parameter's key (+ @z<r>)
    optim.step                   [] float32, the optimizer's step count
    meta.step                    [] int64
Replicas hold identical values under identical keys, so DCP's dedup writes each
shard once and every rank reads back its own. Plain tensors with per-EP-rank keys
rather than DTensor: no device mesh, the same code on gloo and NCCL. The price: a
checkpoint resumes with the same ep only (load refuses another with a clear error);
without ZeRO dp may change, since every expert-DP replica reads the same shard; with
ZeRO the shards follow the group sizes, so dp and the level must stay. The learning
rate is not stored: the loop's set_lr(step) recomputes it from the step.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import threading
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from echoc.errors import EchocError
from runtime import comm
from runtime.parallel import expert_param_names

COMPLETE = "COMPLETE"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


class CheckpointMismatchError(EchocError):
    """A checkpoint written by a different parallel layout than the one resuming it."""


def step_dir(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}"


# ----------------------------------------------------------------------------- state dict

def _param_keys(trainer) -> dict[str, str]:
    """Model state name → checkpoint key: expert tensors get this rank's @ep<r> suffix; a weight
    kept as a ZeRO-3 shard gets @z<r>, r its rank in the weight's data-parallel group."""
    experts = expert_param_names(trainer.model)
    ep_rank = comm.group_rank("ep")
    shard_rank = {s.name: s.shard.rank for s in trainer.state.params if s.weight_sharded}
    keys = {}
    for name in trainer.model.state_dict():
        key = f"{name}@ep{ep_rank}" if name in experts else name
        keys[name] = f"{key}@z{shard_rank[name]}" if name in shard_rank else key
    return keys


def _state(trainer, step: int) -> dict[str, torch.Tensor]:
    """The flat dict DCP saves or loads into; its tensors share storage with the trainer's,
    so a load writes straight into the parameters, buffers and optimizer state.

    Optimizer state per parameter (runtime/train_state.py), under the parameter's key plus
    @z<r> where this rank holds a ZeRO shard: exp_avg, exp_avg_sq, and the fp32 master
    unless the (float32) weight is its own master; `optim.step` is the shared step count."""
    keys = _param_keys(trainer)
    state = {f"model.{keys[n]}": t for n, t in trainer.model.state_dict().items()}
    opt = trainer.state.optimizer
    for s, avg, avg_sq in zip(trainer.state.params, opt.exp_avg, opt.exp_avg_sq):
        key = keys[s.name] if s.weight_sharded or s.shard.n == 1 else f"{keys[s.name]}@z{s.shard.rank}"
        state[f"optim.{key}.exp_avg"], state[f"optim.{key}.exp_avg_sq"] = avg, avg_sq
        if not s.master_is_weight:
            state[f"optim.{key}.master"] = s.master
    state["optim.step"] = opt.step_count
    state["meta.step"] = torch.tensor(step, dtype=torch.int64)
    return state


# ----------------------------------------------------------------------------- save

def _layout() -> dict:
    return {"ep": comm.group_size("ep"), "dp": comm.group_size("expert_dp"),
            "world": dist.get_world_size() if dist.is_initialized() else 1}


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _from_rank0(value):
    """Rank 0's value on every rank (decisions about the filesystem are taken once)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _publish(tmp: Path, final: Path, info: dict) -> None:
    """Rank 0, after every rank wrote: marker into tmp, fsync, then the atomic rename."""
    marker = tmp / COMPLETE
    with open(marker, "w") as f:
        json.dump(info, f)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # a directory without COMPLETE (latest never took it): garbage
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync_dir(final.parent)


def save(trainer, step: int, ckpt_dir: str | Path) -> Path:
    """Collective: every rank calls it at the same step. Writes ckpt_dir/step_{step:08d}/.

    A whole checkpoint of the same step already there is kept as it is (e.g. SIGTERM
    right after an interval save). Returns the checkpoint's directory."""
    final = step_dir(ckpt_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if _from_rank0((final / COMPLETE).is_file()):
        return final
    if _rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)  # left by a save that died
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(_state(trainer, step), storage_writer=dcp.FileSystemWriter(str(tmp)))
    _barrier()  # every rank's shard is on disk
    if _rank() == 0:
        _publish(tmp, final, {"step": step, **_layout()})
    _barrier()
    return final


# ----------------------------------------------------------------------------- find, load, prune

def complete_steps(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    """Whole checkpoints, oldest first: `step_NNNNNNNN` directories holding COMPLETE."""
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
    """(step, directory) of the newest whole checkpoint, or None; .tmp and unmarked dirs never count."""
    found = complete_steps(ckpt_dir)
    return found[-1] if found else None


def load(trainer, path: str | Path) -> int:
    """Collective: restore parameters, persistent buffers and the optimizer's state (moments,
    masters, step count; sharded as this run's ZeRO level) in place. Returns the checkpoint's step."""
    path = Path(path)
    info = json.loads((path / COMPLETE).read_text())
    if info["ep"] != comm.group_size("ep"):
        raise CheckpointMismatchError(
            f"{path} was written with ep = {info['ep']} but this run has ep = {comm.group_size('ep')}; "
            "expert shards are stored per EP rank, so resume with the same parallel.ep")
    state = _state(trainer, 0)   # the optimizer's state exists from the start: DCP loads into it
    dcp.load(state, checkpoint_id=str(path))
    step = int(state["meta.step"])
    assert step == info["step"], f"{path}: COMPLETE says step {info['step']}, the state says {step}"
    return step


def resume(trainer, ckpt_dir: str | Path) -> int:
    """Collective: load the newest whole checkpoint (chosen by rank 0); the step to continue from, 0 if none."""
    found = _from_rank0(latest(ckpt_dir) if _rank() == 0 else None)
    return load(trainer, found[1]) if found else 0


def keep_last(ckpt_dir: str | Path, n: int) -> list[Path]:
    """Delete all but the n newest whole checkpoints, and .tmp leftovers older than the newest.

    Acts on rank 0 only (any rank may call it; not collective). A directory is first renamed
    out of the `step_N` pattern, so a deletion cut short never looks like a checkpoint.
    Returns what was deleted."""
    assert n >= 1, "keep_last needs n >= 1: the newest checkpoint is never deleted"
    found = complete_steps(ckpt_dir) if _rank() == 0 else []
    if not found:
        return []
    newest = found[-1][0]
    doomed = [d for _, d in found[:-n]]
    for d in Path(ckpt_dir).glob("step_*.tmp"):
        m = _STEP_DIR.match(d.name[:-len(".tmp")])
        if m and int(m.group(1)) < newest:
            doomed.append(d)
    for d in doomed:
        gone = d.with_name(d.name + ".deleting")
        os.rename(d, gone)
        shutil.rmtree(gone)
    return doomed


# ----------------------------------------------------------------------------- SIGTERM

def install_stop_signals(flag) -> None:
    """On SIGTERM or SIGINT (Ctrl-C) call flag.set() (a threading.Event) instead of dying.

    The loop then saves and exits at a step boundary (see stop_requested). Main thread only."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: flag.set())


def stop_requested(flag) -> bool:
    """Collective, once per step on every rank: True on all ranks if any rank's flag is set.

    A scheduler's SIGTERM reaches ranks at different moments; agreeing before acting
    keeps every rank saving the same step. A host-side gloo all-reduce of one int:
    no device work, so it does not disturb a captured step."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag.is_set()
    if comm.get_group("stop") is None:  # created on first use, at the same step on every rank
        gloo = dist.get_backend() == "gloo"
        comm.register_group("stop", dist.group.WORLD if gloo else dist.new_group(backend="gloo"))
    t = torch.tensor([int(flag.is_set())])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=comm.get_group("stop"))
    return bool(t.item())


# ----------------------------------------------------------------------------- in the loop

class Checkpointer:
    """Resume at start, save every `train.checkpoint.interval` steps, on SIGTERM / SIGINT and
    at the end. Without `train.checkpoint.dir` it does nothing. A torchrun elastic restart
    (TORCHELASTIC_RESTART_COUNT > 0) resumes from the last complete checkpoint by itself."""

    def __init__(self, trainer, resume_asked: bool, keep: int = 3):
        self.config, self.trainer, self.keep = trainer.spec.train.checkpoint, trainer, keep
        self.start, self.stopped, self.flag = 0, False, threading.Event()
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        if resume_asked and not self.config.dir:
            raise EchocError("--resume needs train.checkpoint.dir in the spec")
        if not self.config.dir:
            return
        if resume_asked or restarted:
            self.start = resume(trainer, self.config.dir)
        install_stop_signals(self.flag)

    def after_step(self, done: int) -> bool:
        """Save if due; True when a SIGTERM / SIGINT asked the run to stop (after saving)."""
        if not self.config.dir:
            return False
        if self.config.interval and done % self.config.interval == 0:
            self._save(done)
        if stop_requested(self.flag):
            self._save(done)
            self.stopped = True
        return self.stopped

    def finish(self, done: int) -> None:
        if self.config.dir and not self.stopped:
            self._save(done)

    def _save(self, done: int) -> None:
        save(self.trainer, done, self.config.dir)
        if _rank() == 0:
            keep_last(self.config.dir, self.keep)
