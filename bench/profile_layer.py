"""Where the compiled MoE layer's GPU time goes: the layer (`torch` backend, forward + backward)
under torch.profiler, every kernel labelled with the graph node it belongs to.

    python bench/profile_layer.py [--hidden 2048 --experts 64 --ffn 1024] [--out profile.json]

How kernels get their node (the same shapes and build as bench/moe_layer.py):
  forward   the GraphModule runs through an fx Interpreter that wraps each node in
            record_function("node:<name>"); a kernel belongs to the innermost such range
            around the CPU op that launched it.
  backward  a kernel launched under autograd's "evaluate_function: <Fn>Backward" carries that
            Function's sequence number; the forward op that created the Function (the last
            forward op recorded with that number) names the node. Kernels under neither
            (the engine's own work, AccumulateGrad) are listed as unattributed.
  graph     the layer is also captured in one CUDA graph (as the bench times it); its replay is
            profiled, and its kernels, in order, are aligned by name with one labelled eager
            step (then, those a second stream moved out of order, by name in turn), so the
            top-kernel table is the captured layer's own, with labels; `graph_aligned_fraction`
            is the share matched in order.
Prints the top kernels (captured) and the per-node totals (eager and captured); writes JSON.
`--device cpu` is a smoke test: leaf CPU ops stand in for kernels, no graph.
"""
from __future__ import annotations

import argparse
import difflib
import json
import os
import statistics
from collections import defaultdict, deque
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function

import layer_setup as ml
from profile_report import print_extras, print_tables
from peers import torchtitan_moe
from runtime import comm

NODE = "node:"
BWD = "autograd::engine::evaluate_function: "
UNATTRIBUTED = "(unattributed)"


class NodeLabels(torch.fx.Interpreter):
    """Runs a GraphModule node by node, each inside record_function("node:<name>")."""

    def run_node(self, n):
        with record_function(NODE + n.name):
            return super().run_node(n)


class ModuleLabels:
    """Every submodule's forward inside record_function("node:<module name>") (for the peer,
    which is no GraphModule), through forward pre/post hooks."""

    def __init__(self, module):
        self.handles, self.open = [], {}
        for name, m in module.named_modules():
            self.handles.append(m.register_forward_pre_hook(self._enter(name or "moe")))
            self.handles.append(m.register_forward_hook(self._exit(name or "moe")))

    def _enter(self, name):
        def hook(m, args):
            rf = record_function(NODE + name)
            rf.__enter__()
            self.open.setdefault(name, []).append(rf)
        return hook

    def _exit(self, name):
        def hook(m, args, out):
            self.open[name].pop().__exit__(None, None, None)
        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


@dataclass
class Kernel:
    """One device activity (kernel, memcpy, memset) of one step, in launch order."""
    name: str
    us: float
    node: str
    phase: str   # fwd | bwd | "" (unattributed)


def _walk_label(e) -> tuple[str, str, int]:
    """(node, phase, backward sequence number or -1) of a CPU op, from its enclosing ranges."""
    while e is not None:
        if e.name.startswith(NODE):
            return e.name[len(NODE):], "fwd", -1
        if e.name.startswith(BWD):
            return e.name[len(BWD):], "bwd", e.sequence_nr
        e = e.cpu_parent
    return UNATTRIBUTED, "", -1


def _top_op(e) -> str:
    """The outermost op (not a range) above a CPU op: aten::linear rather than aten::mm."""
    top = e
    while e is not None and not e.name.startswith((NODE, BWD, "step:")):
        top, e = e, e.cpu_parent
    return top.name


