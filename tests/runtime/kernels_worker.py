"""Run by tests/runtime/test_kernels.py (and tests/gpu/test_layer_cuda.py on CUDA): the Triton
kernels of runtime/rows_triton.py and runtime/swiglu_triton.py against the torch paths of
runtime/rows.py and runtime/grouped_gemm.py, on random rows with -1 indices, dropped copies
and padding. On CPU it needs TRITON_INTERPRET=1 in the environment before triton is imported.

    python kernels_worker.py --device cpu|cuda

Prints one JSON line: {"cases": n, "failures": [...], "results": [{"case", "dtype", "exact",
"max_ulps", "norm_rel", "padding_kept"}]}; `failures` are the results outside the bounds of
`failures()`. `max_ulps`: the largest difference in units of the dtype's last place at the
values' magnitude; `norm_rel`: ||triton - torch|| / ||torch||;
`exact`: bitwise equal where both paths write; `padding_kept`: the Triton path left the rows it
must not write (NaN sentinels) as they were.
"""
import argparse
import json

import torch

from runtime import clone, grouped_gemm, layout, rows, rows_triton, swiglu_triton

try:
    from runtime import layout_triton
except ImportError:   # the worker's caller skips without triton; keep the import error readable
    layout_triton = None


def _ulps(a, b, dtype) -> float:
    """max |a - b| in units of the dtype's last place at the larger magnitude."""
    eps = torch.finfo(dtype).eps
    d = (a.float() - b.float()).abs()
    scale = torch.maximum(a.float().abs(), b.float().abs()).clamp(min=1e-30) * eps
    return float((d / scale).max()) if d.numel() else 0.0


def _norm_rel(a, b) -> float:
    """||a - b|| / ||b|| (the oracle's measure)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp(min=1e-300)) if a.numel() else 0.0


def _res(case: str, got, want, padding_kept=True) -> dict:
    return dict(case=case, exact=torch.equal(got, want), max_ulps=_ulps(got, want, want.dtype),
                norm_rel=_norm_rel(got, want), padding_kept=padding_kept)


def _index(n, m, g, drop=0.25):
    i = torch.randint(0, m, (n,), generator=g)
    return torch.where(torch.rand(n, generator=g) < drop, -1, i)


def case_gather(dtype, dev, g):
    src = torch.randn(37, 70, generator=g).to(dtype).to(dev)
    idx = _index(53, 37, g).to(dev)
    out = []
    for zero in (True, False):
        want = rows.gather(src.cpu(), idx.cpu(), zero_missing=True)
        got = rows_triton.gather(src, idx, torch.full((53, 70), float("nan"), dtype=dtype, device=dev), zero)
        got = got.cpu()
        valid = idx.cpu() >= 0
        exact = torch.equal(got[valid], want[valid]) and (not zero or torch.equal(got, want))
        kept = zero or bool(got[~valid].isnan().all())
        out.append(dict(case=f"gather zero={zero}", exact=exact, max_ulps=0.0 if exact else float("inf"),
                        norm_rel=0.0 if exact else float("inf"), padding_kept=kept))
    return out


def case_gather_sum(dtype, dev, g):
    T, K, H = 19, 4, 70
    src = torch.randn(61, H, generator=g).to(dtype)
    idx = _index(T * K, 61, g).view(T, K)
    want = rows.gather_sum(src, idx)
    got = rows_triton.gather_sum(src.to(dev), idx.to(dev), None, torch.empty(T, H, dtype=dtype, device=dev)).cpu()
    return [_res("gather_sum", got, want)]


def case_weighted_sum(dtype, dev, g):
    T, K, H = 19, 4, 70
    copies = torch.randn(T * K, H, generator=g).to(dtype)
    w = torch.rand(T, K, generator=g).to(dtype)
    gy = torch.randn(T, H, generator=g).to(dtype)
    want = rows.weighted_sum(copies, w)
    got = rows_triton.gather_sum(copies.to(dev), None, w.to(dev), torch.empty(T, H, dtype=dtype, device=dev)).cpu()
    gc_want, gw_want = rows.weighted_sum_backward(gy, copies, w, torch.empty_like(copies))
    gc, gw = rows_triton.weighted_sum_backward(gy.to(dev), copies.to(dev), w.to(dev),
                                               torch.empty(T * K, H, dtype=dtype, device=dev))
    gc, gw = gc.cpu(), gw.cpu()
    return [_res("weighted_sum", got, want), _res("weighted_sum grad_copies", gc, gc_want),
            _res("weighted_sum grad_weights", gw, gw_want)]


def case_scaled_gather_dot(dtype, dev, g):
    """The p2p combine's backward on the expert side: grad_y = w · g[index], grad_w = ⟨g[index], y⟩."""
    R, M, H = 23, 11, 70
    gsrc = torch.randn(M, H, generator=g).to(dtype)
    idx = _index(R, M, g)
    y = torch.randn(R, H, generator=g).to(dtype)
    w = torch.rand(R, generator=g).to(dtype)
    gy_want, gw_want = rows.scaled_gather_dot(gsrc, idx, y, w, torch.zeros(R, H, dtype=dtype))
    gy, gw = rows_triton.scaled_gather_dot(gsrc.to(dev), idx.to(dev), y.to(dev), w.to(dev),
                                           torch.full((R, H), float("nan"), dtype=dtype, device=dev))
    gy, gw, real = gy.cpu(), gw.cpu(), idx >= 0
    return [_res("scaled_gather_dot grad_y", gy[real], gy_want[real], padding_kept=bool(gy[~real].isnan().all())),
            _res("scaled_gather_dot grad_w", gw, gw_want)]


