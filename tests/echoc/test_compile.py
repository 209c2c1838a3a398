"""`echoc compile` of the full GLM-5 spec on the meta device: artifacts, counts, no real weights."""
import json
from pathlib import Path

import pytest

from echoc import cli
from echoc.artifact import write_build
from echoc.compile import compile_build
from echoc.spec_io import load_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_glm5_compiles_without_real_weights(tmp_path):
    spec = load_spec(ROOT / "specs/glm5.yaml")
    build = compile_build(spec)
    write_build(build, tmp_path / "glm5")
    s = json.loads((tmp_path / "glm5/summary.json").read_text())
    assert s["layers"] == 78 and s["moe_layers"] == 75 and s["experts"] == 256
    total = sum(s["parameters"].values())
    assert 720e9 < total < 760e9, total          # GLM-5: 744B (we do not build MTP / DSA indexer)
    assert 36e9 < s["active_parameters_per_token"] < 44e9
    assert s["peak_rss_mib"] < 4096, "compile must not materialise weights (1.4 TB in bf16)"
    graph = (tmp_path / "glm5/graph.txt").read_text()
    assert graph.count("echo.dispatch") == 75 and graph.count("echo.clone_weights") == 0
    # every MoE layer's receive buffer has the static, budget-derived shape
    assert f"bfloat16[{spec.receive_rows}, 6144]" in graph
    assert [p["name"] for p in s["passes"]][:2] == ["sync_free_dispatch", "echo_clone"]
    assert build.summary["dispatch"]["receive_rows"] == spec.receive_rows


def test_echo_without_recompute_shows_clone_nodes(tmp_path):
    spec = load_spec(ROOT / "specs/glm5-mini.yaml", ["echo.enabled=true", "echo.spare_slots_per_rank=2",
                                                     "echo.recompute_clone_dispatch=false"])
    write_build(compile_build(spec), tmp_path / "mini")
    graph = (tmp_path / "mini/graph.txt").read_text()
    moe = spec.model.num_moe_layers
    assert graph.count("echo.plan ") == moe and graph.count("echo.clone_weights") == 2 * moe
    El, S = spec.experts_per_rank, 2
    assert f"bfloat16[{El + S}, 2048, 2048]" in graph  # w13 of home + spare slots


@pytest.mark.parametrize("sets, inline, shown", [
    (["echo.enabled=false"], None, "shared expert; expert weight gradients"),
    ([], "ECHO: the clones send them home by collectives", "expert weight gradients inline (ECHO"),
    (["echo.enabled=false", "backends.wgrad_overlap=false", "backends.shared_expert_overlap=false"],
     "backends.wgrad_overlap is false", "shared expert inline; expert weight gradients inline"),
    (["echo.enabled=false", "cluster.device=cpu", "model.dtype=float32", "backends.exchange=nccl",
      "backends.cuda_graph=none"], None,
     "none (cpu: one stream)")])
def test_the_summary_says_what_runs_on_a_second_stream_and_why_not(sets, inline, shown):
    spec = load_spec(ROOT / "specs/glm5-mini.yaml", ["model.num_layers=2"] + sets)
    streams = compile_build(spec).summary["streams"]
    assert streams["weight_gradients_inline"] == inline
    assert shown in cli._streams_text(streams)
