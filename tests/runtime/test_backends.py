"""The real-row backends (`symm_mem`, `deepep`) on CPU: their own index arithmetic against
hand-computed cases, and the oracle (loss and every gradient ≤ 1e-5 vs the single-process
reference) with each backend's device collective replaced by a gloo stand-in that follows
the library call's contract (tests/runtime/backend_standins.py)."""
from pathlib import Path

import pytest
import torch

from runtime.backends import deepep, symm_mem
from support import assert_oracle_matches, run_json_worker

WORKER = Path(__file__).with_name("backend_worker.py")
BACKENDS = ["symm_mem", "deepep"]


@pytest.fixture
def run_backend(tmp_path):
    def run(spec, backend, steps=3, reference_drops=False):
        cfg = {"spec": spec, "backend": backend, "steps": steps, "reference_drops": reference_drops}
        return run_json_worker(WORKER, cfg, tmp_path)
    return run


# --- the oracle over the stand-ins (slow: torchrun/gloo) ---------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ep", [2, 4])
def test_matches_reference(run_backend, oracle_spec, backend, ep):
    res = run_backend(oracle_spec(ep=ep, capacity=float(ep)), backend)
    assert all(s["dropped"] == 0 for s in res["steps"])
    assert_oracle_matches(res)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_echo_cloning_matches_reference(run_backend, oracle_spec, backend):
    spec = oracle_spec(ep=4, capacity=4.0, experts=8,
                       echo={"enabled": True, "spare_slots_per_rank": 2, "clone_domain": "cluster"})
    res = run_backend(spec, backend)
    assert sum(s["clones"] for s in res["steps"]) > 0, "no clone was planned: the test proves nothing"
    assert_oracle_matches(res)


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_overflow_drops_exactly_the_rows_the_torch_backend_drops(run_backend, oracle_spec, backend):
    """Capacity 1.0, skewed routing, row_alignment 4 (symm_mem's major_align, deepep's
    pad_multiple): the reference is told the drops computed by dist_worker's independent rule."""
    spec = oracle_spec(ep=2, capacity=1.0, experts=4, top_k=2)
    spec["budgets"]["row_alignment"] = 4
    res = run_backend(spec, backend, steps=2, reference_drops=True)
    assert sum(s["dropped"] for s in res["steps"]) > 0, "the test needs overflow to mean anything"
    assert_oracle_matches(res)


# --- pure index arithmetic (no processes) ------------------------------------------------------

def _counts_all(rows):
    return torch.tensor(rows, dtype=torch.int64)


def test_vdev_2d_splits_align_each_slot_and_give_empty_slots_a_block():
    # ep 2, L 2, C 4; rank 1 receives slot 0: 3 (from 0) + 1 (from 1), slot 1: nothing
    counts_all = _counts_all([[2, 0, 3, 0], [1, 1, 1, 0]])
    s = symm_mem.vdev_2d_splits(counts_all, rank=1, slots_per_rank=2, chunk_rows=4, major_align=4)
    assert s.in_splits.tolist() == [1, 1, 1, 0]              # rank-major: (dst 0: slot 0, 1), (dst 1: slot 0, 1)
    assert s.out_splits.tolist() == [3, 1, 0, 0]             # expert-major: (slot 0: src 0, 1), (slot 1: ...)
    assert s.out_offsets.tolist() == [0, 3, 4, 4]            # slot 0 aligned to 4; empty slot 1 takes 4 rows
    assert s.slot_end.tolist() == [4, 8]
    rows = symm_mem.receive_row_map(s, symm_mem.receive_rows(2, 4, 2, 4))
    assert rows.tolist() == [0, 1, 2, 3] + [-1] * 12


