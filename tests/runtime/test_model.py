"""The reference model (runtime/model.py): shapes, gradients, tracing, routing, balancing, init."""
import pytest
import torch
import torch.fx
import torch.nn.functional as F

from echoc.spec import ModelConfig
from runtime.model import (MLP, GQAAttention, GroupedExperts, MLAAttention, MoE, RMSNorm, Router, Transformer, expert_counts,
                           lm_loss, moe_layers, update_expert_bias)

GQA = {"kind": "gqa", "num_heads": 4, "num_kv_heads": 2, "head_dim": 8}
MLA = {"kind": "mla", "num_heads": 4, "q_lora_rank": 16, "kv_lora_rank": 12, "qk_nope_head_dim": 8,
       "qk_rope_head_dim": 4, "v_head_dim": 6}


def make_cfg(attention=GQA, score_fn="sigmoid", experts=8, top_k=2, groups=1, topk_groups=1, shared=1,
             scale=1.0, rate=1e-3, layers=3, dense=1, hidden=32, vocab=64) -> ModelConfig:
    return ModelConfig(name="t", vocab_size=vocab, hidden_size=hidden, num_layers=layers, first_dense_layers=dense,
                 attention=attention, dense_intermediate_size=48,
                 moe={"num_experts": experts, "top_k": top_k, "expert_intermediate_size": 16,
                      "shared_experts": shared,
                      "router": {"score_fn": score_fn, "num_groups": groups, "topk_groups": topk_groups,
                                 "routed_scaling_factor": scale, "bias_update_rate": rate}},
                 dtype="float32")


def build(cfg, seed=0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg)


def tokens(cfg, B=2, S=12, seed=1):
    return torch.randint(0, cfg.vocab_size, (B, S), generator=torch.Generator().manual_seed(seed))


VARIANTS = [
    pytest.param(dict(attention=GQA), id="gqa-sigmoid"),
    pytest.param(dict(attention=MLA), id="mla-sigmoid"),
    pytest.param(dict(attention={**MLA, "q_lora_rank": 0}), id="mla-no-q-lora"),
    pytest.param(dict(attention=GQA, score_fn="softmax"), id="gqa-softmax"),
    pytest.param(dict(attention=MLA, experts=16, top_k=4, groups=4, topk_groups=2, scale=2.5), id="mla-grouped"),
    pytest.param(dict(attention=GQA, score_fn="softmax", experts=16, top_k=3, groups=4, topk_groups=2,
                      shared=0), id="gqa-softmax-grouped-noshared"),
]


# ----------------------------------------------------------------------------- whole model

@pytest.mark.parametrize("kw", VARIANTS)
def test_forward_shapes_and_finite_grads_everywhere(kw):
    cfg = make_cfg(**kw)
    model = build(cfg)
    x = tokens(cfg)
    logits = model(x)
    assert logits.shape == (2, 12, cfg.vocab_size) and logits.dtype == torch.float32
    loss = lm_loss(logits, tokens(cfg, seed=2))
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
    for name, _ in moe_layers(model):
        # the router learns through the top-k weights (not through the bias)
        assert model.get_submodule(f"{name}.router").weight.grad.abs().sum() > 0
        assert model.get_submodule(f"{name}.experts").w13.grad.abs().sum() > 0


def test_structure_follows_the_spec():
    cfg = make_cfg(layers=4, dense=2, shared=2)
    model = build(cfg)
    assert [type(b.mlp) for b in model.layers] == [MLP, MLP, MoE, MoE]
    assert [n for n, _ in moe_layers(model)] == ["layers.2.mlp", "layers.3.mlp"]
    moe = model.layers[2].mlp
    assert moe.shared.w13.weight.shape == (2 * 2 * 16, 32)        # shared_experts × F, gate and up
    assert moe.experts.w13.shape == (8, 32, 32) and moe.experts.w2.shape == (8, 16, 32)
    assert moe.router.weight.shape == (8, 32)
    assert build(make_cfg(shared=0)).layers[1].mlp.shared is None
    assert model.lm_head.weight.data_ptr() != model.embed.weight.data_ptr()   # untied


