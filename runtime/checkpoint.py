"""Checkpoints with torch.distributed.checkpoint (DCP): save, verify, resume, prune, and stop
cleanly on SIGTERM / SIGINT. The on-disk format and its checks are runtime/checkpoint_files.py.

A save writes into `step_N.tmp/`; only after every rank has written (barrier) and the files are
checksummed does rank 0 put COMPLETE (step, spec, checksums) inside it, fsync, and rename it to
`step_N/`. A save refuses a state holding NaN/inf. Resume takes the newest checkpoint whose files
all match their checksums (a damaged one is reported and set aside) and refuses one of another
spec; `N` is always the number of steps whose updates the state holds.

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
import shutil
import signal
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from echoc.errors import EchocError, StoppedBySignal
from runtime import comm
from runtime import checkpoint_files
from runtime.checkpoint_files import (COMPLETE, DCP_ERRORS, CheckpointError, CheckpointMismatchError, check_spec,
                                      check_steps, complete_steps, damage, dcp_reason, file_digest, latest,
                                      marker_json, publish, read_marker, set_aside, step_dir)
from runtime.parallel import expert_param_names

__all__ = ["COMPLETE", "CheckpointError", "CheckpointMismatchError", "Checkpointer", "complete_steps",
           "keep_last", "latest", "load", "resume", "save", "step_dir"]


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

def _layout(trainer) -> dict:
    return {"ep": comm.group_size("ep"), "dp": comm.group_size("expert_dp"),
            "world": dist.get_world_size() if dist.is_initialized() else 1, "zero": trainer.spec.parallel.zero}


def _dcp():
    """torch.distributed.checkpoint, imported when a checkpoint is first saved or loaded: it costs
    ~0.75 s, which every `echoc` command (validate, compile) would otherwise pay."""
    import torch.distributed.checkpoint as dcp
    return dcp


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


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


def _gather(value) -> list:
    """Every rank's value, rank-ordered, on every rank."""
    if not dist.is_initialized():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value)
    return out


def _nonfinite_keys(state: dict[str, torch.Tensor], step: int) -> None:
    """Collective: refuse to save when any rank's floating-point state holds NaN/inf.
    One pass over the tensors on their devices and one small all-reduce."""
    floats = {k: t for k, t in state.items() if t.is_floating_point()}
    device = next(iter(floats.values())).device if floats else torch.device("cpu")
    ok = torch.stack([t.isfinite().all().to(device) for t in floats.values()]) if floats else None
    bad = torch.zeros(1, dtype=torch.int64, device=device) if ok is None else (~ok).sum().reshape(1)
    if dist.is_initialized():
        dist.all_reduce(bad)
    if int(bad.item()):
        mine = [k for k, good in zip(floats, ok.tolist()) if not good] if ok is not None else []
        where = f"e.g. {mine[0]} on rank {_rank()}" if mine else "on another rank"
        raise CheckpointError(f"step {step} not saved: {int(bad.item())} state tensor(s) hold NaN/inf ({where}); "
                              "the last saved checkpoint is kept")


def _digests(tmp: Path) -> dict[str, tuple[int, str]]:
    """Collective: (bytes, sha256) of every file in tmp; the hashing is split over the ranks."""
    names = _from_rank0(sorted(p.name for p in tmp.iterdir() if p.is_file()) if _rank() == 0 else None)
    mine = {n: file_digest(tmp / n) for n in names[_rank()::_world()]}
    return {k: v for part in _gather(mine) for k, v in part.items()}


def save(trainer, step: int, ckpt_dir: str | Path) -> Path:
    """Collective: every rank calls it at the same step. Writes ckpt_dir/step_{step:08d}/.

    A whole checkpoint of the same step already there is kept as it is (e.g. SIGTERM right
    after an interval save). Returns the checkpoint's directory."""
    final = step_dir(ckpt_dir, step)
    tmp = final.with_name(final.name + ".tmp")
    if _from_rank0((final / COMPLETE).is_file() and damage(final, hash_files=False) is None):
        return final
    state = _state(trainer, step)
    _nonfinite_keys(state, step)
    _on_rank0(lambda: (shutil.rmtree(tmp, ignore_errors=True), tmp.mkdir(parents=True)), step, ckpt_dir)
    try:
        dcp = _dcp()
        dcp.save(state, storage_writer=dcp.FileSystemWriter(str(tmp)))
    except DCP_ERRORS as e:  # DCP's own errors carry no hint about what to do
        raise CheckpointError(f"saving step {step} into {tmp} failed in torch.distributed.checkpoint "
                              f"({dcp_reason(e)}); check that "
                              "train.checkpoint.dir is writable with free space on every node") from None
    _barrier()  # every rank's shard is on disk
    files = _digests(tmp)
    _on_rank0(lambda: _publish(tmp, final, marker_json(step, trainer.spec, files, _layout(trainer))), step, ckpt_dir)
    return final


