"""budgets.on_overflow 'rerun' is truly dropless: with a tight capacity and skewed routing, the
overflowed steps are skipped on the device and run again with room for every row, so the run
equals a run whose capacity cannot overflow, step by step (losses) and at the end (every saved
weight and optimizer moment). A 'drop' run at the same tight capacity differs (the test can fail)."""
import json
from pathlib import Path

import pytest
import torch
from support import oracle_spec_dict, run_torchrun
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from runtime.checkpoint_files import latest

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("fault_worker.py")
STEPS = 4


def run(tmp_path: Path, name: str, capacity: float, on_overflow: str) -> tuple[list[dict], dict]:
    spec = oracle_spec_dict(ep=2, capacity=capacity, experts=4, top_k=2, on_overflow=on_overflow)
    spec["train"].update(steps=STEPS, checkpoint={"dir": str(tmp_path / name)})
    out = tmp_path / f"{name}.json"
    run_torchrun(WORKER, {"spec": spec, "out": str(out)}, 2, tmp_path, timeout=300)
    step, d = latest(tmp_path / name)
    assert step == STEPS
    dcp_to_torch_save(d, tmp_path / f"{name}.pt")
    return json.loads(out.read_text())["history"], torch.load(tmp_path / f"{name}.pt")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rerun")
    return {name: run(tmp, name, cap, policy) for name, cap, policy in
            [("rerun", 1.0, "rerun"), ("dropless", 2.0, "drop"), ("drop", 1.0, "drop")]}


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def test_rerun_happened_and_nothing_was_dropped(runs):
    hist, _ = runs["rerun"]
    assert [h["step"] for h in hist] == list(range(STEPS))
    assert sum(h["rerun"] for h in hist) > 0, "no step overflowed: the test proves nothing"
    assert all(h["overflow_before_rerun"] > 0 for h in hist if h["rerun"])
    assert all(h["overflow"] == 0 and h["skipped"] == 0 for h in hist)
    assert all(h["overflow"] == 0 for h in runs["dropless"][0])


def test_rerun_equals_the_dropless_run_step_by_step(runs):
    (rerun, _), (ref, _) = runs["rerun"], runs["dropless"]
    for a, b in zip(rerun, ref):
        assert rel(a["loss"], b["loss"]) < 1e-5, (a["step"], a["loss"], b["loss"])


def test_rerun_ends_with_the_dropless_weights_and_optimizer_state(runs):
    (_, got), (_, want) = runs["rerun"], runs["dropless"]
    assert got.keys() == want.keys()
    for key, w in want.items():
        if isinstance(w, torch.Tensor) and w.is_floating_point():
            err = float((got[key].double() - w.double()).norm() / w.double().norm().clamp(min=1e-30))
            assert err < 1e-6, f"{key}: relative difference {err:.2e}"
        else:
            assert torch.equal(torch.as_tensor(got[key]), torch.as_tensor(w)), key


def test_dropping_at_the_same_capacity_differs(runs):
    """The counter-check: without the rerun the tight capacity drops rows and the losses move."""
    (drop, _), (ref, _) = runs["drop"], runs["dropless"]
    assert sum(h["overflow"] for h in drop) > 0
    assert max(rel(a["loss"], b["loss"]) for a, b in zip(drop, ref)) > 1e-4
