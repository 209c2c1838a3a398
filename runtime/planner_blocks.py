"""Block sizes and bit widths of the fused planner's Triton kernels (runtime/planner_triton.py).

Pure Python (no triton), so the sizes are tested and read without a GPU. Every block is a
power of two (Triton's arange and sort need one) and at least 2 (a sort of one element
has no stages); packed sort keys put a value above an index of `*_bits` bits.
"""
from __future__ import annotations

from dataclasses import dataclass


def _pow2(n: int) -> int:
    """Smallest power of two ≥ max(n, 2)."""
    return 1 << max(1, (max(n, 2) - 1).bit_length())


def _bits(n: int) -> int:
    """Bits that hold every index below n (n ≥ 1), at least 1."""
    return max(1, (n - 1).bit_length())


@dataclass(frozen=True)
class PlanMeta:
    """Compile-time sizes of one plan: g ranks per domain, el experts per rank, s spare slots,
    offer offered experts per rank (≤ el), qc quota columns; *b padded blocks; lb, fb, nb, rb
    the index bits of the in-rank, flat hot-order, piece and room sort keys. The column-sum
    kernel before the plan: ec experts per program, rch count rows per load, cb quota columns
    per store, pb spare slots per store."""
    g: int
    el: int
    s: int
    offer: int
    min_rows: int
    rounds: int
    qc: int
    gb: int
    elb: int
    ob: int
    lb: int
    fb: int
    nb: int
    rb: int
    num_warps: int
    ec: int = 16
    rch: int = 16
    cb: int = 64
    pb: int = 256


def plan_meta(ep: int, E: int, experts_per_rank: int, spares: int, domain_size: int, offer: int,
              min_clone_rows: int, rounds: int) -> PlanMeta:
    """The kernel's sizes for counts [ep, E]; asserts the planner's shape contract."""
    assert E == ep * experts_per_rank and ep % domain_size == 0, (ep, E, experts_per_rank, domain_size)
    g, el = domain_size, experts_per_rank
    gb, elb, ob = _pow2(g), _pow2(el), _pow2(min(offer, el))
    deb = _pow2(g * el)
    return PlanMeta(g=g, el=el, s=spares, offer=min(offer, el), min_rows=max(min_clone_rows, 1),
                    rounds=rounds, qc=1 + ep * spares, gb=gb, elb=elb, ob=ob, lb=_bits(elb), fb=_bits(deb),
                    nb=_bits(gb * ob), rb=_bits(gb),
                    num_warps=16)   # measured fastest at EP 8, 16 and 64 (bench/planner_time.py --warps)


@dataclass(frozen=True)
class AssignMeta:
    """Compile-time sizes of assign_slots for n copies: blk copies per program (ib index
    bits), blocks programs, eb histogram bins (E experts + 1 padding bin), qc quota columns
    (qcb padded, rch quota rows per cumsum program), qsteps the binary search's top bit;
    bch histogram rows and srcb count rows summed per load."""
    n: int
    blk: int
    ib: int
    blocks: int
    eb: int
    qc: int
    qcb: int
    rch: int
    qsteps: int
    bch: int
    srcb: int
    num_warps: int = 4      # with blk 512: fastest of blk 256/512/1024 × 4/8/16 warps at EP 8, 16, 64


def assign_meta(n: int, E: int, qc: int, blk: int = 512) -> AssignMeta:
    """The kernels' sizes for n copies over E experts and a quota of qc columns."""
    blk = min(blk, _pow2(n))
    qcb = _pow2(qc)
    eb = _pow2(E + 1)
    return AssignMeta(n=n, blk=blk, ib=_bits(blk), blocks=-(-n // blk), eb=eb, qc=qc,
                      qcb=qcb, rch=max(2, 2048 // qcb), qsteps=_bits(qcb),
                      bch=max(2, 4096 // eb), srcb=max(2, 4096 // eb))
