"""Run under torchrun by tests/runtime/test_distributed.py: the oracle on gloo.

argv: CONFIG_JSON. CONFIG holds the spec as a dict, the step count, the output path, and
whether to hand the reference the drop mask computed here independently of
runtime/layout.py (plain Python loops over the same rule: inside each
(source rank → destination rank) chunk, copies ordered by (expert, copy index);
the first `chunk_rows` are kept).
"""
import json
import sys

import torch
import torch.distributed as dist

from runtime import comm

from echoc.spec_io import spec_from_dict
from runtime.oracle import compare_with_reference
from echoc.compile import compile_build
from runtime.trainer import init_distributed


def independent_drop_mask(spec):
    """mask_fn(layer, topk_idx [world·mb·S, K]) → [.., K] of 0/1 for the reference router."""
    ep, dp = spec.parallel.ep, spec.parallel.dp
    e_per = spec.experts_per_rank
    tokens = spec.budgets.tokens
    C = spec.peer_chunk_rows

    def mask_fn(layer, idx):
        keep = torch.ones(idx.shape, dtype=torch.float32)
        k = idx.shape[1]
        for src in range(ep * dp):
            rows = idx[src * tokens:(src + 1) * tokens].tolist()
            by_dest = {}
            for t, experts in enumerate(rows):
                for j, e in enumerate(experts):
                    by_dest.setdefault(e // e_per, []).append((e, t * k + j, t, j))
            for copies in by_dest.values():
                for _, _, t, j in sorted(copies)[C:]:
                    keep[src * tokens + t, j] = 0.0
        return keep.to(idx.device)

    return mask_fn


def main():
    cfg = json.load(open(sys.argv[1]))
    spec = spec_from_dict(cfg["spec"])
    device = init_distributed(spec)
    mask = independent_drop_mask(spec) if cfg.get("reference_drops") else None
    reports = compare_with_reference(compile_build(spec).program, device, cfg["steps"], drop_mask=mask)
    result = [{"step": r.step, "loss": r.loss, "ref_loss": r.ref_loss, "loss_rel_err": r.loss_rel_err,
               "worst_grad": r.worst_grad, "dropped": r.dropped, "clones": r.clones, "weight_drift": r.weight_drift, "grads": r.grad_rel_err} for r in reports]
    # every rank checks its own expert shard: gather the worst error per rank
    worst = torch.tensor([max(r.worst_grad[1] for r in reports)])
    allw = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(allw, worst)
    if dist.get_rank() == 0:
        json.dump({"steps": result, "worst_grad_by_rank": [float(w) for w in allw]}, open(cfg["out"], "w"))
    comm.shutdown()
    print("worker done", flush=True)


if __name__ == "__main__":
    main()
