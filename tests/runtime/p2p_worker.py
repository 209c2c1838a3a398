"""Run under torchrun by tests/runtime/test_p2p.py: the oracle with the `torch` dispatch's exchange
set to 'p2p' (runtime/p2p.py), whose exchange is replaced by a gloo stand-in with the kernel's
contract: each rank's real rows (index ≥ 0; for a summing push, the fp32 sum of the rows it names,
rounded) land in chunk `rank` of the peer's receive buffer, and every row no index names is NaN.
The CUDA kernel leaves those rows stale (whatever the last exchange wrote); NaN there makes any
read of a padding row poison the loss or a gradient. Like the real pool, the stand-in's is one
buffer per row shape and dtype, filled with NaN again at every exchange, so a view read after the
next exchange poisons the result too. The oracle then proves the layer reads the real rows alone,
each before the next exchange. argv: CONFIG_JSON, as for dist_worker.py ("reference_drops": the
reference is told the drops, as in backend_worker.py).
"""
import json
import sys

import torch

from backend_worker import oracle_result
from echoc.spec import Spec
from echoc.spec_io import spec_from_dict
from runtime import comm, contracts, p2p
from runtime.contracts import P2P_DISPATCH
from runtime.trainer import init_distributed

PUSHES = {"n": 0, "real_rows": 0, "rows": 0}
POOLS: dict[tuple, torch.Tensor] = {}


def _stale(dtype):
    """What a row nobody pushed holds: NaN, or for index maps an index far out of range."""
    return float("nan") if dtype.is_floating_point else 2 ** 40


def _send_buffer(q, n, C, ep):
    """What one array of an exchange puts where (the push kernel's contract): [n, W], stale
    wherever nothing is pushed; a 2-D index sends the (weighted) fp32 sum of its rows, rounded."""
    src, index = q.src, q.index
    send = torch.full((n,) + tuple(src.shape[1:]), _stale(src.dtype), dtype=src.dtype)
    if index.dim() == 1:
        s = torch.arange(index.shape[0])
        real = index >= 0
        dest = s - s % C + (q.pos if q.pos is not None else s % C)
        send[dest[real]] = src[index[real]]
        return send, int(real.sum())
    U = q.sum_rows or C
    s = torch.arange(index.shape[0])
    real = (index >= 0).any(1)
    w = q.weights.float() if q.weights is not None else torch.ones(index.shape)
    picked = src[index.clamp(min=0)].float() * w.unsqueeze(-1)
    rows = torch.where((index >= 0).unsqueeze(-1), picked, 0).sum(1)     # where, not *: NaN rows stay out
    send[(s // U * C + s % U)[real]] = rows[real].to(src.dtype)
    return send, int(real.sum())


def exchange_standin(pushes, group, rows, **tiles):
    """What p2p.exchange returns, over gloo: one shared pool per row shape and dtype, refilled with
    stale values at every exchange, chunk s holding what rank s pushed. Counts what it moves: rows
    pushed once per (token, rank) (`unique_rows`: a push with places), and copies (`copy_rows`:
    the int64 map pushed beside them, one entry per copy)."""
    ep = comm.group_size(group)
    keys = [(tuple(q.src.shape[1:]), q.src.dtype) for q in pushes]
    assert len(set(keys)) == len(keys), "two arrays of one exchange share a pool"
    PUSHES["exchanges"] = PUSHES.get("exchanges", 0) + 1
    dispatch = any(q.src.dtype == torch.int64 for q in pushes)     # the one exchange that pushes the map
    out = []
    for q, key in zip(pushes, keys):
        send, real = _send_buffer(q, rows, rows // ep, ep)
        PUSHES["n"] += 1
        PUSHES["real_rows"] += real
        PUSHES["rows"] += rows
        if q.index.dim() == 2:
            PUSHES["summed_rows"] = PUSHES.get("summed_rows", 0) + real
        if q.pos is not None and dispatch:
            PUSHES["unique_rows"] = PUSHES.get("unique_rows", 0) + real
        if q.src.dtype == torch.int64:
            PUSHES["copy_rows"] = PUSHES.get("copy_rows", 0) + real
        recv = comm.all_to_all_equal(send, group)
        if key not in POOLS or POOLS[key].shape[0] < rows:
            POOLS[key] = torch.empty_like(recv)
        out.append(POOLS[key].fill_(_stale(q.src.dtype))[:rows].copy_(recv))
    return out


def main():
    cfg = json.load(open(sys.argv[1]))
    spec = spec_from_dict(cfg["spec"])
    # a cpu spec resolves backends.exchange to 'nccl': plan it as 'p2p' (no send or receive buffers in
    # the arena, the symmetric pool instead), and let the Trainer turn the stand-in on
    Spec.token_exchange = property(lambda self: "p2p")
    p2p.exchange = exchange_standin
    p2p.setup = lambda exchange, group="ep", timeout_s=None: (p2p.enable(group, timeout_s) if exchange == "p2p"
                                                             else p2p.disable(group))
    device = init_distributed(spec)
    build, result = oracle_result(spec, device, cfg)
    if result is not None:
        graphs = [m.graph for m in build.program.gm.modules() if isinstance(m, torch.fx.GraphModule)]
        layers = sum(contracts.of(n.target) is P2P_DISPATCH for g in graphs for n in g.nodes)
        json.dump(dict(result, pushes=PUSHES, p2p_layers=layers), open(cfg["out"], "w"))
    comm.shutdown()


if __name__ == "__main__":
    main()
