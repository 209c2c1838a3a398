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


DTYPE_BYTES = {"float32": 4, "bfloat16": 2}


class _Section(BaseModel):
    # attribute docstrings become field descriptions in the JSON schema (`echoc schema`)
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


PosInt = Annotated[int, Field(gt=0)]


class GQAConfig(_Section):
    kind: Literal["gqa"] = "gqa"
    num_heads: PosInt
    num_kv_heads: PosInt
    head_dim: PosInt
    rope_theta: float = Field(10000.0, gt=0)

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
    num_heads: PosInt
    q_lora_rank: int = Field(0, ge=0)
    kv_lora_rank: PosInt
    qk_nope_head_dim: PosInt
    qk_rope_head_dim: PosInt
    v_head_dim: PosInt
    rope_theta: float = Field(10000.0, gt=0)

    @model_validator(mode="after")
    def _rope_even(self):
        if self.qk_rope_head_dim % 2:
            raise SpecCrossFieldError([(
                "qk_rope_head_dim", f"qk_rope_head_dim ({self.qk_rope_head_dim}) must be even (RoPE rotates pairs)")])
        return self


Attention = Annotated[Union[GQAConfig, MLAConfig], Field(discriminator="kind")]


class RouterConfig(_Section):
    score_fn: Literal["sigmoid", "softmax"] = "sigmoid"
    num_groups: PosInt = 1
    topk_groups: PosInt = 1
    routed_scaling_factor: float = Field(1.0, gt=0)
    bias_update_rate: float = Field(1e-3, ge=0)
    """Aux-loss-free balancing: after each step, bias += rate * sign(mean_load - load)."""


class MoEConfig(_Section):
    num_experts: PosInt
    top_k: PosInt
    expert_intermediate_size: PosInt
    shared_experts: int = Field(1, ge=0)
    router: RouterConfig = RouterConfig()


class ModelConfig(_Section):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    vocab_size: PosInt
    hidden_size: PosInt
    num_layers: PosInt
    first_dense_layers: int = Field(0, ge=0)
    attention: Attention
    dense_intermediate_size: PosInt
    moe: MoEConfig
    norm_eps: float = Field(1e-6, gt=0)
    dtype: Literal["float32", "bfloat16"] = "bfloat16"

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.first_dense_layers

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]


class DomainConfig(_Section):
    """A group of nodes joined to other domains by a slower link (e.g. one datacenter)."""
    nodes: list[int] = Field(min_length=1)


class ClusterConfig(_Section):
    device: Literal["cpu", "cuda"] = "cpu"
    nodes: PosInt = 1
    gpus_per_node: PosInt = 1
    """Processes per node; on CPU, gloo processes."""
    intra_node_gbps: float = Field(450.0, gt=0)
    inter_node_gbps: float = Field(50.0, gt=0)
    domains: Optional[list[DomainConfig]] = None
    inter_domain_gbps: Optional[float] = Field(None, gt=0)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node


class ParallelConfig(_Section):
    ep: PosInt = 1
    dp: PosInt = 1


class BudgetsConfig(_Section):
    seq_len: PosInt
    micro_batch: PosInt = 1
    tokens_per_rank: Optional[PosInt] = None
    """Optional; when given it must equal seq_len × micro_batch."""
    received_token_capacity: float = 1.25
    on_overflow: Literal["drop", "error"] = "drop"
    memory_gib: Optional[float] = Field(None, gt=0)
    row_alignment: PosInt = 8
    """Receive-buffer rows per peer chunk are rounded up to this (GEMM alignment)."""

    @model_validator(mode="after")
    def _tokens(self):
        errors = []
        if self.received_token_capacity < 1.0:
            errors.append(("received_token_capacity",
                           f"received_token_capacity must be >= 1.0 (got {self.received_token_capacity}); "
                           "below 1.0 even a perfectly balanced step would overflow"))
        if self.tokens_per_rank is not None and self.tokens_per_rank != self.seq_len * self.micro_batch:
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
    enabled: bool = False
    spare_slots_per_rank: int = Field(0, ge=0)
    recompute_clone_dispatch: bool = False
    clone_domain: Literal["node", "cluster"] = "node"


