"""The expert weight gradients on a stream of their own (runtime/streams.py, grouped_gemm.py):
the fork / tap / FFN nodes give the same numbers as the FFN that computes them inline, every
stash is dropped by the end of backward, and the tap really computes the gradients (the FFN
hands it zeros). On CPU the nodes run on one stream; tests/gpu checks the streams."""
from __future__ import annotations

import gc

import pytest
import torch

from runtime import grouped_gemm, streams

R, H, F, L = 24, 16, 8, 3


def _inputs(dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(R, H, generator=g).to(dtype)
    w13 = (torch.randn(L, H, 2 * F, generator=g) / 4).to(dtype)
    w2 = (torch.randn(L, F, H, generator=g) / 4).to(dtype)
    gy = torch.randn(R, H, generator=g).to(dtype)
    return x, w13, w2, gy


def _grads(dtype, offs, defer: bool, key="layers_1_mlp_expert_ffn", seen=None):
    x, w13, w2, gy = (t.requires_grad_(i < 3) for i, t in enumerate(_inputs(dtype)))
    if defer:
        rows, token = streams.wgrad_fork(x * 1, key)
        y = grouped_gemm.expert_ffn(rows, w13, w2, offs, "torch", wgrad=token, buf=key)
        if seen is not None:       # what the stash holds once the FFN's backward ran (x's own gradient hook)
            rows.register_hook(lambda g: seen.append(streams.live_stashes()))
    else:
        y = grouped_gemm.expert_ffn(x * 1, w13, w2, offs, "torch", buf=key)
    real = int(offs[-1])
    (y[:real] * gy[:real]).sum().backward()
    return x.grad, w13.grad, w2.grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ends", [(8, 8, 20), (0, 24, 24), (0, 0, 0)])
def test_deferred_weight_gradients_equal_the_inline_ones(dtype, ends):
    offs = torch.tensor(ends, dtype=torch.int32)
    inline = _grads(dtype, offs, defer=False)
    seen: list = []
    deferred = _grads(dtype, offs, defer=True, seen=seen)
    for name, a, b in zip(("x", "w13", "w2"), inline, deferred):
        assert b is not None, name
        assert torch.equal(a[: int(offs[-1])] if name == "x" else a, b[: int(offs[-1])] if name == "x" else b), name
    if ends[-1]:
        assert deferred[1].abs().sum() > 0 and deferred[2].abs().sum() > 0     # the tap's, not the FFN's zeros
    assert seen == [["layers_1_mlp_expert_ffn"]]    # stashed after the FFN's backward, until the fork's
    assert streams.live_stashes() == []             # the fork's backward emptied it


def test_a_backward_that_never_reaches_the_fork_leaves_the_stash_to_the_graph():
    """Gradients of the weights alone: the fork's backward never runs; the stash goes with the graph."""
    x, w13, w2, gy = (t.requires_grad_(i < 3) for i, t in enumerate(_inputs(torch.float32)))
    rows, token = streams.wgrad_fork(x * 1, "layers_1_mlp_expert_ffn")
    offs = torch.tensor([8, 8, 20], dtype=torch.int32)
    y = grouped_gemm.expert_ffn(rows, w13, w2, offs, "torch", wgrad=token, buf="layers_1_mlp_expert_ffn")
    loss = (y[:20] * gy[:20]).sum()
    dw13, dw2 = torch.autograd.grad(loss, [w13, w2])
    inline = _grads(torch.float32, offs, defer=False)
    assert torch.equal(dw13, inline[1]) and torch.equal(dw2, inline[2])
    assert streams.live_stashes() == ["layers_1_mlp_expert_ffn"]
    del loss, y, rows, token
    gc.collect()
    assert streams.live_stashes() == []


def test_the_stash_says_what_ran_out_of_order():
    stash = streams.Stash("layers_1_mlp_expert_ffn")
    with pytest.raises(AssertionError, match="ran before the FFN's backward stashed"):
        stash.get()
    with pytest.raises(AssertionError, match="no expert FFN stashed"):
        stash.drop()


@pytest.mark.parametrize("reuse", [False, True])
def test_late_read_check_catches_a_stashed_buffer_reused_before_the_fork(monkeypatch, reuse):
    """streams.CHECK_LATE_READS (the arena tests turn it on): at the fork the weight gradients are
    computed again from the stash; a stashed buffer written in between (as a wrong plan would let
    the dispatch's backward do) is named."""
    monkeypatch.setattr(streams, "CHECK_LATE_READS", True)
    x, w13, w2, gy = (t.requires_grad_(i < 3) for i, t in enumerate(_inputs(torch.float32)))
    rows, token = streams.wgrad_fork(x * 1, "layers_1_mlp_expert_ffn")
    offs = torch.tensor([8, 8, 20], dtype=torch.int32)
    y = grouped_gemm.expert_ffn(rows, w13, w2, offs, "torch", wgrad=token, buf="layers_1_mlp_expert_ffn")
    if reuse:      # runs after the FFN's and the tap's backward, before the fork's
        rows.register_hook(lambda g: streams.stash_of(token).get()["grad_h13"].add_(1.0))
    loss = (y[:20] * gy[:20]).sum()
    if reuse:
        with pytest.raises(AssertionError, match="layers_1_mlp_expert_ffn: a buffer the deferred weight gradients"):
            loss.backward()
        del loss, y, rows, token
        gc.collect()                     # the failed backward left its stash to the graph
        assert streams.live_stashes() == []
    else:
        loss.backward()
        assert streams.live_stashes() == []
