"""backends.exchange 'p2p' on GPUs (runtime/p2p.py: the push kernel into symmetric memory over
NVLink): one MoE layer under the `torch` backend with 'p2p' against the same layer with 'nccl',
forward and backward, eager and captured in one CUDA graph replayed with new routing. Each rank
returns one summed row per token (runtime/p2p_moves.py), rounded to bf16 before it crosses, so the
two agree to bf16 rounding, not bitwise; the graph replays equal 'p2p' eager bitwise. Two widths: one column block per row, and several
(H 6144: three column blocks; H 1000: a masked block). 2+ GPUs.
The CPU oracle with a NaN-padding stand-in is tests/runtime/test_p2p.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime import p2p

WORKER = Path(__file__).with_name("backends_cuda_worker.py")
ROOT = Path(__file__).resolve().parents[2]
BF16 = 1e-2          # relative norm of the difference (as tests/gpu/test_backends_cuda.py)
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@pytest.mark.parametrize("hidden", [256, 6144, 1000])
def test_p2p_layer_matches_nccl_eager_and_in_a_cuda_graph(tmp_path, hidden):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 CUDA GPUs (a group of one exchanges nothing); found {torch.cuda.device_count()}")
    if why := p2p.missing():
        pytest.skip(f"p2p exchange cannot run: {why}")
    out = tmp_path / "out.json"
    # keep the caller's path (packages carried beside the interpreter, e.g. pydantic) after the checkout
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **ENV)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(WORKER), "p2p", str(out), str(hidden)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    res = json.loads(out.read_text())
    assert res["p2p_pool_bytes"] > 0, "the layer never pushed: it compared nccl with nccl"
    assert res["eager_vs_torch"] < BF16, res
    for r in res["replays"]:
        assert r["vs_torch"] < BF16 and r["vs_eager"] == 0.0, res
