"""bench/profile_layer.py labels a captured graph's kernels from a labelled eager step: in launch
order first, then (for kernels a second stream moved out of that order) by name in turn."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))

import profile_layer  # noqa: E402

K = profile_layer.Kernel


def test_kernels_a_second_stream_moved_keep_their_eager_labels():
    eager = [K("router", 1, "route", "fwd"), K("gemm", 1, "ffn", "bwd"), K("push", 1, "dispatch", "bwd"),
             K("gemm", 1, "ffn", "bwd"), K("mm", 1, "route", "bwd")]
    graph = [("router", 1.0), ("gemm", 1.0), ("push", 1.0), ("mm", 1.0), ("gemm", 2.0), ("stray", 1.0)]
    out, in_order = profile_layer.align(eager, graph)
    assert [(k.name, k.node, k.phase) for k in out] == [
        ("router", "route", "fwd"), ("gemm", "ffn", "bwd"), ("push", "dispatch", "bwd"), ("mm", "route", "bwd"),
        ("gemm", "ffn", "bwd"), ("stray", profile_layer.UNATTRIBUTED, "")]
    assert [k.us for k in out] == [g[1] for g in graph]       # the graph's own times
    assert in_order == 4 / 6


def test_an_eager_kernel_labels_one_graph_kernel_at_most():
    out, _ = profile_layer.align([K("gemm", 1, "ffn", "bwd")], [("gemm", 1.0), ("gemm", 1.0)])
    assert [k.node for k in out] == ["ffn", profile_layer.UNATTRIBUTED]
