"""Run under torchrun by tests/faults/: the real worker (echoc.run.worker) with faults injected
through the loop's hooks. argv: CONFIG_JSON with

  spec          the spec as a dict
  out           rank 0 writes {"history": [...], "error": "Type: message" | null} here
  resume        'no' | 'must' | 'or_start';  with_changes: bool
  faults        [{"kind": K, "rank": r (default every rank), "at": k, ...}]: after k finished steps,
                K = "signal" (os.kill self with "signal"), "nan_weight" (a dense weight becomes NaN),
                "nan_loss" (the next step's loss is NaN: a transient fault), "oom" (the step
                raises CUDA's out-of-memory error, as a GPU shared with another process would),
                "disk_full" (every later checkpoint's publication fails with ENOSPC)
"""
import errno
import json
import os
import signal
import sys

import torch
import torch.distributed as dist

import runtime.checkpoint
import runtime.trainer
from echoc.errors import EchocError
from echoc.run import RunRequest, worker
from echoc.spec_io import spec_from_dict

POISON = {"loss": False}


def poisoned_loss(real):
    def lm_loss(logits, labels):
        loss = real(logits, labels)
        if POISON["loss"]:
            POISON["loss"] = False
            return loss * float("nan")
        return loss
    return lm_loss


def make_hook(fault, trainer_box):
    def hook(done):
        rank = int(os.environ["RANK"])
        if done != fault["at"] or fault.get("rank", rank) != rank:
            return
        if fault["kind"] == "signal":
            os.kill(os.getpid(), getattr(signal, fault["signal"]))
        elif fault["kind"] == "oom":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB. GPU 0 has a "
                                              "total capacity of 139.81 GiB of which 3.12 GiB is free.\nmore")
        elif fault["kind"] == "disk_full":
            def full(*_):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "COMPLETE")
            runtime.checkpoint._publish = full
        elif fault["kind"] == "nan_loss":
            POISON["loss"] = True
        elif fault["kind"] == "nan_weight":
            with torch.no_grad():
                dict(trainer_box["model"].named_parameters())["embed.weight"].fill_(float("nan"))
    return hook


def main():
    cfg = json.load(open(sys.argv[1]))
    spec = spec_from_dict(cfg["spec"])
    runtime.trainer.chunked_cross_entropy = poisoned_loss(runtime.trainer.chunked_cross_entropy)
    box = {}
    real_init = runtime.trainer.Trainer.__init__

    def init(self, *a, **k):  # keep a handle on the model for the nan_weight fault
        real_init(self, *a, **k)
        box["model"] = self.model
    runtime.trainer.Trainer.__init__ = init
    req = RunRequest(spec, None, None, resume=cfg.get("resume", "no"),
                     resume_with_changes=cfg.get("with_changes", False))
    hooks = tuple(make_hook(f, box) for f in cfg.get("faults", []))
    history, error = [], None
    try:
        history = worker(req, hooks=hooks)
    except EchocError as e:
        error = f"{type(e).__name__}: {e}"
    if int(os.environ["RANK"]) == 0 or error:
        with open(cfg["out"] + ("" if int(os.environ["RANK"]) == 0 else f".rank{os.environ['RANK']}"), "w") as f:
            json.dump({"history": history, "error": error}, f)
    if error:
        print(error, file=sys.stderr, flush=True)
        sys.exit(2)
    assert not dist.is_initialized()


if __name__ == "__main__":
    main()
