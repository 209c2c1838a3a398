"""`budgets.on_overflow: rerun`: run an overflowed step's batch again with room for every row.

When any rank's static receive buffer overflows, the Trainer skips that step's update on the
device (DeviceMetrics.skipped; no host read). The loop learns it from the step's metrics and
runs the same batch again here, eagerly, through a second Program compiled for the `sync`
backend (exact, host-sized splits: nothing can overflow and nothing is padded; ECHO off,
which does not change the function computed). That program shares the trainer's parameters,
buffers and optimizer (runtime/program.alias), so its update is the step's one update.

The one-step lag: a step's flag reaches the host after the step ran. To keep the order of
updates exact, the loop (in rerun mode only) reads each step's metrics before launching the
next step, so no step ever runs on weights that miss an earlier step's update. That costs the
one step of CPU/GPU overlap the asynchronous metrics give, in rerun mode only; the common
path still has no sync inside the step.
"""
from __future__ import annotations

import torch

from runtime.program import Program, alias
from runtime.trainer import DeviceMetrics, Trainer


class Rerun:
    """`run(tokens, labels)`: the trainer's whole step, eagerly, through the dropless program."""

    def __init__(self, trainer: Trainer, dropless: Program):
        assert dropless.spec.backends.dispatch == "sync", "the rerun program must be dropless (sync backend)"
        alias(dropless, trainer.model)
        self.trainer, self.gm = trainer, dropless.gm
        self.count = 0

    def run(self, tokens: torch.Tensor, labels: torch.Tensor) -> DeviceMetrics:
        """Forward, backward, reductions and the optimizer update of the step, with every row."""
        t = self.trainer
        saved = t.gm, t.arena
        t.gm, t.arena = self.gm, None   # the sync program's buffers come from the allocator
        try:
            t.zero_grad()
            out = t.step(tokens, labels)
        finally:
            t.gm, t.arena = saved
        self.count += 1
        return out
