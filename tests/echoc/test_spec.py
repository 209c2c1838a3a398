"""echoc/spec_io.py: shipped specs load; every broken spec names its YAML path, line and problem."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from echoc.errors import EchocError, SpecError
from echoc.spec import Spec
from echoc.spec_io import json_schema, load_spec, spec_from_dict, spec_hash

SPECS = Path(__file__).resolve().parents[2] / "specs"

# A small valid spec; each broken case below edits one or two of its lines.
BASE = """\
model:
  name: t
  vocab_size: 256
  hidden_size: 64
  num_layers: 3
  first_dense_layers: 1
  dense_intermediate_size: 128
  dtype: float32
  attention:
    kind: gqa
    num_heads: 4
    num_kv_heads: 2
    head_dim: 16
  moe:
    num_experts: 8
    top_k: 2
    expert_intermediate_size: 32
    router:
      num_groups: 1
      topk_groups: 1
cluster:
  device: cpu
  nodes: 1
  gpus_per_node: 2
parallel:
  ep: 2
  dp: 1
budgets:
  seq_len: 64
  micro_batch: 2
  received_token_capacity: 2.0
  on_overflow: drop
echo:
  enabled: false
  spare_slots_per_rank: 1
backends:
  dispatch: torch
  cuda_graph: none
train:
  steps: 3
  data:
    kind: synthetic