def test_vdev_2d_splits_count_overflow_like_the_torch_backend():
    # rank 0 sends 5 copies to rank 1 (slots 2, 3) with C 3: slot 2 keeps 3, slot 3 keeps 0
    counts_all = _counts_all([[0, 0, 3, 2], [0, 0, 0, 0]])
    s = symm_mem.vdev_2d_splits(counts_all, rank=0, slots_per_rank=2, chunk_rows=3, major_align=1)
    assert s.in_splits.tolist() == [0, 0, 3, 0]
    dest = torch.tensor([2, 3, 2, 3, 2])
    counts = torch.tensor([0, 0, 3, 2])
    send_copy, copy_slot, dropped = symm_mem.packed_send(dest, counts, s.in_splits.view(2, 2), 2, 2, 3)
    assert int(dropped) == 2
    assert copy_slot.tolist() == [0, -1, 1, -1, 2]            # slot-2 copies packed first, slot 3 dropped
    assert send_copy.tolist() == [0, 2, 4, -1, -1]


def test_vdev_2d_align_one_still_gives_empty_slots_one_row():
    counts_all = _counts_all([[0, 2], [0, 1]])               # ep 2, L 1: rank 0's slot is empty
    s = symm_mem.vdev_2d_splits(counts_all, rank=0, slots_per_rank=1, chunk_rows=2, major_align=1)
    assert s.slot_end.tolist() == [1]                        # the library's max(aligned, major_align)


def test_deepep_offsets_pad_to_the_multiple_and_keep_empty_slots_empty():
    counts_all = _counts_all([[3, 0, 1, 0], [2, 0, 0, 0]])
    offs, received, sent = deepep.padded_offsets(counts_all, rank=0, slots_per_rank=2, chunk_rows=8,
                                                 pad_multiple=4)
    assert offs.tolist() == [8, 8] and int(received) == 5 and int(sent) == 4
    assert deepep.permuted_rows(ep=2, chunk_rows=8, slots_per_rank=2, pad_multiple=4) == 24
    assert deepep.permuted_rows(2, 8, 2, 1) == 16


def test_deepep_slot_probs_put_each_kept_weight_at_its_slot():
    w = torch.tensor([[0.25, 0.75], [0.5, 0.5]])
    kept = torch.tensor([[3, 0], [-1, 1]])
    p = deepep.slot_probs(w, kept, 4)
    assert p.tolist() == [[0.75, 0.0, 0.0, 0.25], [0.0, 0.5, 0.0, 0.0]]


def test_without_deep_ep_asking_for_it_says_how_to_build_it(make_spec, monkeypatch):
    from echoc.errors import MissingDependencyError
    from passes import sync_free_dispatch
    if deepep.available():
        pytest.skip("deep_ep is installed here")
    spec = make_spec({"parallel.ep": 2})
    spec = spec.model_copy(update={"backends": spec.backends.model_copy(update={"dispatch": "deepep"})})
    with pytest.raises(MissingDependencyError, match=r"bench/build_deepep\.sh SRC_DIR.*94a9f8f6b146"):
        sync_free_dispatch.check_backend(spec)


@pytest.mark.parametrize("backend", BACKENDS)
def test_validate_refuses_the_backends_on_cpu(make_spec, backend):
    from echoc.errors import EchocError
    with pytest.raises(EchocError, match=rf"'{backend}' needs cluster.device 'cuda'"):
        make_spec({"parallel.ep": 2, "backends.dispatch": backend})


@pytest.mark.parametrize("backend,names", [("symm_mem", {"symm_mem.rows", "symm_mem.splits"}),
                                           ("deepep", {"hybrid_ep"})])
def test_memory_plan_lists_the_symmetric_buffers(make_spec, backend, names):
    from backend_standins import install_all
    from echoc.compile import compile_build
    from passes.buffer_json import plan_to_json
    from runtime.backends import base
    spec = make_spec({"parallel.ep": 2})
    spec = spec.model_copy(update={"backends": spec.backends.model_copy(update={"dispatch": backend})})
    install_all()      # deepep's compile-time check accepts the stand-in in place of the package
    try:
        plan = plan_to_json(compile_build(spec).memory_plan)
    finally:
        base.uninstall("symm_mem")
        base.uninstall("deepep")
    symmetric = {b["name"] for b in plan["buffers"] if b["placement"] == "symmetric"}
    assert plan["planned"] and symmetric == names
    assert all(b["bytes"] > 0 for b in plan["buffers"] if b["name"] in names)
