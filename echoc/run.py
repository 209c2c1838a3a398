"""`echoc run`: compile (or load) one build and execute its Program on this rank, or start the
ranks under torchrun. The CLI calls `start` in the launching process and `worker` inside
each torchrun worker; both are plain functions (tested without the CLI)."""
from __future__ import annotations

import ipaddress
import os
import re
import sys
import tempfile
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from echoc import device_memory, preflight
from echoc.artifact import load_build
from echoc.compile import Build, compile_build
from echoc.errors import EchocError, StoppedBySignal
from echoc.spec import Spec
from echoc.spec_io import spec_from_dict
from runtime import comm, watchdog
from runtime.launch import launch
from runtime.loop import RunOptions, train
from runtime.metrics import check_tensorboard
from runtime.program import Program
from runtime.trainer import init_distributed


@dataclass
class RunRequest:
    """What the user asked `echoc run` for (paths already absolute)."""
    spec: Spec | None               # from a YAML file (with --set overrides) ...
    from_build: str | None          # ... or a compiled build directory
    metrics: str
    record_routing: str | None = None
    tensorboard: str | None = None
    resume: str = "no"              # 'no', 'must' (--resume), 'or_start' (--resume-or-start)
    resume_with_changes: bool = False
    launcher: dict = field(default_factory=dict)   # nproc, nnodes, rdzv_endpoint, max_restarts
    spec_path: str | None = None    # the YAML file the spec came from (no output may overwrite it)


