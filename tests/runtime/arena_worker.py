"""Run under torchrun by tests/runtime/test_arena.py: the planned arena against the allocator (gloo, CPU).

argv: CONFIG_JSON. CONFIG holds the spec as a dict (backends.buffers is set here), the step count
and the output path. Three Trainers start from the same reference weights and see the same batches:

  allocator  backends.buffers 'allocator' (PyTorch's caching allocator; the baseline)
  arena      backends.buffers 'arena' (the buffer plan's views)
  collapsed  the arena with every float view moved to one offset: buffers whose lifetimes
             overlap now share bytes, which the plan forbids. It must NOT match: proof that the comparison
             sees a wrong plan, and that the plan's separation of live buffers is what makes the
             arena correct.

Per step: loss and every gradient compared bitwise (allocator vs arena, allocator vs collapsed),
then each takes its optimizer step. With `graph` (CUDA): whole iterations eager vs captured in one
CUDA graph, with and without the arena, compared bitwise (deterministic kernels). Also, one forward through an FX Interpreter records where
each MoE node's output lives: every planned node output must sit at its planned arena address.
"""
import json
import sys

import torch
import torch.distributed as dist
from torch.fx import Interpreter

from echoc.spec_io import spec_from_dict
from runtime import arena, comm, streams
from runtime.arena import Arena, ArenaLayout, View
from runtime.cuda_graph import StepRunner
from runtime.data import TokenSource, local_rows
from echoc.compile import compile_build
from runtime.trainer import Trainer, build_reference, init_distributed


def collapsed(layout: ArenaLayout) -> ArenaLayout:
    """Every floating-point view moved to one offset past the planned arena (index maps stay
    where they were, so the run computes garbage instead of indexing out of bounds)."""
    end = layout.nbytes
    views = {k: View(end, v.shape, v.dtype) if v.dtype.is_floating_point else v for k, v in layout.views.items()}
    return ArenaLayout(end + max(v.nbytes for v in layout.views.values()), views)


def output_addresses(trainer: Trainer, tokens: torch.Tensor) -> dict[str, tuple[int, int]]:
    """key → (address of the node's output, planned address), for the planned node outputs."""
    a, found = trainer.arena, {}
    a.allocate()

    class Recorder(Interpreter):
        def run_node(self, n):
            val = super().run_node(n)
            outs = val if isinstance(val, tuple) else (val,)
            for i, t in enumerate(outs):
                key = n.name if not isinstance(val, tuple) else f"{n.name}[{i}]"
                if isinstance(t, torch.Tensor) and key in a.layout.views:
                    found[key] = (t.data_ptr(), a.address(key))
            return val

    with torch.no_grad(), arena.active(a):
        Recorder(trainer.gm).run(tokens)
    return found


def diff(x: Trainer, y: Trainer, loss_x, loss_y) -> list[str]:
    bad = [] if torch.equal(loss_x, loss_y) else [f"loss {float(loss_x)} vs {float(loss_y)}"]
    gy = {s.name: s.grad for s in y.state.params}      # the reduced fp32 gradients
    for s in x.state.params:
        if not torch.equal(s.grad, gy[s.name]):
            bad.append(f"grad {s.name}: max |Δ| {float((s.grad - gy[s.name]).abs().max()):.3e}")
    return bad[:6]


