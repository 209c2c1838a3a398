"""One token exchange of the `torch` backend, two ways, captured in a CUDA graph on every rank:

    nccl   gather the real rows into the [ep·C, H] send buffer, all_to_all_single (equal splits,
           the padding moves too): what the `torch` backend does with backends.exchange 'nccl'
    p2p    push only the real rows into the peers' symmetric receive buffers (runtime/p2p.py):
           backends.exchange 'p2p'

    torchrun --nproc-per-node 2 bench/exchange.py [--hidden 6144] [--out r.json]

Each rank sends `fill`·C real rows to each peer (C = capacity · T·K / ep); the rest of each chunk
is padding (index -1). Checks first: every real row the two ways deliver is equal, and equals
the row the sender meant. Then times (median of --iters graph replays, ms) and the real rows'
bandwidth out of each rank. Prints a table on rank 0 and writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from layer_setup import capture
from runtime import comm, p2p, rows


def _index(ep: int, C: int, n_real: int, tokens: int, rank: int, gen: torch.Generator) -> torch.Tensor:
    idx = torch.full((ep, C), -1, dtype=torch.int64)
    idx[:, :n_real] = torch.randint(0, tokens, (ep, n_real), generator=gen)
    return idx.view(-1)


def _nccl(src, index, group):
    send = rows.gather(src, index, zero_missing=False)
    return comm.all_to_all_equal(send, group)


def _graph(fn, iters):
    """fn captured (layer_setup.capture; the last call is the captured one): (its output, median ms
    of a replay, the ranks lined up before each)."""
    held = {}
    g = capture(lambda: held.update(out=fn()))
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        torch.cuda.synchronize()
        a.record()
        g.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return held["out"], sorted(times)[len(times) // 2]


def _sweep(args, ep, C, rank, gen):
    """The push kernel's tiles at the first hidden size and fill; fill 0 (barriers only); the copy
    engine copying the same real rows, contiguous, into the peer's pool (the link's reference)."""
    H, n_real = args.hidden[0], int(args.fill[0] * C)
    src = torch.randn(args.tokens, H, dtype=torch.bfloat16, generator=gen).cuda()
    index = _index(ep, C, n_real, args.tokens, rank, gen).cuda()
    gb = n_real * (ep - 1) * H * 2 / 1e9
    out = []
    for block, warps, rows_ in ((2048, 4, 1), (8192, 8, 1), (8192, 4, 1), (8192, 8, 2), (8192, 16, 2),
                                (4096, 8, 4), (2048, 4, 4), (2048, 8, 8)):
        _, t = _graph(lambda: p2p.push(src, index, "ep", block=block, warps=warps, rows=rows_), args.iters)
        out.append(dict(hidden=H, real_rows_per_peer=n_real, block=block, warps=warps, rows=rows_, ms=t,
                        GBps=gb / (t / 1e3)))
    empty = torch.full_like(index, -1)
    _, t = _graph(lambda: p2p.push(src, empty, "ep"), args.iters)
    out.append(dict(hidden=H, real_rows_per_peer=0, block="barriers only", warps=0, ms=t, GBps=0.0))
    pool = p2p.pool("ep", ep * C, src)
    peer = (rank + 1) % ep
    remote = pool.handle.get_buffer(peer, (ep * C, H), torch.bfloat16)
    flat = torch.randn(n_real, H, dtype=torch.bfloat16, generator=gen).cuda()
    _, t = _graph(lambda: remote[rank * C: rank * C + n_real].copy_(flat), args.iters)
    out.append(dict(hidden=H, real_rows_per_peer=n_real, block="copy engine", warps=0, ms=t, GBps=gb / (t / 1e3)))
    return out


def _compare(args, src, ep, C, n_real, rank, gen) -> dict:
    """Both exchanges of the same rows, captured and timed; every real row delivered equal."""
    H = src.shape[1]
    index = _index(ep, C, n_real, args.tokens, rank, gen).cuda()
    a, t_nccl = _graph(lambda: _nccl(src, index, "ep"), args.iters)
    b, t_p2p = _graph(lambda: p2p.push(src, index, "ep"), args.iters)
    real = torch.zeros(ep * C, dtype=torch.bool, device="cuda").view(ep, C)
    real[:, :n_real] = True      # every rank sends n_real rows to every peer
    real = real.view(-1)
    diff = (a[real].float() - b[real].float()).abs().max().item()
    want = torch.empty_like(a)
    comm.all_to_all_equal(rows.gather(src, index), "ep", out=want)
    diff_want = (b[real].float() - want[real].float()).abs().max().item()
    gb = n_real * (ep - 1) * H * 2 / 1e9
    r = dict(hidden=H, C=C, real_rows_per_peer=n_real, fill=round(n_real / C, 3), nccl_ms=t_nccl, p2p_ms=t_p2p,
             ratio=t_nccl / t_p2p, p2p_GBps=gb / (t_p2p / 1e3), nccl_GBps_real=gb / (t_nccl / 1e3),
             max_diff=diff, max_diff_vs_sent=diff_want)
    if diff or diff_want:
        raise SystemExit(f"rank {rank}: p2p rows differ from NCCL's: {r}")
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--hidden", type=int, nargs="+", default=[6144, 2048])
    ap.add_argument("--capacity", type=float, default=1.5)
    ap.add_argument("--fill", type=float, nargs="+", default=[1 / 1.5, 1.0, 0.25])
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--sweep", action="store_true", help="also time the push kernel's tile shapes, an empty "
                    "exchange (the two barriers alone) and the copy engine's peer copy of the same bytes")
    ap.add_argument("--out", default="bench/results/exchange.json")
    args = ap.parse_args()
    dist.init_process_group("nccl")
    rank, ep = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    comm.register_group("ep", dist.group.WORLD)
    if why := p2p.missing():
        raise SystemExit(f"bench/exchange.py: {why}")
    p2p.enable("ep")
    C = int(args.capacity * args.tokens * args.top_k / ep)
    gen = torch.Generator().manual_seed(rank)
    results = []
    for H in args.hidden:
        src = torch.randn(args.tokens, H, dtype=torch.bfloat16, generator=gen).cuda()
        for fill in args.fill:
            results.append(_compare(args, src, ep, C, int(fill * C), rank, gen))
    sweep = _sweep(args, ep, C, rank, gen) if args.sweep else []
    if rank == 0:
        for r in sweep:
            print(f"sweep H {r['hidden']} rows/peer {r['real_rows_per_peer']} block {r['block']} warps {r['warps']} "
                  f"rows/program {r.get('rows', '-')}: "
                  f"{r['ms']:.3f} ms, {r['GBps']:.0f} GB/s")
        print("| H | C | real rows / peer | nccl ms | p2p ms | nccl / p2p | p2p GB/s (real rows out) |")
        print("|---:|---:|---:|---:|---:|---:|---:|")
        for r in results:
            print(f"| {r['hidden']} | {r['C']} | {r['real_rows_per_peer']} | {r['nccl_ms']:.3f} | {r['p2p_ms']:.3f} | "
                  f"{r['ratio']:.2f} | {r['p2p_GBps']:.0f} |")
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(dict(ep=ep, tokens=args.tokens, top_k=args.top_k, capacity=args.capacity,
                           device=torch.cuda.get_device_name(), torch=torch.__version__, results=results, sweep=sweep), f, indent=1)
    dist.barrier()
    p2p.release()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