def in_torchrun() -> bool:
    """Started as a worker: by torchrun, or by a launcher that sets the whole rank environment (a
    stray LOCAL_RANK alone in a shell does not make `echoc run` a worker)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or all(k in os.environ for k in ("LOCAL_RANK", "RANK", "WORLD_SIZE"))


def the_build(req: RunRequest) -> Build:
    """Compile the spec in memory, or load and verify the build directory: one compile."""
    return load_build(req.from_build) if req.from_build else compile_build(req.spec)


def dropless_spec(spec: Spec) -> Spec:
    """The spec of the program an overflowed step runs again with: the `sync` backend (exact,
    host-sized splits: no row can overflow), eager, allocator buffers, no cloning."""
    d = spec.model_dump(mode="json")
    d["backends"].update(dispatch="sync", cuda_graph="none", buffers="allocator")
    d["echo"]["enabled"] = False
    return spec_from_dict(d, source=f"{spec.model.name} (dropless rerun)")


def rerun_program(spec: Spec) -> Program | None:
    """budgets.on_overflow 'rerun': the dropless program; else None."""
    return compile_build(dropless_spec(spec)).program if spec.budgets.on_overflow == "rerun" else None


def worker(req: RunRequest, build: Build | None = None, hooks: tuple = ()) -> list[dict]:
    """Inside torchrun: this rank's part of the run. Returns the per-step metrics.
    hooks: called with the number of finished steps after each step (tests inject faults)."""
    build = build or the_build(req)
    spec = build.spec
    watchdog.watch_parent(grace_s=spec.train.collective_timeout_s)
    options = RunOptions(metrics_path=req.metrics, record_routing=req.record_routing, tensorboard=req.tensorboard,
                         resume=req.resume, resume_with_changes=req.resume_with_changes,
                         rerun_program=rerun_program(spec), hooks=list(hooks))
    device = init_distributed(spec)
    warning = device_memory.expandable_segments(device)
    if warning and dist.get_rank() == 0:
        print(f"echoc: warning: {warning}", file=sys.stderr, flush=True)
    watchdog.announce()
    try:
        dev = device_memory.check_fits(build.summary["memory"], device)
        try:
            history = train(build.program, device, options)
        except torch.cuda.OutOfMemoryError as e:
            raise device_memory.explain_oom(e, build.summary["memory"], dev) from None
    except StoppedBySignal:
        comm.shutdown()          # every rank stopped at the same step: leave together, as a finished run does
        raise
    except Exception as e:
        # the roll call needs the process group's store: before the group is destroyed
        timeout = watchdog.explain_timeout(spec.train.collective_timeout_s) if watchdog.is_timeout(e) else None
        rank = dist.get_rank()
        comm.shutdown(wait=False)
        if timeout is not None:
            raise timeout from None
        if peer_lost(e):
            raise EchocError(f"rank {rank}: another rank left in the middle of a collective ({_first_line(e)}); "
                             "the launcher's last line names the rank that failed first") from None
        raise
    comm.shutdown()
    return history


_PEER_GONE = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "remote process exited",
              "ncclRemoteError", "NCCL communicator was aborted")


def peer_lost(e: BaseException) -> bool:
    """A collective failed because another rank's process went away (killed, crashed): that rank's
    own error is the one to read; this one needs no traceback."""
    return isinstance(e, RuntimeError) and any(k in str(e) for k in _PEER_GONE)


def _first_line(e: BaseException) -> str:
    line = str(e).splitlines()[0] if str(e) else type(e).__name__
    return line[:160]


STOP_NOTE_ENV = "ECHOC_STOP_NOTE"    # the launcher's file where rank 0 leaves what stopped the run


def stopped(e: StoppedBySignal) -> None:
    """In a worker, after a signal stop: rank 0 says so and leaves the note for the launcher. The
    worker then exits 0: torchrun would count any other code as a failure and restart the group
    (--max-restarts), or kill ranks still closing files."""
    if int(os.environ.get("RANK", "0")) != 0:
        return
    print(f"echoc: {e}", file=sys.stderr, flush=True)
    note = os.environ.get(STOP_NOTE_ENV)
    if note:
        with open(note, "w") as f:
            f.write(f"{e.exit_code - 128}\n{e}\n")


def check_launch(req: RunRequest) -> None:
    """Launcher options that make no sense are errors, never silently replaced."""
    nproc, restarts = req.launcher.get("nproc"), req.launcher.get("max_restarts", 0)
    if nproc is not None and nproc < 1:
        raise EchocError(f"--nproc must be >= 1 (got {nproc}); leave it out to use cluster.gpus_per_node")
    if restarts < 0:
        raise EchocError(f"--max-restarts must be >= 0 (got {restarts})")
    nnodes = str(req.launcher.get("nnodes", "1"))
    bounds = nnodes.split(":")
    if (len(bounds) > 2 or not all(re.fullmatch(r"[0-9]+", b) and int(b) >= 1 for b in bounds)
            or int(bounds[0]) > int(bounds[-1])):
        raise EchocError(f"--nnodes must be a node count N >= 1 or a range MIN:MAX with 1 <= MIN <= MAX "
                         f"(got {nnodes!r})")
    endpoint = req.launcher.get("rdzv_endpoint")
    if endpoint is not None:
        _check_endpoint(endpoint)


def _check_endpoint(endpoint: str) -> None:
    """--rdzv-endpoint HOST:PORT: a host name or address, and a port in 1..65535."""
    host, sep, port = endpoint.rpartition(":")
    if host.startswith("[") and host.endswith("]"):                                 # [IPv6]:port
        try:
            host_ok = ipaddress.ip_address(host[1:-1]).version == 6
        except ValueError:
            host_ok = False
    else:
        label = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]*[A-Za-z0-9_])?", re.ASCII)
        host_ok = bool(host) and all(label.fullmatch(p) for p in host.split("."))
    if not (sep and host_ok and re.fullmatch(r"[0-9]+", port) and 1 <= int(port) <= 65535):
        raise EchocError(f"--rdzv-endpoint must be HOST:PORT, a host name or address and a port in 1..65535 "
                         f"(got {endpoint!r})")


def start(req: RunRequest, worker_argv: list[str]) -> None:
    """In the launching process: check everything a worker would trip on later, then start torchrun."""
    check_launch(req)
    if req.tensorboard:
        check_tensorboard()
    build = the_build(req)   # compile errors surface here, once, before any worker starts
    spec = build.spec
    nproc = req.launcher.get("nproc") or spec.cluster.gpus_per_node
    nnodes = req.launcher.get("nnodes", "1")
    if nnodes == "1" and nproc != spec.cluster.world_size:
        raise EchocError(f"--nproc {nproc} but the spec's cluster has {spec.cluster.world_size} ranks "
                         f"(nodes × gpus_per_node); pass --set cluster.gpus_per_node={nproc} and a matching "
                         "parallel.ep × parallel.dp")
    preflight.check_exchange(spec, nproc)
    preflight.check_inputs(spec)
    preflight.check_outputs(spec, req.metrics, req.record_routing, req.tensorboard, req.spec_path)
    note = preflight.check_resume(spec, req.resume, req.resume_with_changes, check_lock=nnodes == "1")
    if note:
        print(f"echoc: {note}", file=sys.stderr, flush=True)
    rerun_program(spec)   # the dropless program compiles too
    with tempfile.TemporaryDirectory(prefix="echoc-stop-") as d:
        os.environ[STOP_NOTE_ENV] = note = os.path.join(d, "stopped")
        try:
            launch(worker_argv, nproc=nproc, nnodes=nnodes, rdzv_endpoint=req.launcher.get("rdzv_endpoint"),
                   max_restarts=req.launcher.get("max_restarts", 0), rdzv_timeout_s=spec.train.collective_timeout_s)
        except StoppedBySignal as e:    # the launcher's own signal: the workers' note says more, if they left one
            raise _noted(note) or e from None
        if stop := _noted(note):        # the workers stopped on a signal after a checkpoint: not a finished run
            raise stop


def _noted(note: str) -> StoppedBySignal | None:
    if not os.path.exists(note):
        return None
    signum, message = open(note).read().split("\n", 1)
    return StoppedBySignal(message.strip(), int(signum))
