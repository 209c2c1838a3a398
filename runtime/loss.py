"""The training loss: mean cross entropy over the logits, in fp32, a chunk of rows at a time.

    logits [B, S, V] (model dtype), labels [B, S] int64  →  loss [] float32

The reference (`runtime.model.lm_loss`) upcasts the whole logits tensor: at its peak it holds
the fp32 copy, its log-softmax, the NLL gradient and the log-softmax gradient, four fp32
[T, V] tensors, 8 GiB for 4096 tokens of a 128k vocabulary. This loss holds one fp32 chunk of
at most LOSS_CHUNK_BYTES at a time: forward keeps the model-dtype logits and the per-row
log-sum-exp; backward writes the model-dtype gradient chunk by chunk.

The chunks are fixed by the shape alone, so the loss is capturable in a CUDA graph and reads
nothing from the host. Every label must be a vocabulary index (there is no ignore index).
"""
from __future__ import annotations

import torch
from torch import Tensor

try:
    from runtime import loss_triton
except ImportError:       # no triton: the torch path
    loss_triton = None

LOSS_CHUNK_BYTES = 1 << 28       # one fp32 chunk of logits: 256 MiB
FP32 = 4
# The Triton kernels (runtime/loss_triton.py): checked against float64 in the Triton interpreter
# (tests/runtime/test_loss.py) and on an H200 (bench/loss.py's check, 13 cases), where they take
# 0.12x the reference's time and 0.17x its memory (docs/BENCHMARKS.md). On wherever triton is.
FUSED_ON_CUDA = True


def chunk_rows(rows: int, vocab: int) -> int:
    """Rows per chunk: as many as fit LOSS_CHUNK_BYTES in fp32 (at least one), at most `rows`."""
    return max(1, min(rows, LOSS_CHUNK_BYTES // (FP32 * vocab)))


class _ChunkedCrossEntropy(torch.autograd.Function):
    """logits [N, V], labels [N] → Σ_i (logsumexp(logits_i) − logits_i[labels_i]) / N."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> Tensor:
        n, v = logits.shape
        step = chunk_rows(n, v)
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        for lo in range(0, n, step):
            chunk = logits[lo:lo + step]
            top = chunk.amax(1, keepdim=True).float()      # exact: the largest value itself
            x = torch.sub(chunk, top)                      # fp32, a new tensor: reads the logits once
            lse[lo:lo + step] = x.exp_().sum(1).log_().add_(top.squeeze(1))
            del x, top      # before the next chunk is taken: one chunk at a time
        target = logits.gather(1, labels[:, None]).squeeze(1).float()
        ctx.save_for_backward(logits, labels, lse)
        return (lse - target).sum() / n

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits, labels, lse = ctx.saved_tensors
        n, v = logits.shape
        step = chunk_rows(n, v)
        scale = grad_loss.float() / n
        grad = torch.empty_like(logits)
        for lo in range(0, n, step):
            p = torch.sub(logits[lo:lo + step], lse[lo:lo + step, None]).exp_()      # softmax, fp32
            p.scatter_add_(1, labels[lo:lo + step, None], p.new_full((p.shape[0], 1), -1.0))
            torch.mul(p, scale, out=grad[lo:lo + step])    # computed in fp32, written in the logits' dtype
            del p
        return grad, None


class _FusedCrossEntropy(torch.autograd.Function):
    """As _ChunkedCrossEntropy, each pass one Triton kernel (runtime/loss_triton.py)."""

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> Tensor:
        logits, labels = logits.contiguous(), labels.contiguous()
        n = logits.shape[0]
        lse = torch.empty(n, dtype=torch.float32, device=logits.device)
        rows = torch.empty_like(lse)
        loss_triton.forward(logits, labels, lse, rows)
        ctx.save_for_backward(logits, labels, lse)
        return rows.sum() / n

    @staticmethod
    def backward(ctx, grad_loss: Tensor):
        logits, labels, lse = ctx.saved_tensors
        grad = torch.empty_like(logits)
        loss_triton.backward(logits, labels, lse, (grad_loss.float() / logits.shape[0]).contiguous(), grad)
        return grad, None


def fused_on(device_type: str) -> bool:
    """Whether chunked_cross_entropy runs the Triton kernels on this kind of device."""
    return FUSED_ON_CUDA and device_type == "cuda" and loss_triton is not None


def fused_planned(device_type: str) -> bool:
    """What a plan for this kind of device assumes, whatever the compiling machine has: the
    fused kernels on CUDA (torch's CUDA builds bring triton), so a plan made on a laptop is the
    plan the GPU runs. Where a CUDA run finds no triton it takes the torch path, one fp32 chunk
    (LOSS_CHUNK_BYTES) above the plan."""
    return FUSED_ON_CUDA and device_type == "cuda"


def chunked_cross_entropy(logits: Tensor, labels: Tensor, fused: bool | None = None) -> Tensor:
    """logits [B, S, V], labels [B, S] → mean cross entropy, float32 scalar (as model.lm_loss).
    `fused`: the Triton kernels (default: FUSED_ON_CUDA, on CUDA tensors, with triton)."""
    if fused is None:
        fused = fused_on(logits.device.type)
    fn = _FusedCrossEntropy if fused else _ChunkedCrossEntropy
    return fn.apply(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))


def loss_bytes(rows: int, vocab: int, dtype_bytes: int, fused: bool = False) -> dict[str, int]:
    """What chunked_cross_entropy holds beyond its input logits, at its peak (backward): the
    model-dtype gradient [N, V], one fp32 chunk (none when fused), and the per-row fp32
    log-sum-exp (the forward's peak, the chunk and two values per row, is lower)."""
    return {"grad_logits": rows * vocab * dtype_bytes,
            "chunk": 0 if fused else chunk_rows(rows, vocab) * vocab * FP32,
            "rows": rows * FP32}
