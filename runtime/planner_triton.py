"""The ECHO planner as a few Triton kernels: the same plan, bit for bit, as runtime/planner.py.

The torch planner (runtime/planner.py) is a few hundred tiny kernels (3 rounds of sorts,
cumsums, searchsorted, gathers and scatters); inside a CUDA graph each costs a launch. Here:

- `plan_fused`: two launches. The first sums the counts over ranks and writes the outputs'
  initial values (quota column 0 = load, other columns 0, spare slots empty) over many
  programs; then one program per clone domain runs all rounds in registers. A domain holds
  g ranks of El home experts; only each rank's `offer` offered experts can give rows, so a
  round works on g·offer pieces against g rooms. Stable sorts become sorts of unique packed
  int64 keys (value, tie-break index, payload); the interval overlay becomes a
  [pieces, rooms] overlap matrix (every positive overlap is exactly one segment of the
  torch overlay, and the k-th clone of a receiver is a cumsum down its column).
- `assign_slots_fused`: two launches: per-block expert histograms, the quota's cumsum and the
  rank's base per expert; then per block of 512 copies the per-expert base positions, a sort
  of (expert, index) and a binary search of each copy's position in its expert's
  cumulative quota.

Exact while every expert's load (rows) stays below 2**40, far above any capacity budget.
Legend: G ranks per domain, El experts per rank, S spare slots per rank, O offered experts
per rank; *B is the padded power-of-two block of a size; P = ep·S, QC = 1 + P.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from runtime.planner_blocks import assign_meta, plan_meta


@triton.jit
def _inverse(perm, BITS):
    """perm [2**BITS] a permutation (natural index at each sorted position) → its inverse.
    (int64 keys: int32 keys, though they fit, measured 2-3× slower at EP 64.)"""
    n: tl.constexpr = 1 << BITS
    key = tl.sort((perm.to(tl.int64) << BITS) | tl.arange(0, n), descending=False)
    return key & (n - 1)


@triton.jit
def _domain_loads(load_ptr, d, G, EL, GB: tl.constexpr, ELB: tl.constexpr):
    """load [E] (counts summed over source ranks) → loads [GB, ELB] of domain d's experts
    (rank-local layout, padding 0). The sum is one small kernel before the plan: summed in
    the plan's single program, ep serial loads cost ~60 µs at EP 64."""
    r = tl.arange(0, GB)[:, None]
    l = tl.arange(0, ELB)[None, :]
    return tl.load(load_ptr + (d * G + r) * EL + l, mask=(r < G) & (l < EL), other=0)


@triton.jit
def _offered(load, EL, ELB: tl.constexpr, OB: tl.constexpr, LB: tl.constexpr):
    """loads [GB, ELB] → (local ids, loads) [GB, OB] of each rank's hottest experts, ties by id
    (the first O columns are offered_experts)."""
    l = tl.arange(0, ELB)[None, :]
    key = tl.where(l < EL, (load << LB) | (ELB - 1 - l), -1)
    key = tl.sort(key, dim=1, descending=True)
    pick = tl.arange(0, ELB)[None, :, None] == tl.arange(0, OB)[None, None, :]
    ev = tl.sum(tl.where(pick, (ELB - 1 - (key & (ELB - 1)))[:, :, None], 0), axis=1)
    hv = tl.sum(tl.where(pick, (key >> LB)[:, :, None], 0), axis=1)
    return ev, hv


@triton.jit
def _pieces(hv, ev, excess, ovalid, EL, ELB: tl.constexpr, GB: tl.constexpr,
            OB: tl.constexpr, LB: tl.constexpr, FB: tl.constexpr, NB: tl.constexpr):
    """Each rank's excess taken from its hottest offered experts → pieces sorted as the torch
    overlay lays them out (size desc, then rank, then hot order), with their natural index."""
    hk = tl.where(ovalid, (hv << LB) | (ELB - 1 - ev), -1)
    ahead = hk[:, None, :] > hk[:, :, None]                       # [GB, o, o']: o' before o
    before = tl.sum(tl.where(ahead, hv[:, None, :], 0), axis=2)
    pos = tl.sum(ahead.to(tl.int64), axis=2)
    piece = tl.where(ovalid, tl.minimum(tl.maximum(excess[:, None] - before, 0), hv), 0)
    r = tl.arange(0, GB)[:, None]
    nat = r * OB + tl.arange(0, OB)[None, :]
    flat = r * EL + pos
    key = tl.where(piece > 0, (piece << (FB + NB)) | ((((1 << FB) - 1) - flat) << NB) | nat, nat)
    key = tl.sort(tl.reshape(key, [GB * OB]), descending=True)
    return key >> (FB + NB), key & (GB * OB - 1)


