"""Checkpoint / resume (runtime/checkpoint.py) on gloo, CPU, fp32: resuming is bitwise invisible.

The distributed cases launch real torchrun processes running tests/runtime/ckpt_worker.py;
the elastic case lets torchrun itself restart the job after one rank is SIGKILLed.
"""
import json
from pathlib import Path

import pytest
import torch
from support import build_spec, oracle_spec_dict, run_torchrun

from runtime import checkpoint
from runtime.checkpoint_files import file_digest, marker_json

WORKER = Path(__file__).with_name("ckpt_worker.py")
STEPS = 8


def spec(ep=2, dp=1):
    s = oracle_spec_dict(ep=ep, dp=dp, capacity=float(ep))
    s["train"]["optimizer"]["warmup_steps"] = 3  # the lr changes across the resume point
    return s


def launch(tmp_path, cfg, nproc, *torchrun_args):
    return run_torchrun(WORKER, cfg, nproc, tmp_path, *torchrun_args, timeout=180)


def roundtrip(tmp_path, s):
    out = tmp_path / "out.json"
    cfg = {"mode": "roundtrip", "spec": s, "steps": STEPS, "save_at": 3,
           "ckpt_dir": str(tmp_path / "ckpt"), "out": str(out)}
    launch(tmp_path, cfg, s["parallel"]["ep"] * s["parallel"]["dp"])
    return json.loads(out.read_text())


@pytest.fixture(scope="module")
def roundtrip_ep2(tmp_path_factory):
    return roundtrip(tmp_path_factory.mktemp("roundtrip_ep2"), spec(ep=2))


def check_roundtrip(res):
    assert res["start"] == 3
    assert res["mismatches"] == [[]] * len(res["mismatches"]), res["mismatches"]


@pytest.mark.slow
def test_fresh_trainer_resumes_bitwise_ep2(roundtrip_ep2):
    check_roundtrip(roundtrip_ep2)
    assert roundtrip_ep2["step_devices"] == ["cpu"]
    assert roundtrip_ep2["losses_b"] == roundtrip_ep2["losses_a"][3:]  # exact: bitwise on CPU fp32


@pytest.mark.slow
def test_fresh_trainer_resumes_bitwise_ep2_dp2(tmp_path):
    res = roundtrip(tmp_path, spec(ep=2, dp=2))
    check_roundtrip(res)
    assert res["losses_b"] == res["losses_a"][3:]


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available(), reason="capturable AdamW needs CUDA")
def test_capturable_adamw_state_resumes_on_gpu(tmp_path):
    """Capturable AdamW keeps its step counters on the device; after a load they must be there too
    (its next step asserts so) and hold the saved values."""
    s = spec(ep=min(2, torch.cuda.device_count()))
    s["cluster"]["device"] = "cuda"
    s["model"]["dtype"] = "bfloat16"  # grouped_mm's dtype
    res = roundtrip(tmp_path, s)
    check_roundtrip(res)
    assert res["step_devices"] == ["cuda:0"]
    assert res["losses_b"] == pytest.approx(res["losses_a"][3:], rel=1e-3)  # GPU kernels need not be bitwise


@pytest.mark.slow
def test_save_cut_before_publish_is_never_latest(roundtrip_ep2):
    res = roundtrip_ep2
    assert res["torn"]["tmp_exists"], "the torn save left nothing: the test proves nothing"
    assert res["torn"]["latest"] == 3
    assert res["after"] == STEPS
    assert res["kept"], "saving a step that is already whole must leave that checkpoint alone"
    assert res["left"] == [f"step_{STEPS:08d}"]  # keep_last(1) pruned step 3; no .tmp remains


def train_cfg(tmp_path, **kw):
    return {"mode": "train", "spec": spec(), "steps": STEPS, "losses": str(tmp_path / "losses.json"),
            "attempts": str(tmp_path / "attempts.jsonl"), **kw}


def read_run(tmp_path):
    losses = json.loads((tmp_path / "losses.json").read_text())
    attempts = [json.loads(line) for line in (tmp_path / "attempts.jsonl").read_text().splitlines()]
    return [losses[str(s)] for s in range(len(losses))], attempts


@pytest.mark.slow
def test_sigkill_and_elastic_restart_give_the_uninterrupted_losses(tmp_path, roundtrip_ep2):
    ckpt = tmp_path / "ckpt"
    cfg = train_cfg(tmp_path, ckpt_dir=str(ckpt), interval=2, kill={"rank": 1, "step": 5, "signal": "SIGKILL"})
    launch(tmp_path, cfg, 2, "--max-restarts=1")
    losses, attempts = read_run(tmp_path)
    # attempt 0 died in step 5 and wrote no record; attempt 1 resumed from the step-4 checkpoint
    assert attempts == [[1, 4, None]], attempts
    assert losses == roundtrip_ep2["losses_a"]
    assert [s for s, _ in checkpoint.complete_steps(ckpt)] == [6, 8]  # keep_last(2)


@pytest.mark.slow
def test_sigterm_on_one_rank_saves_and_stops_then_resume(tmp_path, roundtrip_ep2):
    ckpt = tmp_path / "ckpt"
    # interval 3: the SIGTERM save falls on the step just saved by the interval
    cfg = train_cfg(tmp_path, ckpt_dir=str(ckpt), interval=3, kill={"rank": 1, "step": 2, "signal": "SIGTERM"})
    launch(tmp_path, cfg, 2)
    assert checkpoint.latest(ckpt)[0] == 3  # both ranks agreed to stop after step 2
    launch(tmp_path, cfg, 2)
    losses, attempts = read_run(tmp_path)
    assert attempts == [[0, 0, 3], [0, 3, None]]
    assert losses == roundtrip_ep2["losses_a"]


def make_step(root: Path, step: int, complete: bool, suffix: str = "") -> Path:
    """A checkpoint directory with one file and, when complete, a real COMPLETE marker."""
    d = root / f"step_{step:08d}{suffix}"
    d.mkdir(parents=True)
    (d / ".metadata").write_bytes(b"x" * (step + 1))
    if complete:
        files = {".metadata": file_digest(d / ".metadata")}
        marker = marker_json(step, build_spec(), files, {"ep": 2, "dp": 1, "world": 2})
        (d / checkpoint.COMPLETE).write_text(json.dumps(marker))
    return d


def test_latest_ignores_tmp_and_unmarked_directories(tmp_path):
    assert checkpoint.latest(tmp_path / "absent") is None
    assert checkpoint.latest(tmp_path) is None
    make_step(tmp_path, 2, complete=True)
    make_step(tmp_path, 4, complete=True)
    make_step(tmp_path, 6, complete=False)              # renamed but unmarked: not ours
    make_step(tmp_path, 8, complete=True, suffix=".tmp")  # marker written, rename not yet done
    make_step(tmp_path, 9, complete=False, suffix=".tmp")
    (tmp_path / "step_00000010").write_text("a file")   # not a directory
    make_step(tmp_path, 12, complete=True, suffix=".deleting")
    assert checkpoint.latest(tmp_path) == (4, tmp_path / "step_00000004")


def test_keep_last_prunes_old_whole_checkpoints_and_stale_tmp(tmp_path):
    for s in (2, 4, 6):
        make_step(tmp_path, s, complete=True)
    make_step(tmp_path, 3, complete=False, suffix=".tmp")  # older than the newest: stale
    make_step(tmp_path, 8, complete=False, suffix=".tmp")  # newer: a save may be under way
    checkpoint.keep_last(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000004", "step_00000006",
                                                          "step_00000008.tmp"]
    with pytest.raises(AssertionError):
        checkpoint.keep_last(tmp_path, 0)
