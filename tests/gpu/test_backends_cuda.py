"""The real-row backends on GPUs with the real library calls (NCCL, bf16): one MoE layer under
`symm_mem` (torch NVSHMEM all_to_all_vdev_2d) and `deepep` (DeepEP HybridEP) equals the same layer
under the `torch` backend — forward and backward, eager and captured in one CUDA graph replayed
with new routing — within the bf16 bound. Both libraries refuse a group of one: 2+ GPUs.
The CPU side of these backends (everything but the library call) is tests/runtime/test_backends.py."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.backends import deepep

WORKER = Path(__file__).with_name("backends_cuda_worker.py")
BF16 = 1e-2


def _symm_mem_missing() -> str | None:
    try:
        from torch.distributed import _symmetric_memory  # noqa: F401
    except ImportError:
        return "this torch has no torch.distributed._symmetric_memory"
    if not hasattr(torch.ops.symm_mem, "all_to_all_vdev_2d"):
        return "this torch has no torch.ops.symm_mem.all_to_all_vdev_2d (NVSHMEM build)"
    return None


def _missing(backend: str) -> str | None:
    if torch.cuda.device_count() < 2:
        return f"needs 2 CUDA GPUs ({backend}'s library refuses a group of one); found {torch.cuda.device_count()}"
    if backend == "deepep" and not deepep.available():
        return f"needs deep_ep (HybridEP) built: {deepep.BUILD_HINT}"
    return _symm_mem_missing() if backend == "symm_mem" else None


ROOT = Path(__file__).resolve().parents[2]
# shared multi-GPU machines: no NVLink multicast (docs/DESIGN's distributed runtime)
ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@pytest.mark.parametrize("backend", ["symm_mem", "deepep"])
def test_layer_equals_the_torch_backend_eager_and_in_a_cuda_graph(tmp_path, backend):
    if why := _missing(backend):
        pytest.skip(why)
    out = tmp_path / "out.json"
    # keep the caller's path (packages carried beside the interpreter, e.g. pydantic) after the checkout
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=path, **ENV)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(WORKER), backend, str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    res = json.loads(out.read_text())
    assert res["eager_vs_torch"] < BF16, res
    for r in res["replays"]:
        assert r["vs_eager"] < BF16 and r["vs_torch"] < BF16, res
