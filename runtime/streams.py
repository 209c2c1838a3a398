"""The shared expert on a second CUDA stream, overlapped with routing and token movement.

A MoE layer's shared expert reads only the layer input; the routed path (router, counts,
layout, dispatch, expert FFN, combine) is a chain of many small kernels that leave the GPU
partly idle. passes/sync_free_dispatch.py puts three nodes around the shared expert:

    xs = side_begin(x_flat)      the side stream waits for the main stream; it becomes current
    sh = shared(xs)              queued on the side stream
    sh = side_end(sh)            the previous stream is current again (routing queues there)
    ...routed path...
    out = routed + side_join(sh) the main stream waits for the side stream

Autograd runs each backward op on its forward op's stream and syncs where gradients cross
streams, so the shared expert's backward overlaps the routed backward too. `x_flat`, made
on the main stream and read on the side stream, is recorded on the side stream, so the
caching allocator never hands its memory to the main stream while the side stream may still
read it. On CPU tensors the three functions return their input and do nothing.
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor

_SIDE: dict[int, torch.cuda.Stream] = {}
_LOCAL = threading.local()      # per thread (autograd's device threads run recomputed regions)


def side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SIDE:
        _SIDE[index] = torch.cuda.Stream(device=index)
    return _SIDE[index]


def _previous() -> list:
    if not hasattr(_LOCAL, "stack"):
        _LOCAL.stack = []
    return _LOCAL.stack


def side_begin(x: Tensor) -> Tensor:
    """Make the side stream current, after everything queued so far on the current stream."""
    if not x.is_cuda:
        return x
    current, side = torch.cuda.current_stream(x.device), side_stream(x.device)
    side.wait_stream(current)
    x.record_stream(side)
    _previous().append(current)
    torch.cuda.set_stream(side)
    return x


def side_end(y: Tensor) -> Tensor:
    """Make the stream that was current at side_begin current again (nothing waits)."""
    if not y.is_cuda:
        return y
    torch.cuda.set_stream(_previous().pop())
    return y


def side_join(y: Tensor) -> Tensor:
    """The current stream waits for the side stream's work (y is then ready to read)."""
    if not y.is_cuda:
        return y
    torch.cuda.current_stream(y.device).wait_stream(side_stream(y.device))
    return y
