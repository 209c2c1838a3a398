"""Run under torchrun by tests/runtime/test_p2p.py: the oracle with the `torch` dispatch's exchange
set to 'p2p' (runtime/p2p.py), whose push is replaced by a gloo stand-in with the kernel's contract:
each rank's real rows (index ≥ 0) land in chunk `rank` of the peer's receive buffer, and every row
no index names is NaN. The CUDA kernel leaves those rows stale (whatever the last exchange wrote);
NaN there makes any read of a padding row poison the loss or a gradient. Like the real pool, the
stand-in's is one buffer per row shape and dtype, filled with NaN again at every push, so a view
read after the next exchange poisons the result too. The oracle then proves the layer reads the
real rows alone, each before the next exchange. argv: CONFIG_JSON, as for dist_worker.py
("reference_drops": the reference is told the drops, as in backend_worker.py).
"""
import json
import sys

import torch

from backend_worker import oracle_result
from echoc.spec import Spec
from echoc.spec_io import spec_from_dict
from runtime import comm, p2p
from runtime.trainer import init_distributed

PUSHES = {"n": 0, "real_rows": 0, "rows": 0}
POOLS: dict[tuple, torch.Tensor] = {}


def _stale(dtype):
    """What a row nobody pushed holds: NaN, or for index maps an index far out of range."""
    return float("nan") if dtype.is_floating_point else 2 ** 40


def push_standin(src, index, group, pos=None):
    """What p2p.push returns (p2p_triton.push_rows's contract, positions included), over gloo: the
    shared pool, stale wherever no rank pushed a row."""
    n = index.shape[0]
    C = n // comm.group_size(group)
    send = torch.full((n,) + tuple(src.shape[1:]), _stale(src.dtype), dtype=src.dtype)
    s = torch.arange(n)
    real = index >= 0
    dest = s - s % C + (pos if pos is not None else s % C)
    send[dest[real]] = src[index[real]]
    PUSHES["n"] += 1
    PUSHES["real_rows"] += int(real.sum())
    PUSHES["rows"] += n
    recv = comm.all_to_all_equal(send, group)
    key = (tuple(src.shape[1:]), src.dtype)
    if key not in POOLS or POOLS[key].shape[0] < recv.shape[0]:
        POOLS[key] = torch.empty_like(recv)
    pool = POOLS[key].fill_(_stale(src.dtype))
    return pool[: recv.shape[0]].copy_(recv)


def push_unique_standin(src, tokens, group):
    """p2p.push_unique over the stand-in push, with the real index arithmetic (p2p.unique_tokens)."""
    n = tokens.shape[0]
    lead, upos, where = p2p.unique_tokens(tokens, comm.group_size(group), src.shape[0])
    PUSHES["unique_rows"] = PUSHES.get("unique_rows", 0) + int((lead >= 0).sum())
    PUSHES["copy_rows"] = PUSHES.get("copy_rows", 0) + int((tokens >= 0).sum())
    recv = push_standin(src, lead, group, pos=upos)
    real = torch.where(where >= 0, torch.arange(n), -1)
    return recv, push_standin(where.view(n, 1), real, group).view(n)


def main():
    cfg = json.load(open(sys.argv[1]))
    spec = spec_from_dict(cfg["spec"])
    # a cpu spec resolves backends.exchange to 'nccl': plan it as 'p2p' (no send or receive buffers in
    # the arena, the symmetric pool instead), and let the Trainer turn the stand-in on
    Spec.token_exchange = property(lambda self: "p2p")
    p2p.push = push_standin
    p2p.push_unique = push_unique_standin
    p2p.setup = lambda exchange, group="ep", timeout_s=None: (p2p.enable(group, timeout_s) if exchange == "p2p"
                                                             else p2p.disable(group))
    device = init_distributed(spec)
    _, result = oracle_result(spec, device, cfg)
    if result is not None:
        json.dump(dict(result, pushes=PUSHES), open(cfg["out"], "w"))
    comm.shutdown()


if __name__ == "__main__":
    main()
