"""The `torch` backend's exchange over NVLink, moving only the real rows.

The `torch` backend exchanges [ep·C, H] buffers with equal splits: chunk p of the send buffer
goes to rank p, whatever part of it is padding (capacity 1.5 sends 1.5× the real rows). Here
each rank instead *pushes* its real rows straight into its peers' receive buffers:

    recv_p[rank·C + j] = src[index[p·C + j]]      for every j with index[p·C + j] ≥ 0

one Triton kernel that gathers and stores in one pass (no send buffer), each store going over
NVLink into peer p's memory. A row whose index is -1 (padding) is neither read nor sent, so
the receive buffer's padding rows keep stale values; nobody reads them (the layout's maps
name only real rows, runtime/layout.py).

The receive buffers are symmetric memory (torch.distributed._symmetric_memory, its CUDA
backend): one pool per (group, dtype, row width), allocated and rendezvoused on the first eager
call, before any CUDA-graph capture, shared by every exchange of that shape. Two barriers
order each exchange: before the push (every peer has read what the last exchange left in its
pool) and after it (every row pushed into my pool has landed). Both are kernels on the current
stream, so the whole exchange is captured in the graph with no host read.

Needs every rank of the group on one NVLink domain (one node) and CUDA; `enabled(group)` says
whether this process set the exchange on for a group (the Trainer sets it from
`backends.exchange`, `setup`). CPU and gloo always use the equal-split exchange. `exchange`
pushes several arrays between one pair of barriers; a [n, K] index pushes sums of rows. The
movements built on it (runtime/p2p_moves.py) send one row per token and destination rank:
dispatch pushes each token once (`unique_tokens` names the rows), with a map of where each
copy's token landed and each copy's router weight beside it.
"""
from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

import torch
from torch import Tensor

from echoc.errors import EchocError
from runtime import comm

try:  # the push kernel needs triton (CUDA machines); CPU installs never push
    from runtime import p2p_triton
except ImportError:
    p2p_triton = None

_ON: dict[str, int] = {}        # group → barrier timeout, ms (0: none)


def enable(group: str, timeout_s: float | None = None) -> None:
    """Exchange `group`'s token rows by pushes into symmetric memory (CUDA, one node). With
    `timeout_s`, a barrier that waits longer for a peer traps (the process fails, not hangs)."""
    _ON[group] = int(timeout_s * 1000) if timeout_s else 0


def setup(exchange: str, group: str = "ep", timeout_s: float | None = None) -> None:
    """Turn the push exchange on or off for `group` as the spec resolved it (spec.token_exchange)."""
    if exchange != "p2p":
        disable(group)
        return
    if why := missing() or unreachable(group):
        raise EchocError(f"backends.exchange 'p2p' cannot run here: {why}; set backends.exchange 'nccl'")
    enable(group, timeout_s)


