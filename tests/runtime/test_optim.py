"""runtime/optim.py: AdamW on fp32 masters equals torch.optim.AdamW, skips on the device,
and keeps updates that bf16 weights alone would lose."""
import pytest
import torch

from runtime.optim import AdamWConfig, MasterAdamW


def _pair(shapes, lr, wd, betas=(0.9, 0.95), seed=0):
    torch.manual_seed(seed)
    init = [torch.randn(s) for s in shapes]
    ref = [torch.nn.Parameter(t.clone()) for t in init]
    torch_opt = torch.optim.AdamW(ref, lr=lr, betas=betas, weight_decay=wd)
    ours = MasterAdamW([t.clone() for t in init], torch.tensor(lr), AdamWConfig(betas, wd))
    return ref, torch_opt, ours


@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_matches_torch_adamw_fp32(wd):
    ref, torch_opt, ours = _pair([(7, 3), (11,), (2, 4, 5)], lr=1e-2, wd=wd)
    for _ in range(6):
        grads = [torch.randn_like(p) for p in ref]
        for p, g in zip(ref, grads):
            p.grad = g.clone()
        torch_opt.step()
        ours.step([g.clone() for g in grads], torch.zeros(()))
        for m, p in zip(ours.masters, ref):
            torch.testing.assert_close(m, p.detach(), rtol=1e-6, atol=1e-7)
    state = torch_opt.state[ref[0]]
    torch.testing.assert_close(ours.exp_avg[0], state["exp_avg"], rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(ours.exp_avg_sq[0], state["exp_avg_sq"], rtol=1e-6, atol=1e-10)
    assert float(ours.step_count) == float(state["step"]) == 6


def test_found_inf_skips_on_the_device_and_later_steps_continue():
    ref, torch_opt, ours = _pair([(5, 5)], lr=1e-2, wd=0.1)
    g1, g2 = torch.randn(5, 5), torch.randn(5, 5)
    ours.step([g1.clone()], torch.zeros(()))
    before = ([m.clone() for m in ours.masters], ours.exp_avg[0].clone(), ours.exp_avg_sq[0].clone())
    ours.step([torch.full((5, 5), float("nan"))], torch.ones(()))
    assert torch.equal(ours.masters[0], before[0][0]), "a skipped step changed the weights"
    assert torch.equal(ours.exp_avg[0], before[1]) and torch.equal(ours.exp_avg_sq[0], before[2])
    assert float(ours.step_count) == 1.0
    ours.step([g2.clone()], torch.zeros(()))
    for g in (g1, g2):   # the reference never saw the skipped step
        ref[0].grad = g.clone()
        torch_opt.step()
    torch.testing.assert_close(ours.masters[0], ref[0].detach(), rtol=1e-6, atol=1e-7)


def test_lr_is_read_from_the_device_tensor():
    _, _, ours = _pair([(4,)], lr=1e-2, wd=0.0)
    start = ours.masters[0].clone()
    ours.lr.fill_(0.0)
    ours.step([torch.randn(4)], torch.zeros(()))
    assert torch.equal(ours.masters[0], start)
    ours.lr.fill_(1e-2)
    ours.step([torch.randn(4)], torch.zeros(()))
    assert not torch.equal(ours.masters[0], start)


def test_bf16_update_below_resolution_accumulates_in_the_master():
    """Weights at 1.0 (bf16 spacing 2^-7 there) and steps of lr = 1e-4: pure-bf16 AdamW rounds
    every update away; with an fp32 master the bf16 weight moves after enough steps."""
    steps, lr = 200, 1e-4
    grad = torch.ones(16)
    pure = torch.nn.Parameter(torch.ones(16, dtype=torch.bfloat16))
    pure_opt = torch.optim.AdamW([pure], lr=lr, weight_decay=0.0, foreach=False)
    weight = torch.ones(16, dtype=torch.bfloat16)
    ours = MasterAdamW([weight.float()], torch.tensor(lr), AdamWConfig(weight_decay=0.0))
    for _ in range(steps):
        pure.grad = grad.to(torch.bfloat16)
        pure_opt.step()
        ours.step([grad.clone()], torch.zeros(()))
        weight.copy_(ours.masters[0])
    assert torch.equal(pure.detach(), torch.ones(16, dtype=torch.bfloat16)), "pure bf16 kept an update"
    assert float(ours.masters[0][0]) == pytest.approx(1.0 - steps * lr, rel=1e-3)
    assert float(weight[0]) < 1.0, "the master's accumulated update never reached the bf16 weight"
