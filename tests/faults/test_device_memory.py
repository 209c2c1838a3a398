"""The plan against the GPU it runs on (echoc/device_memory.py): a plan larger than the device's
free memory is refused before the first step, and a CUDA out-of-memory error during the run is
one line that names what the plan needed (no traceback, exit 2)."""
import json
from pathlib import Path

import pytest
import torch
from support import oracle_spec_dict, run_torchrun

from echoc import device_memory as dm
from echoc.errors import EchocError
from echoc.memory_model import HELPFUL_FIELDS

WORKER = Path(__file__).with_name("fault_worker.py")
GIB = 2**30


def test_a_plan_over_the_free_memory_is_refused_naming_both_sizes():
    dev = dm.DeviceMemory(rank=3, device="cuda:3", free=int(20.5 * GIB), total=int(139.8 * GIB))
    assert dm.shortfall(int(19 * GIB), int(20 * GIB), dev, "loss") is None
    # the peak alone would fit; with the allocator's headroom on it the plan does not
    assert dm.shortfall(int(20 * GIB), int(21 * GIB), dev, "loss") is not None
    why = dm.shortfall(int(54.07 * GIB), int(62.18 * GIB), dev, "gradient reduction")
    assert why is not None and "\n" not in why
    for text in ("rank 3", "cuda:3", "needs 62.18 GiB", "peak of 54.07 GiB", "gradient reduction",
                 "20.50 GiB free of 139.80 GiB", "119.30 GiB held by other processes"):
        assert text in why, text
    assert all(f in why for f in HELPFUL_FIELDS)


def test_cpu_runs_are_not_checked():
    assert dm.check_fits({"peak_bytes": 10**15, "peak_phase": "loss"}, torch.device("cpu")) is None


def test_out_of_memory_becomes_one_actionable_line():
    err = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB.\nlong allocator dump")
    dev = dm.DeviceMemory(rank=1, device="cuda:1", free=int(30 * GIB), total=int(80 * GIB))
    out = dm.explain_oom(err, {"peak_bytes": int(25 * GIB)}, dev)
    msg = str(out)
    assert isinstance(out, EchocError) and "\n" not in msg
    assert "rank 1 ran out of GPU memory (CUDA out of memory. Tried to allocate 2.00 GiB.)" in msg
    assert "25.00 GiB per rank" in msg and "30.00 GiB of 80.00 GiB was free on cuda:1" in msg


@pytest.mark.slow
def test_out_of_memory_during_the_run_ends_it_with_that_line_on_every_rank(tmp_path):
    """The real worker under torchrun (gloo): an OOM raised in step 2 on both ranks exits 2 with
    DeviceMemoryError, not a traceback."""
    spec = oracle_spec_dict(ep=2)
    spec["train"]["steps"] = 4
    out = tmp_path / "out.json"
    proc = run_torchrun(WORKER, {"spec": spec, "out": str(out), "faults": [{"kind": "oom", "at": 2}]}, 2,
                        tmp_path, timeout=300, check=False)
    assert proc.returncode != 0
    res = json.loads(out.read_text())
    assert res["error"].startswith("DeviceMemoryError: rank 0 ran out of GPU memory (CUDA out of memory. Tried"), \
        res["error"]
    assert "DeviceMemoryError: rank 1 ran out of GPU memory" in proc.stderr     # each rank says it, one line


def test_workers_get_expandable_segments_unless_the_user_chose_an_allocator_config():
    """The allocator headroom the plan counts on was measured with expandable segments."""
    from runtime.launch import worker_env_defaults
    env = {}
    worker_env_defaults(env, 2)
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    for key, value in (("PYTORCH_CUDA_ALLOC_CONF", "max_split_size_mb:128"), ("PYTORCH_ALLOC_CONF", "x:1"),
                       ("PYTORCH_CUDA_ALLOC_CONF", "")):                  # set empty: the user's choice too
        mine = {key: value}
        worker_env_defaults(mine, 2)
        assert mine[key] == value and (key == "PYTORCH_CUDA_ALLOC_CONF" or "PYTORCH_CUDA_ALLOC_CONF" not in mine)


def test_a_worker_started_by_hand_turns_expandable_segments_on_itself(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda.memory, "_set_allocator_settings", calls.append)
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    monkeypatch.delenv("PYTORCH_ALLOC_CONF", raising=False)
    assert dm.expandable_segments(torch.device("cpu")) is None and calls == []
    assert dm.expandable_segments(torch.device("cuda", 0)) is None and calls == ["expandable_segments:True"]
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "max_split_size_mb:64")        # the user's choice stands ...
    warning = dm.expandable_segments(torch.device("cuda", 0))
    assert len(calls) == 1 and "expandable segments off" in warning         # ... with a warning
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:True,max_split_size_mb:64")
    assert dm.expandable_segments(torch.device("cuda", 0)) is None and len(calls) == 1
