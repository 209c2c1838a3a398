"""The memory plan as JSON (build/<name>/plan.json) and as the runtime's arena layout."""
from __future__ import annotations

import torch

from passes.memory_plan import ARENA, Buffer, MemoryPlan, Part
from runtime.arena import ArenaLayout, View


def plan_to_json(plan: MemoryPlan) -> dict:
    """The plan as written to build/<name>/plan.json."""
    out = {"version": 1, "planned": plan.planned, "reason": plan.reason, "ranks": plan.ranks,
           "note": plan.note, "align_bytes": plan.align_bytes,
           "recompute_clone_dispatch": plan.recompute_clone_dispatch}
    if not plan.planned:
        return out
    tl = plan.timeline
    out["timeline"] = {"steps": tl.steps, "forward": list(tl.forward), "backward": list(tl.backward),
                       "grad_reduction": tl.grad_reduction, "optimizer": tl.optimizer, "layers": tl.layers}
    placed = sum(b.placement == ARENA for b in plan.buffers)
    out["totals"] = {"buffers": len(plan.buffers), "arena_buffers": placed,
                     "allocator_buffers": len(plan.buffers) - placed, "arena_bytes": plan.arena_bytes,
                     "held_bytes": plan.held_bytes,
                     "held_regions": [r._asdict() for r in plan.held_regions],
                     "lower_bound_bytes": plan.lower_bound_bytes, "naive_bytes": plan.naive_bytes,
                     "arena_over_lower_bound": round(plan.arena_bytes / max(plan.lower_bound_bytes, 1), 4),
                     "allocator_lower_bound_bytes": plan.allocator_lower_bound_bytes,
                     "total_lower_bound_bytes": plan.total_lower_bound_bytes,
                     "symmetric_bytes": plan.symmetric_bytes,
                     "peak_step": plan.peak_step, "lifetimes": plan.lifetimes,
                     "interference_edges": plan.interference_edges, "interfering_pairs": plan.interfering_pairs}
    out["buffers"] = [_buffer_json(b) for b in plan.buffers]
    return out


def _buffer_json(b: Buffer) -> dict:
    d = {"name": b.name, "layer": b.layer, "role": b.role, "shape": list(b.shape), "dtype": b.dtype,
         "bytes": b.nbytes, "lifetime": [b.first, b.last], "placement": b.placement, "offset": b.offset}
    if b.kept:
        d["kept"] = True
    if b.keys and list(b.keys) != [b.name]:
        d["keys"] = list(b.keys)
    if len(b.live) > 1:
        d["live"] = [list(s) for s in b.live]
    if b.parts:
        d["parts"] = [{"name": p.name, "shape": list(p.shape), "offset_bytes": p.offset_bytes}
                      | ({"keys": list(p.keys)} if p.keys and list(p.keys) != [p.name] else {}) for p in b.parts]
    return d


def arena_layout(plan: MemoryPlan) -> ArenaLayout:
    """What the runtime allocates: the arena size and, for every key, its view (offset, shape, dtype)."""
    assert plan.planned, plan.reason
    views = {}
    for b in plan.buffers:
        if b.placement != ARENA:
            continue
        dt = getattr(torch, b.dtype)
        for p in b.parts or (Part(b.name, b.shape, 0, b.keys),):
            for key in p.keys:
                assert key not in views, f"arena key {key!r} planned twice"
                views[key] = View(b.offset + p.offset_bytes, p.shape, dt)
    return ArenaLayout(plan.arena_bytes, views, tuple(r.lo for r in plan.held_regions) + (plan.held_bytes,),
                       tuple(r.layer for r in plan.held_regions))