class BackendsConfig(_Section):
    dispatch: Literal["torch", "symm_mem", "deepep", "sync"] = "torch"
    grouped_gemm: Literal["torch", "te", "loop"] = "torch"
    cuda_graph: Literal["full_iteration", "none"] = "none"
    buffers: Literal["arena", "allocator"] = "arena"
    """Where the MoE ops' buffers live: 'arena' = one arena per rank allocated once, each op writing
    into the view the buffer plan gave it; 'allocator' = PyTorch's caching allocator. The arena needs
    static shapes, so with dispatch 'sync' (left at its default) the allocator is used."""

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
    lr: float = Field(3e-4, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(0, ge=0)


class DataConfig(_Section):
    kind: Literal["synthetic", "text"] = "synthetic"
    path: Optional[str] = None
    """For kind text: a file read as bytes (token id = byte value; vocab_size must be >= 256)."""

    @model_validator(mode="after")
    def _path(self):
        if self.kind == "text" and not self.path:
            raise SpecCrossFieldError([("path", "data.kind 'text' needs data.path (a text file read as bytes)")])
        if self.kind == "synthetic" and self.path:
            raise SpecCrossFieldError([("path", "data.path is only read when data.kind is 'text'")])
        return self


class CheckpointConfig(_Section):
    dir: Optional[str] = None
    interval: int = Field(0, ge=0)
    """Steps between checkpoints; 0 = only at the end and on SIGTERM (when dir is set)."""


class TrainConfig(_Section):
    steps: PosInt = 10
    seed: int = 0
    optimizer: OptimizerConfig = OptimizerConfig()
    data: DataConfig = DataConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    log_interval: PosInt = 1
    metrics_path: Optional[str] = None


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
        m, moe = self.model, self.model.moe
        errors: list[tuple[str, str]] = []

        def bad(path: str, msg: str) -> None:
            errors.append((path, msg))

        if m.first_dense_layers > m.num_layers:
            bad("model.first_dense_layers",
                f"{m.first_dense_layers} is more than num_layers ({m.num_layers})")
        if moe.top_k > moe.num_experts:
            bad("model.moe.top_k", f"top_k ({moe.top_k}) must be <= num_experts ({moe.num_experts})")
        r = moe.router
        if r.topk_groups > r.num_groups:
            bad("model.moe.router.topk_groups",
                f"topk_groups ({r.topk_groups}) must be <= num_groups ({r.num_groups})")
        if moe.num_experts % r.num_groups:
            bad("model.moe.router.num_groups",
                f"num_experts ({moe.num_experts}) must be divisible by num_groups ({r.num_groups})")
        elif moe.num_experts >= moe.top_k > r.topk_groups * (moe.num_experts // r.num_groups):
            bad("model.moe.top_k",
                f"top_k ({moe.top_k}) exceeds the experts in the selected groups "
                f"({r.topk_groups} × {moe.num_experts // r.num_groups})")
        world = self.cluster.world_size
        if self.parallel.ep * self.parallel.dp != world:
            bad("parallel", f"ep × dp ({self.parallel.ep} × {self.parallel.dp}) must equal "
                f"nodes × gpus_per_node ({self.cluster.nodes} × {self.cluster.gpus_per_node} = {world})")
        if moe.num_experts % self.parallel.ep:
            bad("parallel.ep", f"num_experts ({moe.num_experts}) must be divisible by ep ({self.parallel.ep})")
        if self.echo.enabled and self.echo.spare_slots_per_rank == 0:
            bad("echo.spare_slots_per_rank", "must be >= 1 when echo.enabled is true")
        if self.echo.enabled and self.parallel.ep == 1:
            bad("echo.enabled", "cloning needs ep >= 2 (with ep = 1 every expert is already local)")
        if self.echo.spare_slots_per_rank > moe.num_experts:
            bad("echo.spare_slots_per_rank",
                f"{self.echo.spare_slots_per_rank} spare slots per rank is more than num_experts ({moe.num_experts})")
        dev, be = self.cluster.device, self.backends
        if dev == "cpu" and be.dispatch in ("symm_mem", "deepep"):
            bad("backends.dispatch", f"'{be.dispatch}' needs cluster.device 'cuda'; on cpu use 'torch' or 'sync'")
        if dev == "cpu" and be.cuda_graph != "none":
            bad("backends.cuda_graph", "CUDA graphs need cluster.device 'cuda'; on cpu use 'none'")
        if dev == "cpu" and be.grouped_gemm == "te":
            bad("backends.grouped_gemm", "'te' (Transformer Engine) needs cluster.device 'cuda'")
        if dev == "cuda" and m.dtype == "float32" and be.grouped_gemm == "torch":
            bad("backends.grouped_gemm", "'torch' (grouped_mm) needs model.dtype 'bfloat16' on cuda; "
                "use bfloat16, or 'loop' for float32")
        if be.cuda_graph == "full_iteration" and be.dispatch == "sync":
            bad("backends.dispatch", "'sync' reads routing counts on the host and cannot be captured; "
                "with cuda_graph 'full_iteration' use 'torch', 'symm_mem' or 'deepep'")
        if self.train.data.kind == "text" and m.vocab_size < 256:
            bad("model.vocab_size", f"{m.vocab_size} is too small for byte-level text data (needs >= 256)")
        if self.cluster.domains is not None:
            seen = sorted(n for d in self.cluster.domains for n in d.nodes)
            if seen != list(range(self.cluster.nodes)):
                bad("cluster.domains", f"domains must partition nodes 0..{self.cluster.nodes - 1} exactly; got {seen}")
            if self.cluster.inter_domain_gbps is None:
                bad("cluster.inter_domain_gbps", "required when cluster.domains is given")
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
    def receive_rows(self) -> int:
        """Static receive-buffer rows per EP rank per layer."""
        return self.peer_chunk_rows * self.parallel.ep


class SpecCrossFieldError(ValueError):
    """Raised by validators with (yaml path, message) pairs; spec_io turns it into SpecError.

    Paths are relative to the section whose validator raises (Spec's are therefore absolute).
    """

    def __init__(self, errors: list[tuple[str, str]]):
        self.errors = errors
        super().__init__("; ".join(f"{p}: {m}" for p, m in errors))
