"""The training worker: one process per rank, started by torchrun.

Builds the reference model on every rank from the same seed, keeps this rank's
expert shard, runs the compiled graph (the same passes `echoc compile` runs),
reduces gradients, steps AdamW, updates the aux-loss-free expert bias, and logs.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from echoc.errors import CapacityOverflowError, EchocError, MissingDependencyError
from echoc.spec import Spec
from runtime import arena, comm
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


def make_arena(spec: Spec, device: torch.device) -> arena.Arena:
    """Plan the MoE buffers (on the meta device, as `echoc compile` does) and allocate the arena once."""
    from echoc.compile import buffer_plan_of
    from passes.buffer_plan import arena_layout
    return arena.Arena(arena_layout(buffer_plan_of(spec)), device)


def build_reference(spec: Spec, device: torch.device) -> Transformer:
    """The full single-process model, identical on every rank for the same seed."""
    torch.manual_seed(spec.train.seed)
    model = Transformer(spec.model)
    return model.to(device=device, dtype=DTYPES[spec.model.dtype])


@dataclass
class StepOut:
    loss: torch.Tensor       # [] this rank's mean loss (detached)
    stats: torch.Tensor      # [num_moe_layers, 4] (dropped, received, sent, clones) on this rank
    counts: torch.Tensor     # [num_moe_layers, ep, E] the EP group's routing counts


@dataclass
class DeviceMetrics:
    """Global step metrics, still on the device (so a captured step can produce them)."""
    loss_sum: torch.Tensor   # [1] float32: Σ over ranks of each rank's mean loss
    stats: torch.Tensor      # [world, num_moe_layers, 4] int64
    counts: torch.Tensor     # [num_moe_layers, ep, E] int64 (this EP group)


class Trainer:
    """The distributed, compiled model and its optimizer.

    `step` is the whole iteration — forward, backward, gradient reductions, AdamW,
    expert-bias update and the metric collectives — with no host read, so the runtime
    can capture it as one CUDA graph (runtime/cuda_graph.py) or run it eagerly.
    """

    def __init__(self, spec: Spec, device: torch.device, model: Transformer | None = None):
        from echoc.compile import compile_graph
        self.spec, self.device = spec, device
        self.model = model if model is not None else build_reference(spec, device)
        shard_experts(self.model, comm.group_rank("ep"), spec.parallel.ep)
        self.gm, self.pass_records = compile_graph(self.model, spec)
        o = spec.train.optimizer
        capturable = device.type == "cuda"
        # lr lives in a device tensor so a captured step reads the schedule's current value
        self.lr = torch.tensor(o.lr, device=device) if capturable else o.lr
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, betas=o.betas,
                                     weight_decay=o.weight_decay, capturable=capturable,
                                     foreach=capturable or None)
        self.world = dist.get_world_size()
        self.moe_names = [n for n, _ in moe_layers(self.model)]
        self.arena = make_arena(spec, device) if spec.backends.uses_arena and self.moe_names else None
        self._arena_checked = False

    def set_lr(self, step: int) -> None:
        """Warm-up schedule; the value goes into the device tensor the optimizer reads."""
        o = self.spec.train.optimizer
        lr = o.lr * min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps else o.lr
        if isinstance(self.lr, torch.Tensor):
            self.lr.fill_(lr)
        else:
            for g in self.opt.param_groups:
                g["lr"] = lr

    def forward_backward(self, tokens: torch.Tensor, labels: torch.Tensor) -> StepOut:
        with arena.active(self.arena):   # the MoE ops write into their planned views, forward and backward
            out = self.gm(tokens)
            if isinstance(out, tuple):
                logits, stats, counts = out
            else:  # no MoE layer
                logits, stats, counts = out, tokens.new_zeros(0, 4), tokens.new_zeros(0, 1, 1)
            loss = lm_loss(logits, labels)
            (loss / self.world).backward()
        self._check_arena_use()
        reduce_gradients(self.model)
        return StepOut(loss.detach(), stats, counts)

    def _check_arena_use(self) -> None:
        """After the first step: every planned view was asked for by its op (the plan and the
        ops agree on every key), so no planned buffer fell back to the allocator unseen."""
        if self.arena is None or self._arena_checked:
            return
        unused = set(self.arena.layout.views) - self.arena.taken
        assert not unused, f"planned arena views no op asked for: {sorted(unused)[:8]}"
        self._arena_checked = True

    def optimizer_step(self, step: int | None = None) -> None:
        if step is not None:
            self.set_lr(step)
        self.opt.step()
        all_reduce_load(self.model)
        update_expert_bias(self.model)

    def step(self, tokens: torch.Tensor, labels: torch.Tensor) -> DeviceMetrics:
        """One whole iteration. Gradients must be None on entry (see zero_grad)."""
        out = self.forward_backward(tokens, labels)
        self.optimizer_step()
        return device_metrics(out)

    def zero_grad(self) -> None:
        self.opt.zero_grad(set_to_none=True)


def device_metrics(out: StepOut) -> DeviceMetrics:
    loss = out.loss.float().reshape(1).clone()
    dist.all_reduce(loss)
    stats = out.stats.to(torch.int64).contiguous()
    world = dist.get_world_size()
    all_stats = torch.empty((world,) + tuple(stats.shape), dtype=stats.dtype, device=stats.device)
    if stats.numel():
        dist.all_gather_into_tensor(all_stats.view(-1), stats.view(-1))
    return DeviceMetrics(loss, all_stats, out.counts.detach().clone())


def host_metrics(loss_sum: torch.Tensor, all_stats: torch.Tensor, names: list[str]) -> dict:
    """From host copies of DeviceMetrics: global loss, overflow, token straggler
    (max / mean received rows over the ranks, worst layer), clones per layer."""
    world = all_stats.shape[0]
    received = all_stats[:, :, 1].double()  # [world, layers]
    straggler = float((received.max(0).values / received.mean(0).clamp(min=1)).max()) if all_stats.numel() else 1.0
    dropped = all_stats[:, :, 0]
    return {"loss": float(loss_sum.reshape(-1)[0]) / world, "overflow": int(dropped.sum()),
            "overflow_by_layer_rank": dropped.T.tolist(), "token_straggler": straggler,
            "clones": int(all_stats[0, :, 3].sum()) if all_stats.numel() else 0, "layers": names}


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


def check_tensorboard() -> None:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise MissingDependencyError("--tensorboard", "pip install tensorboard") from None


class _TensorBoard:
    """Scalars per step (rank 0), when asked for and installed."""

    def __init__(self, logdir: str):
        check_tensorboard()
        from torch.utils.tensorboard import SummaryWriter
        self.w = SummaryWriter(logdir)

    def log(self, m: dict) -> None:
        for key in ("loss", "overflow", "token_straggler", "tokens_per_s", "step_ms", "clones"):
            self.w.add_scalar(key, m[key], m["step"])

    def close(self) -> None:
        self.w.close()


def train(spec: Spec, metrics_path: str | None = None, show_progress: bool = True,
          record_routing: str | None = None, tensorboard: str | None = None,
          resume: bool = False) -> list[dict]:
    """Run spec.train.steps steps; returns the per-step metrics (identical on every rank).

    With cuda_graph 'full_iteration' the first steps run eagerly on a side stream (warm-up),
    then the iteration is captured once and replayed; metrics reach the host through pinned
    buffers and are read one step late, so logging never stalls the GPU.
    """
    from runtime.cuda_graph import AsyncMetrics, StepRunner
    device = init_distributed(spec)
    rank, world = dist.get_rank(), dist.get_world_size()
    trainer = Trainer(spec, device)
    t = spec.train
    source = TokenSource(t.data.kind, spec.model.vocab_size, spec.budgets.seq_len, t.seed, t.data.path)
    mb = spec.budgets.micro_batch
    runner = StepRunner(trainer, graph=spec.backends.cuda_graph == "full_iteration" and device.type == "cuda")
    pending = AsyncMetrics()
    log = open(metrics_path, "a") if (metrics_path and rank == 0) else None
    history: list[dict] = []
    ckpt = _Checkpointing(spec, trainer, resume)
    progress = _Progress(t.steps, ckpt.start) if (show_progress and rank == 0) else None
    board = _TensorBoard(tensorboard) if (tensorboard and rank == 0) else None

    routing: list[torch.Tensor] = []

    def report(done):
        step, (loss_sum, stats, counts), seconds = done
        if record_routing:
            routing.append(counts.clone())
        m = host_metrics(loss_sum, stats, trainer.moe_names)
        m.update(step=step, step_ms=seconds * 1e3, tokens_per_s=world * mb * spec.budgets.seq_len / seconds)
        history.append(m)
        if log and step % t.log_interval == 0:
            log.write(json.dumps({k: v for k, v in m.items() if k != "layers"}) + "\n")
            log.flush()
        if progress:
            progress.update(m)
        if board:
            board.log(m)
        check_overflow(spec, m, step)

    for step in range(ckpt.start, t.steps):
        tokens, labels = (x.to(device, non_blocking=True)
                          for x in local_rows(source.global_batch(step, world * mb), rank, mb))
        trainer.set_lr(step)
        metrics = runner.run(tokens, labels)
        done = pending.push(step, (metrics.loss_sum, metrics.stats, metrics.counts))
        if done is not None:
            report(done)
        if ckpt.after_step(step + 1):
            break
    for done in pending.drain():
        report(done)
    ckpt.finish(t.steps)
    for closing in (progress, board, log):
        if closing:
            closing.close()
    if record_routing and rank == 0 and routing:
        from echoc.simulate import save_trace
        save_trace(torch.stack(routing), record_routing)  # [steps, layers, ep, E] of EP group 0
    return history


def _injected_fault(done: int) -> None:
    """Fault-tolerance tests: ECHOC_KILL_AT="rank:step" SIGKILLs that rank after that many
    steps, on torchrun's first attempt only (the restarted workers then run through)."""
    spec_ = os.environ.get("ECHOC_KILL_AT")
    if not spec_ or int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0:
        return
    rank, step = (int(v) for v in spec_.split(":"))
    if dist.get_rank() == rank and done == step:
        import signal
        os.kill(os.getpid(), signal.SIGKILL)


