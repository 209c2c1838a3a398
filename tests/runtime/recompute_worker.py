"""Run under torchrun by tests/runtime/test_recompute.py: one batch through the same model
compiled without recompute and with `train.recompute` = CFG["recompute"]; every rank checks
that the router loads (counted once, not again in backward), the per-layer stats (routing,
drops, clones), the routing counts, the loss and every gradient are equal.

argv: CONFIG_JSON with the spec dict, the recompute setting and the output path.
"""
import json
import sys

import torch
import torch.distributed as dist

from echoc.compile import compile_build
from echoc.spec_io import spec_from_dict
from runtime import comm
from runtime.data import TokenSource, local_rows
from runtime.model import moe_layers
from runtime.recompute import Recompute
from runtime.trainer import Trainer, build_reference, init_distributed


def one_step(spec, device, reference, tokens, labels):
    program = compile_build(spec).program
    trainer = Trainer(program, device, reference=reference)
    out = trainer.forward_backward(tokens, labels)
    regions = sum(isinstance(m, Recompute) for m in program.gm.modules())
    loads = {n: m.router.load.clone() for n, m in moe_layers(trainer.model)}
    grads = {s.name: s.grad.clone() for s in trainer.state.params}     # the reduced fp32 gradients
    return out, loads, grads, regions


def main():
    cfg = json.load(open(sys.argv[1]))
    base = spec_from_dict(cfg["spec"])
    spec = spec_from_dict(dict(cfg["spec"], train=dict(cfg["spec"]["train"], recompute=cfg["recompute"])))
    device = init_distributed(base)
    reference = build_reference(base, device)
    t = base.train
    batch = TokenSource(t.data.kind, base.model.vocab_size, base.budgets.seq_len, t.seed).global_batch(
        0, dist.get_world_size() * base.budgets.micro_batch)
    tokens, labels = local_rows(batch, dist.get_rank(), base.budgets.micro_batch)
    want = one_step(base, device, reference, tokens, labels)
    got = one_step(spec, device, reference, tokens, labels)
    result = {
        "regions": got[3], "regions_without": want[3],
        "stats_equal": torch.equal(got[0].stats, want[0].stats),
        "counts_equal": torch.equal(got[0].counts, want[0].counts),
        "loss_diff": float((got[0].loss - want[0].loss).abs()),
        "loads_equal": all(torch.equal(got[1][n], want[1][n]) for n in want[1]),
        "load_total": float(sum(v.sum() for v in got[1].values())),
        "no_grad": sorted(n for n, g in got[2].items() if g is None),
        "no_grad_without": sorted(n for n, g in want[2].items() if g is None),
        "worst_grad_diff": max(float((got[2][n] - want[2][n]).abs().max()) for n in want[2]
                               if want[2][n] is not None and got[2][n] is not None),
        "clones": int(got[0].stats[:, 3].sum()),
    }
    results = [None] * dist.get_world_size()
    dist.all_gather_object(results, result)
    if dist.get_rank() == 0:
        json.dump(results, open(cfg["out"], "w"))
    comm.shutdown()


if __name__ == "__main__":
    main()
