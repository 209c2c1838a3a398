"""The echoc spec: one YAML file describing the model, the cluster, the budgets.

Every section is a pydantic model with unknown keys rejected. Cross-field rules
live in `Spec`'s validators; `load_spec` (echoc/spec_io.py) turns a YAML file into
a `Spec` and every validation error into a `SpecError` naming the YAML path and
line.
"""
from __future__ import annotations

import math
from typing import Annotated, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

from echoc.spec_rules import cross_field_errors, exchange as _exchange
from echoc.spec_types import (
    MAX_CAPACITY, MAX_EXPERTS, MAX_FFN, MAX_GPUS_PER_NODE, MAX_HEAD_DIM, MAX_HEADS, MAX_HIDDEN, MAX_LAYERS,
    MAX_LORA_RANK, MAX_ROW_ALIGNMENT, MAX_SEED, MAX_SHARED_EXPERTS, MAX_STEPS, MAX_TIMEOUT_S,
    MAX_TOKENS_PER_RANK, MAX_VOCAB, MAX_WORLD, Flag, PathText, SafeName, float_in, int_in)


DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


class _Section(BaseModel):
    # attribute docstrings become field descriptions in the JSON schema (`echoc schema`);
    # NaN and ±inf are refused in every float field
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


PosFloat = float_in(gt=0)
Gbps = float_in(ge=0.001)     # GB/s of a link: at least 1 MB/s (the cost model divides by it)
Steps = int_in(0, MAX_STEPS)


class GQAConfig(_Section):
    kind: Literal["gqa"] = "gqa"
    num_heads: int_in(1, MAX_HEADS)
    num_kv_heads: int_in(1, MAX_HEADS)
    head_dim: int_in(1, MAX_HEAD_DIM)
    rope_theta: PosFloat = 10000.0

    @model_validator(mode="after")
    def _heads_divide(self):
        errors = []
        if self.num_heads % self.num_kv_heads:
            errors.append(("num_kv_heads",
                           f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})"))
        if self.head_dim % 2:
            errors.append(("head_dim", f"head_dim ({self.head_dim}) must be even (RoPE rotates pairs)"))
        if errors:
            raise SpecCrossFieldError(errors)
        return self