def unreachable(group: str) -> str | None:
    """Why some rank of `group` is not a peer this GPU can store into (None: all are). torchrun
    numbers the ranks of a host consecutively, LOCAL_WORLD_SIZE of them."""
    local = int(os.environ.get("LOCAL_WORLD_SIZE", "0") or 0)
    ranks = comm.group_ranks(group)
    if not local or len(ranks) < 2:
        return None
    hosts = {r // local for r in ranks}
    if len(hosts) > 1:
        return (f"the EP group's ranks {ranks[0]}..{ranks[-1]} span {len(hosts)} hosts of {local} processes "
                "each (p2p reaches the GPUs of one host)")
    me = torch.cuda.current_device()
    far = [r % local for r in ranks if r % local != me and not torch.cuda.can_device_access_peer(me, r % local)]
    return f"GPU {me} cannot access GPU(s) {far} directly (no peer access)" if far else None


def disable(group: str) -> None:
    _ON.pop(group, None)


def enabled(group: str) -> bool:
    return group in _ON and comm.group_size(group) > 1


def missing() -> str | None:
    """Why the push exchange cannot run in this process (None: it can)."""
    if not torch.cuda.is_available():
        return "no CUDA device"
    if importlib.util.find_spec("torch.distributed._symmetric_memory") is None:
        return "this torch has no torch.distributed._symmetric_memory"
    if p2p_triton is None:
        return "triton is not installed (pip install triton)"
    return None


class Pool(NamedTuple):
    buf: Tensor          # [rows, H] symmetric: my receive buffer
    handle: object       # the rendezvous handle (barrier)
    ptrs: Tensor         # [ep] int64 on the device: every rank's `buf` in my address space
    by_allocator: bool   # its bytes show in torch.cuda.memory_allocated (else only in the GPU's own count)


_POOLS: dict[tuple, Pool] = {}


def pool(group: str, rows: int, like: Tensor) -> Pool:
    """The receive pool for [rows, H] exchanges of `like`'s dtype over `group` (made on first use)."""
    key = (group, tuple(like.shape[1:]), like.dtype, like.device)
    have = _POOLS.get(key)
    if have is not None and have.buf.shape[0] >= rows:
        return have
    if torch.cuda.is_current_stream_capturing():
        raise RuntimeError(f"p2p exchange: the receive pool for {key} must exist before CUDA-graph capture "
                           "(run one eager step first)")
    from torch.distributed import _symmetric_memory as symm
    name = comm.get_group(group).group_name
    if not symm.is_symm_mem_enabled_for_group(name):
        symm.enable_symm_mem_for_group(name)
    before = torch.cuda.memory_allocated(like.device)
    buf = symm.empty((rows,) + tuple(like.shape[1:]), dtype=like.dtype, device=like.device)
    by_allocator = torch.cuda.memory_allocated(like.device) - before >= buf.nbytes
    handle = symm.rendezvous(buf, name)
    offset = buf.data_ptr() - handle.buffer_ptrs[handle.rank]
    offsets = comm.all_gather_rows(torch.tensor([offset], dtype=torch.int64, device=like.device), group)
    if bool((offsets != offset).any()):     # a peer's pool must sit where this rank's pointers say
        raise RuntimeError(f"p2p exchange: the pool's offset in its allocation differs between ranks: "
                           f"{offsets.view(-1).tolist()}")
    ptrs = torch.tensor([p + offset for p in handle.buffer_ptrs], dtype=torch.int64, device=like.device)
    _POOLS[key] = Pool(buf, handle, ptrs, by_allocator)
    comm.at_shutdown(release)
    return _POOLS[key]


def release(wait: bool = True) -> None:
    """Free the pools before the groups they live on go: after every kernel that uses them, or
    (`wait` False: after an error, when a peer may never come to a barrier) at once."""
    if _POOLS and wait:
        torch.cuda.synchronize()
    _POOLS.clear()


def pool_bytes(outside_allocator: bool = False) -> int:
    """Bytes of this process's receive pools (only those the caching allocator does not count)."""
    return sum(p.buf.nbytes for p in _POOLS.values() if not (outside_allocator and p.by_allocator))


class Push(NamedTuple):
    """One array pushed in an exchange: row s of the send side (peer s // C) ← src[index[s]]."""
    src: Tensor                      # [S, W] rows to read (unit column stride)
    index: Tensor                    # [n] int64 (-1: nothing), or [n, K]: the (weighted) sum of K rows
    pos: Tensor | None = None        # [n]: each row's place in its chunk (default: where it is)
    weights: Tensor | None = None    # [n, K] with a 2-D index
    sum_rows: int = 0                # 2-D index: its rows per peer U ≤ C (row p·U + j goes to p's row rank·C + j)


def exchange(pushes: list[Push], group: str, rows: int, **tiles) -> list[Tensor]:
    """Push every array of `pushes` into its own receive pool [rows = ep·C, W] on the peers, between
    one pair of barriers: chunk s of each result holds what rank s pushed for me; rows nobody
    pushed are stale. Each result is valid until the next exchange of its row shape and dtype."""
    ep, rank = comm.group_size(group), comm.group_rank(group)
    assert rows % ep == 0, (rows, ep)
    pools = [pool(group, rows, q.src) for q in pushes]
    assert len({id(p) for p in pools}) == len(pools), "two arrays of one exchange share a pool"
    for q in pushes:
        assert q.src.stride(-1) == 1 and q.index.dtype == torch.int64 and q.index.is_contiguous(), \
            (q.src.stride(), q.index.dtype)
    timeout = _ON.get(group, 0)
    pools[0].handle.barrier(channel=0, timeout_ms=timeout)
    for q, p in zip(pushes, pools):
        p2p_triton.push_rows(q.src, q.index, p.ptrs, rows // ep, rank, q.src.shape[1], pos=q.pos,
                             weights=q.weights, sum_rows=q.sum_rows or None, **tiles)
    pools[0].handle.barrier(channel=0, timeout_ms=timeout)
    return [p.buf[:rows] for p in pools]


def push(src: Tensor, index: Tensor, group: str, **tiles) -> Tensor:
    """src [S, H], index [ep·C] (-1: nothing) → my receive buffer [ep·C, H]: chunk s holds what
    rank s pushed for me; rows past each chunk's real rows are stale. Valid until the next push."""
    return exchange([Push(src, index)], group, index.shape[0], **tiles)[0]


def real_rows(index: Tensor) -> Tensor:
    """Row j where index[j] names something, else -1: the index that pushes a map itself, in place."""
    return torch.where(index >= 0, torch.arange(index.shape[0], device=index.device), -1)


def unique_tokens(tokens: Tensor, ep: int, T: int) -> tuple[Tensor, Tensor, Tensor]:
    """tokens [ep·C] (the token of each send row, -1 padding) → (lead [ep·C]: the token where this
    row is its token's first in its chunk, else -1; upos [ep·C]: that first row's position among
    the chunk's distinct tokens; where [ep·C]: every real row's token position, -1 padding)."""
    if p2p_triton is not None and tokens.is_cuda:
        return p2p_triton.unique_tokens(tokens.contiguous(), ep, T)
    n = tokens.shape[0]
    C = n // ep
    tok = tokens.view(ep, C)
    key = torch.where(tok >= 0, tok, T)                                   # padding: a column of its own
    j = torch.arange(C, device=tokens.device).expand(ep, C)
    first = torch.full((ep, T + 1), C, dtype=torch.int64, device=tokens.device)
    first = first.scatter_reduce_(1, key, j, reduce="amin").gather(1, key)   # first row of each row's token
    lead = (tok >= 0) & (first == j)
    upos = torch.cumsum(lead, 1) - lead.long()
    where = torch.where(tok >= 0, upos.gather(1, first.clamp(max=C - 1)), -1)
    return torch.where(lead, tok, -1).view(n), upos.view(n), where.view(n)
