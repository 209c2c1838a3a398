"""Run by tests/runtime/test_loss.py with TRITON_INTERPRET=1 (and by bench/loss.py's check on
CUDA): both loss paths of runtime/loss.py — the chunked torch path and the fused Triton kernels
(runtime/loss_triton.py) — against a float64 reference computed from the same logits, on shapes
with a vocabulary that is not a multiple of the kernels' blocks, one row, extreme logits, a row
whose first block is all −inf, and a label outside the vocabulary (the fused path must give NaN).

    python loss_triton_worker.py --device cpu|cuda

Prints one JSON line: {"cases": n, "failures": [...], "results": [...]}. Bounds, derived from
what each path computes in fp32: the loss within 64 fp32 eps of the reference (relative); each
gradient element within one ulp of its dtype plus what an fp32 log-sum-exp of that row's size
can move exp(x − lse) by (4 eps32 · (1 + |lse|), relative), plus 2⁻²⁴ of the row's largest.
"""
import argparse
import json

import torch

from runtime import loss as L

EPS32 = torch.finfo(torch.float32).eps
CASES = [(1, 7, torch.float32, 4.0), (5, 4096, torch.float32, 4.0), (9, 5000, torch.bfloat16, 4.0),
         (64, 10007, torch.bfloat16, 4.0), (3, 1, torch.float32, 4.0), (4, 3000, torch.float32, 300.0)]


def reference(x: torch.Tensor, y: torch.Tensor, scale: float):
    """float64 loss, gradient and per-row log-sum-exp of the mean cross entropy."""
    x64 = x.double()
    lse = torch.logsumexp(x64, 1)
    loss = (lse - x64.gather(1, y[:, None]).squeeze(1)).mean()
    grad = torch.softmax(x64, 1)
    grad[torch.arange(len(y)), y] -= 1
    return loss, grad * (scale / len(y)), lse


def errors(x, y, fused: bool, scale: float = 0.7) -> dict:
    a = x.clone().requires_grad_()
    loss = L.chunked_cross_entropy(a, y, fused=fused)
    (loss * scale).backward()
    want, gwant, lse = reference(x.cpu(), y.cpu(), scale)
    got, g = loss.detach().cpu().double(), a.grad.cpu().double()
    ulp = torch.finfo(x.dtype).eps
    bound = (ulp + 4 * EPS32 * (1 + lse.abs()))[:, None] * gwant.abs() + 2.0**-24 * gwant.abs().amax(1, keepdim=True)
    return {"loss_eps32": float((got - want).abs() / want.abs().clamp(min=1e-30)) / EPS32,
            "grad_over_bound": float(((g - gwant).abs() / bound.clamp(min=1e-300)).max())}


def one(rows: int, vocab: int, dtype, spread: float, device: str) -> list[dict]:
    g = torch.Generator().manual_seed(rows * vocab)
    x = (spread * torch.randn(rows, vocab, generator=g)).to(dtype)
    if rows > 1 and vocab > 4096:
        x[0, :4096] = float("-inf")                 # the fused forward's first block all −inf
    y = torch.randint(0, vocab, (rows,), generator=g)
    y[0] = vocab - 1                                # a label in the last, partial block
    x, y = x.to(device), y.to(device)
    return [{"case": [rows, vocab, str(dtype), spread], "path": "fused" if fused else "torch", **errors(x, y, fused)}
            for fused in (False, True)]


def bad_label(device: str) -> dict:
    """A label outside the vocabulary: the fused loss and gradient are NaN, never another logit."""
    x = torch.randn(2, 7, device=device).requires_grad_()
    loss = L.chunked_cross_entropy(x, torch.tensor([7, 0], device=device), fused=True)
    loss.backward()
    return {"case": "label 7 of vocabulary 7", "loss_nan": bool(loss.isnan()), "grad_row_nan": bool(x.grad[0].isnan().all())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    dev = ap.parse_args().device
    results = [r for c in CASES for r in one(*c, dev)]
    failures = [r for r in results if not (r["loss_eps32"] <= 64 and r["grad_over_bound"] <= 1)]
    bad = bad_label(dev)
    if not (bad["loss_nan"] and bad["grad_row_nan"]):
        failures.append(bad)
    print(json.dumps({"cases": len(results) + 1, "failures": failures, "results": results + [bad]}))


if __name__ == "__main__":
    main()
