"""No silent hangs: a stopped rank ends the run within train.collective_timeout_s with its name;
a rendezvous that never completes names the endpoint; an absent rank is named at start; killing
the launcher stops its workers (which save on the way out); a killed rank ends the run."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import oracle_spec_dict, run_torchrun

from runtime.checkpoint_files import latest

pytestmark = pytest.mark.slow
WORKER = Path(__file__).with_name("fault_worker.py")
ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 4


def spec(steps=6, **train):
    s = oracle_spec_dict(ep=2, capacity=2.0)
    s["train"].update(steps=steps, collective_timeout_s=TIMEOUT_S, **train)
    return s


def launch(tmp_path, s, nproc=2, **cfg):
    out = tmp_path / "out.json"
    t0 = time.monotonic()
    proc = run_torchrun(WORKER, {"spec": s, "out": str(out), **cfg}, nproc, tmp_path, timeout=240, check=False)
    return proc, time.monotonic() - t0, out


@pytest.mark.parametrize("victim,named", [(1, "not answering: rank 1 ("), (0, "rank 0 is stopped")])
def test_stopped_rank_ends_the_run_naming_it(tmp_path, victim, named):
    proc, seconds, out = launch(tmp_path, spec(), faults=[{"kind": "signal", "signal": "SIGSTOP",
                                                          "rank": victim, "at": 2}])
    assert proc.returncode != 0
    survivor = out if victim != 0 else out.with_name("out.json.rank1")
    error = json.loads(survivor.read_text())["error"]
    assert error.startswith("CollectiveTimeoutError") and named in error, error
    assert f"collective_timeout_s = {TIMEOUT_S} s" in error
    assert seconds < 90  # the timeout, the roll call, torchrun's 30 s grace for a stopped process


def test_killed_rank_ends_the_run(tmp_path):
    proc, seconds, _ = launch(tmp_path, spec(), faults=[{"kind": "signal", "signal": "SIGKILL", "rank": 1, "at": 2}])
    assert proc.returncode != 0 and "SIGKILL" in proc.stderr
    assert seconds < 60


def test_absent_rank_is_named_at_start(tmp_path):
    proc, _, out = launch(tmp_path, spec(), nproc=1)
    assert proc.returncode != 0
    assert "torchrun started 1 processes but the spec's cluster has 2" in json.loads(out.read_text())["error"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def echoc_run(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "echoc", "run", str(ROOT / "specs/tiny.yaml"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, **kw)


def test_rendezvous_that_never_completes_names_the_endpoint(tmp_path):
    endpoint = f"127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    proc = echoc_run(["--nnodes", "2", "--nproc", "2", "--rdzv-endpoint", endpoint, "--metrics",
                      str(tmp_path / "m.jsonl"), "--set", f"train.collective_timeout_s={TIMEOUT_S}"])
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 2, err[-2000:]
    assert f"the rendezvous at {endpoint} for --nnodes 2 did not complete" in err and "Traceback" not in err
    assert time.monotonic() - t0 < 90


def children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def alive(pid: int) -> bool:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[0] != "Z"


def a_long_run_past_two_steps(tmp_path, ck, *extra):
    """`echoc run` of tiny for very many steps with checkpoints in `ck`, once two steps are logged."""
    proc = echoc_run(["--nproc", "2", "--metrics", str(tmp_path / "m.jsonl"), "--set", "train.steps=100000",
                      "--set", "train.log_interval=1", "--set", f"train.checkpoint.dir={ck}", *extra])
    deadline = time.monotonic() + 180
    while not (tmp_path / "m.jsonl").exists() or not (tmp_path / "m.jsonl").read_text().count("\n") >= 2:
        assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read()[-2000:]
        time.sleep(0.5)
    return proc


def test_killing_the_launcher_stops_the_workers_and_they_save(tmp_path):
    ck = tmp_path / "ck"
    proc = a_long_run_past_two_steps(tmp_path, ck)
    workers = children(proc.pid)
    assert len(workers) == 2, workers
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 60
    while any(alive(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not any(alive(w) for w in workers), "workers outlived their launcher"
    assert latest(ck) is not None and latest(ck)[0] > 0


def test_sigterm_to_the_launcher_saves_and_exits_143_without_a_traceback(tmp_path):
    ck = tmp_path / "ck"
    proc = a_long_run_past_two_steps(tmp_path, ck)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err and "done:" not in err, err[-2000:]
    saved = latest(ck)
    assert saved is not None and f"saved {saved[1].name}" in err and "stopped by SIGTERM" in err, err[-2000:]


def test_a_stop_on_sigterm_is_not_a_finished_run(tmp_path):
    s = spec(steps=50, checkpoint={"dir": str(tmp_path / "ck"), "interval": 0})
    proc, _, out = launch(tmp_path, s, faults=[{"kind": "signal", "signal": "SIGTERM", "rank": 1, "at": 3}])
    assert proc.returncode != 0
    error = json.loads(out.read_text())["error"]
    assert error.startswith("StoppedBySignal: stopped by a signal on another rank after step 3 of 50"), error
    assert "saved step_00000003" in error and latest(tmp_path / "ck")[0] == 3


def test_a_rendezvous_endpoint_held_by_another_program_ends_with_a_line(tmp_path):
    """Something that accepts and never answers on the port: torchrun's store handshake would wait
    forever; the launcher gives up when no worker started within the timeout plus a grace."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(8)
        endpoint = f"127.0.0.1:{busy.getsockname()[1]}"
        t0 = time.monotonic()
        proc = echoc_run(["--nnodes", "1:2", "--nproc", "2", "--rdzv-endpoint", endpoint, "--metrics",
                          str(tmp_path / "m.jsonl"), "--set", "train.collective_timeout_s=1"])
        _, err = proc.communicate(timeout=180)
    assert proc.returncode == 2, err[-2000:]
    assert f"the rendezvous at {endpoint} started no worker" in err and "Traceback" not in err, err[-2000:]
    assert time.monotonic() - t0 < 120


def test_sigterm_to_the_workers_stops_the_run_even_with_restarts_left(tmp_path):
    """A scheduler signals the workers, not the launcher: they save and leave together (exit 0, so
    torchrun neither restarts them under --max-restarts nor kills rank 0 while it closes files);
    the launcher still reports a stop, not a finished run."""
    ck = tmp_path / "ck"
    proc = a_long_run_past_two_steps(tmp_path, ck, "--max-restarts", "1")
    for w in children(proc.pid):
        os.kill(w, signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    saved = latest(ck)
    assert saved is not None and f"saved {saved[1].name}" in err and "Traceback" not in err, err[-2000:]
    assert len(list(ck.glob("step_*"))) == 1 and "restart" not in err.lower(), err[-2000:]
