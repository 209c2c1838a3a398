"""The buffer-plan pass: the memory plan of the MoE machinery for one rank and one iteration.

Runs after `propagate_shapes` (it reads `node.meta['tensor_meta']`); reads the graph,
changes nothing. Under the `torch` backend every rank has the same buffer shapes (equal
[ep·C] chunks, El + S expert slots, the same T, K, H, F), so one plan holds for every
rank. The `sync` backend's shapes depend on the data: not planned.

    passes/buffer_lifetimes.py   which buffers exist and when each is live (from the op contracts)
    passes/buffer_alloc.py       offsets in one arena: interference graph, first-fit, lower bound
    passes/buffer_json.py        plan.json and the runtime's arena layout
    passes/memory_plan.py        the data: Buffer, Part, Timeline, MemoryPlan

Placement: ARENA buffers are written by the op itself into views of one arena per rank
(runtime/arena.py), looked up by their contract keys, in regions: the buffers saved across the
forward/backward boundary, two regions per layer (its routing decisions, the rest), then the
transient buffers (freed around the loss).
ALLOCATOR buffers come out of kernels without an output argument (grouped_mm's products, the
graph's torch.stack outputs): listed and bounded, not placed.

Not modelled: the dense part (embedding, attention, norms, router, shared expert, dense FFN,
logits) and the token-sized [T, H] tensors at the MoE boundary; parameters, their gradients
and optimizer state; the router weights weighted_sum saves; grouped-GEMM workspaces. The
backward order is the mirror of the forward; parallel branches (the shared expert) may
interleave differently at run time.
"""
from __future__ import annotations

from torch.fx import GraphModule

from echoc.spec import Spec
from passes.backend_buffers import SYMMETRIC, has_token_layouts, symmetric_buffers
from passes.buffer_alloc import allocate, arena_bytes, interference_graph, interfering_pairs, lower_bound
from passes.buffer_json import arena_layout, plan_to_json
from passes.buffer_lifetimes import collect, has_moe_layers
from passes.manager import PassResult
from passes.memory_plan import ALIGN_BYTES, ALLOCATOR, ARENA, Buffer, HeldRegion, MemoryPlan, aligned

__all__ = ["run", "plan_buffers", "plan_to_json", "arena_layout", "MemoryPlan"]


def _note(spec: Spec) -> str:
    world = spec.parallel.ep * spec.parallel.dp
    spares = spec.echo.spare_slots_per_rank if spec.echo.enabled else 0
    return (f"one plan for all {world} ranks: under the torch backend every rank has the same "
            f"buffer shapes (equal [ep·C] chunks, {spec.experts_per_rank} home + {spares} spare slots)")


def _place_in_regions(placed: list[Buffer], timeline) -> list[HeldRegion]:
    """Offsets. Buffers live across the forward/backward boundary (saved for backward) come
    first, in held regions: buffers of no layer first, then per layer its kept routing decisions
    and its other saved buffers, so that each region can be freed once its layer's backward no
    longer holds it, and a recomputed layer holds only its routing decisions through the loss.
    The others above them, one transient region the runtime frees between forward and backward,
    where the loss's working set peaks."""
    fwd_end = timeline.forward[1]
    groups: dict[tuple[int | None, bool], list[Buffer]] = {}
    for b in placed:
        if b.crosses(fwd_end):
            groups.setdefault((b.layer, b.kept), []).append(b)
    rest = [b for b in placed if not b.crosses(fwd_end)]
    regions, at = [], 0
    for layer, kept in sorted(groups, key=lambda k: (-1 if k[0] is None else k[0], not k[1])):
        group = groups[layer, kept]
        allocate(group)
        for b in group:
            b.offset += at
        regions.append(HeldRegion(layer, at, max(at, arena_bytes(group)), kept))
        at = regions[-1].hi
    allocate(rest)
    for b in rest:
        b.offset += at
    return regions


def _placed_plan(spec: Spec, buffers: list[Buffer], timeline) -> MemoryPlan:
    placed = [b for b in buffers if b.placement == ARENA]
    regions = _place_in_regions(placed, timeline)
    held_bytes = regions[-1].hi if regions else 0
    g = interference_graph(placed)
    lb, peak = lower_bound(placed)
    return MemoryPlan(
        True, "", "all", _note(spec), ALIGN_BYTES, spec.echo.enabled and spec.echo.recompute_clone_dispatch,
        timeline, buffers, arena_bytes=arena_bytes(placed), held_bytes=held_bytes,
        held_regions=regions,
        naive_bytes=sum(aligned(b.nbytes) for b in placed),
        lower_bound_bytes=lb, peak_step=peak, lifetimes=g.number_of_nodes(),
        interference_edges=g.number_of_edges(), interfering_pairs=interfering_pairs(g),
        allocator_lower_bound_bytes=lower_bound([b for b in buffers if b.placement == ALLOCATOR])[0],
        total_lower_bound_bytes=lower_bound([b for b in buffers if b.placement != SYMMETRIC])[0],
        symmetric_bytes=sum(b.nbytes for b in buffers if b.placement == SYMMETRIC))


def plan_buffers(gm: GraphModule, spec: Spec) -> MemoryPlan:
    """The memory plan of `gm` (after the passes and propagate_shapes)."""
    if spec.backends.dispatch == "sync":
        return MemoryPlan(False, "backends.dispatch 'sync' has data-dependent shapes: only the sync-free "
                                 "backends' static buffers are planned")
    if not (has_moe_layers(gm) or has_token_layouts(gm)):
        return MemoryPlan(False, "no MoE layers in the graph")
    buffers, timeline = collect(gm, spec)
    return _placed_plan(spec, buffers + symmetric_buffers(gm, spec), timeline)


def run(gm: GraphModule, spec: Spec) -> PassResult:
    """Plan the MoE buffers of `gm` (shape-propagated). The graph is returned unchanged."""
    return PassResult(gm, plan_buffers(gm, spec))
