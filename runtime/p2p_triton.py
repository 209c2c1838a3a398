"""The push kernel of runtime/p2p.py: gather rows and store them into the peers' memory, in one pass.

Program (r, c): send rows r·R … r·R+R-1 (row s = p·C + j goes to peer p), columns c·BH … c·BH+BH-1.
Each row's index names the source row, or is -1 (padding: nothing is read or stored); a real row
is stored at row rank·C + j of rank p's receive buffer (rank·C + pos[s] when positions are
given), whose address in this process is ptrs[p].

With a [n, K] index the row sent is a sum: Σ_k w[s, k] · src[index[s, k]] over the entries ≥ 0
(weights optional), accumulated in fp32 and rounded once to the pool's dtype; a row with no entry
is not sent. This is how a rank returns one row per token (the sum of that token's copies it
holds) instead of one per copy.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

# tiles measured on 2 × H200 (bench/exchange.py --sweep, docs/BENCHMARKS.md): whole rows up to 8192
# columns per program; 8 warps from 4096 columns on
_MAX_BH = 8192
_ROW_ELEMS = 256           # a narrow push takes several rows a program: a [n, 1] map in n / 256 programs, not n
_SUM_BH = 2048             # a summing push keeps an fp32 accumulator: narrower column blocks


@triton.jit
def _push(src, idx, pos, ptrs, n, C, rank, H, s_src, HAS_POS: tl.constexpr, R: tl.constexpr, BH: tl.constexpr):
    s = tl.program_id(0).to(tl.int64) * R + tl.arange(0, R)
    c = tl.program_id(1) * BH + tl.arange(0, BH)
    i = tl.load(idx + s, mask=s < n, other=-1)
    real = i >= 0
    if tl.max(real.to(tl.int32), 0) > 0:
        p = s // C
        dst = tl.load(ptrs + p, mask=real, other=0).to(tl.pointer_type(src.dtype.element_ty))
        if HAS_POS:
            j = tl.load(pos + s, mask=real, other=0)
        else:
            j = s - p * C
        m = real[:, None] & (c < H)[None, :]
        v = tl.load(src + i[:, None] * s_src + c[None, :], mask=m)
        tl.store(dst[:, None] + (rank * C + j)[:, None] * H + c[None, :], v, mask=m)


@triton.jit
def _push_sum(src, idx, w, ptrs, n, U, C, rank, H, K, s_src, HAS_W: tl.constexpr, KB: tl.constexpr,
              BH: tl.constexpr):
    """Program (s, c): send row s = p·U + j (U rows per peer) ← Σ_k w[s, k] · src[idx[s, k]] (fp32),
    if any idx ≥ 0, into row rank·C + j of peer p's buffer."""
    s = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BH + tl.arange(0, BH)
    cols = c < H
    ks = tl.arange(0, KB)
    if tl.max(tl.load(idx + s * K + ks, mask=ks < K, other=-1), 0) >= 0:
        acc = tl.zeros([BH], dtype=tl.float32)
        for k in range(K):
            i = tl.load(idx + s * K + k)
            v = tl.load(src + i * s_src + c, mask=cols & (c * 0 + i >= 0), other=0).to(tl.float32)
            if HAS_W:   # an empty entry adds 0 whatever its weight holds
                v = v * tl.where(i >= 0, tl.load(w + s * K + k).to(tl.float32), 0.0)
            acc += v
        p = s // U
        dst = tl.load(ptrs + p).to(tl.pointer_type(src.dtype.element_ty))
        tl.store(dst + (rank * C + s - p * U) * H + c, acc.to(src.dtype.element_ty), mask=cols)


