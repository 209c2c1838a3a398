"""Activation recompute at run time: a region of the compiled graph re-run in backward.

passes/recompute.py moves each recomputed region (one MoE block, or one transformer
block) into a `Recompute` module. Its forward runs the region under
`torch.utils.checkpoint` (non-reentrant) with a selective policy: the routing decisions
are saved, everything else is recomputed in backward.

    saved (MUST_SAVE)     router top-k, echo::count, echo::all_gather_counts, echo::plan,
                          echo::assign_slots, echo::layout (and the sync backend's layout)
    recomputed            norms, attention, router scores, dispatch, expert FFN, combine, ...

So the recomputation replays exactly the forward's routing, counts and clone plan (the
count all-gather and the planner do not run again; a recomputed top-k could differ from the
forward's in the last bit), and it reads no device value on the host: the region stays
sync-free and capturable. The token exchanges and clone all-gathers do run again in
backward, on every EP rank in the same order. State updates (the router's `load += counts`)
stay outside the region, so they happen once per step.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.fx import GraphModule
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

from runtime import clone, contracts, ops  # noqa: F401  (they bind the contracts read below)
from runtime.backends import sync as sync_backend  # noqa: F401
from runtime.contracts import ALL_GATHER_COUNTS, ASSIGN_SLOTS, COUNT, LAYOUT, PLAN, SYNC_LAYOUT

ROUTING_CONTRACTS = (COUNT, ALL_GATHER_COUNTS, LAYOUT, PLAN, ASSIGN_SLOTS, SYNC_LAYOUT)


def saved_ops() -> frozenset:
    """The ops whose outputs a recomputed region keeps from its forward (see the module doc)."""
    return frozenset({contracts.target(c) for c in ROUTING_CONTRACTS} | {torch.ops.aten.topk.default})


def _policy(saved: frozenset):
    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in saved else CheckpointPolicy.PREFER_RECOMPUTE
    return policy


class Recompute(nn.Module):
    """`body(*inputs)` (a region of the compiled graph) whose activations are recomputed in backward."""

    def __init__(self, body: GraphModule):
        super().__init__()
        self.body = body
        self._saved = saved_ops()

    def forward(self, *inputs):
        if not torch.is_grad_enabled():
            return self.body(*inputs)
        return checkpoint(self.body, *inputs, use_reentrant=False, preserve_rng_state=False,
                          context_fn=lambda: create_selective_checkpoint_contexts(_policy(self._saved)))