"""


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def edit(text: str, *pairs: tuple[str, str]) -> str:
    """Replace each `old` (which must occur exactly once) by `new`."""
    for old, new in pairs:
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def line_of(text: str, needle: str) -> int:
    """1-based line of the only line of `text` that contains `needle`."""
    hits = [i for i, line in enumerate(text.splitlines(), 1) if needle in line]
    assert len(hits) == 1, (needle, hits)
    return hits[0]


def problems_of(tmp_path: Path, text: str, overrides=()) -> list[tuple[str, int | None, str]]:
    with pytest.raises(SpecError) as info:
        load_spec(write(tmp_path, text), list(overrides))
    return info.value.problems


def find(problems, path: str) -> tuple[int | None, str]:
    """(line, message) of the problem at `path`; fails listing all problems if none."""
    hits = [(line, msg) for p, line, msg in problems if p == path]
    assert hits, f"no problem at {path}: {problems}"
    return hits[0]


# Shipped specs ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["glm5", "glm5-h100", "glm5-mini", "deepseek-v3", "tiny"])
def test_shipped_specs_load(name):
    spec = load_spec(SPECS / f"{name}.yaml")
    assert isinstance(spec, Spec)
    assert spec.parallel.ep * spec.parallel.dp == spec.cluster.world_size


def test_glm5_numbers():
    s = load_spec(SPECS / "glm5.yaml")
    m, moe = s.model, s.model.moe
    assert (m.num_layers, m.first_dense_layers, m.num_moe_layers) == (78, 3, 75)
    assert (m.hidden_size, m.dense_intermediate_size, m.vocab_size) == (6144, 12288, 154880)
    assert (moe.num_experts, moe.top_k, moe.expert_intermediate_size, moe.shared_experts) == (256, 8, 2048, 1)
    assert (moe.router.score_fn, moe.router.routed_scaling_factor) == ("sigmoid", 2.5)
    a = m.attention
    assert (a.kind, a.num_heads, a.q_lora_rank, a.kv_lora_rank) == ("mla", 64, 2048, 512)
    assert (a.qk_nope_head_dim, a.qk_rope_head_dim, a.v_head_dim) == (192, 64, 256)
    assert (s.cluster.world_size, s.parallel.ep, s.parallel.dp, s.experts_per_rank) == (256, 64, 4, 4)
    assert s.echo.enabled and s.echo.spare_slots_per_rank == 2 and s.echo.recompute_clone_dispatch
    assert s.backends.cuda_graph == "full_iteration"


def test_tiny_data_path_is_absolute_and_exists():
    s = load_spec(SPECS / "tiny.yaml")
    p = Path(s.train.data.path)
    assert p.is_absolute() and p == (SPECS / "data" / "tiny.txt").resolve()
    assert 20_000 <= p.stat().st_size <= 50_000
    assert (s.cluster.device, s.cluster.world_size, s.model.dtype) == ("cpu", 2, "float32")


def test_relative_data_path_resolves_from_spec_dir(tmp_path, monkeypatch):
    sub = tmp_path / "cfg"
    sub.mkdir()
    text = edit(BASE, ("    kind: synthetic", "    kind: text\n    path: ../corpus.txt"))
    monkeypatch.chdir(sub)  # the current directory must not matter
    spec = load_spec(write(tmp_path, text, "spec.yaml"))
    assert spec.train.data.path == str((tmp_path.parent / "corpus.txt").resolve())


def test_relative_data_path_from_override_resolves_from_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    spec = load_spec(write(tmp_path, BASE), ["train.data.kind=text", "train.data.path=x.txt"])
    assert spec.train.data.path == str((tmp_path / "x.txt").resolve())


def test_exponent_floats_without_dot(tmp_path):
    text = edit(BASE, ("  steps: 3\n", "  steps: 3\n  optimizer:\n    lr: 1e-3\n    weight_decay: 1E+0\n"))
    opt = load_spec(write(tmp_path, text)).train.optimizer
    assert (opt.lr, opt.weight_decay) == (1e-3, 1.0)


def test_base_is_valid(tmp_path):
    spec = load_spec(write(tmp_path, BASE))
    assert spec.receive_rows == spec.peer_chunk_rows * 2


# Broken specs: (id, edits, yaml path, text whose line is expected, phrase in the message) ------

CASES = [
    ("unknown top-level key", [("train:\n", "optimiser:\n  lr: 1\ntrain:\n")],
     "optimiser", "optimiser:", "allowed keys here are: model, cluster, parallel, budgets"),
    ("unknown nested key", [("    top_k: 2\n", "    top_k: 2\n    topk: 3\n")],
     "model.moe.topk", "topk: 3", "did you mean 'top_k'"),
    ("unknown key in attention", [("    head_dim: 16", "    head_dim: 16\n    q_lora_rank: 8")],
     "model.attention.q_lora_rank", "q_lora_rank", "allowed keys here are: kind, num_heads, num_kv_heads"),
    ("wrong type", [("hidden_size: 64", "hidden_size: big")],
     "model.hidden_size", "hidden_size: big", "expected an integer; got 'big'"),
    ("negative hidden size", [("hidden_size: 64", "hidden_size: -64")],
     "model.hidden_size", "hidden_size: -64", "must be > 0; got -64"),
    ("top_k > num_experts", [("top_k: 2", "top_k: 9")],
     "model.moe.top_k", "top_k: 9", "must be <= num_experts (8)"),
    ("topk_groups > num_groups", [("num_groups: 1", "num_groups: 2"), ("topk_groups: 1", "topk_groups: 3")],
     "model.moe.router.topk_groups", "topk_groups: 3", "must be <= num_groups (2)"),
    ("top_k > experts in selected groups", [("top_k: 2", "top_k: 3"), ("num_groups: 1", "num_groups: 4")],
     "model.moe.top_k", "top_k: 3", "exceeds the experts in the selected groups (1 × 2)"),
    ("experts not divisible by groups", [("num_groups: 1", "num_groups: 3")],
     "model.moe.router.num_groups", "num_groups: 3", "divisible by num_groups"),
    ("ep*dp != world", [("dp: 1", "dp: 2")],
     "parallel", "parallel:", "must equal nodes × gpus_per_node"),
    ("experts not divisible by ep", [("gpus_per_node: 2", "gpus_per_node: 3"), ("ep: 2", "ep: 3")],
     "parallel.ep", "ep: 3", "num_experts (8) must be divisible by ep (3)"),
    ("capacity < 1", [("received_token_capacity: 2.0", "received_token_capacity: 0.5")],
     "budgets.received_token_capacity", "received_token_capacity", "must be >= 1.0 (got 0.5)"),
    ("bad on_overflow literal", [("on_overflow: drop", "on_overflow: ignore")],
     "budgets.on_overflow", "on_overflow", "'ignore' is not allowed; allowed values are 'drop', 'error' or 'rerun'"),
    ("bad dispatch literal", [("dispatch: torch", "dispatch: nccl")],
     "backends.dispatch", "dispatch", "allowed values are 'torch', 'symm_mem', 'deepep' or 'sync'"),
    ("bad dtype literal", [("dtype: float32", "dtype: fp8")],
     "model.dtype", "dtype", "allowed values are 'float32' or 'bfloat16'"),
    ("deepep on cpu", [("dispatch: torch", "dispatch: deepep")],
     "backends.dispatch", "dispatch", "'deepep' needs cluster.device 'cuda'"),
    ("cuda_graph on cpu", [("cuda_graph: none", "cuda_graph: full_iteration")],
     "backends.cuda_graph", "cuda_graph", "CUDA graphs need cluster.device 'cuda'"),
    ("sync + full_iteration", [("device: cpu", "device: cuda"), ("dispatch: torch", "dispatch: sync"),
                               ("cuda_graph: none", "cuda_graph: full_iteration")],
     "backends.dispatch", "dispatch: sync", "cannot be captured"),
    ("arena with the sync backend", [("dispatch: torch", "dispatch: sync"),
                                     ("cuda_graph: none", "cuda_graph: none\n  buffers: arena")],
     "backends.buffers", "buffers: arena", "'arena' needs dispatch 'torch'"),
    ("bad buffers literal", [("cuda_graph: none", "cuda_graph: none\n  buffers: pool")],
     "backends.buffers", "buffers", "allowed values are 'arena' or 'allocator'"),
    ("gqa heads not divisible", [("num_kv_heads: 2", "num_kv_heads: 3")],
     "model.attention.num_kv_heads", "num_kv_heads", "must be a multiple of num_kv_heads (3)"),
    ("odd head_dim", [("head_dim: 16", "head_dim: 15")],
     "model.attention.head_dim", "head_dim", "must be even"),
    ("odd mla rope dim", [("    kind: gqa\n    num_heads: 4\n    num_kv_heads: 2\n    head_dim: 16\n",
                           "    kind: mla\n    num_heads: 4\n    kv_lora_rank: 32\n    qk_nope_head_dim: 16\n"
                           "    qk_rope_head_dim: 7\n    v_head_dim: 16\n")],
     "model.attention.qk_rope_head_dim", "qk_rope_head_dim", "must be even"),
    ("bad attention kind", [("kind: gqa", "kind: mha")],
     "model.attention.kind", "kind: mha", "'mha' is not allowed; allowed values are 'gqa', 'mla'"),
    ("attention kind missing", [("    kind: gqa\n", "")],
     "model.attention.kind", "attention:", "required; allowed values are 'gqa', 'mla'"),
    ("missing required field", [("    expert_intermediate_size: 32\n", "")],
     "model.moe.expert_intermediate_size", "  moe:", "required"),
    ("empty section", [("  seq_len: 64\n  micro_batch: 2\n  received_token_capacity: 2.0\n  on_overflow: drop\n", "")],
     "budgets", "budgets:", "expected a section (a mapping of keys); got null"),
    ("first_dense_layers > num_layers", [("first_dense_layers: 1", "first_dense_layers: 5")],
     "model.first_dense_layers", "first_dense_layers", "more than num_layers (3)"),
    ("echo enabled with 0 slots", [("enabled: false", "enabled: true"), ("spare_slots_per_rank: 1", "spare_slots_per_rank: 0")],
     "echo.spare_slots_per_rank", "spare_slots_per_rank", "must be >= 1 when echo.enabled"),
    ("tokens_per_rank mismatch", [("  micro_batch: 2\n", "  micro_batch: 2\n  tokens_per_rank: 100\n")],
     "budgets.tokens_per_rank", "tokens_per_rank", "must equal seq_len × micro_batch (64 × 2 = 128)"),
    ("text data without path", [("kind: synthetic", "kind: text")],
     "train.data.path", "  data:", "needs data.path"),
    ("path with synthetic data", [("    kind: synthetic", "    kind: synthetic\n    path: a.txt")],
     "train.data.path", "path: a.txt", "only read when data.kind is 'text'"),
    ("vocab too small for text", [("vocab_size: 256", "vocab_size: 100"),
                                  ("    kind: synthetic", "    kind: text\n    path: a.txt")],
     "model.vocab_size", "vocab_size", "too small for byte-level text"),
    ("domains not partitioning nodes", [("nodes: 1", "nodes: 2"), ("gpus_per_node: 2", "gpus_per_node: 1\n"
                                        "  inter_domain_gbps: 10\n  domains:\n  - nodes: [0]\n  - nodes: [0]")],
     "cluster.domains", "domains:", "must partition nodes 0..1 exactly; got [0, 0]"),
    ("domains without inter_domain_gbps", [("gpus_per_node: 2", "gpus_per_node: 2\n  domains:\n  - nodes: [0]")],
     "cluster.inter_domain_gbps", "cluster:", "required when cluster.domains is given"),
    ("list item of the wrong type", [("gpus_per_node: 2", "gpus_per_node: 2\n  inter_domain_gbps: 10\n"
                                      "  domains:\n  - nodes:\n    - zero")],
     "cluster.domains.0.nodes.0", "- zero", "expected an integer; got 'zero'"),
    ("empty list", [("gpus_per_node: 2", "gpus_per_node: 2\n  inter_domain_gbps: 10\n  domains:\n  - nodes: []")],
     "cluster.domains.0.nodes", "nodes: []", "at least 1 item"),
    ("section of the wrong type", [("echo:\n  enabled: false\n  spare_slots_per_rank: 1\n", "echo: yes\n")],
     "echo", "echo: yes", "expected a section (a mapping of keys); got true"),
    ("bad model name", [("name: t", "name: my model")],
     "model.name", "name: my model", "contains ' ', not allowed in a file name"),
    ("betas too short", [("  steps: 3\n", "  steps: 3\n  optimizer:\n    betas: [0.9]\n")],
     "train.optimizer.betas.1", "betas", "required"),
    ("bool expected", [("enabled: false", "enabled: maybe")],
     "echo.enabled", "enabled", "expected true or false; got 'maybe'"),
    ("duplicate key", [("  hidden_size: 64\n", "  hidden_size: 64\n  hidden_size: 32\n")],
     "model.hidden_size", "hidden_size: 32", "duplicate key (first given on line 4)"),
    ("yaml syntax error", [("  vocab_size: 256", "   vocab_size: 256")],
     "(yaml syntax)", "vocab_size", "mapping values are not allowed here"),
    ("yaml unclosed flow", [("    top_k: 2", "    top_k: [2, 3}")],
     "(yaml syntax)", "top_k", "expected ',' or ']'"),
]


@pytest.mark.parametrize("edits,path,line_text,phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_broken_spec(tmp_path, edits, path, line_text, phrase):
    text = edit(BASE, *edits)
    line, msg = find(problems_of(tmp_path, text), path)
    assert line == line_of(text, line_text)
    assert phrase in msg


def test_top_k_over_num_experts_is_one_problem(tmp_path):
    problems = problems_of(tmp_path, edit(BASE, ("top_k: 2", "top_k: 9")))
    assert [p for p, _, _ in problems] == ["model.moe.top_k"]


def test_top_level_not_a_mapping(tmp_path):
    problems = problems_of(tmp_path, "# a comment\n- model\n- budgets\n")
    assert problems == [("(top level)", 2, problems[0][2])]
    assert "expected a mapping with the sections model, cluster" in problems[0][2]


def test_empty_file(tmp_path):
    [(path, line, msg)] = problems_of(tmp_path, "# nothing\n")
    assert path == "(top level)" and "empty" in msg


def test_missing_file(tmp_path):
    with pytest.raises(SpecError) as info:
        load_spec(tmp_path / "nope.yaml")
    assert info.value.problems == [("(file)", None, "file not found")]
    assert "nope.yaml" in str(info.value)


def test_missing_top_level_section_has_no_line(tmp_path):
    text = BASE[:BASE.index("budgets:")] + BASE[BASE.index("echo:"):]
    assert find(problems_of(tmp_path, text), "budgets") == (None, "required")


def test_spec_error_is_echoc_error_and_readable(tmp_path):
    text = edit(BASE, ("top_k: 2", "top_k: 9"))
    with pytest.raises(EchocError) as info:
        load_spec(write(tmp_path, text))
    assert f"model.moe.top_k (line {line_of(text, 'top_k: 9')}): top_k (9) must be <= num_experts" in str(info.value)


def test_several_field_problems_reported_at_once(tmp_path):
    text = edit(BASE, ("hidden_size: 64", "hidden_size: -1"), ("on_overflow: drop", "on_overflow: maybe"),
                ("dispatch: torch", "dispatch: nccl"), ("  steps: 3", "  steps: 3\n  epochs: 2"),
                ("num_kv_heads: 2", "num_kv_heads: 3"))
    problems = problems_of(tmp_path, text)
    paths = {p for p, _, _ in problems}
    assert {"model.hidden_size", "budgets.on_overflow", "backends.dispatch", "train.epochs",
            "model.attention.num_kv_heads"} <= paths
    for p, line, _ in problems:
        assert line is not None, p


def test_several_cross_field_problems_reported_at_once(tmp_path):
    text = edit(BASE, ("dispatch: torch", "dispatch: deepep"), ("cuda_graph: none", "cuda_graph: full_iteration"),
                ("top_k: 2", "top_k: 9"), ("first_dense_layers: 1", "first_dense_layers: 4"))
    paths = [p for p, _, _ in problems_of(tmp_path, text)]
    for p in ["backends.dispatch", "backends.cuda_graph", "model.moe.top_k", "model.first_dense_layers"]:
        assert p in paths


def test_section_validator_reports_both_problems(tmp_path):
    text = edit(BASE, ("received_token_capacity: 2.0", "received_token_capacity: 0.9"),
                ("  micro_batch: 2\n", "  micro_batch: 2\n  tokens_per_rank: 7\n"))
    paths = {p for p, _, _ in problems_of(tmp_path, text)}
    assert {"budgets.received_token_capacity", "budgets.tokens_per_rank"} <= paths


# Overrides -------------------------------------------------------------------------------------

def test_overrides_apply(tmp_path):
    spec = load_spec(write(tmp_path, BASE), [
        "parallel.ep=2", "budgets.received_token_capacity=1.5", "echo.enabled=true", "train.optimizer.lr=1e-3",
        "cluster.domains=[{nodes: [0]}]", "cluster.inter_domain_gbps=12.5"])
    assert spec.parallel.ep == 2 and spec.budgets.received_token_capacity == 1.5
    assert spec.echo.enabled and spec.train.optimizer.lr == 1e-3
    assert spec.cluster.domains[0].nodes == [0] and spec.cluster.inter_domain_gbps == 12.5


def test_override_creates_missing_section(tmp_path):
    text = BASE[:BASE.index("echo:")] + BASE[BASE.index("backends:"):]
    spec = load_spec(write(tmp_path, text), ["echo.enabled=true", "echo.spare_slots_per_rank=2"])
    assert spec.echo.enabled and spec.echo.spare_slots_per_rank == 2


def test_override_of_list_item(tmp_path):
    text = edit(BASE, ("nodes: 1", "nodes: 2"), ("gpus_per_node: 2", "gpus_per_node: 1\n  inter_domain_gbps: 10\n"
                                               "  domains:\n  - nodes: [0]\n  - nodes: [0]"))
    spec = load_spec(write(tmp_path, text), ["cluster.domains.1.nodes=[1]"])
    assert [d.nodes for d in spec.cluster.domains] == [[0], [1]]


def test_shipped_spec_with_echo_override():
    spec = load_spec(SPECS / "tiny.yaml", ["echo.enabled=true"])
    assert spec.echo.enabled and spec.echo.spare_slots_per_rank >= 1


def test_override_unknown_path(tmp_path):
    problems = problems_of(tmp_path, BASE, ["model.moe.topk=3"])
    line, msg = find(problems, "model.moe.topk")
    assert line is None and "(from --set)" in msg and "did you mean 'top_k'" in msg


def test_override_unknown_section(tmp_path):
    line, msg = find(problems_of(tmp_path, BASE, ["optim.lr=3"]), "optim")
    assert line is None and "(from --set) unknown key" in msg


def test_override_bad_value(tmp_path):
    line, msg = find(problems_of(tmp_path, BASE, ["budgets.on_overflow=panic"]), "budgets.on_overflow")
    assert line is None and "'panic' is not allowed" in msg


def test_override_value_keeps_equals_signs(tmp_path):
    line, msg = find(problems_of(tmp_path, BASE, ["parallel.ep=1=2"]), "parallel.ep")
    assert line is None and msg == "(from --set) expected an integer; got '1=2'"


def test_override_cross_field_error(tmp_path):
    problems = problems_of(tmp_path, BASE, ["parallel.ep=3"])
    line, msg = find(problems, "parallel")  # the section is in the file: its line
    assert line == line_of(BASE, "parallel:") and "ep × dp (3 × 1) must equal" in msg
    assert find(problems, "parallel.ep") == (None, "(from --set) num_experts (8) must be divisible by ep (3)")


def test_override_error_on_section_it_created(tmp_path):
    text = BASE[:BASE.index("echo:")] + BASE[BASE.index("backends:"):]
    line, msg = find(problems_of(tmp_path, text, ["echo.enabled=true"]), "echo.spare_slots_per_rank")
    assert line is None and msg.startswith("(from --set)")


@pytest.mark.parametrize("override,phrase", [
    ("parallel.ep", "expected PATH=VALUE"),
    ("=3", "expected PATH=VALUE"),
    ("parallel..ep=3", "expected PATH=VALUE"),
    ("parallel.ep=", "the value is empty"),
    ("parallel.ep=[1,", "not valid YAML"),
    ("model.hidden_size.x=1", "model.hidden_size is int 64, not a section"),
    ("cluster.domains.0.nodes=[0]", "cluster.domains is not set; give the whole list"),
])
def test_malformed_override(tmp_path, override, phrase):
    problems = problems_of(tmp_path, BASE, [override])
    assert len(problems) == 1
    path, line, msg = problems[0]
    assert line is None and "(from --set)" in msg and override in msg and phrase in msg


def test_override_list_index_out_of_range(tmp_path):
    text = edit(BASE, ("gpus_per_node: 2", "gpus_per_node: 2\n  inter_domain_gbps: 10\n  domains:\n  - nodes: [0]"))
    [(path, line, msg)] = problems_of(tmp_path, text, ["cluster.domains.3.nodes=[0]"])
    assert "cluster.domains has 1 item(s); no index 3" in msg


# spec_from_dict, hash, schema ------------------------------------------------------------------

def base_dict() -> dict:
    import yaml
    return yaml.safe_load(BASE)


def test_spec_from_dict_matches_load(tmp_path):
    assert spec_from_dict(base_dict()) == load_spec(write(tmp_path, BASE))


def test_spec_from_dict_errors_have_no_lines():
    d = base_dict()
    d["model"]["moe"]["top_k"] = 9
    d["budgets"]["on_overflow"] = "x"
    with pytest.raises(SpecError) as info:
        spec_from_dict(d, source="bench")
    assert info.value.source == "bench"
    assert all(line is None for _, line, _ in info.value.problems)
    assert any(p == "budgets.on_overflow" for p, _, _ in info.value.problems)


def test_spec_from_dict_rejects_non_mapping():
    with pytest.raises(SpecError):
        spec_from_dict([1, 2])


def test_spec_hash_stable(tmp_path):
    a = load_spec(write(tmp_path, BASE, "a.yaml"))
    # same values: different order, comments, flow style, and a default written out
    reordered = "# comment\n" + BASE[BASE.index("cluster:"):] + BASE[:BASE.index("cluster:")]
    reordered = edit(reordered, ("  dp: 1\n", "  dp: 1  # data parallel\n"),
                     ("  cuda_graph: none\n", "  cuda_graph: none\n  grouped_gemm: torch\n"))
    b = load_spec(write(tmp_path, reordered, "b.yaml"))
    h = spec_hash(a)
    assert len(h) == 16 and int(h, 16) >= 0
    assert h == spec_hash(b) == spec_hash(spec_from_dict(base_dict()))
    assert spec_hash(load_spec(write(tmp_path, BASE, "c.yaml"), ["train.steps=4"])) != h


def test_json_schema():
    schema = json_schema()
    assert set(schema["properties"]) == {"model", "cluster", "parallel", "budgets", "echo", "backends", "train"}
    assert set(schema["required"]) == {"model", "budgets"}
    json.dumps(schema)  # serialisable


# train.recompute ---------------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["none", "moe", "full", "auto"])
def test_train_recompute_values(tmp_path, value):
    spec = load_spec(write(tmp_path, BASE), [f"train.recompute={value}"])
    assert spec.train.recompute == value


def test_train_recompute_default_and_bad_value(tmp_path):
    assert load_spec(write(tmp_path, BASE)).train.recompute == "none"
    text = edit(BASE, ("  steps: 3\n", "  steps: 3\n  recompute: everything\n"))
    line, msg = find(problems_of(tmp_path, text), "train.recompute")
    assert line == line_of(text, "recompute:")
    assert "'none', 'moe', 'full' or 'auto'" in msg, msg


# parallel.zero, train.grad_reduce_dtype ----------------------------------------------------------

def test_zero_and_grad_reduce_dtype_defaults_and_values(tmp_path):
    spec = load_spec(write(tmp_path, BASE))
    assert (spec.parallel.zero, spec.train.grad_reduce_dtype) == (0, "float32")
    spec = load_spec(write(tmp_path, BASE), ["parallel.zero=3", "train.grad_reduce_dtype=bfloat16"])
    assert (spec.parallel.zero, spec.train.grad_reduce_dtype) == (3, "bfloat16")


@pytest.mark.parametrize("value,phrase", [("4", "must be <= 3; got 4"), ("-1", "must be >= 0; got -1"),
                                          ("true", "expected an integer")])
def test_zero_out_of_range(tmp_path, value, phrase):
    text = edit(BASE, ("  dp: 1\n", f"  dp: 1\n  zero: {value}\n"))
    line, msg = find(problems_of(tmp_path, text), "parallel.zero")
    assert line == line_of(text, "zero:")
    assert phrase in msg, msg


def test_a_dropless_rerun_at_zero_3_is_refused_by_validate(tmp_path):
    """The rerun program reads the trainer's whole weights; zero 3 keeps shards: refused, naming
    both fields' values; zero 2 with rerun and zero 3 with drop are fine."""
    line, msg = find(problems_of(tmp_path, BASE, ["parallel.zero=3", "budgets.on_overflow=rerun"]),
                     "budgets.on_overflow")
    assert "parallel.zero 3" in msg and "'drop' or 'error'" in msg, msg
    load_spec(write(tmp_path, BASE), ["parallel.zero=2", "budgets.on_overflow=rerun"])
    load_spec(write(tmp_path, BASE), ["parallel.zero=3", "budgets.on_overflow=drop"])


