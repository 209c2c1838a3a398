"""verify_sync_free on graphs with planted offenders."""
import pytest
import torch
import torch.fx as fx

from echoc.compile import compile_graph
from passes import verify_sync_free
from passes.verify_sync_free import SyncFreeError, find_offenders
from runtime.dtypes import torch_dtype
from runtime.model import meta_transformer
from runtime.parallel import shard_experts

SMALL = {"model.vocab_size": 32, "model.hidden_size": 16, "model.num_layers": 2, "model.dense_intermediate_size": 32,
         "model.dtype": "bfloat16", "model.attention.num_heads": 2, "model.attention.num_kv_heads": 1,
         "model.attention.head_dim": 8, "model.moe.num_experts": 4, "model.moe.expert_intermediate_size": 8,
         "budgets.seq_len": 8, "cluster.device": "cuda"}


@pytest.fixture
def spec(make_spec):
    """spec(cuda_graph, **backends) → a small bf16 CUDA spec."""
    return lambda graph="full_iteration", **be: make_spec(
        SMALL | {"backends.cuda_graph": graph} | {f"backends.{k}": v for k, v in be.items()})


def compiled(s):
    model = meta_transformer(s.model, torch_dtype(s.model.dtype))
    shard_experts(model, 0, s.parallel.ep)
    return compile_graph(model, s)[0]


def graph_of(fn):
    return fx.symbolic_trace(fn)


def test_clean_graph_passes(spec):
    gm = graph_of(lambda x: torch.argsort(x, stable=True) + torch.cumsum(x, 0))
    assert verify_sync_free.run(gm, spec()).info.offenders == []


@pytest.mark.parametrize("fn,needle", [
    (lambda x: x.sum().item(), "item"),
    (lambda x: x.tolist(), "tolist"),
    (lambda x: torch.nonzero(x), "nonzero"),
    (lambda x: torch.bincount(x), "bincount"),
    (lambda x: torch.repeat_interleave(x), "repeat_interleave"),
    (lambda x: x.cpu(), "cpu"),
    (lambda x: torch.masked_select(x, x > 0), "masked_select"),
])
def test_planted_offender_is_named(fn, needle, spec):
    gm = graph_of(fn)
    with pytest.raises(SyncFreeError) as e:
        verify_sync_free.run(gm, spec())
    assert needle in str(e.value)


def test_repeat_interleave_with_output_size_is_fine():
    gm = graph_of(lambda x, r: torch.repeat_interleave(x, r, output_size=8))
    assert find_offenders(gm) == []


def test_not_enforced_without_cuda_graph(spec):
    gm = graph_of(lambda x: x.sum().item())
    info = verify_sync_free.run(gm, spec("none")).info
    assert not info.enforced and info.offenders and "item" in info.offenders[0][1]


def test_sync_backend_and_loop_gemm_are_rejected(spec):
    offenders = dict(find_offenders(compiled(spec("none", dispatch="sync"))))
    assert {"layers_1_mlp_layout", "layers_1_mlp_dispatch", "layers_1_mlp_combine"} <= set(offenders)
    assert "sync" in offenders["layers_1_mlp_dispatch"]
    loop = dict(find_offenders(compiled(spec("none", grouped_gemm="loop"))))
    assert list(loop) == ["layers_1_mlp_expert_ffn"] and "offsets on the host" in loop["layers_1_mlp_expert_ffn"]
    assert find_offenders(compiled(spec("none"))) == []


def test_a_full_iteration_graph_refuses_the_sync_backend(spec):
    with pytest.raises(SyncFreeError, match="layers_1_mlp_layout"):
        verify_sync_free.run(compiled(spec("none", dispatch="sync")), spec())
