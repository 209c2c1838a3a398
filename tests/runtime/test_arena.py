"""The planned arena (runtime/arena.py): views at planned offsets, and a run with the arena
equal to a run without it, bitwise (gloo, CPU, fp32; torchrun workers in arena_worker.py)."""
from pathlib import Path

import pytest
import torch

from runtime import arena, ops  # noqa: F401  (ops registers echo::count)
from runtime.arena import Arena, ArenaLayout, View
from support import run_json_worker

WORKER = Path(__file__).with_name("arena_worker.py")


def small_layout():
    return ArenaLayout(2048, {"a": View(0, (4, 8), torch.float32), "b": View(512, (16,), torch.int64),
                              "a_again": View(0, (32,), torch.float32)})


def test_views_sit_at_their_offsets_with_storages_and_versions_of_their_own():
    ar = Arena(small_layout(), torch.device("cpu"))
    a, b, again = ar.take("a", (4, 8), torch.float32), ar.take("b", (16,), torch.int64), \
        ar.take("a_again", (32,), torch.float32)
    assert a.data_ptr() == ar.blocks[0].data_ptr() == ar.address("a") and b.data_ptr() == ar.address("b")
    assert again.data_ptr() == a.data_ptr()                           # the plan may reuse bytes ...
    assert a.untyped_storage()._cdata != again.untyped_storage()._cdata  # ... as different tensors
    before = again._version
    a.fill_(1.5)
    assert again[0] == 1.5 and again._version == before              # same bytes, own version counter
    b.fill_(7)
    assert torch.equal(ar.blocks[0][512:520], torch.tensor([7, 0, 0, 0, 0, 0, 0, 0], dtype=torch.uint8))
    assert ar.taken == {"a", "b", "a_again"}


def test_out_and_place_use_the_arena_only_while_active_and_only_for_planned_keys():
    ar = Arena(small_layout(), torch.device("cpu"))
    fresh = arena.out("a", (4, 8), torch.float32, "cpu")
    assert fresh.data_ptr() != ar.address("a")
    with arena.active(ar):
        assert arena.out("a", (4, 8), torch.float32, "cpu").data_ptr() == ar.address("a")
        assert arena.out("not_planned", (3,), torch.float32, "cpu").data_ptr() != ar.blocks[0].data_ptr()
        t = torch.arange(16)
        placed = arena.place("b", t)
        assert placed.data_ptr() == ar.address("b") and torch.equal(placed, t)
        assert arena.place("not_planned", t) is t
        with pytest.raises(AssertionError, match="planned as torch.float32"):
            arena.out("a", (8, 8), torch.float32, "cpu")
    assert arena._ACTIVE is None


def test_a_custom_op_accepts_arena_views_of_shared_bytes():
    """Two planned views over the same bytes are input and output of one op: the custom-op
    aliasing check (storages) must not trip, because each view has its own storage."""
    ar = Arena(small_layout(), torch.device("cpu"))
    with arena.active(ar):
        x = torch.ones(4, 2, dtype=torch.int64)
        counts = torch.ops.echo.count.default(x, 16, "b")
    assert counts.data_ptr() == ar.address("b") and int(counts[1]) == 8


@pytest.fixture
def run_arena_worker(tmp_path):
    def run(spec, steps=2, graph=False):
        return run_json_worker(WORKER, {"spec": spec, "steps": steps, "graph": graph}, tmp_path)
    return run


def check_arena_ranks(ranks, policy: str) -> None:
    for rank, r in enumerate(ranks):
        for i, s in enumerate(r["steps"]):
            assert s["arena_vs_allocator"] == [], f"rank {rank} step {i}: {s['arena_vs_allocator'][:5]}"
            assert s["deferred_vs_inline_wgrad"] == [], f"rank {rank} step {i}: {s['deferred_vs_inline_wgrad']}"
            assert s["unused_views"] == []
        # every planned node output was written where the plan put it (the recorder walks the
        # top-level graph: under train.recompute the MoE ops sit inside Recompute modules)
        if policy == "none":
            assert r["addresses"] and all(got == want for got, want in r["addresses"].values()), r["addresses"]
        # the collapsed arena (overlapping live buffers share bytes) is caught
        assert any(s["collapsed_vs_allocator"] for s in r["steps"]), "a wrong plan went unnoticed"


@pytest.mark.slow
@pytest.mark.parametrize("recompute,policy", [(False, "none"), (True, "none"), (False, "full"), (True, "moe")])
def test_arena_run_equals_allocator_run_bitwise(run_arena_worker, oracle_spec, recompute, policy):
    """recompute: echo.recompute_clone_dispatch; policy: train.recompute (a recomputed region
    replays routing decisions kept from its forward, in arena views of their own)."""
    spec = oracle_spec(ep=2, capacity=2.0, experts=8,
                     echo={"enabled": True, "spare_slots_per_rank": 2, "clone_domain": "cluster",
                           "recompute_clone_dispatch": recompute})
    spec["train"]["recompute"] = policy
    ranks = run_arena_worker(spec, steps=3)
    assert sum(s["clones"] for s in ranks[0]["steps"]) > 0, "no clone planned: the clone buffers went untested"
    check_arena_ranks(ranks, policy)


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["none", "moe"])
def test_arena_run_with_deferred_weight_gradients_equals_the_others_bitwise(run_arena_worker, oracle_spec, policy):
    """Without ECHO the expert weight gradients are deferred (backends.wgrad_overlap): the arena run
    equals the allocator run and the run with them inline, with their lifetimes extended in the plan."""
    spec = oracle_spec(ep=2, capacity=2.0, experts=8)
    spec["train"]["recompute"] = policy
    check_arena_ranks(run_arena_worker(spec, steps=3), policy)