def _forward_creators(events, with_op=False) -> dict[int, str]:
    """sequence number → node of the forward op that created the autograd Function: ops record
    the next free number, and the op that takes it is the last one to record it."""
    seq_node: dict[int, tuple[float, str]] = {}
    for e in events:
        if e.device_type != DeviceType.CPU or e.sequence_nr < 0:
            continue
        node, phase, _ = _walk_label(e)
        if with_op and phase == "fwd":
            node = f"{node} {_top_op(e)}"
        if phase == "fwd":
            start = e.time_range.start
            if e.sequence_nr not in seq_node or seq_node[e.sequence_nr][0] <= start:
                seq_node[e.sequence_nr] = (start, node)
    return {s: n for s, (_, n) in seq_node.items()}


def _launches(events, device) -> list[tuple[float, str, float, object]]:
    """(CPU start, device activity name, µs, launching CPU op) in launch order. On CPU, leaf ops."""
    out = []
    for e in events:
        if e.device_type != DeviceType.CPU:
            continue
        if device.type == "cuda":
            out += [(e.time_range.start, k.name, k.duration, e) for k in e.kernels
                    if not k.name.startswith((NODE, "step:"))]
        elif not e.cpu_children and not _annotation(e):
            out.append((e.time_range.start, e.name, e.cpu_time_total, e))
    return sorted(out, key=lambda t: t[0])


def labelled_steps(events, device, step_ranges, with_op=False) -> list[list[Kernel]]:
    """Each profiled step's device activities, in launch order, with node and phase
    (`with_op`: the launching op's name appended to the node, for the peer)."""
    creators = _forward_creators(events, with_op)
    steps: list[list[Kernel]] = [[] for _ in step_ranges]
    for start, name, us, op in _launches(events, device):
        node, phase, seq = _walk_label(op)
        if with_op and phase == "fwd":
            node = f"{node} {_top_op(op)}"
        if phase == "bwd":
            fn = node
            node = creators.get(seq, f"{UNATTRIBUTED} {fn}")
            if node.startswith(UNATTRIBUTED):
                phase = ""
        i = next((i for i, (a, b) in enumerate(step_ranges) if a <= start <= b), None)
        if i is None and phase == "bwd":   # the autograd thread: after its step's forward started
            i = max((i for i, (a, _) in enumerate(step_ranges) if a <= start), default=None)
        if i is not None:
            steps[i].append(Kernel(name, us, node, phase))
    return steps


def step_ranges_of(events, prefix):
    return sorted((e.time_range.start, e.time_range.end) for e in events
                  if e.device_type == DeviceType.CPU and e.name.startswith(prefix))


def profile_eager(gm, model, x, gy, device, steps, peer=None):
    """Profiled labelled eager steps → (list of steps of Kernel, median wall ms per step).
    With `peer` (a plain module), that module runs instead, labelled by submodule and op."""
    interp = NodeLabels(gm) if peer is None else None
    labels = ModuleLabels(peer) if peer is not None else None
    walls = []

    def step():
        for p in (model if peer is None else peer).parameters():
            p.grad = None
        xr = x.detach().requires_grad_(True)
        y = interp.run(xr)[0] if peer is None else peer(xr)
        y.backward(gy)

    for _ in range(2):
        step()
    ml.synchronize(device)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for i in range(steps):
            with record_function(f"step:{i}"):
                walls.append(_wall_ms(step, device))
    if labels:
        labels.remove()
    events = prof.events()
    ranges = step_ranges_of(events, "step:")
    # the autograd thread's ops finish inside the step's range because each step synchronizes
    return labelled_steps(events, device, ranges, with_op=peer is not None), statistics.median(walls)


def _wall_ms(fn, device):
    if device.type != "cuda":
        import time
        t0 = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - t0)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b)


def profile_graph(graph, replays) -> list[list[tuple[str, float]]]:
    """Kernels (name, µs) of each profiled replay of a captured graph, in GPU order; one
    profiler session per replay, so no replay's kernels mix with another's."""
    graph.replay()
    torch.cuda.synchronize()
    out = []
    for _ in range(replays):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            graph.replay()
            torch.cuda.synchronize()
        out.append([(e.name, e.time_range.elapsed_us()) for e in sorted(
            (e for e in prof.events() if e.device_type == DeviceType.CUDA and not _annotation(e)),
            key=lambda e: e.time_range.start)])
    return out