def case_swiglu(dtype, dev, g):
    R, F = 45, 40
    offs = torch.tensor([9, 9, 30, 33], dtype=torch.int32)        # 33 real rows of 45, one empty slot
    h13 = (2 * torch.randn(R, 2 * F, generator=g)).to(dtype)
    grad_act = torch.randn(R, F, generator=g).to(dtype)
    real = slice(0, int(offs[-1]))
    act_want = grouped_gemm.swiglu_forward(h13, offs, torch.empty(R, F, dtype=dtype))
    gh_want = grouped_gemm.swiglu_backward(grad_act, h13, offs, torch.empty(R, 2 * F, dtype=dtype))
    nan = dict(dtype=dtype, device=dev)
    act = swiglu_triton.forward(h13.to(dev), offs.to(dev), torch.full((R, F), float("nan"), **nan)).cpu()
    gh = swiglu_triton.backward(grad_act.to(dev), h13.to(dev), offs.to(dev),
                                torch.full((R, 2 * F), float("nan"), **nan)).cpu()
    out = []
    for name, got, want in (("swiglu forward", act, act_want), ("swiglu backward", gh, gh_want)):
        out.append(_res(name, got[real], want[real], bool(got[real.stop:].isnan().all())))
    return out


def case_clone_experts(dtype, dev, g):
    """ECHO's clone moves whole experts as chunk rows of ≤ 65536 elements through the row kernels
    (runtime/clone.py): gather (send, and the spare slots from the gathered offers; -1: zeros) and,
    in backward, the spare slots' gradients summed per offered expert. Against the torch path, for
    experts of 2 and 3 chunk rows and of a width no chunk divides (600: torch on every device)."""
    out = []
    for tail, chunk in (((64, 2048), 65536), ((3, 65536), 65536), ((20, 30), 0)):
        experts = torch.randn(5, *tail, generator=g).to(dtype)
        index = torch.tensor([3, -1, 0, 3])
        grads = torch.randn(4, *tail, generator=g).to(dtype)
        slot_row = torch.tensor([2, -1, 2, 0])                             # two slots filed under row 2
        want_g = clone._experts(experts, index, torch.empty(4, *tail, dtype=dtype))
        want_s = clone._experts_summed(grads, slot_row, 3, torch.empty(3, *tail, dtype=dtype))
        real = rows.fused
        rows.fused = lambda t: True                                        # the Triton path for these tensors
        try:
            assert clone._chunk_width(experts.to(dev)) == chunk
            nan = dict(dtype=dtype, device=dev)
            got_g = clone._experts(experts.to(dev), index.to(dev), torch.full((4, *tail), float("nan"), **nan)).cpu()
            got_s = clone._experts_summed(grads.to(dev), slot_row.to(dev), 3,
                                          torch.full((3, *tail), float("nan"), **nan)).cpu()
        finally:
            rows.fused = real
        out += [_res(f"gather clone experts {tail}", got_g, want_g),
                _res(f"clone experts summed {tail}", got_s, want_s)]
    return out


