"""backends.exchange: the `torch` dispatch's rows moved by pushes of the real rows (runtime/p2p.py).

On CPU: how 'auto' resolves and what is refused, the memory plan under 'p2p' (a symmetric
receive pool instead of the send and receive buffers, counted in the prediction), and the oracle
at ep 2 and 4 with the push replaced by a gloo stand-in that leaves NaN in every row it does not
write (tests/runtime/p2p_worker.py). The kernel itself runs on GPUs: tests/gpu/test_p2p_cuda.py."""
from pathlib import Path

import json
import os
import subprocess
import sys

import pytest

from echoc.errors import EchocError
from support import assert_oracle_matches, run_json_worker

WORKER = Path(__file__).with_name("p2p_worker.py")
KERNEL_WORKER = Path(__file__).with_name("p2p_kernel_worker.py")
ROOT = Path(__file__).resolve().parents[2]
CUDA = {"cluster.device": "cuda", "model.dtype": "bfloat16"}


@pytest.mark.parametrize("over,want", [
    ({"parallel.ep": 2}, "nccl"),                                                 # cpu
    ({"parallel.ep": 2, "cluster.gpus_per_node": 2, **CUDA}, "p2p"),
    ({"parallel.ep": 2, "parallel.dp": 2, "cluster.gpus_per_node": 4, **CUDA}, "p2p"),   # two EP groups a node
    ({"parallel.ep": 4, "cluster.nodes": 2, "cluster.gpus_per_node": 2, **CUDA}, "nccl"),   # ep spans nodes
    ({"parallel.ep": 1, "cluster.gpus_per_node": 1, **CUDA}, "nccl"),             # nothing moves between ranks
    ({"parallel.ep": 2, "cluster.gpus_per_node": 2, "backends.exchange": "nccl", **CUDA}, "nccl"),
])
def test_auto_resolves_to_p2p_on_cuda_within_a_node(make_spec, over, want):
    assert make_spec(over).token_exchange == want


def test_other_dispatch_backends_never_use_it(make_spec):
    spec = make_spec({"parallel.ep": 2, "cluster.gpus_per_node": 2, "backends.dispatch": "sync", **CUDA})
    assert spec.token_exchange == "nccl"


def test_p2p_is_refused_on_cpu_and_across_nodes(make_spec):
    with pytest.raises(EchocError, match=r"backends.exchange.*'p2p' needs cluster.device 'cuda'"):
        make_spec({"parallel.ep": 2, "backends.exchange": "p2p"})
    with pytest.raises(EchocError, match=r"backends.exchange.*each EP group on one node"):
        make_spec({"parallel.ep": 4, "cluster.nodes": 2, "cluster.gpus_per_node": 2, "backends.exchange": "p2p",
                   **CUDA})


def _plan(make_spec, exchange):
    from echoc.compile import compile_build
    from passes.buffer_json import plan_to_json
    spec = make_spec({"parallel.ep": 2, "cluster.gpus_per_node": 2, "backends.exchange": exchange, **CUDA})
    build = compile_build(spec)
    return spec, plan_to_json(build.memory_plan), build


def test_memory_plan_has_a_symmetric_pool_instead_of_send_and_receive_buffers(make_spec):
    spec, p2p_plan, p2p_build = _plan(make_spec, "p2p")
    _, nccl_plan, nccl_build = _plan(make_spec, "nccl")
    moves = lambda plan: [b["name"] for b in plan["buffers"] if "_mlp_" in b["name"] and
                          b["name"].endswith((".send", ".recv"))]
    assert moves(nccl_plan) and not moves(p2p_plan)
    pool = [b for b in p2p_plan["buffers"] if b["placement"] == "symmetric"]
    assert [b["name"] for b in pool] == ["p2p.recv", "p2p.map", "p2p.weights"]
    assert pool[0]["bytes"] == spec.receive_rows * spec.model.hidden_size * 2      # [ep·C, H] bf16
    assert pool[1]["bytes"] == spec.receive_rows * 8                               # [ep·C] int64
    assert pool[2]["bytes"] == spec.receive_rows * 2                               # [ep·C] bf16 router weights
    total = sum(b["bytes"] for b in pool)
    assert p2p_plan["totals"]["symmetric_bytes"] == total
    assert nccl_plan["totals"]["symmetric_bytes"] == 0
    # the pools are held all run: the prediction counts them in every phase
    assert p2p_build.summary["memory_per_rank_bytes"].get("symmetric_pool") == total
    assert "symmetric_pool" not in nccl_build.summary["memory_per_rank_bytes"]
    assert p2p_plan["totals"]["arena_bytes"] < nccl_plan["totals"]["arena_bytes"]


