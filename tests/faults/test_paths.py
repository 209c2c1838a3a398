"""Fail early, fail clearly: every output path and the data file are checked before any worker
starts, bad launcher options are errors (never silently replaced), and every CLI error is one
line on stderr, exit 2, no traceback."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from support import build_spec

from echoc import preflight
from echoc.errors import EchocError
from echoc.run import RunRequest, check_launch
from runtime.data import DataError, check_text_file

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def a_file(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    return f


def test_output_under_a_file_is_refused(a_file):
    with pytest.raises(preflight.OutputPathError, match="--metrics's directory .* is a file"):
        preflight.check_output_file(a_file / "m.jsonl", "--metrics")
    with pytest.raises(preflight.OutputPathError, match="train.checkpoint.dir .* is a file, not a directory"):
        preflight.check_output_dir(a_file, "train.checkpoint.dir")
    with pytest.raises(preflight.OutputPathError, match="--record-routing .* is a directory"):
        preflight.check_output_file(a_file.parent, "--record-routing")
    spec = build_spec({"train.checkpoint.dir": str(a_file / "ck")})
    with pytest.raises(preflight.OutputPathError, match="train.checkpoint.dir"):
        preflight.check_outputs(spec, None, None, None)
    with pytest.raises(preflight.OutputPathError, match="--tensorboard"):
        preflight.check_outputs(build_spec(), None, None, str(a_file / "tb"))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_is_refused(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(preflight.OutputPathError, match="not writable"):
        preflight.check_output_file(ro / "m.jsonl", "--metrics")


def test_writable_outputs_pass_and_are_created(tmp_path):
    spec = build_spec({"train.checkpoint.dir": str(tmp_path / "a" / "ck")})
    preflight.check_outputs(spec, str(tmp_path / "b" / "m.jsonl"), str(tmp_path / "r.npz"), str(tmp_path / "tb"))
    assert (tmp_path / "a" / "ck").is_dir() and (tmp_path / "b").is_dir() and not list((tmp_path / "b").iterdir())


@pytest.mark.parametrize("content,why", [(None, "no such file"), ("dir", "is a directory"),
                                         ("dev", r"not a regular file \(a device"),
                                         (b"", "holds 0 bytes"), (b"x" * 65, "holds 65 bytes")])
def test_unusable_data_file_is_refused(tmp_path, content, why):
    p = Path("/dev/null") if content == "dev" else tmp_path / "data.txt"
    if content == "dir":
        p.mkdir()
    elif content not in (None, "dev"):
        p.write_bytes(content)
    with pytest.raises(DataError, match=why):
        check_text_file(p, seq_len=64)
    assert check_text_file(_bytes(tmp_path / "ok.txt", 66), seq_len=64) == 66


def _bytes(p: Path, n: int) -> Path:
    p.write_bytes(b"y" * n)
    return p


@pytest.mark.parametrize("launcher,msg", [
    ({"nproc": 0}, "--nproc must be >= 1"), ({"nproc": -2}, "--nproc must be"),
    ({"max_restarts": -1}, "--max-restarts must be >= 0"),
    ({"nnodes": "abc"}, "--nnodes must be a node count"), ({"nnodes": "0"}, "--nnodes must be"),
    ({"nnodes": "3:1"}, "MIN <= MAX .*'3:1'"), ({"nnodes": "1:2:3"}, "--nnodes must be"),
    ({"nnodes": "2", "rdzv_endpoint": "not a host"}, "--rdzv-endpoint must be HOST:PORT"),
    ({"nnodes": "2", "rdzv_endpoint": "localhost:abc"}, "port in 1..65535 .*'localhost:abc'"),
    ({"nnodes": "2", "rdzv_endpoint": "localhost:99999"}, "--rdzv-endpoint must be"),
    ({"nnodes": "2", "rdzv_endpoint": ":29500"}, "--rdzv-endpoint must be"),
    ({"nnodes": "2", "rdzv_endpoint": "host0"}, "--rdzv-endpoint must be"),
    ({"nnodes": "²"}, "--nnodes must be"), ({"nnodes": "1:\u0661"}, "--nnodes must be"),
    ({"nnodes": "2", "rdzv_endpoint": "host:\u0668\u0660"}, "--rdzv-endpoint must be"),
    ({"nnodes": "2", "rdzv_endpoint": "a:b:80"}, "--rdzv-endpoint must be"),
    ({"nnodes": "2", "rdzv_endpoint": "[nothost]:80"}, "--rdzv-endpoint must be")])
def test_bad_launcher_options_are_errors(launcher, msg):
    with pytest.raises(EchocError, match=msg):
        check_launch(RunRequest(None, None, "m.jsonl", launcher=launcher))


@pytest.mark.parametrize("endpoint", ["host0:29500", "10.0.0.1:1", "node-7.cluster.local:65535", "[::1]:29500"])
def test_good_launcher_endpoints_pass(endpoint):
    check_launch(RunRequest(None, None, "m.jsonl", launcher={"nnodes": "1:4", "rdzv_endpoint": endpoint}))


def echoc(*args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "echoc", *args], capture_output=True, text=True, env=env, timeout=300)


def one_line_error(proc, needle):
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr[-2000:]


@pytest.mark.slow
def test_cli_errors_are_one_line_before_any_worker(tmp_path, a_file):
    tiny = str(ROOT / "specs/tiny.yaml")
    one_line_error(echoc("run", tiny, "--nproc", "0"), "--nproc must be >= 1")
    one_line_error(echoc("run", tiny, "--nproc", "two"), "Invalid value for '--nproc'")
    one_line_error(echoc("run", tiny, "--metrics", str(a_file / "m.jsonl")), "is a file")
    one_line_error(echoc("run", tiny, "--set", f"train.data.path={tmp_path}"), "is a directory")
    one_line_error(echoc("run", tiny, "--resume"), "--resume needs train.checkpoint.dir")
    one_line_error(echoc("run", tiny, "--resume-with-changes"), "needs --resume")
    one_line_error(echoc("compile", tiny, "-o", str(a_file)), "is a file, not a directory")
    assert not list(tmp_path.glob("**/*.distcp"))


def test_an_output_naming_an_input_is_refused_and_the_input_kept(tmp_path):
    spec_file = tmp_path / "spec.yaml"
    spec_file.write_text((ROOT / "specs/tiny.yaml").read_text())
    data = tmp_path / "data.txt"
    data.write_text("hello " * 2000)
    spec = build_spec({"train.data.kind": "text", "train.data.path": str(data)})
    with pytest.raises(preflight.OutputPathError, match="--metrics .* is the spec file"):
        preflight.check_outputs(spec, str(spec_file), None, None, str(spec_file))
    with pytest.raises(preflight.OutputPathError, match=r"--record-routing .* is the training data"):
        preflight.check_outputs(spec, None, str(tmp_path / "." / "data.txt"), None, str(spec_file))
    link = tmp_path / "link.jsonl"
    link.symlink_to(spec_file)
    with pytest.raises(preflight.OutputPathError, match="is the spec file"):
        preflight.check_outputs(spec, str(link), None, None, str(spec_file))
    with pytest.raises(preflight.OutputPathError, match="is the --metrics file"):
        preflight.check_outputs(spec, str(tmp_path / "m.jsonl"), str(tmp_path / "m.jsonl"), None)
    assert spec_file.read_text() == (ROOT / "specs/tiny.yaml").read_text() and data.read_text() == "hello " * 2000


def test_an_existing_file_echoc_did_not_write_is_refused(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    with pytest.raises(preflight.OutputPathError, match="does not hold echoc's JSON lines"):
        preflight.check_output_file(notes, "--metrics", "jsonl")
    with pytest.raises(preflight.OutputPathError, match="does not hold an echoc routing trace"):
        preflight.check_output_file(notes, "--record-routing", "torch")
    assert notes.read_text() == "my notes\n"
    ours = tmp_path / "m.jsonl"
    ours.write_text('{"step": 1}\n')
    preflight.check_output_file(ours, "--metrics", "jsonl")           # an earlier run's metrics: appended to
    (tmp_path / "empty.json").write_bytes(b"")
    preflight.check_output_file(tmp_path / "empty.json", "--out", "json")


def test_a_fifo_or_an_overlong_name_is_refused(tmp_path):
    fifo = tmp_path / "m.fifo"
    os.mkfifo(fifo)
    with pytest.raises(preflight.OutputPathError, match="not a regular file"):
        preflight.check_output_file(fifo, "--metrics", "jsonl")
    long = tmp_path / ("c" * 300) / "m.jsonl"
    with pytest.raises(preflight.OutputPathError, match="--metrics .* cannot be used"):
        preflight.check_output_file(long, "--metrics", "jsonl")
    with pytest.raises(preflight.OutputPathError, match="train.checkpoint.dir .* cannot be used"):
        preflight.check_output_dir(tmp_path / ("c" * 300), "train.checkpoint.dir")


@pytest.mark.slow
def test_simulate_refuses_to_write_over_its_spec(tmp_path):
    spec_file = tmp_path / "tiny.yaml"
    spec_file.write_text((ROOT / "specs/tiny.yaml").read_text())
    one_line_error(echoc("simulate", str(spec_file), "--out", str(spec_file)), "is the spec file")
    assert spec_file.read_text() == (ROOT / "specs/tiny.yaml").read_text()
    one_line_error(echoc("inspect", str(tmp_path / ("c" * 300))), "File name too long")


def test_recording_the_routing_of_an_all_dense_model_is_refused(tmp_path):
    spec = build_spec({"model.first_dense_layers": 2, "model.num_layers": 2})
    with pytest.raises(preflight.OutputPathError, match="every layer of this model is dense"):
        preflight.check_outputs(spec, None, str(tmp_path / "r.pt"), None)


def test_an_existing_output_beside_a_new_one_passes(tmp_path):
    """An earlier run's trace stays writable while this run's metrics file does not exist yet."""
    trace = tmp_path / "routing.pt"
    torch.save({"counts": torch.zeros(1, 1, 1, 1, dtype=torch.int64)}, trace)
    preflight.check_outputs(build_spec(), str(tmp_path / "new" / "m.jsonl"), str(trace), None, str(tmp_path / "x.yaml"))
    preflight.check_output_file(tmp_path / "plot.svg", "--plot", None, {"the --out file": str(tmp_path / "o.json")})
