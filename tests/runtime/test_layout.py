"""The index arithmetic of runtime/layout.py, with the exchange simulated in one process.

Each simulated rank routes random copies to slots; the all-to-all is a transpose
of [ep_src, ep_dst, C] chunks. We check that every kept copy lands in the right
slot's segment of the receiver's sorted buffer, comes back to its own row, and
that drops are exactly the copies past C in (slot, copy) order.
"""
import torch
from hypothesis import given, settings, strategies as st

from runtime.layout import (equal_chunk_rows, gather_rows, kept_counts, recv_layout, send_layout,
                            slot_counts)


def simulate(dest_by_rank, ep, L, C):
    counts = [slot_counts(d, ep * L) for d in dest_by_rank]
    counts_all = torch.stack(counts)
    sends = [send_layout(d, c, ep, L, C) for d, c in zip(dest_by_rank, counts)]
    kept = kept_counts(counts_all, L, C)
    src, j = equal_chunk_rows(ep, C, "cpu")
    recvs = [recv_layout(kept[:, r, :], src, j, ep * C) for r in range(ep)]
    return counts_all, sends, kept, recvs


def exchange(bufs, ep, C):
    """all_to_all_single with equal splits, for every rank at once."""
    stacked = torch.stack([b.view(ep, C, -1) for b in bufs])  # [src, dst, C, H]
    return [stacked[:, r].reshape(ep * C, -1) for r in range(ep)]


@settings(max_examples=60, deadline=None)
@given(ep=st.integers(1, 4), L=st.integers(1, 3), C=st.integers(1, 6), n=st.integers(1, 20),
       seed=st.integers(0, 10_000))
def test_copies_reach_their_slot_and_come_back(ep, L, C, n, seed):
    g = torch.Generator().manual_seed(seed)
    dest = [torch.randint(0, ep * L, (n,), generator=g) for _ in range(ep)]
    counts_all, sends, kept, recvs = simulate(dest, ep, L, C)
    # payload of a copy: (source rank, copy index, slot) as floats
    payload = [torch.stack([torch.full((n,), float(r)), torch.arange(n).float(), d.float()], 1)
               for r, d in enumerate(dest)]
    recv = exchange([gather_rows(p, s.send_copy) for p, s in zip(payload, sends)], ep, C)
    for r in range(ep):
        rows = gather_rows(recv[r], recvs[r].sorted_src)
        offs = recvs[r].offs.tolist()
        start = 0
        for local, end in enumerate(offs):
            seg = rows[start:end]
            assert (seg[:, 2] == r * L + local).all(), "row in the wrong slot segment"
            start = end
        assert offs[-1] == kept[:, r].sum()
        assert (rows[offs[-1]:] == 0).all()
    # back to sources
    back_in = [gather_rows(gather_rows(recv[r], recvs[r].sorted_src), recvs[r].recv_sorted)
               for r in range(ep)]
    back = exchange(back_in, ep, C)
    for r in range(ep):
        mine = gather_rows(back[r], sends[r].copy_slot)
        kept_mask = sends[r].copy_slot >= 0
        assert torch.equal(mine[kept_mask], payload[r][kept_mask])
        assert (mine[~kept_mask] == 0).all()


@settings(max_examples=60, deadline=None)
@given(ep=st.integers(1, 4), L=st.integers(1, 3), C=st.integers(1, 6), n=st.integers(1, 20),
       seed=st.integers(0, 10_000))
def test_drops_are_exactly_the_tail_of_each_chunk(ep, L, C, n, seed):
    g = torch.Generator().manual_seed(seed)
    dest = torch.randint(0, ep * L, (n,), generator=g)
    counts = slot_counts(dest, ep * L)
    lay = send_layout(dest, counts, ep, L, C)
    expected_dropped = set()
    for p in range(ep):
        copies = sorted((int(dest[c]), c) for c in range(n) if int(dest[c]) // L == p)
        expected_dropped |= {c for _, c in copies[C:]}
    assert {c for c in range(n) if lay.copy_slot[c] < 0} == expected_dropped
    assert int(lay.dropped) == len(expected_dropped)
    used = lay.copy_slot[lay.copy_slot >= 0]
    assert used.unique().numel() == used.numel(), "two copies share a send row"
    assert torch.equal(lay.send_copy[used], (lay.copy_slot >= 0).nonzero().squeeze(1))


def test_slot_counts_match_bincount():
    d = torch.randint(0, 7, (100,))
    assert torch.equal(slot_counts(d, 7), torch.bincount(d, minlength=7))


def test_gather_rows_zero_for_minus_one_even_with_nan_source():
    src = torch.tensor([[float("nan")], [2.0]])
    out = gather_rows(src, torch.tensor([1, -1, 1]))
    assert out.tolist() == [[2.0], [0.0], [2.0]]