def _torch_layout(dest, counts, counts_all, rank, L, C):
    ep = counts_all.shape[0]
    snd = layout.send_layout(dest, counts, ep, L, C)
    kept = layout.kept_counts(counts_all, L, C)
    src, j = layout.equal_chunk_rows(ep, C, dest.device)
    rcv = layout.recv_layout(kept[:, rank, :], src, j, ep * C)
    stats = torch.stack([snd.dropped, rcv.received, kept[rank].sum()])
    return snd.send_copy, snd.copy_slot, rcv.sorted_src, rcv.recv_sorted, rcv.offs, stats


def case_layout(dev, g):
    """The fused layout (runtime/layout_triton.py) against runtime/layout.py: every map exact.
    (ep, L, C, N): skewed slots so that some chunks overflow (dropped copies), one rank
    receiving more than its chunks hold, several blocks of copies, and N not a block multiple."""
    out = []
    for ep, L, C, n in ((1, 8, 300, 256), (4, 3, 20, 2500), (8, 6, 70, 1500), (2, 5, 600, 1000)):
        S, rank = ep * L, ep - 1
        w = torch.rand(S, generator=g) ** 3 + 0.01
        dest = torch.multinomial(w, n, replacement=True, generator=g)
        counts = layout.slot_counts(dest, S)
        counts_all = torch.randint(0, 2 * C // max(L, 1) + 3, (ep, S), generator=g)
        counts_all[rank] = counts
        want = _torch_layout(dest, counts, counts_all, rank, L, C)
        got = [torch.full_like(t, 7).to(dev) for t in want]
        layout_triton.layout(dest.to(dev), counts.to(dev), counts_all.to(dev), rank, L, C, *got)
        exact = all(torch.equal(a.cpu(), b) for a, b in zip(got, want))
        out.append(dict(case=f"layout ep={ep} L={L} C={C} N={n} dropped={int(want[5][0])}", exact=exact,
                        max_ulps=0.0 if exact else float("inf"), norm_rel=0.0 if exact else float("inf"),
                        padding_kept=True, dtype="int64"))
    return out


def failures(results: list[dict]) -> list[dict]:
    """Gathers bitwise; sums and the SwiGLU to rounding: fp32 normwise ≤ 1e-6, bf16 within 2 units
    in the last place (one intermediate rounding may flip); no write past the real rows."""
    bad = []
    for r in results:
        if r["case"].startswith(("gather ", "layout ")):
            ok = r["exact"]
        elif r["dtype"] == "float32":
            ok = r["norm_rel"] <= 1e-6
        else:
            ok = r["max_ulps"] <= 2.0
        if not (ok and r["padding_kept"]):
            bad.append(r)
    return bad


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    dev = torch.device(args.device)
    g = torch.Generator().manual_seed(0)
    results = []
    for dtype in (torch.float32, torch.bfloat16):
        for case in (case_gather, case_gather_sum, case_weighted_sum, case_scaled_gather_dot, case_swiglu,
                     case_clone_experts):
            for r in case(dtype, dev, g):
                results.append(dict(r, dtype=str(dtype).removeprefix("torch.")))
    results += case_layout(dev, g)
    print(json.dumps({"cases": len(results), "failures": failures(results), "results": results}))


if __name__ == "__main__":
    main()
