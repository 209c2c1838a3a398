"""The distributed model and its optimizer: one training iteration with no host read.

Every rank builds the reference model from the same seed, keeps its expert shard, and
copies it into the compiled program's model (runtime/program.py); `Trainer.step` runs
the program's graph forward, backward, reduces gradients, steps AdamW and updates the
aux-loss-free expert bias. The loop around it is runtime/loop.py.
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
from runtime import arena, comm
from runtime.dtypes import torch_dtype
from runtime.model import Transformer, lm_loss, moe_layers, update_expert_bias
from runtime.parallel import all_reduce_load, reduce_gradients, shard_experts
from runtime.program import Program, materialize


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
        dist.init_process_group(backend, device_id=device if backend == "nccl" else None,
                                timeout=timedelta(seconds=spec.train.collective_timeout_s))
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


class Trainer:
    """The distributed, compiled model and its optimizer.

    `step` is the whole iteration — forward, backward, gradient reductions, AdamW,
    expert-bias update and the metric collectives — with no host read, so the runtime
    can capture it as one CUDA graph (runtime/cuda_graph.py) or run it eagerly.
    `reference`: start from these full (unsharded) weights instead of the seeded init.
    """

    def __init__(self, program: Program, device: torch.device, reference: nn.Module | None = None):
        spec = program.spec
        self.spec, self.device, self.program = spec, device, program
        self.model = materialize(program, rank_init(spec, device, reference), device)
        self.gm = program.gm
        self.opt, self.lr = _adamw(self.model, spec, device)
        self.world = dist.get_world_size()
        self.moe_names = [n for n, _ in moe_layers(self.model)]
        uses_arena = program.arena_layout is not None and self.moe_names
        self.arena = arena.Arena(program.arena_layout, device) if uses_arena else None
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


def _adamw(model: nn.Module, spec: Spec, device: torch.device):
    """AdamW over the model; on CUDA capturable, with lr in a device tensor so a captured
    step reads the schedule's current value."""
    o = spec.train.optimizer
    capturable = device.type == "cuda"
    lr = torch.tensor(o.lr, device=device) if capturable else o.lr
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=o.betas, weight_decay=o.weight_decay,
                            capturable=capturable, foreach=capturable or None)
    return opt, lr


def device_metrics(out: StepOut) -> DeviceMetrics:
    loss = out.loss.float().reshape(1).clone()
    dist.all_reduce(loss)
    stats = out.stats.to(torch.int64).contiguous()
    world = dist.get_world_size()
    all_stats = torch.empty((world,) + tuple(stats.shape), dtype=stats.dtype, device=stats.device)
    if stats.numel():
        comm.all_gather_flat(all_stats.view(-1), stats.view(-1))
    return DeviceMetrics(loss, all_stats, out.counts.detach().clone())
