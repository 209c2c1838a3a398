"""The push kernel (runtime/p2p_triton.py) in the Triton interpreter, run by tests/runtime/test_p2p.py
with TRITON_INTERPRET=1: every rank's receive buffer is a local tensor standing in for a peer's, its
address in `ptrs` as the symmetric pool's would be. For each case (ranks, chunk, width, tile), every
real row lands at row rank·C + j of its peer's buffer bitwise, and nothing else is written (the
buffers start as NaN). Prints {"cases", "failures"} as JSON."""
import json

import torch

from runtime import p2p_triton


def case(ep, C, H, T, rank, block, rows, seed, positions=False):
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(T, H, generator=g)
    idx = torch.full((ep, C), -1, dtype=torch.int64)
    for p in range(ep):   # real rows first in each chunk (the layout's order), a random count of them
        n = int(torch.randint(0, C + 1, (1,), generator=g))
        idx[p, :n] = torch.randint(0, T, (n,), generator=g)
    idx = idx.view(-1)
    # positions: each chunk's real rows stored in a shuffled order
    pos = torch.cat([torch.randperm(C, generator=g) for _ in range(ep)]) if positions else None
    bufs = [torch.full((ep * C, H), float("nan")) for _ in range(ep)]
    ptrs = torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)
    p2p_triton.push_rows(src, idx, ptrs, C, rank, H, block=block, warps=1, rows=rows, pos=pos)
    for p in range(ep):
        want = torch.full((ep * C, H), float("nan"))
        for j in range(C):
            if idx[p * C + j] >= 0:
                want[rank * C + (int(pos[p * C + j]) if positions else j)] = src[idx[p * C + j]]
        if not torch.equal(bufs[p].nan_to_num(7.0), want.nan_to_num(7.0)):
            return f"ep {ep} C {C} H {H} rank {rank} block {block} rows {rows}: peer {p}'s buffer differs"
    return None


def main():
    cases = [(2, 6, 20, 9, 1, 16, 4), (2, 5, 16, 7, 0, 16, 1), (4, 3, 33, 11, 2, 8, 2), (4, 7, 8, 5, 3, 64, 8),
             (3, 4, 40, 6, 1, 32, 2)]
    cases += [c[:-1] + (c[-1], True) for c in cases[:3]]           # the same, stored at given positions
    failures = [f for i, c in enumerate(cases) if (f := case(*c[:7], seed=i, positions=len(c) > 7))]
    print(json.dumps({"cases": len(cases), "failures": failures}))


if __name__ == "__main__":
    main()
