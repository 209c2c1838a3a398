"""The push kernel (runtime/p2p_triton.py) in the Triton interpreter, run by tests/runtime/test_p2p.py
with TRITON_INTERPRET=1: every rank's receive buffer is a local tensor standing in for a peer's, its
address in `ptrs` as the symmetric pool's would be. For each case (ranks, chunk, width, tile), every
real row lands at row rank·C + j of its peer's buffer bitwise, and nothing else is written (the
buffers start as NaN). Summing pushes (a [n, K] index, weights or none): each row the fp32 sum of
the rows it names, at row rank·C + j, rows naming none not written. Prints {"cases", "failures"} as JSON."""
import json

import torch

from runtime import p2p, p2p_moves, p2p_triton


def _peers(ep, C, H):
    """Each rank's receive buffer (NaN: nothing written) and their addresses, as the pool's ptrs."""
    bufs = [torch.full((ep * C, H), float("nan")) for _ in range(ep)]
    return bufs, torch.tensor([b.data_ptr() for b in bufs], dtype=torch.int64)


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
    bufs, ptrs = _peers(ep, C, H)
    p2p_triton.push_rows(src, idx, ptrs, C, rank, H, block=block, warps=1, rows=rows, pos=pos)
    for p in range(ep):
        want = torch.full((ep * C, H), float("nan"))
        for j in range(C):
            if idx[p * C + j] >= 0:
                want[rank * C + (int(pos[p * C + j]) if positions else j)] = src[idx[p * C + j]]
        if not torch.equal(bufs[p].nan_to_num(7.0), want.nan_to_num(7.0)):
            return f"ep {ep} C {C} H {H} rank {rank} block {block} rows {rows}: peer {p}'s buffer differs"
    return None


def sum_case(ep, C, U, K, H, M, rank, block, seed, weighted):
    """A summing push: row p·U + j ← Σ_k w · src[idx[p·U + j, k]] into peer p's row rank·C + j."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randn(M, H, generator=g)
    idx = torch.randint(0, M, (ep * U, K), generator=g)
    idx[torch.rand(ep * U, K, generator=g) < 0.5] = -1                # some entries, and some whole rows, empty
    idx[::3] = -1
    w = torch.randn(ep * U, K, generator=g) if weighted else None
    bufs, ptrs = _peers(ep, C, H)
    p2p_triton.push_rows(src, idx, ptrs, C, rank, H, block=block, warps=1, weights=w, sum_rows=U)
    for p in range(ep):
        want = torch.full((ep * C, H), float("nan"))
        for j in range(U):
            row = idx[p * U + j]
            if (row >= 0).any():
                acc = torch.zeros(H)
                for k in range(K):   # the kernel's order: k = 0, 1, ... in fp32
                    if row[k] >= 0:
                        acc = acc + src[row[k]] * (w[p * U + j, k] if weighted else 1.0)
                want[rank * C + j] = acc
        if not torch.allclose(bufs[p].nan_to_num(7.0), want.nan_to_num(7.0), rtol=1e-6, atol=1e-6):
            return f"sum: ep {ep} C {C} U {U} K {K} H {H} rank {rank} weighted {weighted}: peer {p}'s buffer differs"
    return None


def unique_case(ep, C, T, fill, seed):
    """p2p_triton.unique_tokens equals p2p.unique_tokens's torch path (first rows, their places,
    every copy's place), on chunks with repeated tokens and padding, C spanning several blocks."""
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, T, (ep, C), generator=g)
    n_real = torch.randint(0, C + 1, (ep,), generator=g)
    tokens[torch.arange(C).expand(ep, C) >= (n_real * fill).long().unsqueeze(1)] = -1
    tokens = tokens.view(-1).contiguous()
    got, want = p2p_triton.unique_tokens(tokens, ep, T), p2p.unique_tokens(tokens, ep, T)
    if not all(torch.equal(a, b) for a, b in zip(got, want)):
        return f"unique_tokens ep {ep} C {C} T {T}: differs from the torch path"
    return None


def _routes(n, T, K, ep):
    return p2p_moves.split_routes(torch.full((p2p_moves.routes_numel(n, T, K, ep),), -7, dtype=torch.int64), n, T, K, ep)


