"""The distributed model and its optimizer: one training iteration with no host read.

Every rank builds the reference model from the same seed, keeps its expert shard, and
copies it into the compiled program's model (runtime/program.py); `Trainer.step` runs
the program's graph forward and backward, reduces gradients (sharded by the ZeRO level,
runtime/train_state.py), checks the step on the device (non-finite loss or gradients;
overflow under `budgets.on_overflow: rerun`), steps AdamW on fp32 masters unless the check
failed, and updates the aux-loss-free expert bias. The loop around it is runtime/loop.py.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from echoc.errors import EchocError
from echoc.spec import Spec
from runtime import arena, comm, p2p, zero_ops
from runtime.dtypes import torch_dtype
from runtime.loss import chunked_cross_entropy
from runtime.model import Transformer, moe_layers, update_expert_bias
from runtime.parallel import all_reduce_load, shard_experts
from runtime.program import Program, materialize
from runtime.recompute import Recompute
from runtime.train_state import TrainState


def init_distributed(spec: Spec) -> torch.device:
    """Join the torchrun job (or a 1-process world) and create the EP / expert-DP groups."""
    if spec.cluster.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        # outside torchrun, a world of one: an in-process store, so no port is taken (other jobs
        # may share the host)
        alone = {} if "RANK" in os.environ else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None,
                                timeout=timedelta(seconds=spec.train.collective_timeout_s), **alone)
    if dist.get_world_size() != spec.cluster.world_size:
        raise EchocError(f"torchrun started {dist.get_world_size()} processes but the spec's cluster "
                         f"has {spec.cluster.world_size} (nodes × gpus_per_node)")
    comm.init_groups(spec.parallel.ep, spec.parallel.dp, spec.clone_domain_ranks, spec.train.collective_timeout_s)
    return device


def build_reference(spec: Spec, device: torch.device) -> Transformer:
    """The full single-process model, identical on every rank for the same seed."""
    torch.manual_seed(spec.train.seed)
    model = Transformer(spec.model)
    return model.to(device=device, dtype=torch_dtype(spec.model.dtype))


def rank_init(spec: Spec, device: torch.device, reference: nn.Module | None = None) -> nn.Module:
    """This rank's initial weights: the seeded reference (or a given one, left untouched)
    with only this rank's slice of every stacked expert tensor."""
    model = build_reference(spec, device) if reference is None else copy.deepcopy(reference)
    shard_experts(model, comm.group_rank("ep"), spec.parallel.ep)
    return model


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
    skipped: torch.Tensor    # [1] int32: 1 = this step's update was skipped on the device (any cause)
    nonfinite: torch.Tensor  # [1] int32: 1 = some rank's loss or gradients were NaN/inf