class _Checkpointing:
    """Resume at start, save every `train.checkpoint.interval` steps, on SIGTERM and at the end.

    Without `train.checkpoint.dir` it does nothing. A torchrun elastic restart
    (TORCHELASTIC_RESTART_COUNT > 0) resumes from the last complete checkpoint by itself.
    """

    def __init__(self, spec: Spec, trainer: "Trainer", resume: bool):
        import threading
        from runtime import checkpoint
        self.ck, self.trainer, self.c = spec.train.checkpoint, trainer, checkpoint
        self.start, self.stopped = 0, False
        restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0
        if resume and not self.ck.dir:
            raise EchocError("--resume needs train.checkpoint.dir in the spec")
        if not self.ck.dir:
            return
        if resume or restarted:
            self.start = checkpoint.resume(trainer, self.ck.dir)
        self.flag = threading.Event()
        checkpoint.install_sigterm(self.flag)

    def after_step(self, done: int) -> bool:
        """Save if due; True when a SIGTERM asked the run to stop (after saving)."""
        _injected_fault(done)
        if not self.ck.dir:
            return False
        if self.ck.interval and done % self.ck.interval == 0:
            self._save(done)
        if self.c.stop_requested(self.flag):
            self._save(done)
            self.stopped = True
        return self.stopped

    def finish(self, steps: int) -> None:
        if self.ck.dir and not self.stopped:
            self._save(steps)

    def _save(self, done: int) -> None:
        self.c.save(self.trainer, done, self.ck.dir)
        if dist.get_rank() == 0:
            self.c.keep_last(self.ck.dir, 3)


class _Progress:
    """A rich progress bar on rank 0: step, loss, tokens/s, overflow, token straggler."""

    def __init__(self, total: int, done: int = 0):
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
        self.p = Progress(TextColumn("step"), MofNCompleteColumn(), BarColumn(),
                          TextColumn("{task.fields[info]}"), TimeElapsedColumn())
        self.p.start()
        self.task = self.p.add_task("train", total=total, completed=done, info="")

    def update(self, m: dict) -> None:
        info = (f"loss {m['loss']:.4f} · {m['tokens_per_s']:,.0f} tok/s · overflow {m['overflow']} · "
                f"straggler {m['token_straggler']:.3f}")
        self.p.update(self.task, advance=1, info=info)

    def close(self) -> None:
        self.p.stop()