def _annotation(e) -> bool:
    return getattr(e, "is_user_annotation", False) or e.name.startswith((NODE, "step:"))


def align(eager: list[Kernel], graph: list[tuple[str, float]]) -> tuple[list[Kernel], float]:
    """Graph kernels labelled by the eager kernel they match: first in launch order (same name,
    difflib's longest matching blocks), then, for the kernels a second stream moved out of that
    order (the shared expert's, the expert weight gradients'), the unmatched eager kernels of the
    same name in turn. The rest stay unattributed. Returns the labelled list and the fraction of
    graph kernels matched in order."""
    sm = difflib.SequenceMatcher(a=[k.name for k in eager], b=[g[0] for g in graph], autojunk=False)
    out: list[Kernel | None] = [None] * len(graph)
    used = [False] * len(eager)
    in_order = 0
    for a, b, size in sm.get_matching_blocks():
        for j in range(size):
            e = eager[a + j]
            out[b + j], used[a + j] = Kernel(graph[b + j][0], graph[b + j][1], e.node, e.phase), True
        in_order += size
    spare: dict[str, deque] = defaultdict(deque)
    for e, u in zip(eager, used):
        if not u:
            spare[e.name].append(e)
    for i, (name, us) in enumerate(graph):
        if out[i] is None:
            e = spare[name].popleft() if spare[name] else None
            out[i] = Kernel(name, us, e.node, e.phase) if e else Kernel(name, us, UNATTRIBUTED, "")
    return out, in_order / max(len(graph), 1)


def top_kernels(steps: list[list[Kernel]], n: int) -> list[dict]:
    """Kernels grouped by (name, node, phase), ms per step, most time first."""
    acc: dict[tuple, list[float]] = defaultdict(lambda: [0.0, 0])
    for step in steps:
        for k in step:
            a = acc[(k.name, k.node, k.phase)]
            a[0] += k.us / 1e3 / len(steps)
            a[1] += 1 / len(steps)
    rows = [{"kernel": name, "node": node, "phase": phase, "ms": ms, "calls": round(c, 2)}
            for (name, node, phase), (ms, c) in acc.items()]
    return sorted(rows, key=lambda r: -r["ms"])[:n]


def per_node(steps: list[list[Kernel]]) -> list[dict]:
    """ms per step of each node, forward and backward, most time first."""
    acc: dict[str, dict] = defaultdict(lambda: {"fwd_ms": 0.0, "bwd_ms": 0.0, "other_ms": 0.0, "kernels": 0.0})
    for step in steps:
        for k in step:
            a = acc[k.node]
            a[{"fwd": "fwd_ms", "bwd": "bwd_ms"}.get(k.phase, "other_ms")] += k.us / 1e3 / len(steps)
            a["kernels"] += 1 / len(steps)
    rows = [{"node": node, **v, "total_ms": v["fwd_ms"] + v["bwd_ms"] + v["other_ms"]} for node, v in acc.items()]
    return sorted(rows, key=lambda r: -r["total_ms"])


def floor_profile(args, gm, x, device) -> dict:
    """The GEMM floor of bench/moe_layer.py on x's routing: captured time with the layer's data
    statistics and with zeros (a GEMM-bound graph that runs faster on zeros is power-limited),
    and its kernels, to set beside the same GEMMs inside the layer's graph."""
    with torch.no_grad():
        counts_all = gm(x)[2][0]
    floor = ml.GemmFloor(counts_all.sum(0), args.hidden, args.ffn, args.tokens, device)
    graph = ml.capture(floor.both)
    out = {"ms": ml.time_ms(graph.replay, args.iters, device)}
    kernels = profile_graph(graph, 1)[0]
    out["kernels"] = [{"kernel": k, "ms": us / 1e3} for k, us in kernels]
    out["kernel_sum_ms"] = sum(us for _, us in kernels) / 1e3
    for t in floor.tensors():
        t.zero_()
    out["zeros_ms"] = ml.time_ms(graph.replay, args.iters, device)
    return out


