"""The push kernel of runtime/p2p.py: gather a row and store it into a peer's memory, in one pass.

Program (r, c): send row r = p·C + j of this rank, columns c·BH … c·BH+BH-1. Its index names
the source row (or -1: padding, the program returns at once); the row is stored at row
rank·C + j of rank p's receive buffer, whose address in this process is ptrs[p].
"""
from __future__ import annotations

import triton
import triton.language as tl
from torch import Tensor

_BH, _WARPS = 2048, 4   # columns per program (4 KiB of bf16), warps per program


@triton.jit
def _push(src, idx, ptrs, C, rank, H, s_src, BH: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    i = tl.load(idx + r)
    if i >= 0:
        p = r // C
        j = r - p * C
        dst = tl.load(ptrs + p).to(tl.pointer_type(src.dtype.element_ty))
        c = tl.program_id(1) * BH + tl.arange(0, BH)
        m = c < H
        v = tl.load(src + i * s_src + c, mask=m)
        tl.store(dst + (rank * C + j) * H + c, v, mask=m)


def push_rows(src: Tensor, index: Tensor, ptrs: Tensor, chunk_rows: int, rank: int, H: int,
              block: int = _BH, warps: int = _WARPS) -> None:
    """For every send row r with index[r] ≥ 0: peer (r // C)'s buffer row rank·C + r % C ← src[index[r]]."""
    rows = index.shape[0]
    if rows == 0:
        return
    bh = min(block, triton.next_power_of_2(H))
    _push[(rows, triton.cdiv(H, bh))](src, index, ptrs, chunk_rows, rank, H, src.stride(0), BH=bh, num_warps=warps)
