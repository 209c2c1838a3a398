"""`echoc run`: compile (or load) one build and execute its Program on this rank, or start the
ranks under torchrun. The CLI calls `start` in the launching process and `worker` inside
each torchrun worker; both are plain functions (tested without the CLI)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from echoc.artifact import load_build
from echoc.compile import Build, compile_build
from echoc.errors import EchocError
from echoc.spec import Spec
from runtime import comm
from runtime.launch import launch
from runtime.loop import RunOptions, train
from runtime.metrics import check_tensorboard
from runtime.trainer import init_distributed


@dataclass
class RunRequest:
    """What the user asked `echoc run` for (paths already absolute)."""
    spec: Spec | None               # from a YAML file (with --set overrides) ...
    from_build: str | None          # ... or a compiled build directory
    metrics: str
    record_routing: str | None = None
    tensorboard: str | None = None
    resume: bool = False
    launcher: dict = field(default_factory=dict)   # nproc, nnodes, rdzv_endpoint, max_restarts


def in_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "LOCAL_RANK" in os.environ


def the_build(req: RunRequest) -> Build:
    """Compile the spec in memory, or load and verify the build directory: one compile."""
    return load_build(req.from_build) if req.from_build else compile_build(req.spec)


def worker(req: RunRequest, build: Build | None = None) -> list[dict]:
    """Inside torchrun: this rank's part of the run. Returns the per-step metrics."""
    build = build or the_build(req)
    device = init_distributed(build.spec)
    try:
        options = RunOptions(metrics_path=req.metrics, record_routing=req.record_routing,
                             tensorboard=req.tensorboard, resume=req.resume)
        return train(build.program, device, options)
    finally:
        comm.shutdown()


def start(req: RunRequest, worker_argv: list[str]) -> None:
    """In the launching process: check everything a worker would trip on later, then start torchrun."""
    if req.tensorboard:
        check_tensorboard()
    build = the_build(req)   # compile errors surface here, once, before any worker starts
    spec = build.spec
    nproc, nnodes = req.launcher.get("nproc") or spec.cluster.gpus_per_node, req.launcher.get("nnodes", "1")
    if nnodes == "1" and nproc != spec.cluster.world_size:
        raise EchocError(f"--nproc {nproc} but the spec's cluster has {spec.cluster.world_size} ranks "
                         f"(nodes × gpus_per_node); pass --set cluster.gpus_per_node={nproc} and a matching "
                         "parallel.ep × parallel.dp")
    Path(req.metrics).parent.mkdir(parents=True, exist_ok=True)
    launch(worker_argv, nproc=nproc, nnodes=nnodes, rdzv_endpoint=req.launcher.get("rdzv_endpoint"),
           max_restarts=req.launcher.get("max_restarts", 0))
