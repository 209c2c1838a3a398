"""The router's logits on a GPU (runtime/router_gemm.py): the tensor-core path against the float32
GEMMs of upcast copies, its peak memory, and a CUDA-graph replay against eager."""
import pytest
import torch
import torch.nn.functional as F

from runtime.router_gemm import router_logits, tensor_core_path

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _case(T=4096, H=2048, E=64, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(T, H, device="cuda", generator=g).bfloat16()
    w = (torch.randn(E, H, device="cuda", generator=g) * 0.02).bfloat16()
    return x, w, torch.randn(T, E, device="cuda", generator=g) * 1e-3


def _run(fn, x, w, g):
    x, w = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    out = fn(x, w)
    out.backward(g)
    return out.detach(), x.grad, w.grad


def test_tensor_core_logits_match_the_fp32_gemm():
    x, w, g = _case()
    assert tensor_core_path(x, w)
    out, gx, gw = _run(router_logits, x, w, g)
    ref, rx, rw = _run(lambda a, b: F.linear(a.float(), b.float()), x, w, g)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)        # same products, other order
    assert gx.dtype == gw.dtype == torch.bfloat16
    assert (gx != rx).float().mean() < 0.01, (gx - rx).abs().max()     # rounding-boundary ties only
    assert (gw != rw).float().mean() < 0.01, (gw - rw).abs().max()


def test_tensor_core_logits_keep_no_float32_copy_of_x():
    x, w, g = _case()
    x.requires_grad_(True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    router_logits(x, w.requires_grad_(True)).backward(g)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < x.numel() * 4, (peak, x.numel() * 4)                  # an fp32 copy of x alone is more


def test_router_logits_replay_in_a_cuda_graph():
    x, w, g = _case(T=1024, H=512, E=32)
    x, w = x.requires_grad_(True), w.requires_grad_(True)
    eager, gx_e, gw_e = _run(router_logits, x, w, g)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            router_logits(x, w).backward(g)
    torch.cuda.current_stream().wait_stream(side)
    x.grad = w.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = router_logits(x, w)
        out.backward(g)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, eager) and torch.equal(x.grad, gx_e) and torch.equal(w.grad, gw_e)
