"""Checkpoints you can trust: a damaged checkpoint is reported and the one before it resumes; a
changed spec is refused (safe changes need --resume-with-changes); step labels stay real; no
NaN/inf state is ever saved; pruning never deletes the newest whole checkpoint."""
import json
import os
from pathlib import Path

import pytest
from support import build_spec, oracle_spec_dict, run_torchrun

from echoc import preflight
from runtime import checkpoint_files as files
from runtime.checkpoint import check_fresh_dir

WORKER = Path(__file__).with_name("fault_worker.py")


def make_ckpt(root: Path, step: int, spec=None, size: int = 64) -> Path:
    """A published checkpoint with two files and a real COMPLETE marker."""
    d = files.step_dir(root, step)
    d.mkdir(parents=True)
    for name in (".metadata", "__0_0.distcp"):
        (d / name).write_bytes(bytes(range(256))[:size] * (step + 1))
    digests = {p.name: files.file_digest(p) for p in d.iterdir()}
    marker = files.marker_json(step, spec or build_spec(), digests, {"ep": 2, "dp": 1, "world": 2})
    (d / files.COMPLETE).write_text(json.dumps(marker))
    return d


def flip_byte(path: Path, at: int = 10) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_damage_finds_flipped_truncated_and_missing_files(tmp_path):
    good, flipped, short, gone = (make_ckpt(tmp_path, s) for s in (1, 2, 3, 4))
    flip_byte(flipped / "__0_0.distcp")
    (short / "__0_0.distcp").write_bytes(b"x")
    (gone / ".metadata").unlink()
    assert files.damage(good) is None
    assert "checksum" in files.damage(flipped) and files.damage(flipped, hash_files=False) is None
    assert "bytes" in files.damage(short, hash_files=False)
    assert "missing" in files.damage(gone, hash_files=False)
    (good / files.COMPLETE).write_text("{}")
    assert "older echoc" in files.damage(good)


def test_pruning_never_deletes_the_newest_whole_checkpoint(tmp_path):
    for s in (2, 4, 6, 8):
        make_ckpt(tmp_path, s)
    for s in (6, 8):  # the two newest are damaged after they were written
        (files.step_dir(tmp_path, s) / ".metadata").write_bytes(b"")
    files.keep_last(tmp_path, 1)
    assert [s for s, _ in files.complete_steps(tmp_path)] == [4, 6, 8]


def test_changed_spec_is_refused_naming_the_fields(tmp_path):
    d = make_ckpt(tmp_path, 4)
    marker = files.read_marker(d)
    changed = build_spec({"model.num_layers": 2, "train.seed": 7})
    with pytest.raises(files.CheckpointMismatchError, match=r"model\.num_layers: 3 → 2.*train\.seed: 0 → 7"):
        files.check_spec(d, marker, changed, allow_changes=True)
    safe = build_spec({"train.steps": 40, "train.optimizer.lr": 1e-3})
    with pytest.raises(files.CheckpointMismatchError, match="--resume-with-changes"):
        files.check_spec(d, marker, safe, allow_changes=False)
    assert files.check_spec(d, marker, safe, allow_changes=True) == ["train.optimizer.lr: 0.003 → 0.001",
                                                                     "train.steps: 30 → 40"]
    assert files.check_spec(d, marker, build_spec(), allow_changes=False) == []


def test_a_checkpoint_from_before_a_new_spec_field_resumes_with_its_default(tmp_path):
    """backends.exchange did not exist when older checkpoints were written: their spec reads as
    the default, so resuming one is no change at all; switching the exchange is a safe change."""
    d = make_ckpt(tmp_path, 4)
    marker = files.read_marker(d)
    del marker.spec["backends"]["exchange"]
    assert files.check_spec(d, marker, build_spec(), allow_changes=False) == []
    moved = build_spec({"backends.exchange": "nccl"})
    assert files.check_spec(d, marker, moved, allow_changes=True) == ["backends.exchange: 'auto' → 'nccl'"]
    with pytest.raises(files.CheckpointMismatchError, match="--resume-with-changes"):
        files.check_spec(d, marker, moved, allow_changes=False)


