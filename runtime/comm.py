"""Process groups by name, and the few collectives the echo ops use.

Ops receive a group *name* (a string survives FX graphs, printing and
torch.library schemas); the runtime registers the real groups once with
`set_groups`. Single-process runs register nothing and every group has size 1.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Groups:
    """world = dp × ep. EP groups are contiguous ranks; expert-DP groups stride by ep."""
    ep: dist.ProcessGroup | None
    expert_dp: dist.ProcessGroup | None
    ep_size: int
    dp_size: int


_GROUPS: dict[str, dist.ProcessGroup | None] = {}
_TIMEOUT: dict[str, timedelta | None] = {}

# torch ≥ 2.13 names the flat collectives *_single and deprecates the older names; 2.11 has only those
_ALL_GATHER_FLAT = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_REDUCE_SCATTER_FLAT = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def register_group(name: str, group: dist.ProcessGroup | None) -> None:
    """Name a group so ops and the runtime can find it, and shutdown() releases it."""
    _GROUPS[name] = group


def all_gather_flat(out: torch.Tensor, x: torch.Tensor, group: str = "world") -> torch.Tensor:
    """out [n·m] ← every rank's x [m], rank-ordered."""
    _ALL_GATHER_FLAT(out, x, group=get_group(group))
    return out


def init_groups(ep: int, dp: int, clone_domain: int | None = None, timeout_s: float | None = None) -> Groups:
    """Create the EP, expert-DP and clone-domain groups (every rank calls this, in the same order).

    clone_domain: EP ranks per clone domain (consecutive EP ranks, e.g. one node); default ep.
    timeout_s: every collective on these groups fails after this long instead of hanging.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    assert ep * dp == world, f"ep × dp = {ep * dp} but world size is {world}"
    dom = clone_domain or ep
    assert ep % dom == 0, f"clone domain of {dom} ranks does not divide ep = {ep}"
    _TIMEOUT["default"] = timedelta(seconds=timeout_s) if timeout_s else None
    mine_ep = mine_edp = mine_clone = None
    for d in range(dp):
        g = new_group(list(range(d * ep, (d + 1) * ep)))
        if rank // ep == d:
            mine_ep = g
        for c in range(ep // dom):
            first = d * ep + c * dom
            gc = g if dom == ep else new_group(list(range(first, first + dom)))
            if first <= rank < first + dom:
                mine_clone = gc
    for i in range(ep):
        g = new_group(list(range(i, world, ep)))
        if rank % ep == i:
            mine_edp = g
    _GROUPS.update(ep=mine_ep, expert_dp=mine_edp, clone=mine_clone, world=dist.group.WORLD)
    return Groups(mine_ep, mine_edp, ep, dp)


def new_group(ranks: list[int] | None = None, backend: str | None = None) -> dist.ProcessGroup:
    """dist.new_group with the run's collective timeout (set by init_groups)."""
    return dist.new_group(ranks, timeout=_TIMEOUT.get("default"), backend=backend)


def group_ranks(name: str) -> list[int]:
    """Global ranks of a named group ([0] in a single-process run)."""
    g = _GROUPS.get(name)
    return dist.get_process_group_ranks(g) if g is not None else [0]


def get_group(name: str) -> dist.ProcessGroup | None:
    return _GROUPS.get(name)


def group_size(name: str) -> int:
    g = _GROUPS.get(name)
    return dist.get_world_size(g) if g is not None else 1


def group_rank(name: str) -> int:
    g = _GROUPS.get(name)
    return dist.get_rank(g) if g is not None else 0


def all_gather_rows(x: torch.Tensor, group: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [...] on every rank → [group_size, ...], rank-ordered (into `out` when given)."""
    n = group_size(group)
    if out is None:
        out = torch.empty((n,) + tuple(x.shape), dtype=x.dtype, device=x.device)
    if n == 1:
        return out.copy_(x.unsqueeze(0))
    _ALL_GATHER_FLAT(out.view(-1), x.contiguous().view(-1), group=get_group(group))
    return out


def all_gather_rows_async(x: torch.Tensor, group: str) -> tuple[torch.Tensor, object | None]:
    """all_gather_rows issued without waiting: (out, work); `out` is ready after work.wait()
    (on NCCL the current stream then waits on the collective's stream; nothing blocks the host).
    A group of one rank copies at once and returns no work."""
    n = group_size(group)
    out = torch.empty((n,) + tuple(x.shape), dtype=x.dtype, device=x.device)
    if n == 1:
        return out.copy_(x.unsqueeze(0)), None
    work = _ALL_GATHER_FLAT(out.view(-1), x.contiguous().view(-1), group=get_group(group), async_op=True)
    return out, work


def all_to_all_equal(x: torch.Tensor, group: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """Exchange equal chunks: x [n·C, ...] → [n·C, ...]; chunk p goes to rank p. No host-sized splits."""
    out = torch.empty_like(x) if out is None else out
    if group_size(group) == 1:
        return out.copy_(x)
    dist.all_to_all_single(out, x.contiguous(), group=get_group(group))
    return out


def all_to_all_var(x: torch.Tensor, out_rows: int, in_splits: list[int], out_splits: list[int],
                   group: str) -> torch.Tensor:
    """Host-sized splits (the `sync` baseline): x [sum(in_splits), H] → [out_rows, H]."""
    if group_size(group) == 1:
        return x.clone()
    out = x.new_empty((out_rows,) + tuple(x.shape[1:]))
    dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=get_group(group))
    return out


def reduce_scatter_rows(x: torch.Tensor, group: str, out: torch.Tensor | None = None) -> torch.Tensor:
    """x [n·m, ...] summed over the group; rank i keeps rows i·m … i·m+m-1 → [m, ...]."""
    n = group_size(group)
    if out is None:
        out = x.new_empty((x.shape[0] // n,) + tuple(x.shape[1:]))
    if n == 1:
        return out.copy_(x)
    _REDUCE_SCATTER_FLAT(out, x.contiguous(), group=get_group(group))
    return out


_AT_SHUTDOWN: list = []


def at_shutdown(fn) -> None:
    """Call `fn(wait)` in shutdown(), before the groups are destroyed (once per function)."""
    if fn not in _AT_SHUTDOWN:
        _AT_SHUTDOWN.append(fn)


def shutdown(wait: bool = True) -> None:
    """End of a worker: wait for every rank (unless `wait` is False: after an error, when a
    peer may never come), drop our references to the groups, destroy them.

    Holding a ProcessGroup in a module global until interpreter teardown can abort the
    process ("terminate called without an active exception": gloo's threads destroyed
    late), so the references go first."""
    if not dist.is_initialized():
        return
    if wait:
        dist.barrier()
    for fn in _AT_SHUTDOWN:
        fn(wait)
    _GROUPS.clear()
    dist.destroy_process_group()
