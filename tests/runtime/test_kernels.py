"""Token-row kernels (runtime/rows.py, the SwiGLU of runtime/grouped_gemm.py): the torch path
against plain definitions, the one-rank movement (one gather) against the exchange path, and
the Triton kernels against the torch path in the Triton interpreter (kernels_worker.py; the
same worker runs on a GPU in tests/gpu/test_layer_cuda.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from runtime import grouped_gemm, ops, rows

WORKER = Path(__file__).with_name("kernels_worker.py")
ROOT = Path(__file__).resolve().parents[2]


def _index(n, m, seed, drop=0.3):
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(0, m, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < drop, -1, i)


def test_gather_zero_or_leave_missing_rows():
    src = torch.randn(7, 5)
    src[3] = float("nan")
    idx = torch.tensor([1, -1, 6, -1, 1])
    out = rows.gather(src, idx)
    assert torch.equal(out[[0, 2, 4]], src[[1, 6, 1]]) and torch.equal(out[[1, 3]], torch.zeros(2, 5))
    kept = rows.gather(src, idx, out=torch.full((5, 5), 9.0), zero_missing=False)
    assert torch.equal(kept[[0, 2, 4]], src[[1, 6, 1]])


def test_compose_keeps_minus_one_from_either_map():
    outer, inner = torch.tensor([2, -1, 0, 1]), torch.tensor([5, -1, 7])
    assert rows.compose(outer, inner).tolist() == [7, -1, 5, -1]


def test_gather_sum_and_weighted_sum_match_their_definitions():
    T, K, H = 6, 3, 4
    src = torch.randn(10, H, dtype=torch.float64)
    idx = _index(T * K, 10, 0).view(T, K)
    want = torch.stack([sum((src[i] for i in idx[t] if i >= 0), torch.zeros(H, dtype=src.dtype)) for t in range(T)])
    assert torch.allclose(rows.gather_sum(src, idx), want)
    copies, w = torch.randn(T * K, H, dtype=torch.float64), torch.rand(T, K, dtype=torch.float64)
    ws = torch.stack([sum(w[t, k] * copies[t * K + k] for k in range(K)) for t in range(T)])
    assert torch.allclose(rows.weighted_sum(copies, w), ws)


def test_weighted_sum_backward_matches_autograd():
    T, K, H = 5, 4, 6
    copies = torch.randn(T * K, H, dtype=torch.float64, requires_grad=True)
    w = torch.rand(T, K, dtype=torch.float64, requires_grad=True)
    g = torch.randn(T, H, dtype=torch.float64)
    (copies.view(T, K, H) * w.unsqueeze(2)).sum(1).backward(g)
    gc, gw = rows.weighted_sum_backward(g, copies.detach(), w.detach(), torch.empty(T * K, H, dtype=torch.float64))
    assert torch.allclose(gc, copies.grad) and torch.allclose(gw, w.grad)


def test_swiglu_torch_path_matches_autograd():
    R, Fd = 9, 4
    h13 = torch.randn(R, 2 * Fd, dtype=torch.float64, requires_grad=True)
    offs = torch.tensor([3, 9], dtype=torch.int32)
    act = grouped_gemm.swiglu_forward(h13.detach(), offs, torch.empty(R, Fd, dtype=torch.float64))
    ref = F.silu(h13[:, :Fd]) * h13[:, Fd:]
    assert torch.allclose(act, ref)
    ga = torch.randn(R, Fd, dtype=torch.float64)
    ref.backward(ga)
    gh = grouped_gemm.swiglu_backward(ga, h13.detach(), offs, torch.empty(R, 2 * Fd, dtype=torch.float64))
    assert torch.allclose(gh, h13.grad)


def test_one_rank_movement_equals_the_exchange_path():
    """At one rank the two gathers (send, sorted) compose into one: the same rows, both ways, and
    dispatch's backward (gather + sum per token) equals summing the combined copies."""
    T, K, H, M = 8, 2, 3, 24
    x = torch.randn(T, H)
    send_copy = _index(M, T * K, 1)
    sorted_src = _index(M, M, 2)
    identity = lambda t, out=None: t.clone() if out is None else out.copy_(t)  # noqa: E731
    tokens = ops.token_of(send_copy, K)
    valid = sorted_src >= 0
    a = ops.to_experts(x, tokens, sorted_src, identity)
    b = ops.to_experts(x, tokens, sorted_src, identity, local=True)
    assert torch.equal(a[valid], b[valid])
    y = torch.randn(M, H)
    copy_slot, recv_sorted = _index(T * K, M, 3), _index(M, M, 4)
    c1 = ops.to_sources(y, recv_sorted, copy_slot, identity)
    c2 = ops.to_sources(y, recv_sorted, copy_slot, identity, local=True)
    assert torch.equal(c1, c2)
    summed = rows.gather_sum(y, rows.compose(copy_slot, recv_sorted).view(T, K))
    assert torch.allclose(summed, c1.view(T, K, H).sum(1))


def run_worker(device: str, env: dict | None = None) -> dict:
    """kernels_worker.py on `device`: {"cases", "failures", "results"}."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **(env or {})}
    out = subprocess.run([sys.executable, str(WORKER), "--device", device], capture_output=True, text=True,
                         timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_triton_kernels_equal_the_torch_path_in_the_interpreter():
    """Gathers bitwise; sums and SwiGLU to rounding (kernels_worker.failures); padding untouched."""
    pytest.importorskip("triton", reason="needs the triton package (pip install triton)")
    res = run_worker("cpu", {"TRITON_INTERPRET": "1"})
    assert res["cases"] == 36 and res["failures"] == [], res["failures"]


def test_loop_ffn_with_no_rows_still_reaches_rows_and_weights_in_backward():
    """A rank whose experts get no rows runs the same backward as the others (the `loop` FFN's
    output hangs off rows and weights with zero gradients), so the ranks' collectives pair up."""
    from runtime.grouped_gemm import ffn_loop
    rows = torch.randn(6, 4, requires_grad=True)
    w13 = torch.randn(2, 4, 10, requires_grad=True)
    w2 = torch.randn(2, 5, 4, requires_grad=True)
    for offs, real in ((torch.tensor([0, 0], dtype=torch.int32), 0), (torch.tensor([2, 3], dtype=torch.int32), 3)):
        out = ffn_loop(rows, w13, w2, offs)
        assert out.requires_grad
        assert torch.equal(out[real:], torch.zeros(6 - real, 4))
        gr, g13, g2 = torch.autograd.grad(out.sum(), (rows, w13, w2))
        assert torch.equal(gr[real:], torch.zeros(6 - real, 4))
        if not real:
            assert not gr.any() and not g13.any() and not g2.any()
