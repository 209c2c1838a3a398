"""Run under torchrun by tests/runtime/test_backends.py: the oracle with a real-row backend
whose device collective is its gloo stand-in (tests/runtime/backend_standins.py).

argv: CONFIG_JSON, as for dist_worker.py, plus "backend": 'symm_mem' or 'deepep'. The spec is
validated for the `torch` backend (a user cannot ask for these backends on cpu) and the
backend is then swapped in: the stand-ins are a test seam, not a CPU mode.
"""
import json
import sys

import torch
import torch.distributed as dist

from backend_standins import install_all
from dist_worker import independent_drop_mask
from echoc.compile import compile_build
from echoc.spec_io import spec_from_dict
from runtime import comm
from runtime.oracle import compare_with_reference
from runtime.trainer import init_distributed


def oracle_result(spec, device, cfg):
    """Compile `spec`, compare cfg["steps"] steps with the reference ("reference_drops": told the
    drops): (the build, on rank 0 the JSON-ready result, elsewhere None)."""
    mask = independent_drop_mask(spec) if cfg.get("reference_drops") else None
    build = compile_build(spec)
    reports = compare_with_reference(build.program, device, cfg["steps"], drop_mask=mask)
    worst = torch.tensor([max(r.worst_grad[1] for r in reports)])
    allw = [torch.zeros(1) for _ in range(dist.get_world_size())]
    dist.all_gather(allw, worst)
    if dist.get_rank() != 0:
        return build, None
    steps = [{"step": r.step, "loss_rel_err": r.loss_rel_err, "worst_grad": r.worst_grad, "dropped": r.dropped,
              "clones": r.clones} for r in reports]
    return build, {"steps": steps, "worst_grad_by_rank": [float(w) for w in allw]}


def main():
    cfg = json.load(open(sys.argv[1]))
    spec = spec_from_dict(cfg["spec"])
    spec = spec.model_copy(update={"backends": spec.backends.model_copy(update={"dispatch": cfg["backend"]})})
    install_all()
    device = init_distributed(spec)
    build, result = oracle_result(spec, device, cfg)
    if result is not None:
        json.dump(dict(result, graph=build.program.gm.code), open(cfg["out"], "w"))
    comm.shutdown()
    print("worker done", flush=True)


if __name__ == "__main__":
    main()
