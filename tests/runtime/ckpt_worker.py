"""Run under torchrun by tests/runtime/test_checkpoint.py: checkpoint, resume, die, restart (gloo, CPU).

argv: CONFIG_JSON. CONFIG holds the spec as a dict, `mode` and its settings:

  roundtrip  train `steps` steps saving at `save_at`; then a FRESH Trainer resumes from the
             directory and trains to `steps`; then a save cut short before rank 0 publishes it.
             Rank 0 writes `out` (json): both loss sequences, every rank's state mismatches
             after the load, and what latest() saw around the torn save.
  train      the training loop as runtime/train.py will run it: resume from the newest whole
             checkpoint, save every `interval` steps (keeping 2), save and stop on SIGTERM.
             `kill` {rank, step, signal} makes that rank signal itself before that step on
             torchrun's first attempt only. Rank 0 rewrites `losses` ({step: loss}) after every
             step and appends (attempt, start step, stopped) to `attempts`.
"""
import json
import os
import signal
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from runtime import comm

from echoc.spec_io import spec_from_dict
from runtime import checkpoint
from runtime.data import TokenSource, local_rows
from echoc.compile import compile_build
from runtime.trainer import Trainer, init_distributed


class Loop:
    def __init__(self, spec, device):
        self.spec, self.device = spec, device
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.mb = spec.budgets.micro_batch
        t = spec.train
        self.source = TokenSource(t.data.kind, spec.model.vocab_size, spec.budgets.seq_len, t.seed, t.data.path)

    def step(self, trainer, step: int) -> float:
        tokens, labels = local_rows(self.source.global_batch(step, self.world * self.mb), self.rank, self.mb)
        trainer.set_lr(step)
        trainer.zero_grad()
        m = trainer.step(tokens.to(self.device), labels.to(self.device))
        return float(m.loss_sum[0]) / self.world


def snapshot(trainer) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in checkpoint._state(trainer, 0).items() if k != "meta.step"}


def mismatches(trainer, snap) -> list[str]:
    now = snapshot(trainer)
    bad = [f"missing {k}" for k in snap.keys() - now.keys()] + [f"extra {k}" for k in now.keys() - snap.keys()]
    bad += [f"rank {dist.get_rank()}: {k}" for k in snap.keys() & now.keys()
            if snap[k].dtype != now[k].dtype or not torch.equal(snap[k].cpu(), now[k].cpu())]
    return bad


def gather(obj):
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def roundtrip(cfg, spec, device):
    loop, ckpt, steps, k = Loop(spec, device), cfg["ckpt_dir"], cfg["steps"], cfg["save_at"]
    a = Trainer(compile_build(spec).program, device)
    losses_a = []
    for step in range(steps):
        losses_a.append(loop.step(a, step))
        if step + 1 == k:
            checkpoint.save(a, k, ckpt)
            snap = snapshot(a)
    b = Trainer(compile_build(spec).program, device)
    start = checkpoint.resume(b, ckpt)
    bad = mismatches(b, snap)
    losses_b = [loop.step(b, step) for step in range(start, steps)]

    # a save whose ranks all wrote but whose rank 0 died before publishing it
    publish = checkpoint._publish
    checkpoint._publish = lambda *args: None
    checkpoint.save(b, steps, ckpt)
    checkpoint._publish = publish
    dist.barrier()
    torn = {"latest": checkpoint.latest(ckpt)[0],
            "tmp_exists": checkpoint.step_dir(ckpt, steps).with_suffix(".tmp").is_dir()}
    dist.barrier()
    checkpoint.save(b, steps, ckpt)  # the same step again: the stale .tmp is replaced
    after = checkpoint.latest(ckpt)[0]
    inode = checkpoint.step_dir(ckpt, steps).stat().st_ino
    checkpoint.save(b, steps, ckpt)  # already whole: kept, never deleted to be written again
    kept = checkpoint.step_dir(ckpt, steps).stat().st_ino == inode
    checkpoint.keep_last(ckpt, 1)
    step_devices = [str(b.state.optimizer.step_count.device)]
    all_bad = gather(bad)
    if dist.get_rank() == 0:
        json.dump({"losses_a": losses_a, "losses_b": losses_b, "start": start, "mismatches": all_bad,
                   "step_devices": step_devices, "torn": torn, "after": after, "kept": kept,
                   "left": sorted(p.name for p in Path(ckpt).iterdir())}, open(cfg["out"], "w"))


def write_json(path, obj):
    tmp = f"{path}.part"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def train(cfg, spec, device):
    loop, ckpt, steps, interval = Loop(spec, device), cfg.get("ckpt_dir"), cfg["steps"], cfg.get("interval", 0)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    rank0 = dist.get_rank() == 0
    stop = threading.Event()
    checkpoint.install_stop_signals(stop)
    trainer = Trainer(compile_build(spec).program, device)
    start = checkpoint.resume(trainer, ckpt) if ckpt else 0
    losses_path = Path(cfg["losses"])
    losses = json.loads(losses_path.read_text()) if losses_path.exists() else {}
    kill, stopped = cfg.get("kill"), None
    for step in range(start, steps):
        if kill and attempt == 0 and dist.get_rank() == kill["rank"] and step == kill["step"]:
            os.kill(os.getpid(), getattr(signal, kill["signal"]))
        loss = loop.step(trainer, step)
        if rank0:
            losses[str(step)] = loss
            write_json(losses_path, losses)
        done = step + 1
        if ckpt and interval and done % interval == 0:
            checkpoint.save(trainer, done, ckpt)
            checkpoint.keep_last(ckpt, 2)
        if checkpoint.stop_requested(stop):
            checkpoint.save(trainer, done, ckpt)
            stopped = done
            break
    if rank0:
        with open(cfg["attempts"], "a") as f:
            f.write(json.dumps([attempt, start, stopped]) + "\n")


def main():
    cfg = json.load(open(sys.argv[1]))
    spec = spec_from_dict(cfg["spec"])
    device = init_distributed(spec)
    {"roundtrip": roundtrip, "train": train}[cfg["mode"]](cfg, spec, device)
    comm.shutdown()


if __name__ == "__main__":
    main()