@pytest.mark.parametrize("attention", [GQA, MLA], ids=["gqa", "mla"])
def test_attention_is_causal(attention):
    cfg = make_cfg(attention=attention)
    model = build(cfg)
    x = tokens(cfg)
    y = x.clone()
    y[:, 7:] = (y[:, 7:] + 1) % cfg.vocab_size
    a, b = model(x), model(y)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_builds_on_meta_without_memory():
    cfg = make_cfg(attention=MLA)
    with torch.device("meta"):
        model = Transformer(cfg).to(torch.bfloat16)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in model.parameters())
    router = model.layers[1].mlp.router
    assert router.expert_bias.is_meta and router.expert_bias.dtype == torch.float32


def test_bf16_cast_keeps_balancing_state_and_rope_in_fp32():
    cfg = make_cfg(attention=MLA)
    model = build(cfg)
    r = model.layers[1].mlp.router
    r.expert_bias.fill_(0.123456789)
    model = model.to(torch.bfloat16)
    assert model.layers[1].attn.rope.inv_freq.dtype == torch.float32
    assert r.expert_bias.dtype == torch.float32 and r.load.dtype == torch.float32
    assert r.expert_bias[0].item() == pytest.approx(0.123456789, rel=1e-7)  # not rounded through bf16
    logits = model(tokens(cfg))
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()
    assert r.load.sum().item() == 2 * 12 * cfg.moe.top_k
    keys = model.state_dict().keys()
    assert any(k.endswith(".expert_bias") for k in keys) and not any(k.endswith(".load") for k in keys)


class MoELeaf(torch.fx.Tracer):
    def is_leaf_module(self, m, qualname):
        return isinstance(m, MoE) or super().is_leaf_module(m, qualname)


@pytest.mark.parametrize("attention", [GQA, MLA], ids=["gqa", "mla"])
def test_fx_traces_with_moe_as_leaf(attention):
    cfg = make_cfg(attention=attention, layers=3, dense=1)
    model = build(cfg)
    gm = torch.fx.GraphModule(model, MoELeaf().trace(model))
    mods = [n.target for n in gm.graph.nodes if n.op == "call_module"]
    assert [t for t in mods if isinstance(gm.get_submodule(t), MoE)] == ["layers.1.mlp", "layers.2.mlp"]
    assert not any(".router" in t or ".experts" in t for t in mods)
    x = tokens(cfg)
    torch.testing.assert_close(gm(x), model(x))
    # different sequence lengths: no shape was baked in
    torch.testing.assert_close(gm(x[:, :5]), model(x[:, :5]))


def test_lm_loss_is_mean_cross_entropy_in_fp32():
    logits = torch.randn(2, 3, 11).to(torch.bfloat16)
    labels = torch.randint(0, 11, (2, 3))
    loss = lm_loss(logits, labels)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    want = -torch.log_softmax(logits.float(), -1).gather(-1, labels[..., None]).mean()
    torch.testing.assert_close(loss, want)


# ----------------------------------------------------------------------------- init

def test_init_is_deterministic_and_as_documented():
    cfg = make_cfg(attention=MLA)
    a, b, c = build(cfg, 0), build(cfg, 0), build(cfg, 1)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["layers.1.mlp.experts.w13"], sc["layers.1.mlp.experts.w13"])
    a.init_weights(7)
    c.init_weights(7)
    assert all(torch.equal(a.state_dict()[k], c.state_dict()[k]) for k in sa)
    for name, p in a.named_parameters():
        if any(isinstance(m, RMSNorm) and p is m.weight for m in a.modules()):
            assert torch.equal(p, torch.ones_like(p)), name
        else:
            assert abs(p.std().item() - 0.02) < 0.004, name
    assert all(torch.equal(r.router.expert_bias, torch.zeros(8)) for _, r in moe_layers(a))


# ----------------------------------------------------------------------------- MoE pieces

def test_expert_counts():
    idx = torch.tensor([[0, 3], [3, 1], [3, 0], [2, 1]])
    assert expert_counts(idx, 5).tolist() == [2, 2, 1, 3, 0]
    assert expert_counts(idx, 5).dtype == torch.int64
    big = torch.randint(0, 7, (100, 3))
    assert torch.equal(expert_counts(big, 7), torch.bincount(big.flatten(), minlength=7))


