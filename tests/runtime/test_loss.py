"""runtime/loss.py: the chunked cross entropy equals the reference loss (runtime.model.lm_loss)
in value and gradient, whatever the chunking, and never writes its input."""
import pytest
import torch

from echoc.memory_census import layer_census as _census
from runtime import loss as L
from runtime.model import lm_loss
from support import ROOT


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows_per_chunk", [1, 3, 7, 100])
def test_chunked_cross_entropy_equals_the_reference(monkeypatch, dtype, rows_per_chunk):
    vocab = 13
    monkeypatch.setattr(L, "LOSS_CHUNK_BYTES", L.FP32 * vocab * rows_per_chunk)
    g = torch.Generator().manual_seed(rows_per_chunk)
    logits = (4 * torch.randn(2, 9, vocab, generator=g)).to(dtype)
    labels = torch.randint(0, vocab, (2, 9), generator=g)
    x, ref = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    got, want = L.chunked_cross_entropy(x, labels), lm_loss(ref, labels)
    assert got.dtype == torch.float32 and got.dim() == 0
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    (got * 0.37).backward()
    (want * 0.37).backward()
    assert x.grad.dtype == dtype
    tol = {} if dtype == torch.bfloat16 else {"rtol": 1e-6, "atol": 1e-7}
    torch.testing.assert_close(x.grad, ref.grad, **tol)
    torch.testing.assert_close(x.detach(), logits, rtol=0, atol=0)     # the input is untouched


def test_chunk_rows_bounds_the_fp32_chunk():
    assert L.chunk_rows(4096, 32000) == L.LOSS_CHUNK_BYTES // (4 * 32000)
    assert L.chunk_rows(4, 32000) == 4                          # never more than the rows
    assert L.chunk_rows(4096, L.LOSS_CHUNK_BYTES) == 1          # a vocabulary wider than a chunk: one row
    b = L.loss_bytes(4096, 128000, 2)
    assert b["grad_logits"] == 4096 * 128000 * 2 and b["chunk"] <= L.LOSS_CHUNK_BYTES


def test_a_large_loss_is_exact_for_a_confident_wrong_guess():
    """logits far apart (log-sum-exp must subtract the row maximum, or exp overflows)."""
    logits = torch.tensor([[[1000.0, -1000.0, 0.0]]])
    got = L.chunked_cross_entropy(logits, torch.tensor([[1]]))
    torch.testing.assert_close(got, torch.tensor(2000.0))


def test_fused_loss_equals_the_torch_path_in_the_triton_interpreter():
    """Both loss paths, the Triton kernels in the interpreter, against float64 (loss_triton_worker.py)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("triton", reason="needs the triton package (pip install triton)")
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("loss_triton_worker.py")), "--device", "cpu"],
                         capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["cases"] == 13 and res["failures"] == [], res["failures"]


def test_the_fused_switch_decides_the_kernels_and_the_predicted_bytes(monkeypatch):
    """FUSED_ON_CUDA is the one switch: the loss on CUDA tensors (where triton is) and the memory
    model's loss bytes (no fp32 chunk when fused, whatever the compiling machine has) follow it;
    CPU always runs the torch path."""
    from echoc import memory_model as mm
    from echoc.spec_io import load_spec
    spec = load_spec(ROOT / "specs" / "glm5-mini.yaml")
    monkeypatch.setattr(L, "FUSED_ON_CUDA", True)
    assert L.fused_on("cuda") == (L.loss_triton is not None) and not L.fused_on("cpu")
    assert L.fused_planned("cuda") and not L.fused_planned("cpu")
    assert L.loss_bytes(4096, 32000, 2, fused=True)["chunk"] == 0
    monkeypatch.setattr(L, "loss_triton", None)            # a compiling machine without triton
    assert not L.fused_on("cuda") and L.fused_planned("cuda")
    assert mm.head_bytes(spec, _census(spec))["loss"] == sum(L.loss_bytes(spec.budgets.tokens, spec.model.vocab_size,
                                                                            2, fused=True).values())
    monkeypatch.setattr(L, "FUSED_ON_CUDA", False)
    assert not L.fused_on("cuda") and not L.fused_planned("cuda")
    assert mm.head_bytes(spec, _census(spec))["loss"] == sum(L.loss_bytes(spec.budgets.tokens, spec.model.vocab_size,
                                                                            2, fused=False).values())