def peer_profile(args, model, x, gy, device) -> dict:
    """torchtitan's layer (same weights), eager, kernels labelled by submodule and op."""
    why = torchtitan_moe.available()
    if why:
        return {"skipped": why}
    tt = torchtitan_moe.build(model.mlp)
    steps, wall = profile_eager(None, None, x, gy, device, args.steps, peer=tt)
    return {"eager_wall_ms": wall, "kernel_sum_ms": sum(k.us for s in steps for k in s) / 1e3 / len(steps),
            "kernels_per_step": len(steps[0]), "top": top_kernels(steps, args.top), "nodes": per_node(steps)}


def main():
    ap = argparse.ArgumentParser()
    ml.add_shape_args(ap)
    ap.add_argument("--steps", type=int, default=3, help="profiled steps (eager) and replays (graph)")
    ap.add_argument("--iters", type=int, default=30, help="timed graph replays")
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--floor", action="store_true", help="also profile the GEMM floor (and on zeros)")
    ap.add_argument("--peer", action="store_true", help="also profile torchtitan's layer (same weights)")
    ap.add_argument("--echo", action="store_true", help="the cloned layer (ECHO, 2 spare slots a rank; EP >= 2)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "profile_layer.json"))
    ap.add_argument("--print", dest="print_json", metavar="JSON", help="print the tables of a saved run and exit")
    args = ap.parse_args()
    if args.print_json:
        res = json.load(open(args.print_json))
        print_tables(res, args.top)
        print_extras(res, args.top)
        return
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29561")
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    if args.device == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    world = dist.get_world_size()
    comm.init_groups(world, 1)

    spec, _, model, gm = ml.build(args, "torch", device, echo=args.echo)
    x, gy = ml.inputs(args, device, 0)
    steps, eager_wall = profile_eager(gm, model, x, gy, device, args.steps)
    eager_sum = sum(k.us for s in steps for k in s) / 1e3 / len(steps)
    unattr = sum(k.us for s in steps for k in s if not k.phase) / 1e3 / len(steps)
    res = {"args": vars(args), "world": world, "torch": torch.__version__,
           "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
           "totals": {"eager_wall_ms": eager_wall, "eager_kernel_sum_ms": eager_sum,
                      "eager_kernels_per_step": len(steps[0]), "eager_unattributed_ms": unattr},
           "eager_top": top_kernels(steps, args.top), "eager_nodes": per_node(steps)}
    if device.type == "cuda":
        cap = ml.Captured(ml.echoc_layer(gm), model, x, gy)
        res["totals"]["graph_ms"] = ml.time_ms(cap.graph.replay, args.iters, device)
        replays = profile_graph(cap.graph, args.steps)
        labelled = [align(steps[min(1, len(steps) - 1)], r) for r in replays]
        gsteps = [k for k, _ in labelled]
        res["totals"] |= {"graph_kernel_sum_ms": sum(us for r in replays for _, us in r) / 1e3 / len(replays),
                          "graph_kernels_per_replay": len(replays[0]),
                          "graph_aligned_fraction": min(f for _, f in labelled)}
        res["graph_top"], res["graph_nodes"] = top_kernels(gsteps, args.top), per_node(gsteps)
        del cap, replays     # a live graph holding NCCL kernels makes destroy_process_group wait forever
        torch.cuda.synchronize()
    if device.type == "cuda" and args.floor:
        res["floor"] = floor_profile(args, gm, x, device)
    if args.peer:
        res["peer"] = peer_profile(args, model, x, gy, device)
    if dist.get_rank() == 0:
        print_tables(res, args.top)
        print_extras(res, args.top)
        json.dump(res, open(args.out, "w"), indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
