"""runtime/contracts.py: every declared contract is bound to an implementation whose signature
it names, and nodes are read and rewritten by argument name."""
import operator

import pytest
import torch
from torch import fx

from runtime import contracts
from runtime import clone, grouped_gemm, ops  # noqa: F401  (they bind the contracts)
from runtime.backends import deepep, symm_mem, sync  # noqa: F401  (the real-row backends bind theirs)
from runtime.contracts import COMBINE, DISPATCH, EXPERT_FFN_RECOMPUTE_CLONE, LAYOUT, OpContract

DECLARED = [v for v in vars(contracts).values() if isinstance(v, OpContract)]


def test_every_declared_contract_is_bound_to_a_matching_signature():
    assert len(DECLARED) >= 15   # every op of the torch and sync backends, plus the real-row backends'
    for c in DECLARED:
        target = contracts.target(c)
        assert contracts.of(target) is c
        assert contracts._signature(target) == c.args


def test_bind_refuses_a_signature_that_differs():
    def f(a, b):
        return a
    with pytest.raises(AssertionError, match="contract says"):
        contracts.bind(OpContract("t", ("b", "a"), ("y",)), f)


def _layout_node():
    g = fx.Graph()
    slot, counts, counts_all = (g.placeholder(n) for n in ("slot", "counts", "counts_all"))
    node = g.call_function(torch.ops.echo.layout.default,
                           LAYOUT.call_args(dest_slot=slot, counts=counts, counts_all=counts_all, slots_per_rank=4,
                                            chunk_rows=8, group="ep", buf="lay"))
    return g, node, slot


def test_nodes_are_read_and_rewritten_by_name():
    g, node, slot = _layout_node()
    assert LAYOUT.arg(node, "chunk_rows") == 8 and LAYOUT.arg(node, "dest_slot") is slot
    LAYOUT.set_args(node, slots_per_rank=5)
    assert LAYOUT.arg(node, "slots_per_rank") == 5                  # changed
    assert LAYOUT.arg(node, "chunk_rows") == 8 and LAYOUT.arg(node, "dest_slot") is slot   # kept
    node.args, node.kwargs = node.args[:3], {n: LAYOUT.arg(node, n) for n in LAYOUT.args[3:]}
    assert LAYOUT.arg(node, "group") == "ep"           # keyword arguments are read too
    with pytest.raises(AssertionError, match="missing"):
        LAYOUT.call_args(dest_slot=slot)
    with pytest.raises(AssertionError):
        LAYOUT.set_args(node, chunk=3)


def test_keys_and_gradients_come_from_the_declaration():
    assert LAYOUT.output_keys("n") == tuple(f"n[{i}]" for i in range(6))
    assert LAYOUT.output_key("n", "offs") == "n[4]" and DISPATCH.output_key("n") == "n"
    assert COMBINE.key("n", COMBINE.input_grad) == "n.bwd.grad_in"
    with pytest.raises(AssertionError, match="no part"):
        DISPATCH.key("n", "bwd.grad_in")
    assert EXPERT_FFN_RECOMPUTE_CLONE.owns("f", "f.clone_w2.recompute.bwd.rs_in")
    assert not EXPERT_FFN_RECOMPUTE_CLONE.owns("f", "f.clone_w2.bwd.grad_in")
    grads = DISPATCH.input_grads(x="gx")
    assert len(grads) == len(DISPATCH.args) and grads[0] == "gx" and set(grads[1:]) == {None}
    with pytest.raises(AssertionError):
        DISPATCH.input_grads(send_copy="g")


def test_things_that_are_not_echo_ops_have_no_contract():
    assert contracts.of(operator.getitem) is None and contracts.of("reshape") is None


def test_setup_context_saves_the_declared_arguments_and_keeps_the_named_ones():
    class Ctx:
        def save_for_backward(self, *tensors):
            self.saved_tensors = tensors

    ctx, x = Ctx(), torch.zeros(5, 3)
    maps = [torch.arange(4) + i for i in range(4)]
    DISPATCH.setup_context("x", "top_k", "buf")(ctx, (x, *maps, 2, "ep", "d"), None)
    assert ctx.x_shape == (5, 3) and ctx.top_k == 2 and ctx.buf == "d" and not hasattr(ctx, "group")
    saved = DISPATCH.saved_by_name(ctx)
    assert list(saved) == ["send_copy", "copy_slot", "sorted_src", "recv_sorted"]
    assert all(a is b for a, b in zip(saved.values(), maps))