def test_released_arena_holds_no_bytes_and_refuses_views_until_allocated():
    """The Trainer holds the arena's bytes from forward to the end of backward only."""
    ar = Arena(small_layout(), torch.device("cpu"))
    assert ar.held and "a" in ar
    ar.release()
    assert not ar.held and not ar.blocks and "a" in ar           # the plan stays, the bytes go
    with pytest.raises(AssertionError, match="released"):
        ar.take("a", (4, 8), torch.float32)
    ar.allocate()
    assert ar.held and ar.take("a", (4, 8), torch.float32).data_ptr() == ar.address("a")


def test_trainer_releases_the_arena_after_backward(make_spec, tmp_path):
    """One CPU step with the arena: after it the bytes are released, and the next step allocates
    them again (the loss of two steps equals a trainer without an arena: see the oracle tests)."""
    import torch.distributed as dist
    from echoc.compile import compile_build
    from runtime import comm
    from runtime.trainer import Trainer
    spec = make_spec({"parallel.ep": 1, "cluster.gpus_per_node": 1, "backends.buffers": "arena"})
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    comm.init_groups(1, 1)
    trainer = Trainer(compile_build(spec).program, torch.device("cpu"))
    assert trainer.arena is not None
    tokens = torch.randint(0, spec.model.vocab_size, (spec.budgets.micro_batch, spec.budgets.seq_len))
    for _ in range(2):
        trainer.zero_grad()
        trainer.step(tokens, tokens)
        assert not trainer.arena.held and trainer.arena.taken


def test_each_region_is_a_block_taken_on_demand_and_blocks_no_view_uses_are_given_back():
    """Held regions (one per layer) and the transient region are separate allocations, taken
    when an op first asks for one of their views. end_forward (before a recomputing backward)
    forgets the blocks no view uses (the transient one here) and keeps those in use, whose
    bytes the recomputing backward writes again; in backward, moving to another layer's region forgets the last one's."""
    import weakref
    layout = ArenaLayout(3072, {"l0": View(0, (64,), torch.float32), "l1": View(512, (16,), torch.float32),
                                "tmp": View(1024, (8, 8), torch.float32), "tmp2": View(2048, (16,), torch.int64)},
                         bounds=(0, 512, 1024))
    ar = Arena(layout, torch.device("cpu"))
    assert ar.held and not ar.blocks
    saved = ar.take("l0", (64,), torch.float32).fill_(3.0)       # layer 0's saved view
    assert set(ar.blocks) == {0} and ar.blocks[0].numel() == 512
    tmp = ar.take("tmp", (8, 8), torch.float32)
    assert set(ar.blocks) == {0, 2} and ar.blocks[2].numel() == 2048
    assert tmp.data_ptr() == ar.blocks[2].data_ptr() == ar.address("tmp")
    assert ar.address("tmp2") == ar.blocks[2].data_ptr() + 1024
    ar.take("l1", (16,), torch.float32)                           # layer 1: its view is not kept
    assert set(ar.blocks) == {0, 1, 2} and ar.in_use(0) and not ar.in_use(1)
    transient = weakref.ref(ar.blocks[2])
    del tmp
    ar.end_forward(recomputing=True)
    assert set(ar.blocks) == {0} and transient() is None          # only layer 0's block is still used
    block0 = ar.blocks[0].data_ptr()
    again = ar.take("l0", (64,), torch.float32)                   # a recomputing backward: the same bytes
    assert again.data_ptr() == block0 and torch.equal(saved, torch.full((64,), 3.0))
    assert ar.take("tmp2", (16,), torch.int64).data_ptr() == ar.blocks[2].data_ptr() + 1024
    ar.take("l1", (16,), torch.float32)                           # backward moves on to layer 1
    assert 0 not in ar.blocks and 1 in ar.blocks
    ar.release()
    assert not ar.blocks and not ar.held