def token_maps_case(ep, C, T, K, seed):
    """p2p_triton.token_maps (copies, K > 1) equals p2p_moves.token_maps's torch path: lead, upos,
    token_index, packed places and their push index, on chunks holding several copies of a token."""
    g = torch.Generator().manual_seed(seed)
    copies = torch.randperm(T * K, generator=g)[: int(torch.randint(1, T * K + 1, (1,), generator=g))]
    send_copy = torch.full((ep, C), -1, dtype=torch.int64)
    rank = torch.randint(0, ep, (copies.numel(),), generator=g)
    for p in range(ep):
        mine = copies[rank == p][:C]                     # past C: dropped (the copy has no slot)
        send_copy[p, : mine.numel()] = mine
    send_copy = send_copy.view(-1)
    copy_slot = torch.full((T * K,), -1, dtype=torch.int64)
    real = send_copy >= 0
    copy_slot[send_copy[real]] = torch.arange(ep * C)[real]
    want_r, got_r = _routes(ep * C, T, K, ep), _routes(ep * C, T, K, ep)
    want = p2p_moves.token_maps(send_copy, copy_slot, K, ep, T, want_r)
    got = p2p_triton.token_maps(send_copy, copy_slot, ep, T, K, got_r.lead, got_r.upos, got_r.token_index.view(-1))
    same = all(torch.equal(a, b) for a, b in zip(want + want_r[:3], got + got_r[:3]))
    return None if same else f"token_maps ep {ep} C {C} T {T} K {K}: differs from the torch path"


def sorted_maps_case(ep, C, T, K, seed):
    """p2p_triton.sorted_maps equals p2p_moves.sorted_maps's torch path: each sorted row's pool row
    and weight (0 at padding) and the [ep·U, K] table (-1 where none)."""
    g = torch.Generator().manual_seed(seed)
    U = min(T, C)
    got = torch.full((ep * C,), -1, dtype=torch.int64)
    rows = []
    for s in range(ep):                                   # distinct (place, k) per chunk, real rows first
        m = int(torch.randint(0, min(C, U * K) + 1, (1,), generator=g))
        got[s * C: s * C + m] = torch.randperm(U * K, generator=g)[:m]
        rows += range(s * C, s * C + m)
    order = torch.tensor(rows, dtype=torch.int64)[torch.randperm(len(rows), generator=g)]
    sorted_src = torch.cat([order, torch.full((ep * C - len(rows),), -1, dtype=torch.int64)])
    sorted_src = sorted_src[torch.randperm(ep * C, generator=g)]
    w_recv = torch.randn(ep * C, 1, generator=g)
    want_r, got_r = _routes(ep * C, T, K, ep), _routes(ep * C, T, K, ep)
    want_w, got_w = torch.full((ep * C,), 9.0), torch.full((ep * C,), 9.0)
    p2p_moves.sorted_maps(sorted_src, got, w_recv, C, K, want_r, want_w)
    p2p_triton.sorted_maps(sorted_src, got, w_recv.view(-1), C, U, K, got_r.row_index, got_w, got_r.table)
    same = torch.equal(want_w, got_w) and all(torch.equal(a, b) for a, b in zip(want_r[3:], got_r[3:]))
    return None if same else f"sorted_maps ep {ep} C {C} T {T} K {K}: differs from the torch path"


def main():
    sums = [(2, 6, 4, 3, 20, 9, 1, 16, True), (3, 5, 5, 2, 40, 7, 2, 16, False), (4, 4, 2, 4, 8, 5, 0, 64, True)]
    failures = [f for i, c in enumerate(sums) if (f := sum_case(*c[:8], seed=100 + i, weighted=c[8]))]
    uniques = [(2, 7, 3, 1.0), (3, 2500, 40, 0.7), (4, 1030, 2000, 1.0)]
    failures += [f for i, c in enumerate(uniques) if (f := unique_case(*c, seed=200 + i))]
    maps = [(2, 7, 5, 3), (3, 1500, 400, 8), (4, 9, 3, 4), (2, 2100, 2000, 2)]
    failures += [f for i, c in enumerate(maps) if (f := token_maps_case(*c, seed=300 + i))]
    failures += [f for i, c in enumerate(maps) if (f := sorted_maps_case(*c, seed=400 + i))]
    cases = [(2, 6, 20, 9, 1, 16, 4), (2, 5, 16, 7, 0, 16, 1), (4, 3, 33, 11, 2, 8, 2), (4, 7, 8, 5, 3, 64, 8),
             (3, 4, 40, 6, 1, 32, 2), (3, 50, 1, 20, 1, None, None), (2, 300, 2, 40, 0, None, None)]
    cases += [c[:-1] + (c[-1], True) for c in cases[:3]]           # the same, stored at given positions
    failures += [f for i, c in enumerate(cases) if (f := case(*c[:7], seed=i, positions=len(c) > 7))]
    print(json.dumps({"cases": len(cases) + len(sums) + len(uniques) + 2 * len(maps), "failures": failures}))


if __name__ == "__main__":
    main()