def test_grad_reduce_dtype_bad_value(tmp_path):
    text = edit(BASE, ("  steps: 3\n", "  steps: 3\n  grad_reduce_dtype: fp16\n"))
    line, msg = find(problems_of(tmp_path, text), "train.grad_reduce_dtype")
    assert line == line_of(text, "grad_reduce_dtype:")
    assert "'float32' or 'bfloat16'" in msg, msg


def test_cloning_within_one_rank_domains_is_refused(tmp_path):
    """echo.clone_domain 'node' with one GPU per node: every domain is a single rank, so nothing
    could ever be cloned; refused naming the field, and 'cluster' is accepted."""
    over = ["cluster.nodes=2", "cluster.gpus_per_node=1", "parallel.ep=2", "echo.enabled=true"]
    line, msg = find(problems_of(tmp_path, BASE, over + ["echo.clone_domain=node"]), "echo.clone_domain")
    assert "one rank" in msg and "'cluster'" in msg
    spec = load_spec(write(tmp_path, BASE), over + ["echo.clone_domain=cluster"])
    assert spec.clone_domain_ranks == 2


@pytest.mark.parametrize("over,field,phrase", [
    (["backends.dispatch=sync"], "echo.enabled", "sync-free backends.dispatch"),
    (["echo.recompute_clone_dispatch=true", "backends.grouped_gemm=loop"], "echo.recompute_clone_dispatch",
     "backends.grouped_gemm 'torch'"),
    (["model.first_dense_layers=3", "model.num_layers=3"], "echo.enabled", "cloning needs a MoE layer")])
