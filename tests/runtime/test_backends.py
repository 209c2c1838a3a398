"""The real-row backends (`symm_mem`, `deepep`) on CPU: their own index arithmetic against
hand-computed cases, and the oracle (loss and every gradient ≤ 1e-5 vs the single-process
reference) with each backend's device collective replaced by a gloo stand-in that follows
the library call's contract (tests/runtime/backend_standins.py)."""
import json
from pathlib import Path

import pytest
import torch

from runtime.backends import deepep, symm_mem

WORKER = Path(__file__).with_name("backend_worker.py")
TOL = 1e-5
BACKENDS = ["symm_mem", "deepep"]


@pytest.fixture
def run_backend(tmp_path, torchrun):
    def run(spec, backend, steps=3, reference_drops=False):
        out = tmp_path / "out.json"
        cfg = {"spec": spec, "backend": backend, "steps": steps, "reference_drops": reference_drops,
               "out": str(out)}
        torchrun(WORKER, cfg, spec["parallel"]["ep"] * spec["parallel"]["dp"], tmp_path)
        return json.loads(out.read_text())
    return run


def assert_matches(result, tol=TOL):
    for s in result["steps"]:
        assert s["loss_rel_err"] <= tol, s
        name, err = s["worst_grad"]
        assert err <= tol, f"step {s['step']}: gradient of {name} off by {err:.2e}"
    assert max(result["worst_grad_by_rank"]) <= tol
