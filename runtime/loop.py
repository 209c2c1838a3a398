"""The training loop: run a compiled Program for spec.train.steps steps on this rank.

    trainer  = Trainer(program, device)          the model, its optimizer, one whole iteration
    runner   = StepRunner(trainer, graph=...)    eager, or captured once as one CUDA graph
    for each step: next batch → runner.run → metrics of the step before (pinned, async)
                   → policies (overflow, non-finite, rerun) → logs → checkpoint if due / asked to stop

Metrics reach the host a step late through pinned buffers, so logging never stalls the
GPU; before a checkpoint the pending metrics are read first, so every saved step has been
checked. With `budgets.on_overflow: rerun` each step's metrics are read before the next
step starts (runtime/rerun.py says why). Step labels are real: a checkpoint named step N
holds exactly N steps' updates. `hooks` are called with the number of finished steps after
each step (tests use them to inject faults; nothing in the loop knows about faults).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from echoc.errors import EchocError
from runtime import comm, contracts, flops
from runtime.checkpoint import Checkpointer, latest
from runtime.contracts import PLAN
from runtime.cuda_graph import AsyncMetrics, StepRunner
from runtime.data import TokenSource, local_rows
from runtime.metrics import JsonlLog, ProgressLog, TensorBoardLog, check_overflow, host_metrics
from runtime.program import Program
from runtime.rerun import Rerun
from runtime.routing_trace import save_trace
from runtime.trainer import DeviceMetrics, Trainer


@dataclass
class RunOptions:
    metrics_path: str | None = None        # JSONL on rank 0
    show_progress: bool = True
    record_routing: str | None = None      # routing counts [steps, layers, ep, E] of EP group 0
    tensorboard: str | None = None
    resume: str = "no"                     # 'no', 'must' (--resume) or 'or_start' (--resume-or-start)
    resume_with_changes: bool = False      # accept safe spec changes (runtime/checkpoint_files.py)
    rerun_program: Program | None = None   # on_overflow 'rerun': the dropless program (echoc/run.py)
    hooks: list[Callable[[int], None]] = field(default_factory=list)


class NonFiniteError(EchocError):
    """A step's loss or gradient norm was NaN/inf and train.on_nonfinite is 'stop'."""


def train(program: Program, device: torch.device, options: RunOptions = RunOptions()) -> list[dict]:
    """Run the steps; returns the per-step metrics (identical on every rank)."""
    trainer = Trainer(program, device)
    check_clone_group(program)
    loop = _Loop(trainer, device, options)
    try:
        loop.run()
    finally:
        loop.close()
    return loop.history


def check_clone_group(program: Program) -> None:
    """The clone exchange runs over the 'clone' process group; the planner and the arena plan
    were sized for the spec's clone domain. They must be the same ranks' count."""
    for node in program.gm.graph.nodes:
        if node.op == "call_function" and contracts.of(node.target) is PLAN:
            planned, group = PLAN.arg(node, "domain_size"), comm.group_size("clone")
            assert planned == group, f"{node.name} plans clone domains of {planned} ranks, the clone group has {group}"


def _host(m: DeviceMetrics) -> tuple[torch.Tensor, ...]:
    """The tensors the host reads of a step: loss_sum, stats, counts, skipped, nonfinite."""
    return m.loss_sum, m.stats, m.counts, m.skipped, m.nonfinite


