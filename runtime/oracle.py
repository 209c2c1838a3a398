"""The correctness oracle: the compiled, distributed step against the single-process model.

Every rank builds the full reference model from the same seed and runs it on the
whole global batch (it is small in tests); the distributed Trainer starts from an
identical copy, runs on this rank's rows, and after each step we compare the
global loss and every gradient (expert gradients against the matching slice).
Both then take their optimizer step and bias update. Before each later step the
reference is re-loaded from the distributed model's weights and expert biases
(expert shards all-gathered over EP): Adam's first steps amplify last-bit
rounding differences, and re-syncing keeps every step's comparison exact to
rounding while still checking the step on trained weights and biases. The
weight drift that the two optimizers accumulated is reported too.

`drop_mask` lets a test hand the reference the copies it expects to be dropped
(computed independently), so that with a tight capacity only those rows differ.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.distributed as dist

from runtime import comm
from runtime.data import TokenSource, local_rows
from runtime.model import Transformer, lm_loss, moe_layers, update_expert_bias
from runtime.parallel import expert_param_names
from runtime.program import Program
from runtime.trainer import Trainer, build_reference


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-30))


@dataclass
class StepReport:
    step: int
    loss: float
    ref_loss: float
    loss_rel_err: float
    grad_rel_err: dict[str, float] = field(default_factory=dict)
    dropped: int = 0
    clones: int = 0
    weight_drift: float = 0.0

    @property
    def worst_grad(self) -> tuple[str, float]:
        return max(self.grad_rel_err.items(), key=lambda kv: kv[1])


def _ref_grad(name: str, grad: torch.Tensor, experts: set[str], ep_rank: int, ep: int) -> torch.Tensor:
    if name not in experts:
        return grad
    per = grad.shape[0] // ep
    return grad[ep_rank * per:(ep_rank + 1) * per]


@torch.no_grad()
def _sync_reference(ref: Transformer, trainer: Trainer, experts: set[str]) -> float:
    """Copy the distributed weights (ZeRO shards gathered, then expert shards gathered over EP)
    and expert biases into the reference; return the largest relative difference seen before copying."""
    drift, model = 0.0, trainer.model
    ref_params = dict(ref.named_parameters())
    for name, w in trainer.state.full("weight").items():
        full = comm.all_gather_rows(w, "ep").flatten(0, 1) if name in experts else w
        drift = max(drift, rel_err(ref_params[name].data, full))
        ref_params[name].data.copy_(full)
    ref_buffers = dict(ref.named_buffers())
    for name, b in model.named_buffers():
        if name.endswith("expert_bias"):
            ref_buffers[name].copy_(b)
    return drift


def _install_router_masks(ref: Transformer, mask_fn: Callable) -> None:
    """Multiply each reference router's top-k weights by mask_fn(layer_name, topk_idx)."""
    for name, moe in moe_layers(ref):
        def hook(mod, args, out, name=name):
            idx, w = out
            return idx, w * mask_fn(name, idx).to(w.dtype)
        moe.router.register_forward_hook(hook)


def compare_with_reference(program: Program, device: torch.device, steps: int,
                           drop_mask: Callable | None = None) -> list[StepReport]:
    """Run `steps` steps of both and report relative errors (every rank returns the same losses)."""
    spec = program.spec
    ref = build_reference(spec, device)
    trainer = Trainer(program, device, reference=ref)
    if drop_mask is not None:
        _install_router_masks(ref, drop_mask)
    o = spec.train.optimizer
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    t = spec.train
    source = TokenSource(t.data.kind, spec.model.vocab_size, spec.budgets.seq_len, t.seed, t.data.path)
    rank, world, mb = dist.get_rank(), dist.get_world_size(), spec.budgets.micro_batch
    experts = expert_param_names(ref)
    ep_rank, ep = comm.group_rank("ep"), spec.parallel.ep
    reports = []
    for step in range(steps):
        drift = _sync_reference(ref, trainer, experts) if step else 0.0
        batch = source.global_batch(step, world * mb).to(device)
        ref_loss = lm_loss(ref(batch[:, :-1]), batch[:, 1:])
        ref_loss.backward()
        tokens, labels = local_rows(batch, rank, mb)
        out = trainer.forward_backward(tokens, labels)
        loss = out.loss.clone()
        dist.all_reduce(loss)
        loss /= world
        dropped = out.stats[:, 0].sum().clone() if out.stats.numel() else torch.zeros((), dtype=torch.int64)
        dist.all_reduce(dropped)
        rep = StepReport(step, loss.item(), ref_loss.item(), rel_err(loss, ref_loss.detach()),
                         dropped=int(dropped), weight_drift=drift,
                         clones=int(out.stats[:, 3].sum()) if out.stats.numel() else 0)
        ref_params = dict(ref.named_parameters())
        for name, grad in trainer.state.full("grad").items():   # ZeRO shards gathered
            want = _ref_grad(name, ref_params[name].grad, experts, ep_rank, ep)
            rep.grad_rel_err[name] = rel_err(grad, want)
        reports.append(rep)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        update_expert_bias(ref)
        trainer.optimizer_step(step)
        trainer.zero_grad()
    return reports
