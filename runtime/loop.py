"""The training loop: run a compiled Program for spec.train.steps steps on this rank.

    trainer  = Trainer(program, device)          the model, its optimizer, one whole iteration
    runner   = StepRunner(trainer, graph=...)    eager, or captured once as one CUDA graph
    for each step: next batch → runner.run → metrics of the step before (pinned, async)
                   → logs → checkpoint if due / asked to stop

Metrics reach the host a step late through pinned buffers, so logging never stalls the
GPU. `hooks` are called with the number of finished steps after each step (tests use
them to inject faults; nothing in the loop knows about faults).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from runtime.checkpoint import Checkpointer
from runtime.cuda_graph import AsyncMetrics, StepRunner
from runtime.data import TokenSource, local_rows
from runtime.metrics import JsonlLog, ProgressLog, TensorBoardLog, check_overflow, host_metrics
from runtime.program import Program
from runtime.routing_trace import save_trace
from runtime.trainer import Trainer


@dataclass
class RunOptions:
    metrics_path: str | None = None        # JSONL on rank 0
    show_progress: bool = True
    record_routing: str | None = None      # routing counts [steps, layers, ep, E] of EP group 0
    tensorboard: str | None = None
    resume: bool = False
    hooks: list[Callable[[int], None]] = field(default_factory=list)


def train(program: Program, device: torch.device, options: RunOptions = RunOptions()) -> list[dict]:
    """Run the steps; returns the per-step metrics (identical on every rank)."""
    spec, t = program.spec, program.spec.train
    rank, world, mb = dist.get_rank(), dist.get_world_size(), spec.budgets.micro_batch
    trainer = Trainer(program, device)
    source = TokenSource(t.data.kind, spec.model.vocab_size, spec.budgets.seq_len, t.seed, t.data.path)
    runner = StepRunner(trainer, graph=spec.backends.cuda_graph == "full_iteration" and device.type == "cuda")
    ckpt = Checkpointer(trainer, options.resume)
    logs = _logs(options, t, ckpt.start) if rank == 0 else []
    pending, history, routing = AsyncMetrics(), [], []

    def report(done) -> None:
        step, (loss_sum, stats, counts), seconds = done
        if options.record_routing:
            routing.append(counts.clone())
        m = host_metrics(loss_sum, stats, trainer.moe_names)
        m.update(step=step, step_ms=seconds * 1e3, tokens_per_s=world * mb * spec.budgets.seq_len / seconds)
        history.append(m)
        for log in logs:
            log.log(m)
        check_overflow(spec, m, step)

    for step in range(ckpt.start, t.steps):
        tokens, labels = (x.to(device, non_blocking=True)
                          for x in local_rows(source.global_batch(step, world * mb), rank, mb))
        trainer.set_lr(step)
        metrics = runner.run(tokens, labels)
        done = pending.push(step, (metrics.loss_sum, metrics.stats, metrics.counts))
        if done is not None:
            report(done)
        for hook in options.hooks:
            hook(step + 1)
        if ckpt.after_step(step + 1):
            break
    for done in pending.drain():
        report(done)
    ckpt.finish(t.steps)
    for log in logs:
        log.close()
    if options.record_routing and rank == 0 and routing:
        save_trace(torch.stack(routing), options.record_routing)
    return history


def _logs(options: RunOptions, t, start: int) -> list:
    logs = []
    if options.metrics_path:
        logs.append(JsonlLog(options.metrics_path, t.log_interval))
    if options.show_progress:
        logs.append(ProgressLog(t.steps, start))
    if options.tensorboard:
        logs.append(TensorBoardLog(options.tensorboard))
    return logs