class Trainer:
    """The distributed, compiled model and its optimizer.

    `step` is the whole iteration — forward, backward, gradient reductions, the device-side
    guard, AdamW, expert-bias update and the metric collectives — with no host read, so the
    runtime can capture it as one CUDA graph (runtime/cuda_graph.py) or run it eagerly.
    `reference`: start from these full (unsharded) weights instead of the seeded init.
    """

    def __init__(self, program: Program, device: torch.device, reference: nn.Module | None = None):
        spec = program.spec
        self.spec, self.device, self.program = spec, device, program
        # how the `torch` dispatch moves rows (backends.exchange); a peer that never comes fails the step
        p2p.setup(spec.token_exchange, timeout_s=spec.train.collective_timeout_s)
        self.model = materialize(program, rank_init(spec, device, reference), device)
        self.gm = program.gm
        self.state = TrainState(self.model, spec, device, zero_ops.gathered_params(program.gm),
                                zero_ops.reduced_params(program.gm))
        self.lr = self.state.lr
        self.world = dist.get_world_size()
        self.moe_names = [n for n, _ in moe_layers(self.model)]
        uses_arena = program.arena_layout is not None and self.moe_names
        self.arena = arena.Arena(program.arena_layout, device) if uses_arena else None
        self.recomputing = any(isinstance(m, Recompute) for m in program.gm.modules())
        self._arena_checked = False
        # the guard's verdict of the current step, read by optimizer_step (static device tensors)
        self.found_inf = torch.zeros((), dtype=torch.float32, device=device)
        self.skipped = torch.zeros(1, dtype=torch.int32, device=device)
        self.nonfinite = torch.zeros(1, dtype=torch.int32, device=device)

    def set_lr(self, step: int) -> None:
        """Warm-up schedule; the value goes into the device tensor the optimizer reads."""
        o = self.spec.train.optimizer
        self.lr.fill_(o.lr * min(1.0, (step + 1) / o.warmup_steps) if o.warmup_steps else o.lr)

    def forward_backward(self, tokens: torch.Tensor, labels: torch.Tensor) -> StepOut:
        """Forward, backward, gradient reduction and the guard (sets found_inf / skipped / nonfinite).
        tokens, labels: [micro_batch, seq_len] int64, the shape the plan was made for."""
        want = (self.spec.budgets.micro_batch, self.spec.budgets.seq_len)
        if tuple(tokens.shape) != want or tuple(labels.shape) != want:
            raise ValueError(f"tokens {tuple(tokens.shape)} and labels {tuple(labels.shape)}: the plan is for "
                             f"[budgets.micro_batch, budgets.seq_len] = {list(want)}")
        if self.arena is not None:
            self.arena.allocate()
        with arena.active(self.arena), zero_ops.regather_in_backward():
            out = self.gm(tokens)
            if self.arena is not None:     # the loss reuses the transient MoE block; saved views keep theirs
                self.arena.end_forward(self.recomputing)
            if isinstance(out, tuple):
                logits, stats, counts = out
            else:  # no MoE layer
                logits, stats, counts = out, tokens.new_zeros(0, 4), tokens.new_zeros(0, 1, 1)
            loss = chunked_cross_entropy(logits, labels)    # saves the logits, not an fp32 copy
            del out, logits
            (loss / self.world).backward()
        self._check_arena_use()
        if self.arena is not None:
            self.arena.release()      # the reduction and the optimizer reuse the MoE buffers' bytes
        self.state.reduce_grads()
        step_out = StepOut(loss.detach(), stats, counts)
        self._guard(step_out)
        return step_out

    def _check_arena_use(self) -> None:
        """After the first step: every planned view was asked for by its op (the plan and the
        ops agree on every key), so no planned buffer fell back to the allocator unseen."""
        if self.arena is None or self._arena_checked:
            return
        unused = set(self.arena.layout.views) - self.arena.taken
        assert not unused, f"planned arena views no op asked for: {sorted(unused)[:8]}"
        self._arena_checked = True

    @torch.no_grad()
    def _guard(self, out: StepOut) -> None:
        """On the device, agreed by every rank: skip this step's update when any rank's loss or
        gradients are NaN/inf, or (budgets.on_overflow 'rerun') any rank dropped a row."""
        bad = ~(torch.isfinite(out.loss.float()) & torch.isfinite(self.state.grad_sq_sum()))
        overflowed = out.stats[:, 0].sum() > 0 if out.stats.numel() else torch.zeros((), dtype=torch.bool,
                                                                                          device=self.device)
        flags = torch.stack([bad, overflowed]).float()
        if self.world > 1:
            dist.all_reduce(flags)
        nonfinite = flags[0] > 0
        skip = nonfinite | ((flags[1] > 0) & (self.spec.budgets.on_overflow == "rerun"))
        self.found_inf.copy_(skip.float())
        self.skipped.copy_(skip.reshape(1))
        self.nonfinite.copy_(nonfinite.reshape(1))

    @torch.no_grad()
    def optimizer_step(self, step: int | None = None) -> None:
        """AdamW (skipped on the device if the guard said so), then the expert-bias update
        (undone on the device for a skipped step)."""
        if step is not None:
            self.set_lr(step)
        self.state.step(self.found_inf)
        all_reduce_load(self.model)
        biases = [moe.router.expert_bias for _, moe in moe_layers(self.model)]
        before = [b.clone() for b in biases]
        update_expert_bias(self.model)
        keep = self.found_inf > 0
        for b, old in zip(biases, before):
            b.copy_(torch.where(keep, old, b))

    def step(self, tokens: torch.Tensor, labels: torch.Tensor) -> DeviceMetrics:
        """One whole iteration. Gradients must be None on entry (see zero_grad)."""
        out = self.forward_backward(tokens, labels)
        self.optimizer_step()
        return device_metrics(out, self.skipped, self.nonfinite)

    def zero_grad(self) -> None:
        self.state.zero_grad()


def device_metrics(out: StepOut, skipped: torch.Tensor, nonfinite: torch.Tensor) -> DeviceMetrics:
    loss = out.loss.float().reshape(1).clone()
    dist.all_reduce(loss)
    stats = out.stats.to(torch.int64).contiguous()
    world = dist.get_world_size()
    all_stats = torch.empty((world,) + tuple(stats.shape), dtype=stats.dtype, device=stats.device)
    if stats.numel():
        comm.all_gather_flat(all_stats.view(-1), stats.view(-1))
    return DeviceMetrics(loss, all_stats, out.counts.detach().clone(), skipped.clone(), nonfinite.clone())
