"""The default pass pipeline, in order (the compile driver runs it)."""
from __future__ import annotations

from passes import echo_clone, sync_free_dispatch, verify_sync_free, zero
from passes.manager import Pipeline


def default_pipeline() -> Pipeline:
    return Pipeline([
        ("sync_free_dispatch", sync_free_dispatch.run),
        ("echo_clone", echo_clone.run),
        ("zero", zero.run),
        ("verify_sync_free", verify_sync_free.run),
    ])
