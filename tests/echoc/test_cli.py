"""The CLI through typer's test runner (and one real 2-process `echoc run`)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from echoc.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_validate_ok():
    r = runner.invoke(app, ["validate", str(ROOT / "specs/tiny.yaml")])
    assert r.exit_code == 0, r.output
    assert "ok" in r.output and "receive buffer" in r.output


def test_bad_spec_exits_2_without_traceback(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((ROOT / "specs/tiny.yaml").read_text().replace("top_k: 2", "top_k: 20"))
    proc = subprocess.run([sys.executable, "-m", "echoc", "validate", str(bad)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "model.moe.top_k" in proc.stderr and "Traceback" not in proc.stderr


def test_set_override_is_validated():
    proc = subprocess.run([sys.executable, "-m", "echoc", "validate", str(ROOT / "specs/tiny.yaml"),
                           "--set", "parallel.ep=3"], capture_output=True, text=True)
    assert proc.returncode == 2 and "parallel" in proc.stderr and "Traceback" not in proc.stderr


def test_schema_is_json():
    r = runner.invoke(app, ["schema"])
    assert r.exit_code == 0
    assert "model" in json.loads(r.output)["properties"]


def test_compile_and_inspect(tmp_path):
    out = tmp_path / "b"
    r = runner.invoke(app, ["compile", str(ROOT / "specs/tiny.yaml"), "-o", str(out)])
    assert r.exit_code == 0, r.output
    for f in ("graph.txt", "graph.py", "summary.json"):
        assert (out / f).exists()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["moe_layers"] == 2 and summary["experts"] == 8
    r = runner.invoke(app, ["inspect", str(out)])
    assert r.exit_code == 0 and "receive buffer" in r.output
    r = runner.invoke(app, ["inspect", str(out), "--graph", "--filter", "echo.dispatch"])
    assert r.exit_code == 0 and r.output.count("echo.dispatch") == 2


def test_an_all_dense_model_prints_no_moe_machinery(tmp_path):
    """first_dense_layers = num_layers: no dispatch, no receive buffer, no ECHO advice."""
    r = runner.invoke(app, ["compile", str(ROOT / "specs/tiny.yaml"), "-o", str(tmp_path / "b"),
                            "--set", "model.first_dense_layers=3"])
    assert r.exit_code == 0, r.output
    assert "none (no MoE layer)" in r.output and "receive buffer" not in r.output and "ECHO" not in r.output


def test_inspect_missing_dir_is_a_user_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "echoc", "inspect", str(tmp_path / "nope")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "echoc compile" in proc.stderr


@pytest.mark.slow
def test_run_two_processes_loss_goes_down(tmp_path):
    metrics = tmp_path / "m.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "echoc", "run", str(ROOT / "specs/tiny.yaml"), "--nproc", "2",
                           "--metrics", str(metrics), "--set", "train.steps=12", "--set", "train.log_interval=1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [json.loads(line)["loss"] for line in metrics.read_text().splitlines()]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < losses[0] - 0.5, losses


@pytest.mark.slow
def test_overflow_error_names_layer_rank_and_count(tmp_path):
    """capacity 1.0 with on_overflow error: the run stops with the layer, rank and count, exit 2."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "echoc", "run", str(ROOT / "specs/tiny.yaml"), "--nproc", "2",
                           "--metrics", str(tmp_path / "m.jsonl"),
                           "--set", "budgets.received_token_capacity=1.0", "--set", "budgets.on_overflow=error",
                           "--set", "train.steps=20", "--set", "budgets.row_alignment=1"],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr
    assert "did not fit layer layers." in err and "token copies from rank" in err, err[-2000:]
    assert "Traceback" not in err


def test_inspect_buffers_and_filtered_graph(tmp_path):
    out = tmp_path / "b"
    assert runner.invoke(app, ["compile", str(ROOT / "specs/tiny.yaml"), "-o", str(out)]).exit_code == 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["planned"] and plan["totals"]["arena_bytes"] >= plan["totals"]["lower_bound_bytes"]
    r = runner.invoke(app, ["inspect", str(out), "--buffers", "--sort", "layer"])
    assert r.exit_code == 0 and "lower bound" in r.output
    r = runner.invoke(app, ["inspect", str(out), "--graph", "--layer", "2", "--op", "echo.combine"])
    assert r.exit_code == 0 and "layers_2_mlp_combine" in r.output and "layers_1_mlp" not in r.output


def test_missing_plot_extra_names_the_install(tmp_path, monkeypatch):
    """matplotlib is hidden (sys.modules entry None makes its import fail), installed or not."""
    from echoc.errors import MissingDependencyError
    out = tmp_path / "b"
    assert runner.invoke(app, ["compile", str(ROOT / "specs/tiny.yaml"), "-o", str(out)]).exit_code == 0
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)
    r = runner.invoke(app, ["inspect", str(out), "--timeline", str(tmp_path / "t.png")])
    assert isinstance(r.exception, MissingDependencyError)
    assert "echoc[plot]" in str(r.exception) and not (tmp_path / "t.png").exists()


