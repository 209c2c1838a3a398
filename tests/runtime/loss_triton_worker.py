"""Run by tests/runtime/test_loss.py with TRITON_INTERPRET=1 (and by bench/loss.py's check on
CUDA): the fused loss (runtime/loss_triton.py) against the torch chunked path, on shapes with a
vocabulary that is not a multiple of the kernels' blocks, one row, and extreme logits.

    python loss_triton_worker.py --device cpu|cuda

Prints one JSON line: {"cases": n, "failures": [...]}: a failure names the case and the
largest relative difference of the loss or of the gradient (in units of the dtype's eps).
"""
import argparse
import json

import torch

from runtime import loss as L

CASES = [(1, 7, torch.float32), (5, 4096, torch.float32), (9, 5000, torch.bfloat16), (64, 10007, torch.bfloat16),
         (3, 1, torch.float32)]


def one(rows: int, vocab: int, dtype, device: str, spread: float = 4.0) -> dict:
    g = torch.Generator().manual_seed(rows * vocab)
    x = (spread * torch.randn(rows, vocab, generator=g)).to(dtype).to(device)
    y = torch.randint(0, vocab, (rows,), generator=g).to(device)
    out = {}
    for name, fused in (("torch", False), ("fused", True)):
        a = x.clone().requires_grad_()
        loss = L.chunked_cross_entropy(a, y, fused=fused)
        (loss * 0.7).backward()
        out[name] = (loss.detach().double(), a.grad.double())
    eps = torch.finfo(dtype).eps
    (lt, gt), (lf, gf) = out["torch"], out["fused"]
    loss_err = float((lt - lf).abs() / lt.abs().clamp(min=1e-30)) / eps
    grad_err = float((gt - gf).abs().max() / gt.abs().max().clamp(min=1e-30)) / eps
    return {"case": [rows, vocab, str(dtype), spread], "loss_eps": loss_err, "grad_eps": grad_err}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    dev = ap.parse_args().device
    results = [one(r, v, d, dev) for r, v, d in CASES] + [one(4, 3000, torch.float32, dev, spread=300.0)]
    # a few eps of the sum order (the gradient: relative to its largest element)
    failures = [r for r in results if r["loss_eps"] > 64 or r["grad_eps"] > 16]
    print(json.dumps({"cases": len(results), "failures": failures, "results": results}))


if __name__ == "__main__":
    main()