def push_rows(src: Tensor, index: Tensor, ptrs: Tensor, chunk_rows: int, rank: int, H: int,
              block: int | None = None, warps: int | None = None, rows: int | None = None, pos: Tensor | None = None,
              weights: Tensor | None = None, sum_rows: int | None = None) -> None:
    """For every send row s with index[s] ≥ 0: peer (s // C)'s buffer row rank·C + s % C (or
    rank·C + pos[s]) ← src[index[s]]. A 2-D index [n, K] sends the (weighted) sum of its rows, row
    s = p·U + j (U = `sum_rows` per peer, ≤ C) to peer p's row rank·C + j."""
    n = index.shape[0]
    assert rows is None or rows & (rows - 1) == 0, f"rows per program must be a power of 2, got {rows}"
    if n == 0:
        return
    if index.dim() == 2:
        assert pos is None, "a summing push stores row s at its own position"
        bh = min(block or _SUM_BH, triton.next_power_of_2(H))
        _push_sum[(n, triton.cdiv(H, bh))](src, index, index if weights is None else weights, ptrs, n,
                                           sum_rows or chunk_rows, chunk_rows, rank, H, index.shape[1], src.stride(0),
                                           HAS_W=weights is not None, KB=triton.next_power_of_2(index.shape[1]),
                                           BH=bh, num_warps=warps or 4)
        return
    bh = min(block or _MAX_BH, triton.next_power_of_2(H))
    warps = warps or (8 if bh >= 4096 else 4)
    rows = rows or max(1, _ROW_ELEMS // bh)
    _push[(triton.cdiv(n, rows), triton.cdiv(H, bh))](src, index, index if pos is None else pos, ptrs, n, chunk_rows,
                                                      rank, H, src.stride(0), HAS_POS=pos is not None, R=rows,
                                                      BH=bh, num_warps=warps)


# --- each token's first row in its chunk (p2p.unique_tokens), and the dispatch's maps -----------
# Rows hold a token t, or a copy c = t·K + k of it (K = 1: tokens), -1 for padding.
_UB = 1024                 # rows per block of the kernels below


@triton.jit
def _token(rows, at, mask, K):
    c = tl.load(rows + at, mask=mask, other=-1)
    return tl.where(c >= 0, c // K, -1), c


@triton.jit
def _first_rows(rows, first, C, T, K, B: tl.constexpr):
    """Program (p, b): first[p, t] = min over the rows j of chunk p holding token t (atomic)."""
    p = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * B + tl.arange(0, B)
    tok, _ = _token(rows, p * C + j, j < C, K)
    tl.atomic_min(first + p * T + tok, j.to(tl.int32), mask=tok >= 0)


@triton.jit
def _lead_rows(rows, first, lead, upos, C, T, K, B: tl.constexpr):
    """Program p, chunk p in blocks: a row leads if it is its token's first; upos counts the
    leading rows before each row (an exclusive scan carried across blocks)."""
    p = tl.program_id(0).to(tl.int64)
    carry = tl.zeros([], dtype=tl.int64)
    for b in range(0, C, B):
        j = b + tl.arange(0, B)
        inside = j < C
        tok, _ = _token(rows, p * C + j, inside, K)
        f = tl.load(first + p * T + tok, mask=tok >= 0, other=-1)
        is_lead = (tok >= 0) & (f == j)
        n = is_lead.to(tl.int64)
        tl.store(upos + p * C + j, carry + tl.cumsum(n, 0) - n, mask=inside)
        tl.store(lead + p * C + j, tl.where(is_lead, tok, -1), mask=inside)
        carry += tl.sum(n, 0)


@triton.jit
def _token_places(rows, first, upos, where, sent, C, T, K, SENT: tl.constexpr, B: tl.constexpr):
    """Program (p, b): where[p·C + j] = u·K + k, u the upos of the first row of row j's token and
    k its copy (-1 padding); with SENT, sent[p·C + j] = p·C + j where row j is real, else -1."""
    p = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1) * B + tl.arange(0, B)
    inside = j < C
    tok, c = _token(rows, p * C + j, inside, K)
    f = tl.load(first + p * T + tok, mask=tok >= 0, other=0).to(tl.int64)
    u = tl.load(upos + p * C + f, mask=tok >= 0, other=-1)
    tl.store(where + p * C + j, tl.where(tok >= 0, u * K + c % K, -1), mask=inside)
    if SENT:
        tl.store(sent + p * C + j, tl.where(tok >= 0, p * C + j, -1), mask=inside)


def _unique(rows: Tensor, ep: int, T: int, K: int, lead: Tensor, upos: Tensor, where: Tensor,
            sent: Tensor | None) -> None:
    n = rows.shape[0]
    C = n // ep
    first = torch.full((ep, T), C, dtype=torch.int32, device=rows.device)
    if n:
        grid = (ep, triton.cdiv(C, _UB))
        _first_rows[grid](rows, first, C, T, K, B=_UB, num_warps=4)
        _lead_rows[(ep,)](rows, first, lead, upos, C, T, K, B=_UB, num_warps=4)
        _token_places[grid](rows, first, upos, where, where if sent is None else sent, C, T, K,
                            SENT=sent is not None, B=_UB, num_warps=4)


def unique_tokens(tokens: Tensor, ep: int, T: int) -> tuple[Tensor, Tensor, Tensor]:
    """p2p.unique_tokens in three kernels: (lead, upos, where), each [ep·C] int64."""
    lead, upos, where = (torch.empty_like(tokens) for _ in range(3))
    _unique(tokens, ep, T, 1, lead, upos, where, None)
    return lead, upos, where


@triton.jit
def _token_index(copy_slot, lead, upos, out, N, C, B: tl.constexpr):
    """out[c] = the pool row to sum for copy c: j − j % C + upos[j] where its send row j leads, else -1."""
    c = tl.program_id(0).to(tl.int64) * B + tl.arange(0, B)
    j = tl.load(copy_slot + c, mask=c < N, other=-1)
    first = (j >= 0) & (tl.load(lead + j, mask=j >= 0, other=-1) >= 0)
    u = tl.load(upos + j, mask=first, other=0)
    tl.store(out + c, tl.where(first, j - j % C + u, -1), mask=c < N)


def token_maps(send_copy: Tensor, copy_slot: Tensor, ep: int, T: int, K: int, lead: Tensor, upos: Tensor,
               token_index: Tensor) -> tuple[Tensor, Tensor]:
    """Dispatch's token side (p2p_moves): fills lead, upos [ep·C] and token_index [T·K]; returns
    (packed [ep·C]: each row's place·K + k, -1 padding; sent: the push index of `packed`)."""
    packed, sent = torch.empty_like(send_copy), torch.empty_like(send_copy)
    _unique(send_copy, ep, T, K, lead, upos, packed, sent)
    N = copy_slot.shape[0]
    if N:
        _token_index[(triton.cdiv(N, _UB),)](copy_slot, lead, upos, token_index, N, send_copy.shape[0] // ep, B=_UB,
                                             num_warps=4)
    return packed, sent


@triton.jit
def _sorted_maps(sorted_src, got, w_recv, row_index, row_weight, table, n, C, U, K, B: tl.constexpr):
    """Expert side: sorted row i (receive row s) → its pool row s − s % C + place, its weight, and
    its entry table[(s // C · U + place) · K + k] = i (the table holds -1 before)."""
    i = tl.program_id(0).to(tl.int64) * B + tl.arange(0, B)
    s = tl.load(sorted_src + i, mask=i < n, other=-1)
    real = s >= 0
    p = tl.load(got + s, mask=real, other=0)
    place = p // K
    tl.store(row_index + i, tl.where(real, s - s % C + place, -1), mask=i < n)
    w = tl.load(w_recv + s, mask=real, other=0)
    tl.store(row_weight + i, tl.where(real, w, 0), mask=i < n)
    tl.store(table + (s // C * U + place) * K + p % K, i, mask=real)


def sorted_maps(sorted_src: Tensor, got: Tensor, w_recv: Tensor, C: int, U: int, K: int, row_index: Tensor,
                row_weight: Tensor, table: Tensor) -> None:
    """Dispatch's expert side (p2p_moves): fills row_index [n], row_weight [n] and table [ep·U, K]."""
    table.fill_(-1)
    n = sorted_src.shape[0]
    if n:
        _sorted_maps[(triton.cdiv(n, _UB),)](sorted_src, got, w_recv, row_index, row_weight, table, n, C, U, K,
                                             B=_UB, num_warps=4)
