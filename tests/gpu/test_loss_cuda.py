"""The chunked loss on a GPU: its peak memory is what the memory model counts
(runtime.loss.loss_bytes), far below the reference's fp32 working set, and it replays in a
CUDA graph with the same numbers as eager."""
import pytest
import torch

from runtime import loss as L
from runtime.model import lm_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def _peak_above(fn) -> int:
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def test_loss_replays_in_a_cuda_graph():
    """As the Trainer uses it: the logits come from an output head inside the captured step,
    warmed up on a side stream first; the replay equals an eager step."""
    rows, vocab, hidden = 1024, 50000, 64
    g = torch.Generator(device="cuda").manual_seed(0)
    head = torch.randn(vocab, hidden, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
    h = torch.randn(2, rows // 2, hidden, device="cuda", dtype=torch.bfloat16, generator=g)
    labels = torch.randint(0, vocab, (2, rows // 2), device="cuda", generator=g)

    def step():
        head.grad = None
        out = L.chunked_cross_entropy(h @ head.t(), labels)
        out.backward()
        return out, head.grad

    torch.cuda.set_device(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    head.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = step()
    graph.replay()
    torch.cuda.synchronize()
    captured = [t.clone() for t in captured]
    eager = step()          # after the capture: an eager run first would tie autograd to the legacy stream
    assert all(torch.equal(c, e) for c, e in zip(captured, eager))


@pytest.mark.parametrize("fused", [False, True], ids=["torch-chunks", "fused"])
def test_loss_peak_is_the_predicted_working_set(fused):
    if fused:
        pytest.importorskip("triton", reason="needs the triton package (pip install triton)")
    rows, vocab = 4096, 128000
    logits = torch.randn(1, rows, vocab, device="cuda", dtype=torch.bfloat16).requires_grad_()
    labels = torch.randint(0, vocab, (1, rows), device="cuda")

    def step(loss_fn):
        def run():
            loss_fn(logits, labels).backward()
            logits.grad = None
        return run

    measured = _peak_above(step(lambda x, y: L.chunked_cross_entropy(x, y, fused=fused)))
    reference = _peak_above(step(lm_loss))
    predicted = sum(L.loss_bytes(rows, vocab, 2, fused).values())
    # the allocator rounds each block up (to 512 B, 2 MiB segments): a little either way, no more
    assert predicted - 2**16 <= measured <= predicted * 1.02 + 2**21, (measured, predicted)
    assert measured < reference / 2, (measured, reference)


def test_fused_loss_addresses_past_two_to_the_31_elements():
    """The fused kernels' row offsets are int64: logits of more than 2³¹ elements (4100 × 524 288
    bf16, 4.3 GB), the last rows' losses and gradients as the torch path's."""
    pytest.importorskip("triton", reason="needs the triton package (pip install triton)")
    rows, vocab = 4100, 1 << 19
    assert rows * vocab > 2**31
    g = torch.Generator(device="cuda").manual_seed(1)
    logits = torch.randn(rows, vocab, device="cuda", dtype=torch.bfloat16, generator=g)
    labels = torch.randint(0, vocab, (rows,), device="cuda", generator=g)
    labels[-1] = vocab - 1
    out = {}
    for fused in (False, True):
        x = logits.clone().requires_grad_()
        loss = L.chunked_cross_entropy(x, labels, fused=fused)
        loss.backward()
        out[fused] = (loss.detach(), x.grad[-3:].float())
        del x
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-5, atol=0)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=2**-7, atol=1e-12)