@triton.jit
def _rooms(room, GB: tl.constexpr, RB: tl.constexpr):
    """room [GB] → rooms sorted descending (ties by rank) and their receiving ranks."""
    key = tl.sort((room << RB) | (GB - 1 - tl.arange(0, GB)), descending=True)
    return key >> RB, GB - 1 - (key & (GB - 1))


@triton.jit
def _overlay(piece_s, room_s, used_s, S, MIN_ROWS):
    """Sorted pieces [NP] on one line, sorted rooms [GB] on another → kept clone rows and
    the k-th new clone of each receiver, [NP, GB]."""
    pe = tl.cumsum(piece_s, 0)
    re = tl.cumsum(room_s, 0)
    total = tl.minimum(tl.sum(piece_s, 0), tl.sum(room_s, 0))
    lo = tl.maximum((pe - piece_s)[:, None], (re - room_s)[None, :])
    hi = tl.minimum(tl.minimum(pe[:, None], re[None, :]), total)
    rows = tl.maximum(hi - lo, 0)
    big = (rows >= MIN_ROWS).to(tl.int64)
    k = tl.cumsum(big, 0) - big
    keep = (big > 0) & (k < (S - used_s)[None, :])
    return tl.where(keep, rows, 0), k


@triton.jit
def _store_clones(spare_ptr, quota_ptr, rows, slot, recv_s, expert_s, d, G,
                  EL, S, QC):
    """Write the kept clones [NP, GB] (rows > 0) into spare_expert and quota."""
    keep = rows > 0
    rank = d * G + recv_s[None, :]
    expert = d * G * EL + expert_s[:, None] + 0 * rank
    tl.store(spare_ptr + rank * S + slot, expert, mask=keep)
    tl.store(quota_ptr + expert * QC + 1 + rank * S + slot, rows, mask=keep)


@triton.jit
def _next_level(load, used, mean, rvalid, S):
    """Later rounds spread what is left over the ranks that still have a free slot."""
    left = tl.sum(tl.where(rvalid, tl.maximum(load - mean, 0), 0), 0)
    open_ranks = tl.maximum(tl.sum((rvalid & (used < S) & (load <= mean)).to(tl.int64), 0), 1)
    return mean + (left + open_ranks - 1) // open_ranks


_PLAN_ARGS = ["ep", "E", "G", "EL", "S", "OFFER", "MIN_ROWS", "ROUNDS", "QC"]


