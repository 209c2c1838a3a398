"""The training worker: one process per rank, started by torchrun.

Builds the reference model on every rank from the same seed, keeps this rank's
expert shard, runs the compiled graph (the same passes `echoc compile` runs),
reduces gradients, steps AdamW, updates the aux-loss-free expert bias, and logs.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from echoc.errors import CapacityOverflowError
from echoc.spec import Spec
from runtime import comm
from runtime.data import TokenSource, local_rows
from runtime.model import Transformer, lm_loss, moe_layers, update_expert_bias
from runtime.parallel import all_reduce_load, reduce_gradients, shard_experts

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def init_distributed(spec: Spec) -> torch.device:
    """Join the torchrun job (or a 1-process world) and create the EP / expert-DP groups."""
    if spec.cluster.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        if "RANK" not in os.environ:
            os.environ.update(RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=os.environ.get("MASTER_PORT", "29517"))
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None)
    if dist.get_world_size() != spec.cluster.world_size:
        raise RuntimeError(f"torchrun started {dist.get_world_size()} processes but the spec's cluster "
                           f"has {spec.cluster.world_size} (nodes × gpus_per_node)")
    comm.init_groups(spec.parallel.ep, spec.parallel.dp)
    return device


def build_reference(spec: Spec, device: torch.device) -> Transformer:
    """The full single-process model, identical on every rank for the same seed."""
    torch.manual_seed(spec.train.seed)
    model = Transformer(spec.model)
    return model.to(device=device, dtype=DTYPES[spec.model.dtype])


@dataclass
class StepOut:
    loss: torch.Tensor       # [] this rank's mean loss (detached)
    stats: torch.Tensor      # [num_moe_layers, 3] (dropped, received, sent) on this rank


class Trainer:
    """The distributed, compiled model and its optimizer."""

    def __init__(self, spec: Spec, device: torch.device, model: Transformer | None = None):
        from echoc.compile import compile_graph
        self.spec, self.device = spec, device
        self.model = model if model is not None else build_reference(spec, device)
        shard_experts(self.model, comm.group_rank("ep"), spec.parallel.ep)
        self.gm, self.pass_records = compile_graph(self.model, spec)
        o = spec.train.optimizer
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=o.lr, betas=o.betas,
                                     weight_decay=o.weight_decay)
        self.world = dist.get_world_size()
        self.moe_names = [n for n, _ in moe_layers(self.model)]

    def forward_backward(self, tokens: torch.Tensor, labels: torch.Tensor) -> StepOut:
        out = self.gm(tokens)
        logits, stats = out if isinstance(out, tuple) else (out, torch.zeros(0, 3, dtype=torch.int64))
        loss = lm_loss(logits, labels)
        (loss / self.world).backward()
        reduce_gradients(self.model)
        return StepOut(loss.detach(), stats)

    def optimizer_step(self, step: int) -> None:
        o = self.spec.train.optimizer
        if o.warmup_steps:
            for g in self.opt.param_groups:
                g["lr"] = o.lr * min(1.0, (step + 1) / o.warmup_steps)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        all_reduce_load(self.model)
        update_expert_bias(self.model)


def gather_step_metrics(out: StepOut, names: list[str]) -> dict:
    """Global loss, overflow and token straggler (max/mean received rows over EP ranks)."""
    loss = out.loss.clone()
    dist.all_reduce(loss)
    stats = out.stats.to(torch.int64)
    world = dist.get_world_size()
    all_stats = torch.empty((world,) + tuple(stats.shape), dtype=stats.dtype, device=stats.device)
    dist.all_gather_into_tensor(all_stats.view(-1), stats.contiguous().view(-1))
    all_stats = all_stats.cpu()
    received = all_stats[:, :, 1].float()  # [world, layers]
    straggler = (received.max(0).values / received.mean(0).clamp(min=1)).max().item() if stats.numel() else 1.0
    dropped = all_stats[:, :, 0]
    return {"loss": loss.item() / world, "overflow": int(dropped.sum()),
            "overflow_by_layer_rank": dropped.T.tolist(), "token_straggler": straggler,
            "layers": names}


def check_overflow(spec: Spec, metrics: dict, step: int) -> None:
    if spec.budgets.on_overflow != "error" or metrics["overflow"] == 0:
        return
    for layer, per_rank in zip(metrics["layers"], metrics["overflow_by_layer_rank"]):
        for rank, n in enumerate(per_rank):
            if n:
                raise CapacityOverflowError(
                    f"step {step}: {n} token copies from rank {rank} did not fit layer {layer}'s "
                    f"dispatch chunk ({spec.peer_chunk_rows} rows per peer); raise "
                    "budgets.received_token_capacity or set budgets.on_overflow: drop")


def train(spec: Spec, metrics_path: str | None = None, show_progress: bool = True) -> list[dict]:
    """Run spec.train.steps steps; returns the per-step metrics (identical on every rank)."""
    device = init_distributed(spec)
    rank, world = dist.get_rank(), dist.get_world_size()
    trainer = Trainer(spec, device)
    t = spec.train
    source = TokenSource(t.data.kind, spec.model.vocab_size, spec.budgets.seq_len, t.seed, t.data.path)
    mb = spec.budgets.micro_batch
    log = open(metrics_path, "a") if (metrics_path and rank == 0) else None
    history = []
    progress = _Progress(t.steps) if (show_progress and rank == 0) else None
    for step in range(t.steps):
        t0 = time.perf_counter()
        tokens, labels = (x.to(device) for x in local_rows(source.global_batch(step, world * mb), rank, mb))
        out = trainer.forward_backward(tokens, labels)
        trainer.optimizer_step(step)
        m = gather_step_metrics(out, trainer.moe_names)
        dt = time.perf_counter() - t0
        m.update(step=step, tokens_per_s=world * tokens.numel() / dt, step_ms=dt * 1e3)
        history.append(m)
        if log and step % t.log_interval == 0:
            log.write(json.dumps({k: v for k, v in m.items() if k != "layers"}) + "\n")
            log.flush()
        if progress:
            progress.update(m)
        check_overflow(spec, m, step)
    if progress:
        progress.close()
    if log:
        log.close()
    return history


class _Progress:
    """A rich progress bar on rank 0: step, loss, tokens/s, overflow, token straggler."""

    def __init__(self, total: int):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self.p = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                          TextColumn("{task.fields[info]}"), TimeElapsedColumn())
        self.p.start()
        self.task = self.p.add_task("train", total=total, info="")

    def update(self, m: dict) -> None:
        info = (f"loss {m['loss']:.4f} · {m['tokens_per_s']:,.0f} tok/s · overflow {m['overflow']} · "
                f"straggler {m['token_straggler']:.3f}")
        self.p.update(self.task, advance=1, info=info)

    def close(self) -> None:
        self.p.stop()


def write_history(path: str | Path, history: list[dict]) -> None:
    Path(path).write_text(json.dumps(history))
