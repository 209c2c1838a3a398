"""The memoised shape propagation gives every node the same tensor_meta as the plain one."""
import pytest

from echoc.compile import compile_graph
from echoc.shapes import _PlanShapes, example_tokens
from echoc.spec_io import load_spec
from runtime.dtypes import torch_dtype
from runtime.model import meta_transformer
from runtime.parallel import shard_experts


def _metas(spec, memo: bool) -> dict:
    model = meta_transformer(spec.model, torch_dtype(spec.model.dtype))
    shard_experts(model, 0, spec.parallel.ep)
    gm, _ = compile_graph(model, spec)
    shapes = _PlanShapes(gm, memo=memo)
    shapes.propagate(example_tokens(spec))
    return {n.name: n.meta.get("tensor_meta") for n in gm.graph.nodes}, shapes


@pytest.mark.parametrize("overrides", [
    {},
    {"parallel.ep": 2, "echo.enabled": True, "parallel.zero": 3, "train.recompute": "full"},
    {"parallel.ep": 4, "model.dtype": "bfloat16", "parallel.zero": 1},
])
def test_memo_matches_plain_propagation(make_spec, overrides):
    spec = make_spec(overrides)
    plain, _ = _metas(spec, memo=False)
    memo, shapes = _metas(spec, memo=True)
    assert memo == plain
    assert shapes._memo                     # the memo was used, so the comparison means something


def test_memo_matches_on_the_mla_flagship_shape():
    """glm5-mini: MLA attention, shared experts, several identical layers (memo hits)."""
    spec = load_spec("specs/glm5-mini.yaml")
    plain, _ = _metas(spec, memo=False)
    memo, _ = _metas(spec, memo=True)
    assert memo == plain
