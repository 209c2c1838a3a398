"""The training state of one rank, sharded by the ZeRO level: master weights, moments, gradients.

Every parameter belongs to one data-parallel group: dense parameters to all ranks
("world"), stacked expert tensors to their expert-DP group ("expert_dp": the ranks holding
the same EP shard). Under `parallel.zero` (runtime/shards.py says how a tensor is cut):

    level  weights (model dtype)     gradients                          fp32 master + moments
    0      whole                     all-reduced, whole                 whole (fp32 model: the weight)
    1      whole                     all-reduced, whole                 this rank's shard
    2      whole                     reduce-scattered by the graph,     this rank's shard
                                     layer by layer, into the shard
                                     (passes/zero.py's zero_reduce)
    3      the shard (`param.data`)  reduce-scattered by the graph      this rank's shard
                                     (passes/zero.py's gather backward)

After the update, level 1 and 2 all-gather the new weights from the master shards (cast to
the model dtype); level 3 copies the master shard into the weight shard. Gradients are
summed in `train.grad_reduce_dtype`. Loss scaling as runtime/parallel.py: the summed
gradient is the global-mean gradient. No host reads: every step is capturable.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from echoc.spec import Spec
from runtime import comm
from runtime.zero_ops import SHARD_GRADS
from runtime.dtypes import torch_dtype
from runtime.optim import AdamWConfig, MasterAdamW
from runtime.parallel import expert_param_names
from runtime.shards import (ShardSpec, gather_full, reduce_scatter_full, shard_spec, split_rows,
                            take_shard)

REDUCE_BUCKET_BYTES = 1 << 27    # gradients cast and reduced per collective (a larger tensor: alone)


def reduce_buckets(states: list[ParamState], dtype: torch.dtype) -> list[list[ParamState]]:
    """states in order, cut into runs of at most REDUCE_BUCKET_BYTES of `dtype` elements."""
    item = torch.empty((), dtype=dtype).element_size()
    out: list[list[ParamState]] = []
    size = REDUCE_BUCKET_BYTES
    for s in states:
        n = s.param.numel() * item
        if size + n > REDUCE_BUCKET_BYTES:
            out.append([])
            size = 0
        out[-1].append(s)
        size += n
    return out


@dataclass
class ParamState:
    name: str
    param: nn.Parameter
    shape: torch.Size         # the whole weight's shape
    shard: ShardSpec          # n = 1 when this level keeps the tensor whole
    weight_sharded: bool      # ZeRO 3: param.data is this rank's shard [m]; the graph gathers it
    master: Tensor            # fp32: [m], or the weight's shape when whole
    master_is_weight: bool    # a float32 weight (or weight shard) is its own master: no copy
    grad: Tensor | None = None  # fp32, like master: what the optimizer reads this step


class TrainState:
    """Master weights, the optimizer and gradient reduction for `model` at `spec.parallel.zero`.

    `gathered`: names of the parameters the compiled graph all-gathers before use (ZeRO 3,
    passes/zero.py); their `param.data` becomes this rank's shard here. `reduced`: names of
    the parameters whose gradients the graph's backward reduce-scatters (ZeRO 2)."""

    def __init__(self, model: nn.Module, spec: Spec, device: torch.device, gathered: dict[str, str],
                 reduced: dict[str, str] | None = None):
        self.level, self.model = spec.parallel.zero, model
        self.reduced = set(reduced or ())
        self.reduce_dtype = torch_dtype(spec.train.grad_reduce_dtype)
        experts = expert_param_names(model)
        self.params = [self._param_state(name, p, "expert_dp" if name in experts else "world", gathered)
                       for name, p in model.named_parameters()]
        o = spec.train.optimizer
        self.lr = torch.tensor(o.lr, dtype=torch.float32, device=device)
        self.optimizer = MasterAdamW([s.master for s in self.params], self.lr,
                                     AdamWConfig(tuple(o.betas), o.weight_decay))

    @torch.no_grad()
    def _param_state(self, name: str, p: nn.Parameter, group: str, gathered: dict[str, str]) -> ParamState:
        sharded, shape = name in gathered, p.shape
        assert not sharded or gathered[name] == group, f"{name}: gathered over {gathered[name]}, owned by {group}"
        s = shard_spec(p.numel(), group) if self.level >= 1 else ShardSpec(p.numel(), 1, 0, group)
        if sharded:
            p.data = take_shard(p.data, s, p.data.new_empty(s.rows))
        own = p.dtype == torch.float32 and (sharded or s.n == 1)
        if own:
            master = p.data
        elif sharded or s.n == 1:
            master = p.data.float()
        else:
            master = take_shard(p.data, s, torch.empty(s.rows, dtype=torch.float32, device=p.device))
        return ParamState(name, p, shape, s, sharded, master, own)

    def by_group(self, sharded: bool | None = None) -> dict[str, list[ParamState]]:
        out: dict[str, list[ParamState]] = {}
        for s in self.params:
            if sharded is None or s.weight_sharded == sharded:
                out.setdefault(s.shard.group, []).append(s)
        return out

    # --- after backward ---------------------------------------------------------------------
    @torch.no_grad()
    def reduce_grads(self) -> None:
        """Sum gradients over each parameter's group into `ParamState.grad` (fp32, master-shaped),
        one bucket of REDUCE_BUCKET_BYTES at a time, dropping each `param.grad` as its bucket is
        cast (levels 0–2): the reduction holds the model-dtype gradients not yet reduced, the fp32
        ones done, and one bucket. At level 3 `param.grad` is the summed shard (reduced by the
        graph's gather backward) and stays."""
        for s in self.params:
            if s.name in self.reduced:
                shard = SHARD_GRADS.take(s.name)
                s.grad = torch.zeros_like(s.master) if shard is None else shard.float().view_as(s.master)
            elif s.param.grad is None:
                s.param.grad = torch.zeros_like(s.param)
        for group, states in self.by_group(sharded=False).items():
            states = [s for s in states if s.name not in self.reduced]
            if states:
                (self._reduce_scatter if self.level >= 2 else self._all_reduce)(group, states)
        for s in self.params:
            if s.weight_sharded:
                s.grad = s.param.grad.float()

    def _all_reduce(self, group: str, states: list[ParamState]) -> None:
        for bucket in reduce_buckets(states, self.reduce_dtype):
            sizes = [s.param.numel() for s in bucket]
            flat = torch.empty(sum(sizes), dtype=self.reduce_dtype, device=bucket[0].param.device)
            for s, g in zip(bucket, flat.split(sizes)):
                g.copy_(s.param.grad.reshape(-1))        # the cast happens in the copy: no other copy
                s.param.grad = None
            if comm.group_size(group) > 1:
                dist.all_reduce(flat, group=comm.get_group(group))
            for s, g in zip(bucket, flat.split(sizes)):
                if s.shard.n == 1:
                    s.grad = g.view_as(s.param).float()
                else:
                    s.grad = take_shard(g, s.shard, torch.empty_like(s.master))
            del flat, g         # before the next bucket's buffer (fp32 whole: the gradients keep it)

    def _reduce_scatter(self, group: str, states: list[ParamState]) -> None:
        for bucket in reduce_buckets(states, self.reduce_dtype):
            specs = [s.shard for s in bucket]
            flat = reduce_scatter_full([s.param.grad for s in bucket], specs, self.reduce_dtype)
            for s, g in zip(bucket, split_rows(flat, specs)):
                s.grad = g.float().view_as(s.master)
                s.param.grad = None
            del flat, g         # before the next bucket's buffer (fp32: the gradients keep it)

    def grad_sq_sum(self) -> Tensor:
        """[] float32: Σ of squared gradient elements this rank holds (non-finite iff any is)."""
        norms = torch._foreach_norm([s.grad for s in self.params])
        return torch.stack(norms).float().pow(2).sum()

    # --- the update ---------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, found_inf: Tensor) -> None:
        """AdamW on the masters (skipped on the device when found_inf is 1), then the weights
        follow the masters."""
        self.optimizer.step([s.grad for s in self.params], found_inf)
        for group, states in self.by_group(sharded=False).items():
            if states[0].shard.n > 1:
                gather_full([s.master for s in states], [s.shard for s in states], [s.param.data for s in states])
        for s in self.params:
            if not s.master_is_weight and (s.shard.n == 1 or s.weight_sharded):
                s.param.data.copy_(s.master.view_as(s.param.data))

    def zero_grad(self) -> None:
        for s in self.params:
            s.param.grad, s.grad = None, None
        SHARD_GRADS.clear()

    # --- whole tensors (oracle, tests) --------------------------------------------------------
    @torch.no_grad()
    def full(self, which: str) -> dict[str, Tensor]:
        """Every parameter's whole `weight` (model dtype) or `grad` (fp32, after reduce_grads),
        gathered over its group where this rank holds a shard."""
        out = {}
        for s in self.params:
            src = s.param.data if which == "weight" else s.grad
            if not (s.weight_sharded if which == "weight" else s.shard.n > 1):
                out[s.name] = src.view(s.shape)
                continue
            full = torch.empty(s.shard.numel, dtype=src.dtype, device=src.device)
            gather_full([src], [s.shard], [full])
            out[s.name] = full.view(s.shape)
        return out
