"""The router's logits without float32 copies (runtime/router_gemm.py) against the float32 GEMMs."""
import torch
import torch.nn.functional as F

from runtime.router_gemm import router_logits, split_grads, split_bf16


def _case(T=512, H=256, E=32, dtype=torch.bfloat16, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, H, generator=g).to(dtype)
    w = (torch.randn(E, H, generator=g) * 0.02).to(dtype)
    return x, w, torch.randn(T, E, generator=g) * 1e-3


def _emulated_mm(a, b):
    """What the tensor-core GEMM computes: exact bf16 products, float32 sums."""
    return a.float() @ b.float()


def _emulated_mm_bf16(a, b):
    """The same GEMM writing bf16: float32 sums rounded once."""
    return (a.float() @ b.float()).to(a.dtype)


def _fp32_grads(g, x, w):
    return (g @ w.float()).to(x.dtype), (g.t() @ x.float()).to(w.dtype)


def test_split_holds_the_gradient_to_2_pow_minus_16():
    _, _, g = _case()
    parts = split_bf16(g, torch.bfloat16)
    hi, lo = parts.float().chunk(2, dim=1)
    assert ((hi + lo - g).abs() <= g.abs() * 2.0 ** -16).all()
    assert (hi - g).abs().max() > (g.abs() * 2.0 ** -16).max() / 8     # the remainder matters


def test_split_grads_round_as_the_fp32_gemms(dtype=torch.bfloat16):
    """Both gradients equal the float32 path's rounded results but where the exact value sits at a
    rounding boundary (< 1 % of entries); rounding g to bf16 alone changes ~40 % of them."""
    x, w, g = _case(dtype=dtype)
    ref_x, ref_w = _fp32_grads(g, x, w)
    got_x, got_w = split_grads(g, x, w, _emulated_mm, _emulated_mm_bf16)
    assert got_x.dtype == dtype and got_w.dtype == dtype
    assert (got_x != ref_x).float().mean() < 0.01
    assert (got_w != ref_w).float().mean() < 0.01
    hi_only = (g.to(dtype).float() @ w.float()).to(dtype)
    assert (hi_only != ref_x).float().mean() > 0.1                     # the test can tell


def test_cpu_path_is_the_fp32_linear_exactly():
    x, w, g = _case()
    x.requires_grad_(True)
    w.requires_grad_(True)
    out = router_logits(x, w)
    assert out.dtype == torch.float32
    ref_x, ref_w = x.detach().clone().requires_grad_(True), w.detach().clone().requires_grad_(True)
    ref = F.linear(ref_x.float(), ref_w.float())
    assert torch.equal(out, ref)
    out.backward(g)
    ref.backward(g)
    assert torch.equal(x.grad, ref_x.grad) and torch.equal(w.grad, ref_w.grad)


def test_backward_keeps_no_float32_copy():
    x, w, _ = _case()
    x.requires_grad_(True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        router_logits(x, w.requires_grad_(True))
    assert saved and all(t.dtype == torch.bfloat16 for t in saved)
    assert sum(t.numel() for t in saved) == x.numel() + w.numel()
