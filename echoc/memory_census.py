"""What autograd keeps for backward, counted on the meta device: the dense parts of one layer.

The memory plan (passes/buffer_plan.py) knows the MoE machinery's buffers; everything else a
layer saves for backward — norms, attention, the router's scores, the shared expert, a dense
FFN — is counted here by running fresh meta-device modules of the same shapes under
`saved_tensors_hooks` and summing the distinct storages they save (a view keeps its whole
storage alive; parameters are not activations and are left out).

Attention is counted as the fused kernels on the GPU run it (flash / memory-efficient SDPA:
q, k, v, the output and a float32 log-sum-exp [B, heads, S]), not as the meta device's math
fallback, which would save the [S, S] score matrix.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from echoc.spec import Spec
from runtime.dtypes import torch_dtype
from runtime.model import MLP, Block, Router


@dataclass(frozen=True)
class LayerCensus:
    """Bytes one layer saves for backward (one micro-batch, T = tokens per rank), by part."""
    attention: int       # attn_norm, attention, mlp_norm (every layer)
    dense_mlp: int       # the SwiGLU FFN of a dense layer
    router: int          # an MoE layer's router (scores, fp32 copies)
    shared: int          # an MoE layer's shared expert(s)
    head: int            # the final norm and lm_head (once per model)


class _Census:
    """Distinct storages saved for backward while active; parameters excluded."""

    def __init__(self, exclude: set[int]):
        self.exclude, self.seen, self.nbytes = exclude, set(), 0
        self.held: list[torch.Tensor] = []   # a freed storage's address may come back: hold each one

    def add(self, t: torch.Tensor) -> None:
        s = t.untyped_storage()
        key = s._cdata
        if key not in self.exclude and key not in self.seen:
            self.seen.add(key)
            self.held.append(t)
            self.nbytes += s.nbytes()

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        self.add(t)
        return t


class _FusedAttention(TorchFunctionMode):
    """SDPA as the fused GPU kernels save it: q, k, v, output, lse [B, heads, S] float32."""

    def __init__(self, census: _Census):
        super().__init__()
        self.census = census

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is not F.scaled_dot_product_attention:
            return func(*args, **(kwargs or {}))
        q, k, v = args[:3]
        out = torch.empty(q.shape[:-1] + v.shape[-1:], dtype=q.dtype, device=q.device, requires_grad=True)
        for t in (q, k, v, out, torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)):
            self.census.add(t)
        return out


def _saved_bytes(module: torch.nn.Module, fn, x: torch.Tensor) -> int:
    census = _Census({p.untyped_storage()._cdata for p in module.parameters()}
                     | {b.untyped_storage()._cdata for b in module.buffers()})
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(census.pack, lambda t: t), \
            _FusedAttention(census):
        fn(x.requires_grad_(True))
    return census.nbytes


def layer_census(spec: Spec) -> LayerCensus:
    """Saved bytes per part of a layer, from meta modules shaped by `spec.model` (nothing allocated)."""
    m, b = spec.model, spec.budgets
    dt = torch_dtype(m.dtype)
    with torch.device("meta"):
        block = Block(m, m.num_layers).to(dt)           # an index past first_dense_layers: the MoE layout
        mlp = MLP(m.hidden_size, m.dense_intermediate_size).to(dt)
        router = Router(m).to(dt)
        shared = MLP(m.hidden_size, m.moe.shared_experts * m.moe.expert_intermediate_size).to(dt) \
            if m.moe.shared_experts else None
        head_norm, lm_head = block.attn_norm, torch.nn.Linear(m.hidden_size, m.vocab_size, bias=False).to(dt)
        x = torch.empty(b.micro_batch, b.seq_len, m.hidden_size, dtype=dt)
    flat = x.view(-1, m.hidden_size)

    def attention(h):
        h = h + block.attn(block.attn_norm(h))
        return block.mlp_norm(h)

    routed = _saved_bytes(router, router, flat.clone())
    shared_bytes = 0
    if shared is not None:   # both keep the layer's input: measured together, it counts once (with the router)
        both = torch.nn.ModuleList([router, shared])
        shared_bytes = _saved_bytes(both, lambda h: (router(h), shared(h)), flat.clone()) - routed
    return LayerCensus(
        attention=_saved_bytes(block, attention, x.clone()),
        dense_mlp=_saved_bytes(mlp, mlp, x.clone()),
        router=routed,
        shared=shared_bytes,
        head=_saved_bytes(lm_head, lambda h: lm_head(head_norm(h)), x.clone()))
