"""echo.clone_domain at run time: with `node` on 2 nodes × 2 ranks (ep 4, 4 gloo processes) the
clone process group is the node, the compiled planner plans for domains of 2 (the arena is sized
for them: a disagreement fails the planned-shape check), clones happen, and the oracle holds."""
import json
from pathlib import Path

import pytest
from support import oracle_spec_dict, run_torchrun

WORKER = Path(__file__).with_name("clone_domain_worker.py")


@pytest.mark.slow
@pytest.mark.parametrize("domain,groups", [("node", [[0, 1], [0, 1], [2, 3], [2, 3]]),
                                           ("cluster", [[0, 1, 2, 3]] * 4)])
def test_clone_group_follows_the_clone_domain_and_the_oracle_holds(tmp_path, domain, groups):
    spec = oracle_spec_dict(ep=4, capacity=4.0, experts=16,
                            echo={"enabled": True, "spare_slots_per_rank": 2, "clone_domain": domain})
    spec["cluster"].update(nodes=2, gpus_per_node=2)
    out = tmp_path / "out.json"
    run_torchrun(WORKER, {"spec": spec, "steps": 3, "out": str(out)}, 4, tmp_path, timeout=300)
    res = json.loads(out.read_text())
    assert res["clone_groups"] == groups
    assert sum(s["clones"] for s in res["steps"]) > 0, "no clone was planned: the test proves nothing"
    assert all(s["dropped"] == 0 and s["loss_rel_err"] <= 1e-5 for s in res["steps"]), res["steps"]
    assert max(res["worst_grad_by_rank"]) <= 1e-5