def _run(args, tmp_path, name, steps=10, spec=True):
    metrics = tmp_path / f"{name}.jsonl"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    target = [str(ROOT / "specs/tiny.yaml"), "--set", f"train.steps={steps}", "--set", "train.log_interval=1"]
    proc = subprocess.run([sys.executable, "-m", "echoc", "run", "--nproc", "2", "--metrics", str(metrics)]
                          + (target if spec else []) + args,
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    by_step = {}
    for line in metrics.read_text().splitlines():  # a restarted run rewrites later steps
        m = json.loads(line)
        by_step[m["step"]] = m["loss"]
    return [by_step[s] for s in sorted(by_step)]


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_losses(tmp_path):
    full = _run([], tmp_path, "full")
    ck = ["--set", f"train.checkpoint.dir={tmp_path / 'ck'}", "--set", "train.checkpoint.interval=3"]
    first = _run(ck, tmp_path, "first", steps=6)
    # train.steps 6 → 10 is a change of the spec: safe, but only accepted when asked for
    resumed = _run(ck + ["--resume", "--resume-with-changes"], tmp_path, "resumed")
    assert first + resumed == full  # bitwise: same seed, data a function of the step


@pytest.mark.slow
def test_tensorboard_events_are_written(tmp_path):
    pytest.importorskip("tensorboard", reason="optional package tensorboard is not installed")
    _run(["--tensorboard", str(tmp_path / "tb")], tmp_path, "tb", steps=2)
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


@pytest.mark.slow
def test_run_from_build_equals_run_from_spec(tmp_path):
    """`echoc run --from-build` executes the compiled build: same losses as running the spec."""
    out = tmp_path / "b"
    spec_args = [str(ROOT / "specs/tiny.yaml"), "-o", str(out), "--set", "train.steps=4", "--set", "train.log_interval=1"]
    assert runner.invoke(app, ["compile"] + spec_args).exit_code == 0
    from_build = _run(["--from-build", str(out)], tmp_path, "build", spec=False)
    assert from_build == _run([], tmp_path, "spec", steps=4) and len(from_build) == 4


def test_spec_and_from_build_together_is_an_error(tmp_path):
    r = runner.invoke(app, ["run", str(ROOT / "specs/tiny.yaml"), "--from-build", str(tmp_path)])
    assert r.exit_code != 0 and "not both" in str(r.exception)


def _cli_error(*args) -> str:
    """Run the CLI (its own process, as users do): exit 2, one line on stderr, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "echoc", *args], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("damage,needle", [
    (lambda b: (b / "summary.json").write_text('{"x":'), "summary.json is not valid JSON"),
    (lambda b: (b / "summary.json").write_text("[1, 2]"), "expected a JSON object"),
    (lambda b: (b / "summary.json").write_text("{}"), "lists no file hashes"),
    (lambda b: (b / "plan.json").unlink(), "no plan.json here"),
    (lambda b: (b / "graph.txt").write_text("edited"), "graph.txt was changed after `echoc compile`")])
def test_inspect_of_a_damaged_build_names_the_file(tmp_path, damage, needle):
    out = tmp_path / "b"
    assert runner.invoke(app, ["compile", str(ROOT / "specs/tiny.yaml"), "-o", str(out)]).exit_code == 0
    damage(out)
    assert needle in _cli_error("inspect", str(out), "--buffers")


def test_inspect_options_that_select_nothing_are_errors(tmp_path):
    out = tmp_path / "b"
    assert runner.invoke(app, ["compile", str(ROOT / "specs/tiny.yaml"), "-o", str(out)]).exit_code == 0
    assert "no line of the graph listing matches --layer '99'" in _cli_error("inspect", str(out), "--graph",
                                                                               "--layer", "99")
    assert "--limit must be a positive" in _cli_error("inspect", str(out), "--buffers", "--limit", "-1")
    assert "add --graph" in _cli_error("inspect", str(out), "--filter", "x")


def test_outputs_are_checked_before_anything_is_written(tmp_path):
    """compile never overwrites files some other program wrote; simulate checks --out first."""
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "summary.json").write_text("my notes")
    assert "holds summary.json that no `echoc compile` wrote" in _cli_error("compile", str(ROOT / "specs/tiny.yaml"),
                                                                           "-o", str(foreign))
    assert (foreign / "summary.json").read_text() == "my notes" and len(list(foreign.iterdir())) == 1
    assert "-o is empty" in _cli_error("compile", str(ROOT / "specs/tiny.yaml"), "-o", "")
    cut = tmp_path / "cut"                    # a compile cut short: its stub summary, one file written
    cut.mkdir()
    (cut / "summary.json").write_text('{"spec_hash": "x", "complete": false}')
    (cut / "graph.txt").write_text("partial")
    assert "a compile cut short" in _cli_error("inspect", str(cut))
    assert runner.invoke(app, ["compile", str(ROOT / "specs/tiny.yaml"), "-o", str(cut)]).exit_code == 0
    assert "--out" in _cli_error("simulate", str(ROOT / "specs/tiny.yaml"), "--skew", "zipf:1.2", "--steps", "2",
                                 "--out", str(tmp_path))
