"""The cross-field rules of a Spec (docs/spec.md, "Cross-field rules"): each returns (absolute
yaml path, message) pairs; Spec's validator raises them together as one SpecCrossFieldError."""
from __future__ import annotations


def cross_field_errors(spec) -> list[tuple[str, str]]:
    """Every cross-field problem of `spec` (an echoc.spec.Spec, which imports this module), model
    first."""
    return _model_rules(spec) + _layout_rules(spec) + _backend_rules(spec) + _cluster_rules(spec)


def _model_rules(spec) -> list[tuple[str, str]]:
    m, moe, r = spec.model, spec.model.moe, spec.model.moe.router
    errors = []
    if m.first_dense_layers > m.num_layers:
        errors.append(("model.first_dense_layers", f"{m.first_dense_layers} is more than num_layers ({m.num_layers})"))
    if moe.top_k > moe.num_experts:
        errors.append(("model.moe.top_k", f"top_k ({moe.top_k}) must be <= num_experts ({moe.num_experts})"))
    if r.topk_groups > r.num_groups:
        errors.append(("model.moe.router.topk_groups",
                       f"topk_groups ({r.topk_groups}) must be <= num_groups ({r.num_groups})"))
    if moe.num_experts % r.num_groups:
        errors.append(("model.moe.router.num_groups",
                       f"num_experts ({moe.num_experts}) must be divisible by num_groups ({r.num_groups})"))
    elif moe.num_experts >= moe.top_k > r.topk_groups * (moe.num_experts // r.num_groups):
        errors.append(("model.moe.top_k", f"top_k ({moe.top_k}) exceeds the experts in the selected groups "
                                          f"({r.topk_groups} × {moe.num_experts // r.num_groups})"))
    if spec.train.data.kind == "text" and m.vocab_size < 256:
        errors.append(("model.vocab_size", f"{m.vocab_size} is too small for byte-level text data (needs >= 256)"))
    return errors


def _layout_rules(spec) -> list[tuple[str, str]]:
    """Parallel layout and expert cloning."""
    p, c, echo, num_experts = spec.parallel, spec.cluster, spec.echo, spec.model.moe.num_experts
    errors = []
    if p.ep * p.dp != c.world_size:
        errors.append(("parallel", f"ep × dp ({p.ep} × {p.dp}) must equal nodes × gpus_per_node "
                                   f"({c.nodes} × {c.gpus_per_node} = {c.world_size})"))
    if num_experts % p.ep:
        errors.append(("parallel.ep", f"num_experts ({num_experts}) must be divisible by ep ({p.ep})"))
    if echo.enabled and echo.spare_slots_per_rank == 0:
        errors.append(("echo.spare_slots_per_rank", "must be >= 1 when echo.enabled is true"))
    if echo.enabled and p.ep == 1:
        errors.append(("echo.enabled", "cloning needs ep >= 2 (with ep = 1 every expert is already local)"))
    elif echo.enabled and spec.model.first_dense_layers >= spec.model.num_layers:
        errors.append(("echo.enabled", f"cloning needs a MoE layer; model.first_dense_layers "
                                       f"({spec.model.first_dense_layers}) makes all {spec.model.num_layers} dense"))
    elif echo.enabled and spec.clone_domain_ranks == 1:
        errors.append(("echo.clone_domain", f"'node' with {c.gpus_per_node} GPU per node makes every clone domain "
                                            "one rank, which has no other rank to clone onto; use 'cluster'"))
    if echo.spare_slots_per_rank > num_experts:
        errors.append(("echo.spare_slots_per_rank",
                       f"{echo.spare_slots_per_rank} spare slots per rank is more than num_experts ({num_experts})"))
    return errors


def ep_within_node(spec) -> bool:
    """Every EP group (consecutive ranks) lies on one node."""
    ep, g = spec.parallel.ep, spec.cluster.gpus_per_node
    return ep <= g and g % ep == 0


def exchange(spec) -> str:
    """The exchange the 'torch' dispatch uses: backends.exchange with 'auto' resolved ('nccl' at
    ep 1, where no row moves between ranks, and for every other dispatch backend)."""
    be = spec.backends
    if be.dispatch != "torch" or spec.parallel.ep == 1:
        return "nccl"
    if be.exchange != "auto":
        return be.exchange
    return "p2p" if spec.cluster.device == "cuda" and ep_within_node(spec) else "nccl"


def _backend_rules(spec) -> list[tuple[str, str]]:
    dev, be = spec.cluster.device, spec.backends
    errors = []
    if dev == "cpu" and be.dispatch in ("symm_mem", "deepep"):
        errors.append(("backends.dispatch", f"'{be.dispatch}' needs cluster.device 'cuda'; on cpu use 'torch' or 'sync'"))
    if be.exchange == "p2p" and dev == "cpu":
        errors.append(("backends.exchange", "'p2p' needs cluster.device 'cuda' (NVLink symmetric memory); "
                                            "on cpu use 'nccl' or 'auto'"))
    elif be.exchange == "p2p" and not ep_within_node(spec):
        errors.append(("backends.exchange", f"'p2p' needs each EP group on one node (ep {spec.parallel.ep}, "
                                            f"{spec.cluster.gpus_per_node} GPUs per node); use 'nccl' or 'auto'"))
    if dev == "cpu" and be.cuda_graph != "none":
        errors.append(("backends.cuda_graph", "CUDA graphs need cluster.device 'cuda'; on cpu use 'none'"))
    if dev == "cpu" and be.grouped_gemm == "te":
        errors.append(("backends.grouped_gemm", "'te' (Transformer Engine) needs cluster.device 'cuda'"))
    if dev == "cuda" and spec.model.dtype == "float32" and be.grouped_gemm == "torch":
        errors.append(("backends.grouped_gemm", "'torch' (grouped_mm) needs model.dtype 'bfloat16' on cuda; "
                                                "use bfloat16, or 'loop' for float32"))
    if be.cuda_graph == "full_iteration" and be.dispatch == "sync":
        errors.append(("backends.dispatch", "'sync' reads routing counts on the host and cannot be captured; "
                                            "with cuda_graph 'full_iteration' use 'torch', 'symm_mem' or 'deepep'"))
    if spec.echo.enabled and be.dispatch == "sync":
        errors.append(("echo.enabled", "cloning needs a sync-free backends.dispatch ('torch', 'symm_mem' or "
                                       "'deepep'; got 'sync'), or echo.enabled false"))
    if be.grouped_gemm == "torch" and spec.model.num_moe_layers:
        errors += _grouped_mm_widths(spec)
    if spec.budgets.on_overflow == "rerun" and spec.parallel.zero == 3:
        errors.append(("budgets.on_overflow", "'rerun' runs a second, dropless program on the same weights, which "
                                              "parallel.zero 3 keeps as shards that program cannot read; with zero 3 "
                                              "use 'drop' or 'error', or use 'rerun' with zero 0, 1 or 2"))
    if spec.echo.enabled and spec.echo.recompute_clone_dispatch and be.grouped_gemm != "torch":
        errors.append(("echo.recompute_clone_dispatch", "needs backends.grouped_gemm 'torch' (grouped_mm; got "
                                                        f"'{be.grouped_gemm}'), or recompute_clone_dispatch false"))
    return errors


def _grouped_mm_widths(spec) -> list[tuple[str, str]]:
    """grouped_mm reads its operands' rows at 16-byte aligned strides: the expert FFN's widths."""
    m = spec.model
    step = 16 // m.dtype_bytes
    return [(field, f"{v} must be a multiple of {step} with model.dtype '{m.dtype}' for backends.grouped_gemm "
                    f"'torch' (grouped_mm needs 16-byte rows); use a multiple of {step}, or grouped_gemm 'loop'")
            for field, v in (("model.hidden_size", m.hidden_size),
                             ("model.moe.expert_intermediate_size", m.moe.expert_intermediate_size)) if v % step]


def _cluster_rules(spec) -> list[tuple[str, str]]:
    c = spec.cluster
    if c.domains is None:
        return []
    errors = []
    seen = sorted(n for d in c.domains for n in d.nodes)
    if seen != list(range(c.nodes)):
        shown = str(seen) if len(seen) <= 32 else f"{str(seen[:32])[:-1]}, ... ({len(seen)} in all)]"
        errors.append(("cluster.domains", f"domains must partition nodes 0..{c.nodes - 1} exactly; got {shown}"))
    if c.inter_domain_gbps is None:
        errors.append(("cluster.inter_domain_gbps", "required when cluster.domains is given"))
    return errors
