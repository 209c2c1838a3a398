"""No silent hangs, on the worker side.

- `watch_parent`: torchrun starts its workers in their own sessions, so a launcher killed with
  SIGKILL leaves them running (blocked in a collective, or training on). A daemon thread notices
  the parent's death and sends this process SIGTERM (the loop saves and stops at the next step
  when checkpoints are on), then exits hard if that has not happened within the grace period.
- `explain_timeout`: when a collective times out (train.collective_timeout_s on every process
  group), the surviving ranks hold a roll call in the rendezvous store and name the ranks that
  did not answer, with their host and pid (each rank registers them at start, `announce`).
"""
from __future__ import annotations

import os
import signal
import socket
import sys
import threading
import time

import torch.distributed as dist

from echoc.errors import EchocError
from runtime import p2p


class CollectiveTimeoutError(EchocError):
    """A collective did not complete within train.collective_timeout_s."""


def watch_parent(grace_s: float, poll_s: float = 1.0) -> threading.Thread:
    """Start the parent-death watchdog of this worker (see the module docstring)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        print(f"echoc: rank {os.environ.get('RANK', '?')}: the launcher (pid {parent}) is gone; stopping",
              file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(1)

    thread = threading.Thread(target=watch, name="echoc-parent-watchdog", daemon=True)
    thread.start()
    return thread


def _store():
    # the process group's own store (private API: the one handle every rank already shares)
    return dist.distributed_c10d._get_default_store()


def announce() -> None:
    """Register this rank's host and pid in the rendezvous store (named if it stops answering)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        _store().set(f"echoc/who/{dist.get_rank()}", f"{socket.gethostname()}, pid {os.getpid()}")


def is_timeout(error: BaseException) -> bool:
    """A collective's timeout as gloo / c10d report it; or, under backends.exchange 'p2p', the CUDA
    fault of a symmetric-memory barrier that waited longer than its timeout for a peer and trapped
    (the device prints "timed out"; the host sees only a launch failure)."""
    msg = str(error).lower()
    if isinstance(error, (RuntimeError, dist.DistError)) and "timed out" in msg:
        return True
    trapped = "unspecified launch failure" in msg or "illegal instruction" in msg
    return isinstance(error, RuntimeError) and trapped and p2p.enabled("ep")


def _roll_call(rank: int, world: int, wait_s: float) -> dict[int, str] | None:
    """{rank: host and pid} of the ranks that did not check in within wait_s; None when the store
    itself did not answer (its host, rank 0, is then the one missing). Never blocks past wait_s + 2."""
    result: dict = {}

    def call() -> None:
        store = _store()
        store.set(f"echoc/here/{rank}", "1")
        deadline, missing = time.monotonic() + wait_s, list(range(world))
        while missing and time.monotonic() < deadline:
            missing = [r for r in missing if not store.check([f"echoc/here/{r}"])]
            time.sleep(0.1)
        result["missing"] = {r: store.get(f"echoc/who/{r}").decode() if store.check([f"echoc/who/{r}"])
                             else "never registered" for r in missing}

    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    thread.join(wait_s + 2)
    return result.get("missing")


def explain_timeout(timeout_s: float) -> CollectiveTimeoutError:
    """Collective (every surviving rank): the error naming who is missing."""
    rank, world = dist.get_rank(), dist.get_world_size()
    missing = _roll_call(rank, world, wait_s=min(10.0, max(2.0, timeout_s)))
    head = f"rank {rank}: a collective waited train.collective_timeout_s = {timeout_s:g} s and timed out"
    if missing is None:
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        return CollectiveTimeoutError(f"{head}; the rendezvous store on rank 0 ({where}) does not answer either: "
                                      "rank 0 is stopped, hung or unreachable")
    if not missing:
        return CollectiveTimeoutError(f"{head}, yet every rank answers: either a step took longer than the timeout "
                                      "(raise train.collective_timeout_s), or the ranks wait in different "
                                      "collectives, which is a bug in the compiled step (report it with this spec)")
    names = "; ".join(f"rank {r} ({who})" for r, who in sorted(missing.items()))
    return CollectiveTimeoutError(f"{head}; not answering: {names} (stopped, hung or unreachable)")
