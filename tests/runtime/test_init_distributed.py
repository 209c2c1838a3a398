"""init_distributed outside torchrun (benches, the 1-process world): two such processes on one
host at the same time both start and run a collective (they take no port)."""
import os
import subprocess
import sys
import textwrap

from support import ROOT

SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    import torch
    import torch.distributed as dist
    from echoc.spec_io import load_spec
    from runtime.trainer import init_distributed
    spec = load_spec(sys.argv[1], ["cluster.gpus_per_node=1", "parallel.ep=1", "parallel.dp=1"])
    init_distributed(spec)
    x = torch.ones(3)
    dist.all_reduce(x)
    me, barrier = sys.argv[2], Path(sys.argv[3])
    (barrier / me).touch()
    deadline = time.monotonic() + 60     # both processes hold their process group at once
    while len(list(barrier.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    print("ok" if len(list(barrier.iterdir())) == 2 and x.tolist() == [1.0] * 3 else "alone", flush=True)
""")


def test_two_one_process_worlds_on_one_host_do_not_collide(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(ROOT / "specs" / "tiny.yaml"), str(i), str(tmp_path)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-800:] for _, err in outs]
    assert [out.strip() for out, _ in outs] == ["ok", "ok"]