def dense_moe(experts: GroupedExperts, x, idx, w):
    """Every expert on every token, then mask: an independent formula for GroupedExperts.forward."""
    h = torch.einsum("th,ehf->etf", x, experts.w13)
    gate, up = h.chunk(2, dim=-1)
    y = torch.einsum("etf,efh->teh", F.silu(gate) * up, experts.w2)        # [T, E, H]
    combine = torch.zeros(x.shape[0], experts.num_experts).scatter(1, idx, w)
    return (combine.unsqueeze(-1) * y).sum(1)


def test_grouped_experts_loop_equals_dense_computation():
    torch.manual_seed(0)
    E, H, Fd, T, K = 6, 16, 8, 40, 2
    experts = GroupedExperts(E, H, Fd)
    with torch.no_grad():
        experts.w13.normal_()
        experts.w2.normal_()
    x = torch.randn(T, H, requires_grad=True)
    idx = torch.stack([torch.randperm(E)[:K] for _ in range(T)])
    idx[:, 0] = torch.where(idx[:, 1] == 0, 1, 0)   # expert 0 hot; still distinct within a row
    w = torch.rand(T, K)
    got = experts(x, idx, w)
    want = dense_moe(experts, x, idx, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    g_got = torch.autograd.grad(got.square().sum(), [x, experts.w13, experts.w2])
    g_want = torch.autograd.grad(want.square().sum(), [x, experts.w13, experts.w2])
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert torch.equal(experts.expert_forward(x[:3], 2), experts(x[:3], torch.tensor([[2], [2], [2]]),
                                                                 torch.ones(3, 1)))


def test_moe_is_routed_plus_shared_and_counts_load():
    cfg = make_cfg(experts=8, top_k=2)
    torch.manual_seed(0)
    moe = MoE(cfg)
    x = torch.randn(2, 5, 32)
    out = moe(x)
    assert out.shape == x.shape
    assert moe.router.load.sum().item() == 10 * 2
    flat = x.reshape(-1, 32)
    idx, w = moe.router(flat)
    want = dense_moe(moe.experts, flat, idx, w) + moe.shared(flat)
    torch.testing.assert_close(out.reshape(-1, 32), want, rtol=1e-5, atol=1e-5)
    assert torch.equal(moe.router.load, expert_counts(idx, 8).float())   # MoE.forward counts, the router alone not


def make_router(**kw) -> Router:
    torch.manual_seed(0)
    return Router(make_cfg(**kw))


def reference_selection(scores, bias, E, G, topk_groups, K, score_fn):
    """Token by token, in plain Python: the group-limited top-k of (scores + bias)."""
    picks = []
    for s in (scores + bias).tolist():
        per = E // G
        groups = [s[g * per:(g + 1) * per] for g in range(G)]
        gscore = [sum(sorted(grp)[-2:]) if score_fn == "sigmoid" else max(grp) for grp in groups]
        keep = sorted(range(G), key=lambda g: -gscore[g])[:topk_groups]
        allowed = [e for e in range(E) if e // per in keep]
        picks.append(set(sorted(allowed, key=lambda e: -s[e])[:K]))
    return picks


@pytest.mark.parametrize("score_fn", ["sigmoid", "softmax"])
def test_router_respects_group_limit(score_fn):
    E, G, TG, K = 16, 4, 2, 4
    router = make_router(score_fn=score_fn, experts=E, top_k=K, groups=G, topk_groups=TG)
    with torch.no_grad():
        router.expert_bias.normal_(0, 0.05)
    x = torch.randn(200, 32)
    idx, _ = router(x)
    assert idx.dtype == torch.int64 and idx.shape == (200, K)
    assert all(len(set((row // (E // G)).tolist())) <= TG for row in idx)
    logits = x @ router.weight.T
    scores = logits.sigmoid() if score_fn == "sigmoid" else logits.softmax(-1)
    want = reference_selection(scores, router.expert_bias, E, G, TG, K, score_fn)
    assert [set(r) for r in idx.tolist()] == want
    # the test has teeth: without the group limit, many tokens would span more groups
    free = make_router(score_fn=score_fn, experts=E, top_k=K, groups=1, topk_groups=1)
    free_idx, _ = free(x)
    assert sum(len(set((row // (E // G)).tolist())) > TG for row in free_idx) > 50


def test_sigmoid_weights_sum_to_scaling_factor():
    router = make_router(experts=8, top_k=3, scale=2.5)
    x = torch.randn(50, 32)
    idx, w = router(x)
    torch.testing.assert_close(w.sum(-1), torch.full((50,), 2.5))
    scores = (x @ router.weight.T).sigmoid()
    picked = scores.gather(-1, idx)
    torch.testing.assert_close(w, 2.5 * picked / picked.sum(-1, keepdim=True))
    assert (picked.min(-1).values >= scores.topk(3, -1).values[:, -1] - 1e-6).all()   # bias 0: the top scores


def test_sigmoid_top1_keeps_the_raw_score_so_the_router_learns():
    """One normalised weight is 1 whatever the logits: the router would get no gradient."""
    router = make_router(experts=8, top_k=1, scale=2.5)
    x = torch.randn(40, 32)
    idx, w = router(x)
    torch.testing.assert_close(w, 2.5 * (x @ router.weight.T).sigmoid().gather(-1, idx))
    assert w.std() > 0
    w.sum().backward()
    assert router.weight.grad.norm() > 1e-2


def test_softmax_weights():
    x = torch.randn(30, 32)
    r1 = make_router(score_fn="softmax", top_k=1, scale=1.5)
    idx, w = r1(x)
    probs = (x @ r1.weight.T).softmax(-1)
    torch.testing.assert_close(w, 1.5 * probs.gather(-1, idx))               # top-1: raw probability
    r2 = make_router(score_fn="softmax", top_k=2, scale=1.5)
    _, w2 = r2(x)
    torch.testing.assert_close(w2.sum(-1), torch.full((30,), 1.5))           # top-k > 1: renormalised


def test_bias_changes_selection_but_not_the_weights_source():
    router = make_router(experts=8, top_k=2, scale=1.0)
    x = torch.randn(64, 32)
    before, _ = router(x)
    assert (before == 5).any(-1).float().mean() < 0.9
    with torch.no_grad():
        router.expert_bias[5] = 10.0
    idx, w = router(x)
    assert (idx == 5).any(-1).all()                                          # bias wins the selection ...
    scores = (x @ router.weight.T).sigmoid()
    picked = scores.gather(-1, idx)
    torch.testing.assert_close(w, picked / picked.sum(-1, keepdim=True))     # ... weights use raw scores


def test_router_computes_in_fp32_and_returns_input_dtype():
    router = make_router(experts=8, top_k=2).to(torch.bfloat16)
    x = torch.randn(16, 32).to(torch.bfloat16)
    idx, w = router(x)
    assert idx.dtype == torch.int64 and w.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- balancing

def test_update_expert_bias_moves_toward_underloaded_experts():
    model = build(make_cfg(experts=4, top_k=1, rate=0.01))
    (name, moe), _ = moe_layers(model)
    moe.router.load.copy_(torch.tensor([10.0, 2.0, 4.0, 0.0]))              # mean 4
    other = moe_layers(model)[1][1].router
    other.load.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0]))
    update_expert_bias(model)
    torch.testing.assert_close(moe.router.expert_bias, torch.tensor([-0.01, 0.01, 0.0, 0.01]))
    torch.testing.assert_close(other.expert_bias, torch.zeros(4))
    assert moe.router.load.sum() == 0 and other.load.sum() == 0
    # given loads (e.g. all-reduced over ranks) replace the routers' own
    loads = {n: torch.tensor([0.0, 0.0, 0.0, 8.0]) for n, _ in moe_layers(model)}
    update_expert_bias(model, loads)
    torch.testing.assert_close(moe.router.expert_bias, torch.tensor([0.0, 0.02, 0.01, 0.0]))


def test_bias_updates_balance_a_skewed_router():
    torch.manual_seed(0)
    cfg = make_cfg(experts=8, top_k=2, layers=1, dense=0, rate=0.02)
    moe = MoE(cfg)
    x = torch.randn(1, 256, 32) + 0.5
    with torch.no_grad():
        moe.router.weight[0] += 0.1          # expert 0 is hot for most tokens

    def imbalance():
        counts = expert_counts(moe.router(x[0])[0], 8).float()
        return (counts.max() / counts.mean()).item()

    start = imbalance()
    for _ in range(30):
        moe(x)
        update_expert_bias(moe)
    assert start > 2.5 and imbalance() < 0.6 * start
    assert moe.router.expert_bias[0] < 0


# ----------------------------------------------------------------------------- learning

@pytest.mark.parametrize("attention", [GQA, MLA], ids=["gqa", "mla"])
def test_loss_decreases_on_a_repeated_batch(attention):
    cfg = make_cfg(attention=attention, experts=4, top_k=2)
    model = build(cfg)
    x = tokens(cfg, B=2, S=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        loss = lm_loss(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad()
        update_expert_bias(model)
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def rope_ref(x, theta):
    """x [B, S, h, d]: rotate the complex numbers (x[i] + i·x[i + d/2]) by position · theta^(-2i/d)."""
    d = x.shape[-1]
    angle = torch.arange(x.shape[1])[:, None] * theta ** (-torch.arange(0, d, 2) / d)   # [S, d/2]
    z = torch.complex(x[..., :d // 2], x[..., d // 2:]) * torch.polar(torch.ones_like(angle), angle)[:, None]
    return torch.cat([z.real, z.imag], dim=-1)


def attention_ref(q, k, v):
    """q, k [B, S, h, dk], v [B, S, h, dv]: causal softmax(q·k / sqrt(dk)) v, one head at a time."""
    S, dk = q.shape[1], q.shape[-1]
    scores = torch.einsum("bshd,bthd->bhst", q, k) / dk ** 0.5
    scores = scores.masked_fill(torch.ones(S, S, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("bhst,bthd->bshd", scores.softmax(-1), v)


def test_mla_matches_explicit_formula():
    cfg = make_cfg(attention={**MLA, "rope_theta": 500.0})
    torch.manual_seed(0)
    attn = MLAAttention(cfg)
    x = torch.randn(2, 7, 32)
    h, nope, rope, dv, r = 4, 8, 4, 6, 12
    q = attn.wq_b(attn.q_norm(attn.wq_a(x))).view(2, 7, h, nope + rope)
    q = torch.cat([q[..., :nope], rope_ref(q[..., nope:], 500.0)], dim=-1)
    a = attn.wkv_a(x)
    k_pe = rope_ref(a[..., r:].unsqueeze(2), 500.0)                    # one rope key for all heads
    kv = attn.wkv_b(attn.kv_norm(a[..., :r])).view(2, 7, h, nope + dv)
    k = torch.cat([kv[..., :nope], k_pe.expand(-1, -1, h, -1)], dim=-1)
    want = attn.wo(attention_ref(q, k, kv[..., nope:]).reshape(2, 7, h * dv))
    torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-5)
    assert attn.wkv_a.out_features == r + rope and attn.wkv_b.out_features == h * (nope + dv)


def test_gqa_matches_explicit_formula():
    cfg = make_cfg(attention={**GQA, "rope_theta": 100.0})
    torch.manual_seed(0)
    attn = GQAAttention(cfg)
    x = torch.randn(2, 7, 32)
    q = rope_ref(attn.wq(x).view(2, 7, 4, 8), 100.0)
    k = rope_ref(attn.wk(x).view(2, 7, 2, 8), 100.0)
    v = attn.wv(x).view(2, 7, 2, 8)
    kv_head = torch.tensor([0, 0, 1, 1])                               # query heads 0, 1 share kv head 0
    want = attn.wo(attention_ref(q, k[:, :, kv_head], v[:, :, kv_head]).reshape(2, 7, 32))
    torch.testing.assert_close(attn(x), want, rtol=1e-5, atol=1e-5)
