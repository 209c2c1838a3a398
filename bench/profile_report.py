"""The printed tables of bench/profile_layer.py: top kernels with readable names, per-node totals."""
from __future__ import annotations

import re
import zlib


def pretty(kernel: str) -> str:
    """A readable kernel name: the functor or op of an ATen elementwise kernel, the tile of a
    CUTLASS grouped GEMM (with a tag that tells its variants apart), templates dropped."""
    if kernel.startswith("_ZN7cutlass") and "GroupProblemShape" in kernel:
        tile = re.search(r"NSG_ILi(\d+)EEENSG_ILi(\d+)EEENSG_ILi(\d+)E", kernel)
        t = "x".join(tile.groups()) if tile else "?"
        return f"cutlass grouped GEMM sm90 {t} #{zlib.crc32(kernel.encode()) % 4096:03x}"
    m = re.search(r"native::(?:\(anonymous namespace\)::)?(\w+_kernel)\(at::Tensor", kernel)
    if m:
        return m.group(1)
    m = re.search(r"binary_internal::(\w+Functor)", kernel) or re.search(r"(\w+Functor)<", kernel)
    if m:
        return f"elementwise {m.group(1)}"
    m = re.match(r"void (?:[\w:]+::)?(\w+)<", kernel)
    return m.group(1) if m else kernel


def short(name: str, width: int) -> str:
    return name if len(name) <= width else name[:width - 1] + "…"


def print_tables(res: dict, n_top: int) -> None:
    a = res["args"]
    print(f"\nMoE layer profile: H {a['hidden']}, {a['experts']} experts top-{a['top_k']}, F {a['ffn']}, "
          f"{a['tokens']} tokens, 1 shared expert, capacity {a['capacity']}, bf16, EP {res['world']}, "
          f"{res['device']}")
    t = res["totals"]
    print("totals, ms per fwd+bwd: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}"
                                                for k, v in t.items()))
    src = "graph" if res.get("graph_top") else "eager"
    print(f"\ntop {n_top} kernels by GPU time ({src}; labels "
          f"{'aligned from the labelled eager run' if src == 'graph' else 'from the labelled run'})")
    _print_top(res[f"{src}_top"][:n_top], 24)
    print(f"\nper node, ms per step ({src}; eager total in the last column)")
    eager = {r["node"]: r for r in res["eager_nodes"]}
    print(f"{'node':<28}{'fwd':>8}{'bwd':>8}{'other':>8}{'total':>8}{'kernels':>9}{'eager':>8}")
    for r in res[f"{src}_nodes"]:
        e = eager.get(r["node"], {}).get("total_ms", 0.0)
        print(f"{short(r['node'], 28):<28}{r['fwd_ms']:>8.3f}{r['bwd_ms']:>8.3f}{r['other_ms']:>8.3f}"
              f"{r['total_ms']:>8.3f}{r['kernels']:>9g}{e:>8.3f}")


def _print_top(rows, node_width):
    print(f"{'ms':>8}{'calls':>7}  {'node':<{node_width}}{'ph':<4} kernel")
    for r in rows:
        print(f"{r['ms']:>8.3f}{r['calls']:>7g}  {short(r['node'], node_width):<{node_width}}{r['phase']:<4} "
              f"{short(pretty(r['kernel']), 70)}")


def print_extras(res: dict, n_top: int) -> None:
    """The floor's kernels beside the layer's GEMMs, and the peer's top kernels."""
    if "floor" in res:
        f = res["floor"]
        print(f"\nGEMM floor alone (captured): {f['ms']:.3f} ms (kernel sum {f['kernel_sum_ms']:.3f}); "
              f"the same graph on zeros: {f['zeros_ms']:.3f} ms")
        for k in f["kernels"]:
            print(f"{k['ms']:>8.3f}  {short(pretty(k['kernel']), 70)}")
    p = res.get("peer")
    if p and "top" in p:
        print(f"\ntorchtitan layer, eager: wall {p['eager_wall_ms']:.3f} ms, kernel sum {p['kernel_sum_ms']:.3f} ms, "
              f"{p['kernels_per_step']} kernels; top {n_top} (module · op)")
        _print_top(p["top"][:n_top], 50)
    elif p:
        print(f"\ntorchtitan layer: {p}")
