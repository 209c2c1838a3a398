"""Run under torchrun by tests/runtime/test_clone_domain.py: the oracle with the spec's clone domain.

argv: CONFIG_JSON {spec, steps, out}. Rank 0 writes every rank's clone-group ranks, the clone
domain the compiled planner uses, and the oracle's per-step results."""
import json
import sys

import torch.distributed as dist

from echoc.compile import compile_build
from echoc.spec_io import spec_from_dict
from runtime import comm
from runtime.loop import check_clone_group
from runtime.oracle import compare_with_reference
from runtime.trainer import init_distributed


def main():
    cfg = json.load(open(sys.argv[1]))
    spec = spec_from_dict(cfg["spec"])
    device = init_distributed(spec)
    program = compile_build(spec).program
    check_clone_group(program)
    reports = compare_with_reference(program, device, cfg["steps"])
    groups = [None] * dist.get_world_size()
    dist.all_gather_object(groups, comm.group_ranks("clone"))
    worst = [None] * dist.get_world_size()
    dist.all_gather_object(worst, max(r.worst_grad[1] for r in reports))
    if dist.get_rank() == 0:
        json.dump({"clone_groups": groups, "worst_grad_by_rank": worst,
                   "steps": [{"loss_rel_err": r.loss_rel_err, "clones": r.clones, "dropped": r.dropped}
                             for r in reports]}, open(cfg["out"], "w"))
    comm.shutdown()


if __name__ == "__main__":
    main()