class _Loop:
    def __init__(self, trainer: Trainer, device: torch.device, options: RunOptions):
        spec, t = trainer.spec, trainer.spec.train
        self.trainer, self.device, self.options, self.spec = trainer, device, options, spec
        self.rank, self.world, self.mb = dist.get_rank(), dist.get_world_size(), spec.budgets.micro_batch
        self.source = TokenSource(t.data.kind, spec.model.vocab_size, spec.budgets.seq_len, t.seed, t.data.path)
        graph = spec.backends.cuda_graph == "full_iteration" and device.type == "cuda"
        self.runner = StepRunner(trainer, graph=graph)
        self.rerun = None
        if spec.budgets.on_overflow == "rerun":
            assert options.rerun_program is not None, "on_overflow 'rerun' needs RunOptions.rerun_program"
            self.rerun = Rerun(trainer, options.rerun_program)
        self.ckpt = Checkpointer(trainer, options.resume, options.resume_with_changes)
        self.logs = _logs(options, t, self.ckpt.start) if self.rank == 0 else []
        self.pending, self.history, self.routing = AsyncMetrics(), [], []
        self.throughput = flops.throughput(spec.model, spec.budgets.seq_len, device)   # before any capture

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = local_rows(self.source.global_batch(step, self.world * self.mb), self.rank, self.mb)
        return tuple(x.to(self.device, non_blocking=True) for x in rows)

    def run(self) -> None:
        done = self.ckpt.start
        for step in range(self.ckpt.start, self.spec.train.steps):
            tokens, labels = self.batch(step)
            self.trainer.set_lr(step)
            self.report(self.pending.push(step, _host(self.runner.run(tokens, labels))))
            if self.rerun is not None:
                self.drain()   # this step's overflow flag, before the next step reads the weights
            done = step + 1
            for hook in self.options.hooks:
                hook(done)
            stop = self.ckpt.stop_asked()
            if stop or self.ckpt.due(done):
                self.drain()   # every step in the saved state has been checked
                self.ckpt.save(done)
            if stop:
                raise self.ckpt.stopped_early(done)
        self.drain()
        self.ckpt.save(done)

    def drain(self) -> None:
        for finished in self.pending.drain():
            self.report(finished)

    def report(self, finished) -> None:
        """Host metrics of one finished step; the overflow, rerun and non-finite policies; the logs."""
        if finished is None:
            return
        step, tensors, seconds = finished
        m = self.host(step, tensors, seconds)
        if self.rerun is not None and m["overflow"]:
            assert m["skipped"], f"step {step} overflowed under on_overflow 'rerun' but its update was applied"
            m = self.redo(step, m)
        check_overflow(self.spec, m, step)
        self.check_finite(m)
        if self.options.record_routing:
            self.routing.append(tensors[2].clone())
        self.history.append(m)
        for log in self.logs:
            log.log(m)

    def host(self, step: int, tensors, seconds: float) -> dict:
        loss_sum, stats, _, skipped, nonfinite = tensors
        m = host_metrics(loss_sum, stats, self.trainer.moe_names)
        m.update(step=step, step_ms=seconds * 1e3, skipped=int(skipped.reshape(-1)[0]),
                 nonfinite=int(nonfinite.reshape(-1)[0]), rerun=0, overflow_before_rerun=0,
                 tokens_per_s=self.world * self.mb * self.spec.budgets.seq_len / max(seconds, 1e-9))
        m.update(self.throughput.metrics(m["tokens_per_s"] / self.world))   # tflops_per_gpu, mfu
        return m

    def redo(self, step: int, first: dict) -> dict:
        """The overflowed step again, every row in place; its metrics replace the first attempt's."""
        tokens, labels = self.batch(step)
        self.trainer.set_lr(step)
        again = AsyncMetrics()
        again.push(step, _host(self.rerun.run(tokens, labels)))
        _, tensors, seconds = next(again.drain())
        m = self.host(step, tensors, first["step_ms"] / 1e3 + seconds)
        m.update(rerun=1, overflow_before_rerun=first["overflow"])
        return m

    def check_finite(self, m: dict) -> None:
        if not m["nonfinite"] or self.spec.train.on_nonfinite == "skip":
            return
        d = self.spec.train.checkpoint.dir
        last = latest(d) if d else None
        kept = f"; the newest checkpoint is {last[1]}" if last else ""
        raise NonFiniteError(f"step {m['step']}: the loss or gradient norm is NaN/inf; its update was skipped and "
                             f"the run stopped (train.on_nonfinite: stop){kept}. Lower train.optimizer.lr, or set "
                             "train.on_nonfinite: skip to skip such steps")

    def close(self) -> None:
        for log in self.logs:
            log.close()
        if self.options.record_routing and self.rank == 0 and self.routing:
            save_trace(torch.stack(self.routing), self.options.record_routing)


def _logs(options: RunOptions, t, start: int) -> list:
    logs = []
    if options.metrics_path:
        logs.append(JsonlLog(options.metrics_path, t.log_interval))
    if options.show_progress:
        logs.append(ProgressLog(t.steps, start))
    if options.tensorboard:
        logs.append(TensorBoardLog(options.tensorboard))
    return logs
