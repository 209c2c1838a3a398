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
import weakref
from contextlib import contextmanager
from typing import Callable

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


# --- the expert weight gradients on a stream of their own ----------------------------------------
# A MoE layer's backward runs, in order: the expert FFN's backward, then the dispatch's backward
# (a token exchange across the EP group, then the router's backward), all on the main stream.
# The FFN's two weight-gradient GEMMs (dW2 = actᵀ·dy, dW13 = rowsᵀ·grad_h13, a third of its
# backward FLOPs) feed nothing in the layer, so they can run beside the exchange:
#
#     x_in, token = wgrad_fork(x_flat, key)       forward: x_flat unchanged, and a token that
#                                                  carries the layer's Stash
#     w13', w2' = tap(token, w13, w2)              made on the wgrad stream (runtime/grouped_gemm.py)
#     y = ffn(rows, w13', w2', token)              its backward: dx on the main stream; it stashes
#                                                  act, dy, rows, grad_h13, offs in the Stash and
#                                                  returns zeros for w13', w2'
#
# Backward: the tap's node runs on the wgrad stream (autograd runs a node on its forward's
# stream and makes it wait for its inputs' streams), after the FFN's backward; it reads the
# Stash and returns dW13, dW2. The token's gradient, made on the wgrad stream after them, is an
# input of the fork's backward on the main stream: autograd makes the main stream wait for the
# wgrad stream there, once the layer's whole backward (exchange, router) is queued. Only then
# does the fork empty the Stash, so the main stream reuses no stashed memory (arena or
# allocator) before the GEMMs that read it are done; the memory plan keeps those buffers live
# to the fork's backward (passes/buffer_lifetimes.py). A backward that never reaches the fork
# (an error, or gradients of the weights alone) leaves the Stash to the autograd graph, freed
# with it (by the garbage collector: the graph holds a cycle) after backward's end, where the
# caller's stream waits for the wgrad stream (the weights' AccumulateGrad runs there).
# Allocator invariant: everything the wgrad stream allocates (dW13, dW2, the token's gradient)
# is allocated after that stream waited for the FFN's backward on the main stream, and is freed
# on the main stream after it waited for the wgrad stream; so no block moves between the two
# streams while either may still use it, without record_stream.
# On CPU tensors the same nodes run, on one stream, with the same arithmetic.

_WGRAD: dict[int, torch.cuda.Stream] = {}
_LIVE: weakref.WeakSet = weakref.WeakSet()      # every Stash holding tensors (tests read live_stashes)
# Tests: at the fork's backward, compute the weight gradients again from the stash and require
# them bitwise equal to the tap's. On CPU the tap runs right after the FFN's backward, before the
# dispatch's backward could reuse a stashed buffer's bytes; this check reads them as late as the
# wgrad stream may on a GPU, so a plan that let them be reused earlier fails on CPU too.
CHECK_LATE_READS = False


def wgrad_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _WGRAD:
        _WGRAD[index] = torch.cuda.Stream(device=index)
    return _WGRAD[index]


@contextmanager
def on_wgrad_stream(device: torch.device):
    """Ops made inside (autograd nodes) belong to the wgrad stream; on CPU nothing changes."""
    if device.type != "cuda":
        yield
        return
    with torch.cuda.stream(wgrad_stream(device)):
        yield


class Stash:
    """One layer's tensors for its deferred weight gradients, from the FFN's backward to the fork's."""

    def __init__(self, key: str):
        self.key, self.tensors = key, None
        self.recheck: Callable[[], None] | None = None     # set by the tap under CHECK_LATE_READS

    def put(self, **tensors: Tensor) -> None:
        self.tensors = tensors
        _LIVE.add(self)

    def get(self) -> dict[str, Tensor]:
        assert self.tensors is not None, f"{self.key}: the weight gradients ran before the FFN's backward stashed"
        return self.tensors

    def drop(self) -> None:
        assert self.tensors is not None, f"{self.key}: the fork's backward ran, but no expert FFN stashed"
        if self.recheck is not None:
            self.recheck()
        self.tensors, self.recheck = None, None
        _LIVE.discard(self)


def live_stashes() -> list[str]:
    """The keys of the Stashes still holding tensors (none after a whole backward)."""
    return sorted(s.key for s in _LIVE)


def stash_of(token: Tensor) -> Stash:
    """The Stash a wgrad_fork token carries."""
    return token.wgrad_stash


class _Fork(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, key: str):
        token = x.new_zeros(())
        ctx.stash = token.wgrad_stash = Stash(key)
        return x.view_as(x), token

    @staticmethod
    def backward(ctx, grad_x: Tensor, _grad_token: Tensor):
        ctx.stash.drop()   # the main stream already waits for the wgrad GEMMs (the token's gradient)
        return grad_x, None


def wgrad_fork(x: Tensor, key: str) -> tuple[Tensor, Tensor]:
    """(x, token): x unchanged; the token, passed to the layer's FFN, carries the Stash that ties
    its deferred weight gradients back to the main stream at x's backward, emptied there."""
    return _Fork.apply(x, key)
