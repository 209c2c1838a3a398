"""The fused ECHO planner on a GPU (runtime/planner_triton.py): the same plan and slots, bit for
bit, as the torch reference on many random count matrices, eager and replayed in a CUDA graph.
Needs CUDA and the triton package."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime import planner

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
              pytest.mark.skipif(planner._fused is None, reason="needs the triton package (pip install triton)")]

WORKER = Path(__file__).parents[1] / "runtime" / "planner_fused_worker.py"


@pytest.mark.parametrize("seed", [0, 1])
def test_fused_equals_reference_on_random_counts(seed):
    """40 random cases per seed: each new block shape compiles a kernel, most of the time."""
    out = subprocess.run([sys.executable, str(WORKER), "--device", "cuda", "--cases", "40",
                          "--seed", str(seed)], capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["cases"] == 40 and result["mismatches"] == [], result["mismatches"][:5]


def zipf_counts(ep, E, copies, g):
    w = (torch.arange(1, E + 1, dtype=torch.float64) ** -1.2)[torch.randperm(E, generator=g)]
    idx = torch.multinomial(w.expand(ep, E), copies, replacement=True, generator=g)
    return idx, torch.zeros(ep, E, dtype=torch.int64).scatter_add_(1, idx, torch.ones_like(idx))


@pytest.mark.parametrize("ep", [8, 16, 64])
def test_public_functions_take_the_fused_path_and_replay_in_a_graph(ep):
    """plan / assign_slots on CUDA tensors, captured once, replayed on new counts written into
    the static input: every replay equals the reference on those counts."""
    E, S, El = 256, 2, 256 // ep
    g = torch.Generator().manual_seed(ep)
    idx, counts = zipf_counts(ep, E, 4096, g)
    static_counts, static_idx = counts.cuda(), idx[0].view(-1, 8).cuda()
    planner.plan(static_counts, El, S, ep)  # compile outside the capture
    planner.assign_slots(static_idx, static_counts, planner.plan(static_counts, El, S, ep).quota, 0, El, S)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        p = planner.plan(static_counts, El, S, ep)
        slots = planner.assign_slots(static_idx, static_counts, p.quota, 0, El, S)
    for _ in range(3):
        idx, counts = zipf_counts(ep, E, 4096, g)
        static_counts.copy_(counts)
        static_idx.copy_(idx[0].view(-1, 8))
        graph.replay()
        ref = planner.plan_reference(counts, El, S, ep)
        assert torch.equal(p.spare_expert.cpu(), ref.spare_expert) and torch.equal(p.quota.cpu(), ref.quota)
        want = planner.assign_slots_reference(idx[0].view(-1, 8), counts, ref.quota, 0, El, S)
        assert torch.equal(slots.cpu(), want)
        assert (ref.spare_expert >= 0).any(), "zipf counts at EP ≥ 8 should clone something"