def test_under_p2p_the_dispatch_carries_the_weights_and_combine_sums(make_spec):
    """One row per token and rank back from the experts needs the router weights there: the pass
    emits echo::dispatch_weighted + echo::combine_weighted instead of echo::dispatch + echo::combine
    + weighted_sum (ep > 1 only)."""
    from runtime import contracts
    from runtime.contracts import COMBINE, DISPATCH, P2P_COMBINE, P2P_DISPATCH, WEIGHTED_SUM
    used = lambda build: {contracts.of(n.target) for n in build.program.gm.graph.nodes} - {None}
    p2p_ops, nccl_ops = used(_plan(make_spec, "p2p")[2]), used(_plan(make_spec, "nccl")[2])
    assert {P2P_DISPATCH, P2P_COMBINE} <= p2p_ops and not {DISPATCH, COMBINE, WEIGHTED_SUM} & p2p_ops
    assert {DISPATCH, COMBINE, WEIGHTED_SUM} <= nccl_ops and not {P2P_DISPATCH, P2P_COMBINE} & nccl_ops


def _run_oracle(tmp_path, spec, exchanges_per_layer=4, **cfg):
    """The oracle through the stand-in; each MoE layer exchanges `exchanges_per_layer` times a step
    (dispatch, combine and their backwards; a recomputed layer dispatches and combines again)."""
    steps = 3
    res = run_json_worker(WORKER, {"spec": spec, "steps": steps, **cfg}, tmp_path)
    pushes = res["pushes"]
    assert res["p2p_layers"] > 0, "no echo::dispatch_weighted in the graph"
    assert pushes["exchanges"] == exchanges_per_layer * res["p2p_layers"] * steps, (pushes, res["p2p_layers"])
    assert pushes["n"] > 0, "the exchange never pushed: the test proves nothing"
    assert 0 < pushes["real_rows"] < pushes["rows"], "no padding row: NaN was never put anywhere"
    assert 0 < pushes["unique_rows"] < pushes["copy_rows"], "dispatch sent no token fewer times than its copies"
    assert pushes["summed_rows"] > 0, "no rank returned a summed row: combine_weighted and dispatch's backward never ran"
    assert_oracle_matches(res)
    return res


@pytest.mark.slow
@pytest.mark.parametrize("ep", [2, 4])
def test_matches_reference_reading_only_the_pushed_rows(tmp_path, oracle_spec, ep):
    _run_oracle(tmp_path, oracle_spec(ep=ep, capacity=float(ep)))


@pytest.mark.slow
def test_overflow_drops_the_same_copies_under_p2p(tmp_path, oracle_spec):
    """Capacity 1.0, skewed routing: the reference is told the drops of dist_worker's independent rule."""
    res = _run_oracle(tmp_path, oracle_spec(ep=2, capacity=1.0, experts=4, top_k=2), reference_drops=True)
    assert sum(s["dropped"] for s in res["steps"]) > 0, "the test needs overflow to mean anything"


@pytest.mark.slow
def test_moe_recompute_exchanges_again_in_backward_under_p2p(tmp_path, oracle_spec):
    """train.recompute 'moe': each MoE block, combine_weighted included, replayed in backward."""
    spec = oracle_spec(ep=2, capacity=2.0)
    spec["train"]["recompute"] = "moe"
    _run_oracle(tmp_path, spec, exchanges_per_layer=6)