def test_a_checkpoint_from_before_wgrad_overlap_resumes_and_the_streams_may_change(tmp_path):
    """backends.wgrad_overlap is new: an older checkpoint reads as its default; turning it, or the
    shared expert's stream, off is a safe change (same kernels, same numbers)."""
    d = make_ckpt(tmp_path, 4)
    marker = files.read_marker(d)
    del marker.spec["backends"]["wgrad_overlap"]
    assert files.check_spec(d, marker, build_spec(), allow_changes=False) == []
    off = build_spec({"backends.wgrad_overlap": False, "backends.shared_expert_overlap": False})
    assert files.check_spec(d, marker, off, allow_changes=True) == ["backends.shared_expert_overlap: True → False",
                                                                    "backends.wgrad_overlap: True → False"]
    with pytest.raises(files.CheckpointMismatchError, match="--resume-with-changes"):
        files.check_spec(d, marker, off, allow_changes=False)


def test_resume_with_steps_at_or_below_the_checkpoint_is_refused(tmp_path):
    d = make_ckpt(tmp_path, 8)
    with pytest.raises(files.CheckpointError, match="nothing is left to train"):
        files.check_steps(d, 8, 5)
    with pytest.raises(files.CheckpointError, match="nothing is left to train"):
        files.check_steps(d, 8, 8)
    files.check_steps(d, 8, 9)


def test_preflight_resume_rules(tmp_path):
    spec = build_spec({"train.checkpoint.dir": str(tmp_path / "ck")})
    with pytest.raises(files.CheckpointError, match="no whole checkpoint"):
        preflight.check_resume(spec, "must", False)
    assert preflight.check_resume(spec, "or_start", False) is None
    assert preflight.check_resume(spec, "no", False) is None
    make_ckpt(tmp_path / "ck", 4, spec)
    make_ckpt(tmp_path / "ck", 6, spec)
    flip_byte(files.step_dir(tmp_path / "ck", 6) / ".metadata")   # found by the workers' hashing
    (files.step_dir(tmp_path / "ck", 6) / "__0_0.distcp").unlink()  # found here already
    assert "step_00000004" in preflight.check_resume(spec, "must", False)
    with pytest.raises(files.CheckpointError, match="already holds checkpoints"):
        check_fresh_dir(tmp_path / "ck")
    with pytest.raises(files.CheckpointError, match="needs train.checkpoint.dir"):
        preflight.check_resume(build_spec(), "must", False)
    (files.step_dir(tmp_path / "ck", 4) / "__0_0.distcp").unlink()   # now none is whole: say why
    with pytest.raises(files.CheckpointError, match=r"no whole checkpoint .*\(damaged: step_00000004: .*__0_0.distcp"
                                                    r".*; step_00000006: "):
        preflight.check_resume(spec, "must", False)


@pytest.mark.parametrize("edit", [
    lambda m: m.pop("files"), lambda m: m.update(files=[]), lambda m: m.update(files={"abc": "abc"}),
    lambda m: m.update(step="six"), lambda m: m.pop("ep"), lambda m: m.update(spec=[1]),
    lambda m: m.update(files={"../x": [1, "0" * 64]})])
def test_a_malformed_marker_is_damage_not_a_traceback(tmp_path, edit):
    older, newer = make_ckpt(tmp_path, 2), make_ckpt(tmp_path, 4)
    marker = json.loads((newer / files.COMPLETE).read_text())
    edit(marker)
    (newer / files.COMPLETE).write_text(json.dumps(marker))
    found, damaged = files.newest_whole(tmp_path)
    assert found == (2, older) and len(damaged) == 1 and "step_00000004: its COMPLETE marker is malformed" in damaged[0]


def test_a_renamed_checkpoint_is_damage(tmp_path):
    make_ckpt(tmp_path, 2)
    make_ckpt(tmp_path, 6).rename(files.step_dir(tmp_path, 10))
    found, damaged = files.newest_whole(tmp_path)
    assert found[0] == 2 and "says step 6" in damaged[0]


def launch(tmp_path, spec, name, expect_ok=True, **cfg):
    out = tmp_path / f"{name}.json"
    proc = run_torchrun(WORKER, {"spec": spec, "out": str(out), **cfg}, 2, tmp_path, timeout=300, check=expect_ok)
    return json.loads(out.read_text()), proc


def ckpt_spec(tmp_path, steps, **train):
    spec = oracle_spec_dict(ep=2, capacity=2.0)
    spec["train"].update(steps=steps, checkpoint={"dir": str(tmp_path / "ck"), "interval": 2}, **train)
    return spec


