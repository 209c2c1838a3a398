"""Run under torchrun by tests/runtime/test_zero.py (gloo, CPU).

argv: CONFIG_JSON with the spec (a dict), `mode`, `out` and the mode's settings:

  guard    step 0 normal; step 1 with a NaN gradient injected on the last rank only; step 2
           normal. Per step: skipped / nonfinite flags, whether the whole weights, the optimizer's
           step count and the expert biases changed. With on_overflow 'rerun' and a tight
           capacity the overflowing steps are skipped the same way (no NaN injected then).
  resume   (ZeRO) `steps` steps uninterrupted; a second trainer runs `save_at` steps, saves, a
           third loads that checkpoint and runs the rest: both loss sequences.
  memory   ZeRO 3: after a forward, how many gathered weights are still alive; units gathered
           again in backward; the size of every parameter this rank holds.
  reduce   ZeRO 2: one forward + backward; each reduce-scatter the graph's backward runs (its
           unit's first parameter, and how many whole `.grad`s exist at that moment), then
           the whole gradients and the shards left after backward.
"""
import json
import sys

import torch
import torch.distributed as dist

from echoc.compile import compile_build
from echoc.spec_io import spec_from_dict
from runtime import checkpoint, comm, contracts, zero_ops
from runtime.data import TokenSource, local_rows
from runtime.model import lm_loss, moe_layers
from runtime.trainer import Trainer, init_distributed


def batch(spec, step, device):
    t, world, mb = spec.train, dist.get_world_size(), spec.budgets.micro_batch
    source = TokenSource(t.data.kind, spec.model.vocab_size, spec.budgets.seq_len, t.seed, t.data.path)
    return (x.to(device) for x in local_rows(source.global_batch(step, world * mb), dist.get_rank(), mb))


def run_step(trainer, spec, step, device):
    tokens, labels = batch(spec, step, device)
    trainer.set_lr(step)
    trainer.zero_grad()
    return trainer.step(tokens, labels)


def snapshot(trainer):
    weights = {k: v.clone() for k, v in trainer.state.full("weight").items()}
    biases = [m.router.expert_bias.clone() for _, m in moe_layers(trainer.model)]
    return weights, biases, float(trainer.state.optimizer.step_count)


def changed(before, after):
    (w0, b0, s0), (w1, b1, s1) = before, after
    return {"weights": any(not torch.equal(w0[k], w1[k]) for k in w0),
            "biases": any(not torch.equal(x, y) for x, y in zip(b0, b1)), "step_count": s1 != s0}


def guard(cfg, spec, device):
    trainer = Trainer(compile_build(spec).program, device)
    last, rows = dist.get_rank() == dist.get_world_size() - 1, []
    for step in range(3):
        handle = None
        if step == 1 and cfg.get("inject_nan") and last:
            handle = trainer.model.get_parameter("lm_head.weight").register_hook(lambda g: g * float("nan"))
        before = snapshot(trainer)
        m = run_step(trainer, spec, step, device)
        if handle is not None:
            handle.remove()
        rows.append({"skipped": int(m.skipped[0]), "nonfinite": int(m.nonfinite[0]),
                     "overflow": int(m.stats[:, :, 0].sum()), **changed(before, snapshot(trainer))})
    return rows


def losses(trainer, spec, device, steps):
    return [float(run_step(trainer, spec, s, device).loss_sum[0]) / dist.get_world_size() for s in steps]


def resume(cfg, spec, device):
    steps, k = cfg["steps"], cfg["save_at"]
    whole = losses(Trainer(compile_build(spec).program, device), spec, device, range(steps))
    first = Trainer(compile_build(spec).program, device)
    head = losses(first, spec, device, range(k))
    path = checkpoint.save(first, k, cfg["ckpt_dir"])
    second = Trainer(compile_build(spec).program, device)
    start = checkpoint.load(second, path)
    return {"whole": whole, "resumed": head + losses(second, spec, device, range(start, steps)), "start": start}


def memory(cfg, spec, device):
    trainer = Trainer(compile_build(spec).program, device)
    tokens, labels = batch(spec, 0, device)
    before = zero_ops.REGATHERS[0]
    with zero_ops.regather_in_backward():
        out = trainer.gm(tokens)
        loss = lm_loss(out[0], labels)
        alive = zero_ops.live_gathered()
        (loss / dist.get_world_size()).backward()
    held = {s.name: [s.param.numel(), s.shard.numel, s.weight_sharded] for s in trainer.state.params}
    units = len(zero_ops.gathered_params(trainer.gm))
    return {"alive_after_forward": alive, "regathered": zero_ops.REGATHERS[0] - before, "held": held,
            "gathered_params": units, "units": sum(1 for n in trainer.gm.graph.nodes if contracts.of(n.target) is zero_ops.ZERO_GATHER)}


def reduce(cfg, spec, device):
    trainer = Trainer(compile_build(spec).program, device)
    tokens, labels = batch(spec, 0, device)
    calls, inner = [], zero_ops.reduce_scatter_full
    params = dict(trainer.model.named_parameters())

    def counting(fulls, specs, dtype):
        calls.append([len(zero_ops.SHARD_GRADS.by_name), sum(p.grad is not None for p in params.values())])
        return inner(fulls, specs, dtype)

    zero_ops.reduce_scatter_full = counting
    trainer.zero_grad()
    out = trainer.gm(tokens)
    (lm_loss(out[0], labels) / dist.get_world_size()).backward()
    zero_ops.reduce_scatter_full = inner
    reduced = zero_ops.reduced_params(trainer.gm)
    shards = {n: [zero_ops.SHARD_GRADS.by_name[n].numel(), s.shard.rows]
              for s in trainer.state.params for n in [s.name] if n in zero_ops.SHARD_GRADS.by_name}
    units = [n.name for n in trainer.gm.graph.nodes if contracts.of(n.target) is zero_ops.ZERO_REDUCE]
    return {"calls": calls, "units": units, "reduced": sorted(reduced), "params": sorted(params),
            "whole_grads": [n for n, p in params.items() if p.grad is not None], "shards": shards}


def main():
    cfg = json.load(open(sys.argv[1]))
    spec = spec_from_dict(cfg["spec"])
    device = init_distributed(spec)
    result = {"guard": guard, "resume": resume, "memory": memory, "reduce": reduce}[cfg["mode"]](cfg, spec, device)
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, result)
    if dist.get_rank() == 0:
        json.dump(everyone, open(cfg["out"], "w"))
    comm.shutdown()


if __name__ == "__main__":
    main()