@triton.jit(do_not_specialize=_PLAN_ARGS)
def _plan_kernel(load_ptr, spare_ptr, quota_ptr, ep, E, G, EL, S, OFFER, MIN_ROWS, ROUNDS, QC,
                 GB: tl.constexpr, ELB: tl.constexpr, OB: tl.constexpr, LB: tl.constexpr, FB: tl.constexpr,
                 NB: tl.constexpr, RB: tl.constexpr):
    """One clone domain per program: all rounds of the water-filling overlay (see module doc).
    Only block sizes are compile-time, so one compiled kernel serves many plan shapes."""
    d = tl.program_id(0)
    tile = _domain_loads(load_ptr, d, G, EL, GB, ELB)
    ev, hv = _offered(tile, EL, ELB, OB, LB)
    r = tl.arange(0, GB)
    rvalid = r < G
    ovalid = rvalid[:, None] & (tl.arange(0, OB)[None, :] < OFFER)
    load = tl.sum(tile, 1)
    mean = (tl.sum(load, 0) + G - 1) // G
    level = mean
    used = tl.zeros([GB], tl.int64)
    for _ in range(ROUNDS):
        excess = tl.where(rvalid, tl.maximum(load - level, 0), 0)
        room = tl.where(rvalid & (used < S), tl.maximum(level - load, 0), 0)
        piece_s, nat_s = _pieces(hv, ev, excess, ovalid, EL, ELB, GB, OB, LB, FB, NB)
        room_s, recv_s = _rooms(room, GB, RB)
        used_s = tl.gather(used, recv_s, 0)
        rows, k = _overlay(piece_s, room_s, used_s, S, MIN_ROWS)
        expert_s = (nat_s // OB) * EL + tl.gather(tl.reshape(ev, [GB * OB]), nat_s, 0)
        _store_clones(spare_ptr, quota_ptr, rows, used_s[None, :] + k, recv_s, expert_s, d, G,
                      EL, S, QC)
        taken = tl.reshape(tl.gather(tl.sum(rows, 1), _inverse(nat_s, NB), 0), [GB, OB])
        inv_r = _inverse(recv_s, RB)
        hv -= taken
        load += tl.gather(tl.sum(rows, 0), inv_r, 0) - tl.sum(taken, 1)
        used += tl.gather(tl.sum((rows > 0).to(tl.int64), 0), inv_r, 0)
        level = _next_level(load, used, mean, rvalid, S)
    col0 = quota_ptr + ((d * G + r)[:, None] * EL + ev) * QC
    tl.store(col0, hv, mask=ovalid)


@triton.jit(do_not_specialize=["ep", "E", "S", "QC"])
def _load_kernel(counts_ptr, load_ptr, spare_ptr, quota_ptr, ep, E, S, QC, EC: tl.constexpr,
                 RCH: tl.constexpr, CB: tl.constexpr, PB: tl.constexpr):
    """Program p: experts [p·EC, (p+1)·EC): load = counts summed over ranks, quota column 0 =
    load, other columns 0. Program 0 also empties every spare slot (-1)."""
    e = tl.program_id(0) * EC + tl.arange(0, EC)
    load = tl.zeros([EC], tl.int64)
    for r0 in range(0, ep, RCH):
        r = r0 + tl.arange(0, RCH)[:, None]
        tile = tl.load(counts_ptr + r * E + e[None, :], mask=(r < ep) & (e[None, :] < E), other=0)
        load += tl.sum(tile.to(tl.int64), 0)
    tl.store(load_ptr + e, load, mask=e < E)
    for c0 in range(0, QC, CB):
        c = c0 + tl.arange(0, CB)[None, :]
        q = tl.where(c == 0, load[:, None], 0)
        tl.store(quota_ptr + e[:, None] * QC + c, q, mask=(e[:, None] < E) & (c < QC))
    if tl.program_id(0) == 0:
        for p0 in range(0, ep * S, PB):
            p = p0 + tl.arange(0, PB)
            tl.store(spare_ptr + p, tl.full([PB], -1, tl.int64), mask=p < ep * S)


def plan_fused(counts: Tensor, experts_per_rank: int, spares: int, domain_size: int, offer: int,
               min_clone_rows: int, rounds: int = 3) -> tuple[Tensor, Tensor]:
    """counts [ep, E] → (spare_expert [ep, S] int64, quota [E, 1 + ep·S] int64), equal to
    runtime.planner's torch path. Two launches: the column sum with the outputs' initial values
    (spread over many programs), then one program per clone domain."""
    ep, E = counts.shape
    m = plan_meta(ep, E, experts_per_rank, spares, domain_size, offer, min_clone_rows, rounds)
    spare = torch.empty(ep, spares, dtype=torch.int64, device=counts.device)
    quota = torch.empty(E, m.qc, dtype=torch.int64, device=counts.device)
    load = torch.empty(E, dtype=torch.int64, device=counts.device)
    _load_kernel[(-(-E // m.ec),)](counts.contiguous(), load, spare, quota, ep, E, m.s, m.qc, m.ec, m.rch,
                                   m.cb, m.pb)
    _plan_kernel[(ep // domain_size,)](
        load, spare, quota, ep, E, m.g, m.el, m.s, m.offer, m.min_rows, m.rounds,
        m.qc, m.gb, m.elb, m.ob, m.lb, m.fb, m.nb, m.rb, num_warps=m.num_warps)
    return spare, quota


@triton.jit(do_not_specialize=["n", "E", "rank", "blocks", "qprogs", "QC"])
def _prep_kernel(idx_ptr, counts_ptr, quota_ptr, hist_ptr, qcum_ptr, rankbase_ptr, n, E, rank, blocks,
                 qprogs, QC, BLK: tl.constexpr, EB: tl.constexpr, QCB: tl.constexpr,
                 RCH: tl.constexpr, SRCB: tl.constexpr):
    """Programs [0, blocks): hist [blocks, EB] of each block's experts (bin E counts the padding).
    Next qprogs programs: qcum [E, QC], the quota's cumulative sum along its columns.
    Last program: rankbase [EB] = copies of e on lower ranks − copies of lower experts here."""
    pid = tl.program_id(0)
    if pid < blocks:
        i = pid * BLK + tl.arange(0, BLK)
        e = tl.load(idx_ptr + i, mask=i < n, other=E).to(tl.int32)
        tl.store(hist_ptr + pid * EB + tl.arange(0, EB), tl.histogram(e, EB))
    elif pid < blocks + qprogs:
        rows = (pid - blocks) * RCH + tl.arange(0, RCH)[:, None]
        c = tl.arange(0, QCB)[None, :]
        m = (rows < E) & (c < QC)
        q = tl.load(quota_ptr + rows * QC + c, mask=m, other=0)
        tl.store(qcum_ptr + rows * QC + c, tl.cumsum(q, 1), mask=m)
    else:
        e = tl.arange(0, EB)
        mine = tl.load(counts_ptr + rank * E + e, mask=e < E, other=0).to(tl.int64)
        before = tl.zeros([EB], tl.int64)
        for r0 in range(0, rank, SRCB):
            r = r0 + tl.arange(0, SRCB)[:, None]
            tile = tl.load(counts_ptr + r * E + e[None, :], mask=(r < rank) & (e[None, :] < E), other=0)
            before += tl.sum(tile.to(tl.int64), 0)
        tl.store(rankbase_ptr + e, before - (tl.cumsum(mine, 0) - mine))


@triton.jit
def _block_base(hist_ptr, rankbase_ptr, b, blocks, EB: tl.constexpr, BCH: tl.constexpr):
    """[EB]: position among all copies of e (source rank, copy order) of block b's first copy
    of e, minus its rank among block b's copies sorted by expert."""
    e = tl.arange(0, EB)
    total = tl.zeros([EB], tl.int64)
    prefix = tl.zeros([EB], tl.int64)
    mine = tl.zeros([EB], tl.int64)
    for b0 in range(0, blocks, BCH):
        bb = b0 + tl.arange(0, BCH)[:, None]
        h = tl.load(hist_ptr + bb * EB + e[None, :], mask=bb < blocks, other=0).to(tl.int64)
        total += tl.sum(h, 0)
        prefix += tl.sum(tl.where(bb < b, h, 0), 0)
        mine += tl.sum(tl.where(bb == b, h, 0), 0)
    lower = (tl.cumsum(total, 0) - total) - (tl.cumsum(mine, 0) - mine)
    return tl.load(rankbase_ptr + e) + lower + prefix


@triton.jit(do_not_specialize=["n", "E", "blocks", "EL", "S", "QC"])
def _assign_kernel(idx_ptr, hist_ptr, rankbase_ptr, base_ptr, qcum_ptr, out_ptr, n, E, blocks, EL, S,
                   QC, BLK: tl.constexpr, IB: tl.constexpr, EB: tl.constexpr, BCH: tl.constexpr,
                   QSTEPS: tl.constexpr):
    """Block b's copies → global slots: position among e's copies, then the replica whose
    cumulative quota first exceeds it (binary search), as runtime.planner.assign_slots."""
    b = tl.program_id(0)
    tl.store(base_ptr + b * EB + tl.arange(0, EB), _block_base(hist_ptr, rankbase_ptr, b, blocks, EB, BCH))
    tl.debug_barrier()  # the per-expert base goes through memory to be read back per copy
    i = tl.arange(0, BLK)
    e = tl.load(idx_ptr + b * BLK + i, mask=b * BLK + i < n, other=E).to(tl.int64)
    key = tl.sort((e << IB) | i)
    e_t = key >> IB
    valid = e_t < E
    pos = tl.load(base_ptr + b * EB + e_t) + i
    cnt = tl.zeros([BLK], tl.int64)
    for j in tl.static_range(QSTEPS + 1):
        cand = cnt + (1 << (QSTEPS - j))
        ok = valid & (cand <= QC)
        end = tl.load(qcum_ptr + e_t * QC + cand - 1, mask=ok, other=0)
        cnt = tl.where(ok & (end <= pos), cand, cnt)
    col = tl.minimum(cnt, QC - 1)
    L = EL + S
    SD = tl.maximum(S, 1)
    spare = tl.maximum(col - 1, 0)
    slot = tl.where(col == 0, (e_t // EL) * L + e_t % EL, (spare // SD) * L + EL + spare % SD)
    tl.store(out_ptr + b * BLK + (key & (BLK - 1)), slot, mask=valid)


def assign_slots_fused(topk_idx: Tensor, counts: Tensor, quota: Tensor, rank: int,
                       experts_per_rank: int, spares: int) -> Tensor:
    """topk_idx [T, K] → global slots [T·K] int64, equal to runtime.planner's torch path.
    counts [ep, E]; quota [E, 1 + ep·S] (non-negative, as plan makes it). Two launches."""
    e = topk_idx.reshape(-1).contiguous()
    E, qc = quota.shape
    out = torch.empty(e.numel(), dtype=torch.int64, device=e.device)
    if e.numel() == 0:
        return out
    m = assign_meta(e.numel(), E, qc)
    hist = torch.empty(m.blocks, m.eb, dtype=torch.int32, device=e.device)
    rankbase = torch.empty(m.eb, dtype=torch.int64, device=e.device)
    base = torch.empty(m.blocks, m.eb, dtype=torch.int64, device=e.device)
    qcum = torch.empty(E, qc, dtype=torch.int64, device=e.device)
    qprogs = -(-E // m.rch)
    _prep_kernel[(m.blocks + qprogs + 1,)](e, counts.contiguous(), quota.contiguous(), hist, qcum, rankbase,
                                           m.n, E, rank, m.blocks, qprogs, qc, m.blk, m.eb, m.qcb, m.rch,
                                           m.srcb, num_warps=m.num_warps)
    _assign_kernel[(m.blocks,)](e, hist, rankbase, base, qcum, out, m.n, E, m.blocks, experts_per_rank,
                                spares, qc, m.blk, m.ib, m.eb, m.bch, m.qsteps, num_warps=m.num_warps)
    return out
