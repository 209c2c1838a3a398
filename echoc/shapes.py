"""Shape propagation for the compile driver: every node's `tensor_meta`, without real memory.

Meta tensors by default; fake tensors with a shape environment when the `sync` backend makes
shapes data-dependent. On meta tensors each op's result depends only on its target and the
metadata of its arguments (shape, stride, dtype, requires_grad: there are no values), so
results are memoised on exactly that key. A model's layers repeat, so most of glm5's 10,700
nodes are answered from the memo (elementwise ops on meta tensors run through Python
decompositions at ~0.3 ms each). A hit returns fresh tensors with the remembered metadata.
"""
from __future__ import annotations

from typing import Any

import torch
from torch.fx import GraphModule
from torch.fx.passes.shape_prop import ShapeProp

from echoc.spec import Spec
from runtime import grouped_gemm

_EXPERT_FFNS = (grouped_gemm.expert_ffn, grouped_gemm.expert_ffn_recompute_clone)


class _Unkeyable(Exception):
    """An argument the memo cannot key on (the op then simply runs)."""


def _key(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        if x.device.type != "meta":
            raise _Unkeyable
        return ("T", tuple(x.shape), x.stride(), x.dtype, x.requires_grad)
    if isinstance(x, (tuple, list)):
        return (type(x).__name__, tuple(_key(v) for v in x))
    if isinstance(x, dict):
        return ("dict", tuple((k, _key(v)) for k, v in x.items()))
    if isinstance(x, slice):
        return ("slice", _key(x.start), _key(x.stop), _key(x.step))
    if x is None or x is Ellipsis or isinstance(x, (bool, int, float, str, torch.dtype, torch.device,
                                                   torch.memory_format, torch.layout)):
        return (type(x), x)
    raise _Unkeyable        # modules, callables, anything else: identity or values matter


def _meta_of(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return ("T", tuple(x.shape), x.stride(), x.dtype, x.requires_grad)
    if isinstance(x, (tuple, list)) and not isinstance(x, torch.Size):
        return (type(x), [_meta_of(v) for v in x])
    return ("V", x)


def _fresh(m: Any) -> Any:
    tag = m[0]
    if tag == "T":
        _, shape, stride, dtype, grad = m
        t = torch.empty_strided(shape, stride, dtype=dtype, device="meta")
        return t.requires_grad_(True) if grad else t
    if tag == "V":
        return m[1]
    return m[0](_fresh(v) for v in m[1])


class _PlanShapes(ShapeProp):
    """ShapeProp that takes the expert FFN's output shape from its contract ([R, H] like its
    input rows) instead of running the grouped GEMM, whose meta kernel insists on the CUDA
    dtype rules even for a CPU float32 plan; with `memo`, results on meta tensors are memoised."""

    def __init__(self, gm: GraphModule, fake_mode=None, memo: bool = False):
        super().__init__(gm, fake_mode=fake_mode)
        self._memo: dict | None = {} if memo else None

    def _memoised(self, kind: str, target, args, kwargs, run):
        if self._memo is None:
            return run()
        try:
            key = (kind, target, _key(args), _key(kwargs))
            hash(key)
        except (_Unkeyable, TypeError):
            return run()
        if key not in self._memo:
            out = run()
            self._memo[key] = _meta_of(out)
            return out
        return _fresh(self._memo[key])

    def call_function(self, target, args, kwargs):
        if target in _EXPERT_FFNS:
            rows = args[0] if args else next(iter(kwargs.values()))
            return torch.empty_like(rows)
        return self._memoised("f", target, args, kwargs, lambda: super(_PlanShapes, self).call_function(
            target, args, kwargs))

    def call_module(self, target, args, kwargs):
        """A leaf without children (a Linear, the rotary embedding): its output's metadata
        follows from its type, its extra_repr (strides, sizes), its parameters' and buffers'
        metadata and its inputs', so it is memoised on those."""
        mod = self.fetch_attr(target)
        run = lambda: super(_PlanShapes, self).call_module(target, args, kwargs)   # noqa: E731
        if next(mod.children(), None) is not None:
            return run()
        own = tuple((n, t) for n, t in mod.named_parameters(recurse=False)) + tuple(mod.named_buffers(recurse=False))
        return self._memoised("M", (type(mod), mod.extra_repr(), _key(own)), args, kwargs, run)

    def call_method(self, target, args, kwargs):
        return self._memoised("m", target, args, kwargs, lambda: super(_PlanShapes, self).call_method(
            target, args, kwargs))


def example_tokens(spec: Spec, device="meta") -> torch.Tensor:
    b = spec.budgets
    return torch.zeros((b.micro_batch, b.seq_len), dtype=torch.int64, device=device)


def propagate_shapes(gm: GraphModule, spec: Spec) -> None:
    """Fill node.meta['tensor_meta'] without real memory: meta tensors (memoised), or fake
    tensors with a shape environment when the `sync` backend makes shapes data-dependent."""
    if spec.backends.dispatch != "sync":
        _PlanShapes(gm, memo=True).propagate(example_tokens(spec))
        return
    from torch._subclasses.fake_tensor import FakeTensorMode      # only `sync` needs them (sympy-heavy)
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True, static_shapes=True)
    _PlanShapes(gm, fake_mode=mode).propagate(example_tokens(spec))
