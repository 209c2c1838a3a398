"""The training loss on one GPU: the reference (runtime.model.lm_loss, fp32 logits whole), the
chunked torch path and the fused Triton kernels (runtime/loss.py), forward + backward.

    python bench/loss.py [--rows 4096] [--vocab 32000,128000,154880] [--out bench/results/loss.json]

First the fused kernels are checked against the torch path on the GPU
(tests/runtime/loss_triton_worker.py; a failure stops the bench). Then, per vocabulary, bf16
logits [rows, V] and random labels: each variant captured in a CUDA graph (the Trainer's
setting), the median ms of 20 replays, and the peak bytes allocated above the logits while
one eager forward + backward runs. Ratios are to the reference. Prints one table, writes JSON.
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from layer_setup import capture
from runtime import loss as L
from runtime.model import lm_loss

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"reference": lm_loss,
            "chunked": lambda x, y: L.chunked_cross_entropy(x, y, fused=False),
            "fused": lambda x, y: L.chunked_cross_entropy(x, y, fused=True)}


def check_on_gpu() -> dict:
    out = subprocess.run([sys.executable, str(ROOT / "tests" / "runtime" / "loss_triton_worker.py"), "--device", "cuda"],
                         capture_output=True, text=True, timeout=600)
    if out.returncode:
        sys.exit(f"loss_triton_worker failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    if res["failures"]:
        sys.exit(f"fused loss differs from the torch path on the GPU: {res['failures']}")
    return res


def step(fn, logits, labels):
    logits.grad = None
    loss = fn(logits, labels)
    loss.backward()
    return loss


def graph_ms(fn, logits, labels, reps: int = 20) -> float:
    graph = capture(lambda: step(fn, logits, labels))
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        graph.replay()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    del graph
    logits.grad = None
    torch.cuda.empty_cache()
    return statistics.median(times)


def peak_bytes(fn, logits, labels) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(fn, logits, labels)
    torch.cuda.synchronize()
    logits.grad = None
    return torch.cuda.max_memory_allocated() - base


def run(rows: int, vocab: int) -> list[dict]:
    g = torch.Generator(device="cuda").manual_seed(vocab)
    base = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16, generator=g)
    labels = torch.randint(0, vocab, (rows,), device="cuda", generator=g)
    out = []
    for name, fn in VARIANTS.items():
        logits = base.clone().requires_grad_()      # a fresh leaf, captured before any eager use
        out.append({"variant": name, "rows": rows, "vocab": vocab, "ms": graph_ms(fn, logits, labels),
                    "peak_bytes": peak_bytes(fn, logits, labels)})
        del logits
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--vocab", default="32000,128000,154880")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "loss.json"))
    args = ap.parse_args()
    torch.cuda.set_device(0)
    check = check_on_gpu()
    rows = [r for v in args.vocab.split(",") for r in run(args.rows, int(v))]
    ref = {r["vocab"]: r for r in rows if r["variant"] == "reference"}
    print(f"{'vocab':>7} {'variant':<10} {'ms':>7} {'vs ref':>7} {'peak GiB':>9} {'vs ref':>7}")
    for r in rows:
        b = ref[r["vocab"]]
        print(f"{r['vocab']:>7} {r['variant']:<10} {r['ms']:>7.3f} {r['ms'] / b['ms']:>7.3f} "
              f"{r['peak_bytes'] / 2**30:>9.3f} {r['peak_bytes'] / b['peak_bytes']:>7.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
                                          "torch": torch.__version__, "check": check, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