def graph_runs(spec, spec_alloc, ref, device, source, steps) -> dict:
    """Whole iterations (forward, backward, reductions, AdamW) through StepRunner: eager with the
    allocator, and captured as one CUDA graph with the allocator and with the arena. Returns
    each one's loss per step and whether its final weights equal the eager allocator run's."""
    rank, world, mb = dist.get_rank(), dist.get_world_size(), spec.budgets.micro_batch
    out, weights = {}, {}
    for name, sp, graph in (("eager_allocator", spec_alloc, False), ("graph_allocator", spec_alloc, True),
                            ("graph_arena", spec, True)):
        trainer = Trainer(compile_build(sp).program, device, reference=ref)
        runner = StepRunner(trainer, graph=graph)
        losses = []
        for step in range(steps):
            tokens, labels = (x.to(device) for x in local_rows(source.global_batch(step, world * mb), rank, mb))
            trainer.set_lr(step)
            losses.append(float(runner.run(tokens, labels).loss_sum[0]))
        out[name] = losses
        weights[name] = [p.detach().clone() for p in trainer.model.parameters()]
        del runner, trainer
    base = weights["eager_allocator"]
    out["same_weights"] = {k: all(torch.equal(a, b) for a, b in zip(w, base)) for k, w in weights.items()}
    return out


def main():
    cfg = json.load(open(sys.argv[1]))
    spec_dict = cfg["spec"]
    spec_dict["backends"]["buffers"] = "arena"
    spec = spec_from_dict(spec_dict)
    spec_dict["backends"]["buffers"] = "allocator"
    spec_alloc = spec_from_dict(spec_dict)
    spec_dict["backends"].update(buffers="arena", wgrad_overlap=False)
    spec_inline = spec_from_dict(spec_dict)     # the expert weight gradients inside the FFN's backward
    device = init_distributed(spec)
    if device.type == "cuda":   # bitwise comparisons need deterministic kernels (embedding backward, index_add)
        torch.use_deterministic_algorithms(True, warn_only=True)
    ref = build_reference(spec, device)
    runs = {"allocator": Trainer(compile_build(spec_alloc).program, device, reference=ref),
            "arena": Trainer(compile_build(spec).program, device, reference=ref),
            "collapsed": Trainer(compile_build(spec).program, device, reference=ref),
            "inline_wgrad": Trainer(compile_build(spec_inline).program, device, reference=ref)}
    assert runs["allocator"].arena is None and runs["arena"].arena is not None
    runs["collapsed"].arena = Arena(collapsed(runs["arena"].arena.layout), device)
    rank, world, mb = dist.get_rank(), dist.get_world_size(), spec.budgets.micro_batch
    t = spec.train
    source = TokenSource(t.data.kind, spec.model.vocab_size, spec.budgets.seq_len, t.seed, t.data.path)
    result = {"steps": [], "planned_views": len(runs["arena"].arena.layout.views),
              "arena_bytes": runs["arena"].arena.layout.nbytes}
    for step in range(cfg["steps"]):
        tokens, labels = (x.to(device) for x in local_rows(source.global_batch(step, world * mb), rank, mb))
        if step == 0:
            result["addresses"] = output_addresses(runs["arena"], tokens)
        outs = {}
        for k, tr in runs.items():
            streams.CHECK_LATE_READS = k != "collapsed"     # a collapsed plan is meant to give wrong numbers
            outs[k] = tr.forward_backward(tokens, labels)
        result["steps"].append({
            "loss": float(outs["arena"].loss),
            "clones": int(outs["arena"].stats[:, 3].sum()),
            "arena_vs_allocator": diff(runs["allocator"], runs["arena"], outs["allocator"].loss, outs["arena"].loss),
            "collapsed_vs_allocator": diff(runs["allocator"], runs["collapsed"], outs["allocator"].loss,
                                           outs["collapsed"].loss),
            "deferred_vs_inline_wgrad": diff(runs["inline_wgrad"], runs["arena"], outs["inline_wgrad"].loss,
                                             outs["arena"].loss),
            "unused_views": sorted(set(runs["arena"].arena.layout.views) - runs["arena"].arena.taken)})
        for tr in runs.values():
            tr.optimizer_step(step)
            tr.zero_grad()
    streams.CHECK_LATE_READS = False          # its comparison reads the device: never inside a capture
    if cfg.get("graph"):
        result["graph"] = graph_runs(spec, spec_alloc, ref, device, source, cfg["steps"])
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        json.dump(gathered, open(cfg["out"], "w"))
    comm.shutdown()


if __name__ == "__main__":
    main()
