"""The planned arena on GPUs (NCCL, bf16): a run with the arena equals a run without it, bitwise,
eager and captured as one CUDA graph (deterministic kernels). EP 2 needs 2 CUDA devices; EP 1
(where a movement's backward is one gather between two planned buffers) needs one."""
import json
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parents[1] / "runtime" / "arena_worker.py"


def check_ranks(ranks, addresses=True):
    """Arena = allocator bitwise at every step, every planned output at its address (only
    without train.recompute: the recorder walks the top-level graph, and recomputed MoE ops
    sit inside Recompute modules), the collapsed arena caught, and the captured runs equal
    to eager."""
    for r in ranks:
        assert all(s["arena_vs_allocator"] == [] and s["unused_views"] == [] for s in r["steps"]), r["steps"]
        # the expert weight gradients deferred to the wgrad stream (the default) or inline: bitwise equal
        assert all(s["deferred_vs_inline_wgrad"] == [] for s in r["steps"]), r["steps"]
        if addresses:
            assert r["addresses"] and all(got == want for got, want in r["addresses"].values())
        assert any(s["collapsed_vs_allocator"] for s in r["steps"])
        g = r["graph"]
        assert g["graph_arena"] == g["graph_allocator"] == g["eager_allocator"], g
        assert all(g["same_weights"].values()), g["same_weights"]


@pytest.mark.skipif(torch.cuda.device_count() < 1, reason="needs a CUDA GPU")
@pytest.mark.parametrize("recompute", ["none", "moe", "full"])
def test_arena_equals_allocator_at_ep1_on_one_gpu(tmp_path, recompute, monkeypatch, oracle_spec, torchrun):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    spec = oracle_spec(ep=1, capacity=2.0, experts=8)
    spec["cluster"]["device"] = "cuda"
    spec["model"]["dtype"] = "bfloat16"
    spec["budgets"]["row_alignment"] = 16
    spec["train"]["recompute"] = recompute
    out = tmp_path / "out.json"
    torchrun(WORKER, {"spec": spec, "steps": 6, "graph": True, "out": str(out)}, 1, tmp_path)
    check_ranks(json.loads(out.read_text()), addresses=recompute == "none")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("recompute,policy", [(False, "none"), (True, "none"), (False, "moe"), (True, "full")])
def test_arena_equals_allocator_on_gpus_eager_and_in_a_cuda_graph(tmp_path, recompute, policy, monkeypatch,
                                                                 oracle_spec, torchrun):
    """recompute: echo.recompute_clone_dispatch; policy: train.recompute (a recomputed forward
    gives each layer's unused region back as it moves on, inside the captured graph too)."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    spec = oracle_spec(ep=2, capacity=2.0, experts=8,
                       echo={"enabled": True, "spare_slots_per_rank": 2, "clone_domain": "cluster",
                             "recompute_clone_dispatch": recompute})
    spec["train"]["recompute"] = policy
    spec["cluster"]["device"] = "cuda"
    spec["model"]["dtype"] = "bfloat16"
    spec["budgets"]["row_alignment"] = 16
    # tiny experts on GPUs never pay for a clone; an (unreal) fast link makes the cost model clone anyway
    spec["cluster"]["intra_node_gbps"] = 1e7
    out = tmp_path / "out.json"
    torchrun(WORKER, {"spec": spec, "steps": 6, "graph": True, "out": str(out)}, 2, tmp_path)
    ranks = json.loads(out.read_text())
    check_ranks(ranks, addresses=policy == "none")
    assert sum(s["clones"] for s in ranks[0]["steps"]) > 0


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("policy", ["none", "moe"])
def test_deferred_weight_gradients_at_ep2_equal_inline_and_allocator(tmp_path, policy, monkeypatch, oracle_spec,
                                                                     torchrun):
    """Without ECHO the expert weight gradients run on the wgrad stream (backends.wgrad_overlap),
    beside the p2p dispatch's backward: bitwise equal to them inline and to the allocator run,
    eager and captured."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    spec = oracle_spec(ep=2, capacity=2.0, experts=8)
    spec["train"]["recompute"] = policy
    spec["cluster"]["device"] = "cuda"
    spec["model"]["dtype"] = "bfloat16"
    spec["budgets"]["row_alignment"] = 16
    out = tmp_path / "out.json"
    torchrun(WORKER, {"spec": spec, "steps": 6, "graph": True, "out": str(out)}, 2, tmp_path)
    check_ranks(json.loads(out.read_text()), addresses=policy == "none")