def test_a_layers_two_regions_live_together_and_recompute_keeps_only_its_routing_decisions():
    """Per layer a region of routing decisions (kept by a recomputed region through the loss) and
    one of its other saved buffers. In a recomputed forward, moving on to the next layer forgets
    the last layer's blocks nothing uses (its other saved buffers); end_forward keeps the routing
    decisions; in backward a layer's two regions coexist, and moving to another layer forgets both."""
    layout = ArenaLayout(4096, {"d0": View(0, (16,), torch.int64), "s0": View(512, (64,), torch.float32),
                                "d1": View(1024, (16,), torch.int64), "s1": View(1536, (64,), torch.float32),
                                "tmp": View(3072, (16,), torch.float32)},
                         bounds=(0, 512, 1024, 1536, 2048), layers=(0, 0, 1, 1))
    ar = Arena(layout, torch.device("cpu"))
    kept = {"d0": ar.take("d0", (16,), torch.int64).fill_(7)}     # layer 0: the checkpoint keeps this
    ar.take("s0", (64,), torch.float32)                            # ... and not this
    ar.take("tmp", (16,), torch.float32)
    assert set(ar.blocks) == {0, 1, 4}
    kept["d1"] = ar.take("d1", (16,), torch.int64).fill_(7)        # on to layer 1
    assert set(ar.blocks) == {0, 2, 4}                             # layer 0's unused region is gone
    ar.take("s1", (64,), torch.float32)
    ar.end_forward(recomputing=True)
    assert set(ar.blocks) == {0, 2}                                # the routing decisions only
    ar.take("s1", (64,), torch.float32)                            # layer 1 recomputes: a fresh block
    assert set(ar.blocks) == {0, 2, 3}
    ar.take("d1", (16,), torch.int64)                              # the same layer: nothing forgotten
    assert set(ar.blocks) == {0, 2, 3}
    ar.take("s0", (64,), torch.float32)                            # on to layer 0: layer 1's both go
    assert set(ar.blocks) == {0, 1}
    assert all(torch.equal(t, torch.full((16,), 7)) for t in kept.values())


def test_a_forward_keeps_the_regions_autograd_saved_views_use():
    """Without recompute a layer's saved views stay in use: moving on forgets nothing they hold."""
    layout = ArenaLayout(2048, {"s0": View(0, (64,), torch.float32), "s1": View(512, (64,), torch.float32)},
                         bounds=(0, 512, 1024), layers=(0, 1))
    ar = Arena(layout, torch.device("cpu"))
    saved = ar.take("s0", (64,), torch.float32).fill_(1.0)
    ar.take("s1", (64,), torch.float32).fill_(2.0)
    assert set(ar.blocks) == {0, 1} and torch.equal(saved, torch.ones(64))


def test_an_empty_view_touches_no_region():
    """A zero-byte buffer's region may end where the next layer's begins: taking it must not
    switch layers (which in backward would forget the current layer's blocks)."""
    layout = ArenaLayout(2048, {"l0": View(0, (64,), torch.float32), "e1": View(512, (0,), torch.float32),
                                "l2": View(512, (64,), torch.float32)},
                         bounds=(0, 512, 512, 1024), layers=(0, 1, 2))
    ar = Arena(layout, torch.device("cpu"))
    ar.end_forward()
    ar.take("l0", (64,), torch.float32)
    assert ar.take("e1", (0,), torch.float32).numel() == 0
    assert set(ar.blocks) == {0} and "e1" in ar.taken


def test_a_view_may_not_straddle_two_regions():
    with pytest.raises(AssertionError):
        Arena(ArenaLayout(2048, {"x": View(512, (256,), torch.float32)}, bounds=(0, 1024)), torch.device("cpu"))


def test_without_recompute_end_forward_forgets_every_block_and_saved_views_keep_theirs():
    """No recomputing backward will take a layer's region again: the arena lets go of all its
    blocks after the forward, so each lives exactly as long as autograd's views of it."""
    layout = ArenaLayout(2048, {"l0": View(0, (64,), torch.float32), "tmp": View(1024, (16,), torch.int64)},
                         bounds=(0, 1024))
    ar = Arena(layout, torch.device("cpu"))
    saved = ar.take("l0", (64,), torch.float32).fill_(2.0)
    ar.take("tmp", (16,), torch.int64)
    assert ar.in_use(0) and set(ar.blocks) == {0, 1}
    ar.end_forward()
    assert not ar.blocks and torch.equal(saved, torch.full((64,), 2.0))


def test_trainer_refuses_a_batch_of_another_shape_than_planned(make_spec, tmp_path):
    """A batch of other rows or length than [budgets.micro_batch, budgets.seq_len] is an error
    naming both, before any planned buffer is asked for a shape it was not planned for."""
    import torch.distributed as dist
    from echoc.compile import compile_build
    from runtime import comm
    from runtime.trainer import Trainer
    spec = make_spec({"parallel.ep": 1, "cluster.gpus_per_node": 1, "backends.buffers": "arena"})
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    comm.init_groups(1, 1)
    trainer = Trainer(compile_build(spec).program, torch.device("cpu"))
    mb, s = spec.budgets.micro_batch, spec.budgets.seq_len
    for shape in ((mb + 1, s), (mb, s - 1)):
        tokens = torch.zeros(shape, dtype=torch.int64)
        with pytest.raises(ValueError, match=r"budgets.micro_batch, budgets.seq_len\] = \[" + f"{mb}, {s}"):
            trainer.step(tokens, tokens)