def _on_rank0(write, step: int, ckpt_dir: str | Path) -> None:
    """Collective: rank 0 writes (file-system work); the disk refusing it (read-only, full) is the
    same CheckpointError on every rank, naming the newest whole checkpoint."""
    def attempt():
        try:
            write()
        except OSError as e:
            newest = latest(ckpt_dir)
            raise CheckpointError(f"cannot write the checkpoint of step {step} into {ckpt_dir} "
                                  f"({e.strerror or type(e).__name__}: {e.filename or ckpt_dir}); the newest whole one "
                                  f"is {newest[1].name if newest else 'none'}: free space or make "
                                  "train.checkpoint.dir writable, then continue with --resume") from None
    _agreed(attempt)


def _agreed(work):
    """Collective: rank 0 does `work` and returns its result (None elsewhere); a CheckpointError it
    raises is raised on every rank, not one rank's traceback and the others' broken collective."""
    result, why = None, None
    if _rank() == 0:
        try:
            result = work()
        except CheckpointError as e:
            why = str(e)
    why = _from_rank0(why)
    if why is not None:
        raise CheckpointError(why)
    return result


def _publish(tmp: Path, final: Path, marker: dict) -> None:
    """Rank 0, after every rank wrote (tests replace it to cut a save short)."""
    publish(tmp, final, marker)


# ----------------------------------------------------------------------------- load, resume

def load(trainer, path: str | Path) -> int:
    """Collective: restore parameters, persistent buffers and the optimizer's state (moments,
    masters, step count; sharded as this run's ZeRO level) in place. Returns the checkpoint's step."""
    path = Path(path)
    info = json.loads((path / COMPLETE).read_text())
    if info["ep"] != comm.group_size("ep"):
        raise CheckpointMismatchError(
            f"{path} was written with ep = {info['ep']} but this run has ep = {comm.group_size('ep')}; "
            "expert shards are stored per EP rank, so resume with the same parallel.ep")
    zero, mine = info.get("zero", 0), trainer.spec.parallel.zero
    if zero != mine or (zero >= 1 and info["world"] != _layout(trainer)["world"]):
        raise CheckpointMismatchError(
            f"{path} was written with parallel.zero = {zero} on {info['world']} ranks, this run has zero = {mine} "
            f"on {_layout(trainer)['world']}: its optimizer shards do not fit; resume with the same zero level "
            "and world size")
    state = _state(trainer, 0)   # the optimizer's state exists from the start: DCP loads into it
    _dcp().load(state, checkpoint_id=str(path))
    step = int(state["meta.step"])
    assert step == info["step"], f"{path}: COMPLETE says step {info['step']}, the state says {step}"
    return step


def keep_last(ckpt_dir: str | Path, n: int) -> list[Path]:
    """Prune old checkpoints (runtime/checkpoint_files.keep_last) on rank 0 only; any rank may call it."""
    return checkpoint_files.keep_last(ckpt_dir, n) if _rank() == 0 else []


def _say(text: str) -> None:
    if _rank() == 0:
        print(f"echoc: {text}", file=sys.stderr, flush=True)


def _verified(d: Path) -> str | None:
    """Collective: why checkpoint d is damaged (sizes, then every file's sha256, split over ranks), or None."""
    why = _from_rank0(damage(d, hash_files=False) if _rank() == 0 else None)
    if why is not None:
        return why
    names = sorted(read_marker(d).files)
    problems = _gather(damage(d, names[_rank()::_world()]))
    return next((p for p in problems if p), None)


def _load_with_hint(trainer, d: Path) -> int:
    try:
        return load(trainer, d)
    except EchocError:
        raise
    except DCP_ERRORS as e:  # DCP's errors name a key or a storage call, not what to do
        raise CheckpointError(f"{d} could not be loaded by torch.distributed.checkpoint ({dcp_reason(e)}); it "
                              "does not fit this model or was written by another torch: move it out of the "
                              "checkpoint directory to resume from an earlier one") from None


def resume(trainer, ckpt_dir: str | Path, allow_changes: bool = False, steps: int | None = None) -> int:
    """Collective: load the newest verified checkpoint and return its step; 0 when there is none.
    steps: the run's last step; a checkpoint at or past it is refused (nothing to train).

    A damaged one (missing file, wrong size or checksum) is reported, set aside (renamed
    `.damaged`) and the next older one is tried. A checkpoint of another spec is refused
    (CheckpointMismatchError naming the fields) unless `allow_changes` and every change is safe."""
    found = _from_rank0(complete_steps(ckpt_dir) if _rank() == 0 else None)
    for step, d in reversed(found):
        why = _verified(d)
        if why is not None:
            if _rank() == 0:
                _say(f"checkpoint {d} is damaged ({why}); set aside as {set_aside(d).name}, "
                     "trying the one before it")
            _barrier()
            continue
        marker = read_marker(d)
        changes = check_spec(d, marker, trainer.spec, allow_changes)
        if steps is not None:
            check_steps(d, step, steps)
        if changes:
            _say(f"resuming {d.name} with changes: " + "; ".join(changes))
        return _load_with_hint(trainer, d)
    return 0


