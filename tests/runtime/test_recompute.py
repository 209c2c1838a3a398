"""train.recompute against the single-process reference (gloo, CPU, fp32): recomputing each MoE
block or each transformer block in backward gives the same loss and gradients, routing, counts
and clone plan included (tests/runtime/dist_worker.py compares after every step)."""
import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("dist_worker.py")
TOL = 1e-5
ECHO = {"enabled": True, "spare_slots_per_rank": 1, "clone_domain": "cluster"}


def _oracle(tmp_path, torchrun, spec, steps=3):
    out = tmp_path / "out.json"
    torchrun(WORKER, {"spec": spec, "steps": steps, "out": str(out)}, spec["parallel"]["ep"] * spec["parallel"]["dp"],
             tmp_path)
    return json.loads(out.read_text())


@pytest.mark.parametrize("recompute,echo,zero", [
    ("none", None, 0), ("moe", None, 0), ("full", None, 0), ("moe", ECHO, 0), ("full", ECHO, 0),
    ("full", None, 1), ("full", None, 2), ("full", ECHO, 3), ("moe", None, 3)])
def test_recompute_matches_reference(tmp_path, torchrun, oracle_spec, recompute, echo, zero):
    """At ZeRO 3 a recomputed region gathers its layer's weights again (the gathers are inside it)."""
    spec = oracle_spec(ep=2, dp=2, echo=echo)
    spec["train"]["recompute"] = recompute
    spec["parallel"]["zero"] = zero
    res = _oracle(tmp_path, torchrun, spec)
    for s in res["steps"]:
        assert s["dropped"] == 0, s
        assert s["loss_rel_err"] <= TOL, s
        assert s["worst_grad"][1] <= TOL, s
    assert max(res["worst_grad_by_rank"]) <= TOL, res["worst_grad_by_rank"]
    if echo is not None:
        assert sum(s["clones"] for s in res["steps"]) > 0, "no clone planned: the case does not test cloning"


@pytest.mark.parametrize("recompute", ["moe", "full"])
def test_recompute_replays_routing_and_counts_load_once(tmp_path, torchrun, oracle_spec, recompute):
    """Against the same model without recompute, on one batch: router loads, stats (drops, rows,
    clones), routing counts, loss and gradients are equal on every rank."""
    spec = oracle_spec(ep=2, dp=2, echo=ECHO, capacity=1.0)
    out = tmp_path / "out.json"
    torchrun(WORKER.with_name("recompute_worker.py"), {"spec": spec, "recompute": recompute, "out": str(out)},
             4, tmp_path)
    tokens_k = spec["budgets"]["seq_len"] * spec["budgets"]["micro_batch"] * spec["model"]["moe"]["top_k"]
    layers = spec["model"]["num_layers"] - spec["model"]["first_dense_layers"]
    for r in json.loads(out.read_text()):
        assert r["regions_without"] == 0 and r["regions"] == (layers if recompute == "moe" else 3), r
        assert r["stats_equal"] and r["counts_equal"] and r["loads_equal"], r
        assert r["load_total"] == layers * tokens_k, r      # each token's K picks counted once per layer
        assert r["no_grad"] == r["no_grad_without"], r
        assert r["loss_diff"] == 0.0 and r["worst_grad_diff"] <= 1e-6, r
