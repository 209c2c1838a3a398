"""When the real-row backends (`symm_mem`, `deepep`) can run in a bench, and why not otherwise."""
from __future__ import annotations

from runtime.backends import deepep

REAL_ROW_BACKENDS = ("symm_mem", "deepep")


def skip_reason(backend: str, world: int, device_type: str = "cuda") -> str | None:
    """None when `backend` can run here; else the reason, for the bench's notes."""
    if backend not in REAL_ROW_BACKENDS:
        return None
    if device_type != "cuda" or world < 2:
        return (f"skipped: '{backend}' needs >= 2 GPUs (torch symm_mem and DeepEP HybridEP refuse a group of one; "
                f"here {world} {device_type} rank(s))")
    if backend == "deepep" and not deepep.available():
        return f"skipped: deep_ep (HybridEP) is not built here: {deepep.BUILD_HINT}"
    return None