@pytest.mark.slow
def test_three_ranks_with_chunks_shorter_than_the_token_budget(tmp_path, oracle_spec):
    """ep 3 at capacity 1.0: C = 22 rows per peer < T = 32 tokens, so a chunk's distinct tokens are
    bounded by C, not T (p2p_moves: U = min(T, C)); the reference is told the drops."""
    spec = oracle_spec(ep=3, capacity=1.0, experts=6, top_k=2)
    res = _run_oracle(tmp_path, spec, reference_drops=True)
    from echoc.spec_io import spec_from_dict
    s = spec_from_dict(spec)
    assert s.peer_chunk_rows < s.budgets.tokens, (s.peer_chunk_rows, s.budgets.tokens)
    assert res["steps"], res


@pytest.mark.slow
def test_cloning_full_recompute_and_zero3_under_p2p(tmp_path, oracle_spec):
    """ECHO clones, the recomputed forward exchanging again in backward, ZeRO 3 over ep 2 × dp 2."""
    spec = oracle_spec(ep=2, dp=2, capacity=2.0,
                       echo={"enabled": True, "spare_slots_per_rank": 1, "clone_domain": "cluster"})
    spec["train"]["recompute"], spec["parallel"]["zero"] = "full", 3
    res = _run_oracle(tmp_path, spec, exchanges_per_layer=6)
    assert sum(s["clones"] for s in res["steps"]) > 0, "no clone was planned: the test proves nothing"


def test_push_kernel_in_the_interpreter_writes_each_real_row_and_nothing_else():
    pytest.importorskip("triton", reason="needs the triton package (pip install triton)")
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, str(KERNEL_WORKER)], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["cases"] == 24 and res["failures"] == [], res


def test_the_launcher_refuses_p2p_where_the_gpus_cannot_reach_each_other(make_spec, monkeypatch):
    import torch

    from echoc import preflight
    from runtime import p2p
    spec = make_spec({"parallel.ep": 2, "cluster.gpus_per_node": 2, **CUDA})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(p2p, "missing", lambda: None)
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: True)
    preflight.check_exchange(spec, 2)                                       # reachable: nothing to say
    monkeypatch.setattr(torch.cuda, "can_device_access_peer", lambda a, b: False)
    with pytest.raises(EchocError, match=r"backends.exchange 'auto' chose 'p2p'.*no peer access.*'nccl'"):
        preflight.check_exchange(spec, 2)
    preflight.check_exchange(make_spec({"parallel.ep": 2, "cluster.gpus_per_node": 2, "backends.exchange": "nccl",
                                        **CUDA}), 2)                        # nccl needs none of it
    monkeypatch.setattr(p2p, "missing", lambda: "this torch has no torch.distributed._symmetric_memory")
    with pytest.raises(EchocError, match=r"_symmetric_memory"):
        preflight.check_exchange(spec, 2)


def test_a_trapped_barrier_reads_as_a_timeout_only_under_p2p(monkeypatch):
    from runtime import p2p, watchdog
    trap = RuntimeError("CUDA error: unspecified launch failure")
    monkeypatch.setattr(p2p, "enabled", lambda group: False)
    assert not watchdog.is_timeout(trap)
    monkeypatch.setattr(p2p, "enabled", lambda group: True)
    assert watchdog.is_timeout(trap)
    assert not watchdog.is_timeout(RuntimeError("CUDA error: out of memory"))


def test_unique_tokens_sends_each_token_once_per_chunk_and_maps_every_copy_to_it():
    import torch

    from runtime import p2p
    # ep 2, C 5, T 4: chunk 0 has tokens 3, 1, 3, 0 and padding; chunk 1 has 2, 2, 2 and padding
    tokens = torch.tensor([3, 1, 3, 0, -1, 2, 2, 2, -1, -1])
    lead, upos, where = p2p.unique_tokens(tokens, 2, 4)
    assert lead.tolist() == [3, 1, -1, 0, -1, 2, -1, -1, -1, -1]
    assert [u for u, l in zip(upos.tolist(), lead.tolist()) if l >= 0] == [0, 1, 2, 0]
    assert where.tolist() == [0, 1, 0, 2, -1, 0, 0, 0, -1, -1]