# ----------------------------------------------------------------------------- SIGTERM

def install_stop_signals(flag) -> None:
    """On SIGTERM or SIGINT (Ctrl-C) call flag.set() (a threading.Event) instead of dying.

    The loop then saves and exits at a step boundary (see stop_requested). Main thread only."""
    def stop(signum, frame):
        flag.signum = signum    # what to tell the user, and the exit code (128 + signum)
        flag.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)


def stop_requested(flag) -> bool:
    """Collective, once per step on every rank: True on all ranks if any rank's flag is set.

    A scheduler's SIGTERM reaches ranks at different moments; agreeing before acting
    keeps every rank saving the same step. A host-side gloo all-reduce of one int:
    no device work, so it does not disturb a captured step."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return flag.is_set()
    if comm.get_group("stop") is None:  # created on first use, at the same step on every rank
        gloo = dist.get_backend() == "gloo"
        comm.register_group("stop", dist.group.WORLD if gloo else comm.new_group(backend="gloo"))
    t = torch.tensor([int(flag.is_set())])
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=comm.get_group("stop"))
    return bool(t.item())


# ----------------------------------------------------------------------------- in the loop

RESUME_MODES = ("no", "must", "or_start")


class Checkpointer:
    """Resume at start; save when the loop asks (interval, SIGTERM / SIGINT, end). Without
    `train.checkpoint.dir` it does nothing. resume: 'no' (a directory that already holds
    checkpoints is then an error: they would be mixed and pruned), 'must' (a missing checkpoint
    is an error), 'or_start'. A torchrun elastic restart (TORCHELASTIC_RESTART_COUNT > 0)
    resumes by itself."""

    def __init__(self, trainer, resume_mode: str = "no", allow_changes: bool = False, keep: int = 3):
        assert resume_mode in RESUME_MODES, resume_mode
        self.config, self.trainer, self.keep = trainer.spec.train.checkpoint, trainer, keep
        self.start, self.stopped, self.flag = 0, False, threading.Event()
        if resume_mode != "no" and not self.config.dir:
            raise CheckpointError("--resume needs train.checkpoint.dir in the spec")
        if not self.config.dir:
            return
        self.lock = _agreed(lambda: checkpoint_files.lock_dir(self.config.dir))   # rank 0 holds it for the run
        if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
            resume_mode = "or_start"
        if resume_mode == "no":
            check_fresh_dir(self.config.dir)
        else:
            self.start = resume(trainer, self.config.dir, allow_changes, trainer.spec.train.steps)
            if self.start == 0 and resume_mode == "must":
                raise CheckpointError(f"--resume: no whole checkpoint in {self.config.dir}; "
                                      "use --resume-or-start to start from step 0 when there is none")
        install_stop_signals(self.flag)

    @property
    def enabled(self) -> bool:
        return bool(self.config.dir)

    def due(self, done: int) -> bool:
        """An interval save falls after `done` steps."""
        return self.enabled and bool(self.config.interval) and done % self.config.interval == 0

    def stop_asked(self) -> bool:
        """Collective: a SIGTERM / SIGINT reached any rank (checked every step)."""
        self.stopped = self.enabled and stop_requested(self.flag)
        return self.stopped

    def stopped_early(self, done: int) -> StoppedBySignal:
        """What the loop raises after the stop save: the run is not finished."""
        signum = getattr(self.flag, "signum", signal.SIGTERM)   # another rank's signal: not recorded here
        name = signal.Signals(signum).name if getattr(self.flag, "signum", None) else "a signal on another rank"
        return StoppedBySignal(f"stopped by {name} after step {done} of {self.trainer.spec.train.steps}; saved "
                               f"{step_dir(self.config.dir, done).name} in {self.config.dir}: continue with "
                               "`echoc run ... --resume`", int(signum))

    def save(self, done: int) -> None:
        """Collective: save the state after `done` steps, then prune (rank 0)."""
        if not self.enabled:
            return
        save(self.trainer, done, self.config.dir)
        keep_last(self.config.dir, self.keep)


def check_fresh_dir(ckpt_dir: str | Path) -> None:
    """A run that does not resume must not write into a directory holding another run's checkpoints."""
    found = latest(ckpt_dir)
    if found is not None:
        raise CheckpointError(f"train.checkpoint.dir {ckpt_dir} already holds checkpoints (newest {found[1].name}); "
                              "pass --resume to continue from them, or use another directory")
