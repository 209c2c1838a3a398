"""Running the iteration: eagerly, or captured once as one CUDA graph and replayed.

Capture follows PyTorch's whole-network recipe: a few real steps on a side stream
(warm-up: NCCL communicators, cuBLAS handles, autograd and optimizer state all
exist before capture), gradients set to None, then one `torch.cuda.graph` capture
of Trainer.step over static token/label buffers. Every later step copies the next
batch into those buffers and replays. The captured step contains forward,
backward, the clone gradient reduction, the dense and expert-DP all-reduces, AdamW
(capturable, lr read from a device tensor), the expert-bias update and the metric
collectives.
"""
from __future__ import annotations

import time
from collections import deque

import torch


class StepRunner:
    """`run(tokens, labels) -> DeviceMetrics` for every step, graph or eager."""

    def __init__(self, trainer, graph: bool, warmup_steps: int = 3):
        self.trainer, self.graph_mode, self.warmup_steps = trainer, graph, warmup_steps
        self.steps_run = 0
        self.graph = None
        self.side = torch.cuda.Stream() if graph else None

    def _eager(self, tokens, labels):
        self.trainer.zero_grad()
        return self.trainer.step(tokens, labels)

    def run(self, tokens: torch.Tensor, labels: torch.Tensor):
        self.steps_run += 1
        if not self.graph_mode:
            return self._eager(tokens, labels)
        if self.graph is None and self.steps_run <= self.warmup_steps:
            self.side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(self.side):
                out = self._eager(tokens, labels)
            torch.cuda.current_stream().wait_stream(self.side)
            return out
        if self.graph is None:
            self._capture(tokens, labels)
        if tokens.shape != self.tokens.shape or labels.shape != self.labels.shape:   # copy_ would broadcast
            raise ValueError(f"tokens {tuple(tokens.shape)} and labels {tuple(labels.shape)}: the captured "
                             f"step is for {list(self.tokens.shape)} (budgets.micro_batch, budgets.seq_len)")
        self.tokens.copy_(tokens, non_blocking=True)
        self.labels.copy_(labels, non_blocking=True)
        self.graph.replay()
        return self.out

    def _capture(self, tokens, labels):
        torch.cuda.synchronize()
        self.tokens, self.labels = tokens.clone(), labels.clone()
        self.trainer.zero_grad()
        # the warm-up's cached blocks back to the driver: the graph's private pool cannot reuse
        # them, and keeping them would hold the eager peak and the graph's memory at once
        torch.cuda.empty_cache()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self.trainer.step(self.tokens, self.labels)


class AsyncMetrics:
    """Device tensors → pinned host copies; a step's values are read one step later."""

    def __init__(self):
        self.queue: deque = deque()
        self.t_last = time.perf_counter()

    def push(self, step: int, tensors: tuple[torch.Tensor, ...]):
        """Start copying this step's tensors; return the previous step's (step, host tensors, seconds)."""
        pinned = tuple(torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda) for t in tensors)
        for h, d in zip(pinned, tensors):
            h.copy_(d, non_blocking=True)
        event = torch.cuda.Event() if tensors[0].is_cuda else None
        if event is not None:
            event.record()
        now = time.perf_counter()  # push-to-push time = step time once the GPU is the bottleneck
        self.queue.append((step, pinned, event, now - self.t_last))
        self.t_last = now
        return self._pop() if len(self.queue) > 1 else None

    def _pop(self):
        step, pinned, event, seconds = self.queue.popleft()
        if event is not None:
            event.synchronize()
        return step, pinned, seconds

    def drain(self):
        while self.queue:
            yield self._pop()
