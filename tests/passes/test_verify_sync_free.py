"""verify_sync_free on graphs with planted offenders."""
import pytest
import torch
import torch.fx as fx

from echoc.spec_io import spec_from_dict
from passes import verify_sync_free
from passes.verify_sync_free import SyncFreeError, find_offenders


def spec(graph="full_iteration"):
    return spec_from_dict({
        "model": {"name": "t", "vocab_size": 32, "hidden_size": 16, "num_layers": 1, "dense_intermediate_size": 32,
                  "dtype": "bfloat16", "attention": {"kind": "gqa", "num_heads": 2, "num_kv_heads": 1, "head_dim": 8},
                  "moe": {"num_experts": 4, "top_k": 2, "expert_intermediate_size": 8}},
        "cluster": {"device": "cuda"}, "budgets": {"seq_len": 8},
        "backends": {"cuda_graph": graph},
    })


def graph_of(fn):
    return fx.symbolic_trace(fn)


def test_clean_graph_passes():
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
def test_planted_offender_is_named(fn, needle):
    gm = graph_of(fn)
    with pytest.raises(SyncFreeError) as e:
        verify_sync_free.run(gm, spec())
    assert needle in str(e.value)


def test_repeat_interleave_with_output_size_is_fine():
    gm = graph_of(lambda x, r: torch.repeat_interleave(x, r, output_size=8))
    assert find_offenders(gm) == []


def test_not_enforced_without_cuda_graph():
    gm = graph_of(lambda x: x.sum().item())
    info = verify_sync_free.run(gm, spec("none")).info
    assert not info.enforced and info.offenders and "item" in info.offenders[0][1]


def test_sync_backend_and_loop_gemm_are_rejected():
    from echoc.compile import build_meta_model, compile_graph
    s = spec_from_dict({**spec("none").model_dump(), "backends": {"dispatch": "sync", "cuda_graph": "none"}})
    gm, _ = compile_graph(build_meta_model(s), s)
    why = " ".join(w for _, w in find_offenders(gm))
    assert "sync" in why
    s2 = spec_from_dict({**spec("none").model_dump(), "backends": {"grouped_gemm": "loop", "cuda_graph": "none"}})
    gm2, _ = compile_graph(build_meta_model(s2), s2)
    assert "offsets on the host" in " ".join(w for _, w in find_offenders(gm2))