class MLAConfig(_Section):
    """Multi-head latent attention (DeepSeek-V3 / GLM-5). q_lora_rank 0 means no query low-rank."""
    kind: Literal["mla"] = "mla"
    num_heads: int_in(1, MAX_HEADS)
    q_lora_rank: int_in(0, MAX_LORA_RANK) = 0
    kv_lora_rank: int_in(1, MAX_LORA_RANK)
    qk_nope_head_dim: int_in(1, MAX_HEAD_DIM)
    qk_rope_head_dim: int_in(1, MAX_HEAD_DIM)
    v_head_dim: int_in(1, MAX_HEAD_DIM)
    rope_theta: PosFloat = 10000.0

    @model_validator(mode="after")
    def _rope_even(self):
        if self.qk_rope_head_dim % 2:
            raise SpecCrossFieldError([(
                "qk_rope_head_dim", f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even (RoPE rotates pairs)")])
        return self


Attention = Annotated[Union[GQAConfig, MLAConfig], Field(discriminator="kind")]


class RouterConfig(_Section):
    score_fn: Literal["sigmoid", "softmax"] = "sigmoid"
    num_groups: int_in(1, MAX_EXPERTS) = 1
    topk_groups: int_in(1, MAX_EXPERTS) = 1
    routed_scaling_factor: PosFloat = 1.0
    bias_update_rate: float_in(ge=0) = 1e-3
    """Aux-loss-free balancing: after each step, bias += rate * sign(mean_load - load)."""


class MoEConfig(_Section):
    num_experts: int_in(1, MAX_EXPERTS)
    top_k: int_in(1, MAX_EXPERTS)
    expert_intermediate_size: int_in(1, MAX_FFN)
    shared_experts: int_in(0, MAX_SHARED_EXPERTS) = 1
    router: RouterConfig = RouterConfig()


class ModelConfig(_Section):
    name: SafeName
    """Becomes the build directory build/<name>/: a safe file name."""
    vocab_size: int_in(1, MAX_VOCAB)
    hidden_size: int_in(1, MAX_HIDDEN)
    num_layers: int_in(1, MAX_LAYERS)
    first_dense_layers: int_in(0, MAX_LAYERS) = 0
    attention: Attention
    dense_intermediate_size: int_in(1, MAX_FFN)
    moe: MoEConfig
    norm_eps: float_in(gt=0, lt=1) = 1e-6
    dtype: Literal["float32", "bfloat16"] = "bfloat16"

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


class DomainConfig(_Section):
    """A group of nodes joined to other domains by a slower link (e.g. one datacenter)."""
    nodes: list[int_in(0, MAX_WORLD - 1)] = Field(min_length=1)


class ClusterConfig(_Section):
    device: Literal["cpu", "cuda"] = "cpu"
    nodes: int_in(1, MAX_WORLD) = 1
    gpus_per_node: int_in(1, MAX_GPUS_PER_NODE) = 1
    """Processes per node; on CPU, gloo processes."""
    intra_node_gbps: Gbps = 450.0
    inter_node_gbps: Gbps = 50.0
    domains: Optional[list[DomainConfig]] = None
    inter_domain_gbps: Optional[Gbps] = None

    @model_validator(mode="after")
    def _world(self):
        if self.world_size > MAX_WORLD:
            raise SpecCrossFieldError([("gpus_per_node", f"nodes × gpus_per_node ({self.nodes} × {self.gpus_per_node} "
                                        f"= {self.world_size:,}) is more than {MAX_WORLD:,} processes")])
        return self

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


class ParallelConfig(_Section):
    ep: int_in(1, MAX_WORLD) = 1
    dp: int_in(1, MAX_WORLD) = 1
    zero: int_in(0, 3) = 0
    """Sharded training state over each parameter's data-parallel group (all ranks for dense
    parameters, expert-DP for experts): 1 = fp32 master weights and AdamW moments, 2 = also the
    gradients (reduce-scattered), 3 = also the weights (all-gathered per layer before use)."""


class BudgetsConfig(_Section):
    seq_len: int_in(1, MAX_TOKENS_PER_RANK)
    micro_batch: int_in(1, MAX_TOKENS_PER_RANK) = 1
    tokens_per_rank: Optional[int_in(1, MAX_TOKENS_PER_RANK)] = None
    """Optional; when given it must equal seq_len × micro_batch."""
    received_token_capacity: float_in(le=MAX_CAPACITY) = 1.25
    on_overflow: Literal["drop", "error", "rerun"] = "drop"
    """Rows beyond capacity: dropped and counted; the step fails; or the step's update is skipped
    on the device and the same batch runs again with room for every row."""
    memory_gib: Optional[PosFloat] = None
    row_alignment: int_in(1, MAX_ROW_ALIGNMENT) = 8
    """Receive-buffer rows per peer chunk are rounded up to this (GEMM alignment)."""

    @model_validator(mode="after")
    def _tokens(self):
        errors = []
        if self.received_token_capacity < 1.0:
            errors.append(("received_token_capacity",
                           f"received_token_capacity must be >= 1.0 (got {self.received_token_capacity}); "
                           "below 1.0 even a perfectly balanced step would overflow"))
        if self.tokens > MAX_TOKENS_PER_RANK:
            errors.append(("micro_batch", f"seq_len × micro_batch ({self.seq_len} × {self.micro_batch} = "
                                          f"{self.tokens:,}) is more than {MAX_TOKENS_PER_RANK:,} tokens per rank"))
        elif self.tokens_per_rank is not None and self.tokens_per_rank != self.tokens:
            errors.append(("tokens_per_rank",
                           f"tokens_per_rank ({self.tokens_per_rank}) must equal seq_len × micro_batch "
                           f"({self.seq_len} × {self.micro_batch} = {self.seq_len * self.micro_batch}); "
                           "or leave it out"))
        if errors:
            raise SpecCrossFieldError(errors)
        return self

    @property
    def tokens(self) -> int:
        return self.seq_len * self.micro_batch


class EchoConfig(_Section):
    enabled: Flag = False
    spare_slots_per_rank: int_in(0, MAX_EXPERTS) = 0
    recompute_clone_dispatch: Flag = False
    clone_domain: Literal["node", "cluster"] = "node"


class BackendsConfig(_Section):
    dispatch: Literal["torch", "symm_mem", "deepep", "sync"] = "torch"
    grouped_gemm: Literal["torch", "te", "loop"] = "torch"
    cuda_graph: Literal["full_iteration", "none"] = "none"
    buffers: Literal["arena", "allocator"] = "arena"
    """Where the MoE ops' buffers live: 'arena' = one arena per rank allocated once, each op writing
    into the view the buffer plan gave it; 'allocator' = PyTorch's caching allocator. The arena needs
    static shapes, so with dispatch 'sync' (left at its default) the allocator is used."""
    exchange: Literal["auto", "nccl", "p2p"] = "auto"
    """How the 'torch' dispatch moves token rows between EP ranks. 'nccl': all_to_all_single of the
    capacity-padded [ep·C, H] buffers (equal splits; gloo on cpu). 'p2p': each rank pushes only its
    real rows, one per token and destination rank, into its peers' symmetric-memory receive buffers
    (runtime/p2p.py, p2p_moves.py; cuda, the EP group on one node; sums cross in bf16, so not bitwise
    equal to 'nccl'). 'auto': 'p2p' where it can run, else 'nccl'. Other dispatch backends ignore it."""
    shared_expert_overlap: Flag = True
    """Run each MoE layer's shared expert on a second CUDA stream, overlapped with routing and token
    movement (forward and backward). No effect on CPU, nor at parallel.zero 3."""
    wgrad_overlap: Flag = True
    """Run each MoE layer's expert weight-gradient GEMMs on a second CUDA stream in backward, beside
    the layer's dispatch backward (its token exchange and the router's backward); on CPU the same
    nodes run on one stream. No effect with grouped_gemm 'loop', at parallel.zero 3, or with ECHO
    (the clones send the weight gradients home on the main stream, before the dispatch's backward)."""

    @model_validator(mode="after")
    def _buffers(self):
        if self.buffers == "arena" and self.dispatch != "torch" and "buffers" in self.model_fields_set:
            raise SpecCrossFieldError([("buffers", f"'arena' needs dispatch 'torch' (the '{self.dispatch}' "
                                                   "backend's buffer shapes depend on routing); use 'allocator'")])
        return self

    @property
    def uses_arena(self) -> bool:
        return self.buffers == "arena" and self.dispatch == "torch"


class OptimizerConfig(_Section):
    name: Literal["adamw"] = "adamw"
    lr: float_in(gt=0, le=1) = 3e-4
    betas: tuple[float_in(ge=0, lt=1), float_in(ge=0, lt=1)] = (0.9, 0.95)
    weight_decay: float_in(ge=0) = 0.0
    warmup_steps: Steps = 0


class DataConfig(_Section):
    kind: Literal["synthetic", "text"] = "synthetic"
    path: Optional[PathText] = None
    """For kind text: a file read as bytes (token id = byte value; vocab_size must be >= 256)."""

    @model_validator(mode="after")
    def _path(self):
        if self.kind == "text" and not self.path:
            raise SpecCrossFieldError([("path", "data.kind 'text' needs data.path (a text file read as bytes)")])
        if self.kind == "synthetic" and self.path:
            raise SpecCrossFieldError([("path", "data.path is only read when data.kind is 'text'")])
        return self


class CheckpointConfig(_Section):
    dir: Optional[PathText] = None
    interval: Steps = 0
    """Steps between checkpoints; 0 = only at the end and on SIGTERM (when dir is set)."""


class TrainConfig(_Section):
    steps: int_in(1, MAX_STEPS) = 10
    seed: int_in(0, MAX_SEED) = 0
    optimizer: OptimizerConfig = OptimizerConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log_interval: int_in(1, MAX_STEPS) = 1
    metrics_path: Optional[PathText] = None
    collective_timeout_s: float_in(ge=1, le=MAX_TIMEOUT_S) = 600.0
    """Every collective times out after this many seconds: a rank that stops answering ends the run
    (at least 1 s: the ranks' first connection to their store needs that much)."""
    on_nonfinite: Literal["skip", "stop"] = "stop"
    """A NaN/inf loss or gradient norm skips that step's update on the device; then 'skip' counts and
    reports it, 'stop' stops the run naming the step."""
    grad_reduce_dtype: Literal["float32", "bfloat16"] = "float32"
    """The dtype gradients are summed in over data-parallel ranks (all-reduce or reduce-scatter)."""
    recompute: Literal["none", "moe", "full", "auto"] = "none"
    """Activation recompute in backward: 'moe' each MoE block, 'full' each transformer block (only block
    inputs kept); 'auto' = the cheapest of those that fits budgets.memory_gib (decided at compile time)."""


class Spec(_Section):
    model: ModelConfig
    cluster: ClusterConfig = ClusterConfig()
    parallel: ParallelConfig = ParallelConfig()
    budgets: BudgetsConfig
    echo: EchoConfig = EchoConfig()
    backends: BackendsConfig = BackendsConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="after")
    def _cross_field(self):
        errors = cross_field_errors(self)
        if errors:
            raise SpecCrossFieldError(errors)
        return self

    # Derived sizes used by passes and the runtime -------------------------------------------
    @property
    def experts_per_rank(self) -> int:
        return self.model.moe.num_experts // self.parallel.ep

    @property
    def peer_chunk_rows(self) -> int:
        """Rows each rank may send to each EP peer per layer (torch backend, equal splits)."""
        b, ep = self.budgets, self.parallel.ep
        raw = math.ceil(b.received_token_capacity * b.tokens * self.model.moe.top_k / ep)
        return -(-raw // b.row_alignment) * b.row_alignment

    @property
    def token_exchange(self) -> str:
        """How the 'torch' dispatch moves rows between ranks: backends.exchange, 'auto' resolved
        ('p2p' or 'nccl'; see echoc/spec_rules.exchange)."""
        return _exchange(self)

    @property
    def receive_rows(self) -> int:
        """Static receive-buffer rows per EP rank per layer."""
        return self.peer_chunk_rows * self.parallel.ep

    @property
    def clone_domain_ranks(self) -> int:
        """EP ranks per clone domain: one node's worth of consecutive EP ranks ('node'), or the
        whole EP group ('cluster', or when a node's ranks do not divide ep)."""
        ep = self.parallel.ep
        if self.echo.clone_domain == "cluster":
            return ep
        d = min(self.cluster.gpus_per_node, ep)
        return d if ep % d == 0 else ep


class SpecCrossFieldError(ValueError):
    """Raised by validators with (yaml path, message) pairs; spec_io turns it into SpecError.

    Paths are relative to the section whose validator raises (Spec's are therefore absolute).
    """

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{p}: {m}" for p, m in errors))