@pytest.mark.slow
def test_corrupt_newest_checkpoint_is_set_aside_and_the_previous_one_resumes(tmp_path):
    first, _ = launch(tmp_path, ckpt_spec(tmp_path, 4), "first")
    newest = files.step_dir(tmp_path / "ck", 4)
    flip_byte(newest / "__1_0.distcp", at=200)
    second, proc = launch(tmp_path, ckpt_spec(tmp_path, 6), "second", resume="must", with_changes=True)
    assert "is damaged" in proc.stderr and "does not match its checksum" in proc.stderr
    assert [h["step"] for h in second["history"]] == [2, 3, 4, 5]   # resumed from step 2
    assert [h["loss"] for h in second["history"][:2]] == [h["loss"] for h in first["history"][2:]]
    assert newest.with_name(newest.name + ".damaged").is_dir()
    assert [s for s, _ in files.complete_steps(tmp_path / "ck")] == [2, 4, 6]


@pytest.mark.slow
def test_nan_loss_stops_the_run_naming_the_step_and_saves_nothing_after_it(tmp_path):
    spec = ckpt_spec(tmp_path, 6, on_nonfinite="stop")
    spec["train"]["checkpoint"]["interval"] = 1
    res, proc = launch(tmp_path, spec, "nan", expect_ok=False, faults=[{"kind": "nan_loss", "at": 2}])
    assert proc.returncode != 0
    assert res["error"].startswith("NonFiniteError: step 2: the loss or gradient norm is NaN/inf")
    assert files.latest(tmp_path / "ck")[0] == 2   # steps 0 and 1; step 2's update never saved


@pytest.mark.slow
def test_nan_loss_with_skip_is_counted_and_training_goes_on(tmp_path):
    res, _ = launch(tmp_path, ckpt_spec(tmp_path, 5, on_nonfinite="skip"), "skip",
                    faults=[{"kind": "nan_loss", "at": 2}])
    flags = [(h["nonfinite"], h["skipped"]) for h in res["history"]]
    assert flags == [(0, 0), (0, 0), (1, 1), (0, 0), (0, 0)]
    assert all(h["loss"] == h["loss"] for i, h in enumerate(res["history"]) if i != 2)  # finite again
    assert files.latest(tmp_path / "ck")[0] == 5


@pytest.mark.slow
def test_nan_weights_are_never_saved(tmp_path):
    """A state poisoned outside the step (the guard cannot undo it): the save refuses, the last
    good checkpoint stays the newest."""
    spec = ckpt_spec(tmp_path, 6, on_nonfinite="skip")
    spec["train"]["checkpoint"]["interval"] = 1
    res, _ = launch(tmp_path, spec, "poison", expect_ok=False, faults=[{"kind": "nan_weight", "at": 2}])
    assert res["error"].startswith("CheckpointError: step 2 not saved") and "NaN/inf" in res["error"]
    assert files.latest(tmp_path / "ck")[0] == 1


@pytest.mark.slow
def test_a_save_the_disk_refuses_is_one_error_on_every_rank_keeping_the_older_checkpoints(tmp_path):
    res, proc = launch(tmp_path, ckpt_spec(tmp_path, 8), "full", expect_ok=False,
                       faults=[{"kind": "disk_full", "rank": 0, "at": 3}])
    assert proc.returncode != 0 and proc.stderr.count("CheckpointError: cannot write") == 2, proc.stderr[-3000:]
    for out in (tmp_path / "full.json", tmp_path / "full.json.rank1"):
        error = json.loads(out.read_text())["error"]
        assert error.startswith("CheckpointError: cannot write the checkpoint of step 4") and \
            "No space left on device" in error and "the newest whole one is step_00000002" in error, error
    assert [s for s, _ in files.complete_steps(tmp_path / "ck")] == [2]


def test_one_run_a_checkpoint_directory(tmp_path):
    held = files.lock_dir(tmp_path)
    assert held is not None
    with pytest.raises(files.CheckpointError, match=rf"is in use by another run \(pid {os.getpid()} on "):
        files.check_unlocked(tmp_path)
    spec = build_spec({"train.checkpoint.dir": str(tmp_path)})
    with pytest.raises(files.CheckpointError, match="in use by another run"):
        preflight.check_resume(spec, "no", False)
    held.close()                                   # the run ended: the directory is free again
    preflight.check_resume(spec, "no", False)
    assert files.complete_steps(tmp_path) == []    # the lock file is no checkpoint
