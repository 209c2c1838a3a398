"""init_distributed outside torchrun (benches, the 1-process world): two such processes on one
host at the same time both start, each on a free port, unless the user gave MASTER_PORT."""
import os
import subprocess
import sys
import textwrap

from support import ROOT

SCRIPT = textwrap.dedent("""
    import sys, time
    from echoc.spec_io import load_spec
    from runtime.trainer import init_distributed
    spec = load_spec(sys.argv[1], ["cluster.gpus_per_node=1", "parallel.ep=1", "parallel.dp=1"])
    init_distributed(spec)
    time.sleep(3)             # both processes hold their store at once
    print("ok", flush=True)
""")


def test_two_one_process_worlds_on_one_host_do_not_collide():
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, str(ROOT / "specs" / "tiny.yaml")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-800:] for _, err in outs]
    assert all(out.strip() == "ok" for out, _ in outs)