def test_cloning_rules_compile_relies_on_are_checked_by_validate(tmp_path, over, field, phrase):
    """What compile or the run would refuse later, validate refuses now, naming the field; without
    cloning the same backends are fine."""
    base = ["cluster.gpus_per_node=2", "parallel.ep=2", "echo.enabled=true"]
    line, msg = find(problems_of(tmp_path, BASE, base + over), field)
    assert phrase in msg, msg
    load_spec(write(tmp_path, BASE), base[:2] + over + ["echo.enabled=false"])


@pytest.mark.parametrize("value", ["1", "0", "1.0", "'t'", "'yes'"])
def test_yes_no_fields_take_true_or_false_only(tmp_path, value):
    line, msg = find(problems_of(tmp_path, BASE, [f"echo.recompute_clone_dispatch={value}"]),
                     "echo.recompute_clone_dispatch")
    assert "expected true or false" in msg, msg


@pytest.mark.parametrize("over,field,step", [
    (["model.hidden_size=42"], "model.hidden_size", 4),
    (["model.moe.expert_intermediate_size=30"], "model.moe.expert_intermediate_size", 4),
    (["model.dtype=bfloat16", "model.hidden_size=60"], "model.hidden_size", 8)])
def test_grouped_mm_widths_must_be_16_byte_rows(tmp_path, over, field, step):
    """grouped_mm fails at run time on rows that are not a multiple of 16 bytes: validate refuses
    the width, naming the field and the multiple; 'loop' takes any width."""
    line, msg = find(problems_of(tmp_path, BASE, over), field)
    assert f"multiple of {step}" in msg and "'loop'" in msg, msg
    load_spec(write(tmp_path, BASE), over + ["backends.grouped_gemm=loop"])


@pytest.mark.parametrize("key,shown", [("~", "'~' (!!null)"), ("1", "'1' (!!int)"), ("[a]", "'a sequence' (!!seq)")])
def test_a_key_that_is_not_a_word_is_named_with_its_own_line(tmp_path, key, shown):
    text = edit(BASE, ("  hidden_size: 64", f"  hidden_size: 64\n  {key}: 2"))
    line, msg = find(problems_of(tmp_path, text), "model")
    assert line == text.splitlines().index(f"  {key}: 2") + 1 and shown in msg and "not a field name" in msg, msg


def test_an_empty_spec_path_says_so(tmp_path):
    with pytest.raises(SpecError, match="path is empty"):
        load_spec("")
