"""The plan against the GPU it runs on: before the first step every rank compares what the
compile says the run needs (the predicted peak and the allocator's headroom on it,
memory_model.ALLOCATOR_HEADROOM) with the memory its device has free (other processes may hold
some), and a CUDA out-of-memory error during the run becomes one line that says what the plan
needed.

Both are errors a user can act on (free the GPU, or lower the plan's memory), so they are
EchocErrors: one line, exit 2, no traceback. Every rank checks its own device; the ranks agree
through one all-reduce, so no rank is left waiting in a collective for one that stopped."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from echoc.errors import EchocError
from echoc.memory_model import HELPFUL_FIELDS, format_size


class DeviceMemoryError(EchocError):
    """The plan does not fit the memory its GPU has, or ran out of it."""


@dataclass(frozen=True)
class DeviceMemory:
    """One rank's device at the start of the run."""
    rank: int
    device: str
    free: int
    total: int


def shortfall(predicted: int, needs: int, dev: DeviceMemory, phase: str) -> str | None:
    """Why a plan whose peak is `predicted` bytes and that needs `needs` bytes of the allocator
    cannot run on `dev` (None: it can)."""
    if needs <= dev.free:
        return None
    held = dev.total - dev.free
    return (f"rank {dev.rank}: the plan needs {format_size(needs)} (a predicted peak of {format_size(predicted)} "
            f"at {phase}, and the allocator's headroom on it) but {dev.device} "
            f"has {format_size(dev.free)} free of {format_size(dev.total)} ({format_size(held)} held by other "
            f"processes or this one's CUDA context); free the GPU, or lower the plan's memory: "
            + ", ".join(HELPFUL_FIELDS) + ", budgets.memory_gib to check it at compile time")


def expandable_segments(device: torch.device) -> str | None:
    """On CUDA, unless the user chose an allocator config: the caching allocator grows its segments
    in place (expandable segments), which the allocator headroom in the plan was measured with.
    `echoc run` sets it in the workers' environment; this covers a worker torchrun started by hand.
    Returns a warning when the user's own config leaves them off (the headroom may not hold)."""
    if device.type != "cuda":
        return None
    chosen = [os.environ[k] for k in ("PYTORCH_CUDA_ALLOC_CONF", "PYTORCH_ALLOC_CONF") if k in os.environ]
    if not chosen:
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")
        return None
    if any("expandable_segments:true" in c.replace(" ", "").lower() for c in chosen):
        return None
    return ("your PYTORCH_CUDA_ALLOC_CONF / PYTORCH_ALLOC_CONF leaves expandable segments off; the plan's "
            "allocator headroom was measured with them on (without, a run needed more than 1.10× its peak)")


def check_fits(memory: dict, device: torch.device) -> DeviceMemory | None:
    """On CUDA: raise DeviceMemoryError on every rank when what the plan needs (summary.json's
    `memory`) exceeds some rank's free device memory. Returns this rank's reading (None on CPU)."""
    if device.type != "cuda":
        return None
    free, total = torch.cuda.mem_get_info(device)
    dev = DeviceMemory(dist.get_rank() if dist.is_initialized() else 0, f"cuda:{device.index}", free, total)
    peak = int(memory["peak_bytes"])
    why = shortfall(peak, int(memory.get("needs_bytes", peak)), dev, memory.get("peak_phase", "?"))
    short = torch.tensor([0.0 if why is None else 1.0], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(short, op=dist.ReduceOp.MAX)
    if why is not None:
        raise DeviceMemoryError(why)
    if short.item() > 0:
        raise DeviceMemoryError(f"rank {dev.rank}: another rank's GPU lacks the memory the plan needs "
                                "(its message says how much)")
    return dev


def explain_oom(e: BaseException, memory: dict, dev: DeviceMemory | None) -> DeviceMemoryError:
    """A CUDA out-of-memory error during the run, as one actionable line."""
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    start = (f"; {format_size(dev.free)} of {format_size(dev.total)} was free on {dev.device} at the start"
             if dev is not None else "")
    rank = dev.rank if dev is not None else (dist.get_rank() if dist.is_initialized() else 0)
    return DeviceMemoryError(
        f"rank {rank} ran out of GPU memory ({first[:200]}); the plan predicts a peak of "
        f"{format_size(int(memory['peak_bytes']))} per rank{start}. Another process may have taken memory since, "
        "or the allocator's fragmentation needs more than the plan: free the GPU, or lower the plan's memory ("
        + ", ".join(HELPFUL_FIELDS) + ")")
