"""One MoE layer, forward + backward, on GPUs: the sync-free `torch` backend in a CUDA graph and
eager, the host-synced `sync` baseline, torchtitan's MoE layer (the peer) and the GEMM floor,
in one run.

    torchrun --nproc-per-node 1 bench/moe_layer.py [--hidden 2048 --experts 64 --ffn 1024] [--out r.json]

Variants (every time is forward + backward of one layer, median of --iters):
  torch_graph         echoc, `torch` backend, captured in one CUDA graph and replayed (at EP ≥ 2 on one
                      node its exchange is 'p2p': only the real rows are pushed, runtime/p2p.py)
  torch_graph_inline_wgrad  the same with backends.wgrad_overlap off (the expert weight gradients
                      on the main stream, inside the FFN's backward; the shared expert still beside)
  torch_graph_nccl    the same with backends.exchange 'nccl' (capacity-padded all_to_all; EP ≥ 2)
  torch_graph_one_stream  both overlaps off: the whole layer on one stream
  torch_eager         the same graph module, eager
  sync_eager          echoc, `sync` backend (host-synced, variable splits), eager, on one stream
  torchtitan_eager    torchtitan 0.3.0's MoE (router, GroupedExperts, LocalTokenDispatcher, shared
                      FeedForward; bench/peers/torchtitan_moe.py) with the same weights; each rank
                      runs it on its own tokens with all E experts (EP 1 semantics)
  torchtitan_graph    the same, captured in a CUDA graph (its EP 1 path has no host sync)
  torchtitan_compile  the same under torch.compile (default mode), eager launch (--no-compile skips)
  floor_routed        the routed-expert grouped GEMMs alone (fwd, dgrad, wgrad: the six grouped_mm
                      calls of echoc's expert FFN) on this rank's real rows, captured
  floor               floor_routed + the shared expert's six dense GEMMs on the rank's tokens
Each is printed as ms, × floor, × the fastest torchtitan variant, and model TFLOP/s: the routed and
shared GEMM FLOPs of fwd + bwd, 3 · 2 · rows · (H·2F + F·H), rows = real routed rows + tokens.

Checks first, then times:
  * the captured graph is replayed with NEW routing each replay (fresh inputs copied into
    the static buffers); its output and gradients match an eager run of the same inputs
    (bf16, relative error < 1e-2);
  * eager `torch` backend matches the single-process reference MoE (dropless) when no
    row overflows;
  * torchtitan's layer with the same weights matches echoc's eager output (it runs its expert
    GEMMs in bf16 with fp32 scores, so agreement is to bf16 rounding);
  * with EP ≥ 2 only: the cloned (ECHO) layer, eager vs reference and graph vs eager.
Prints one table (rank 0) and writes JSON. `--device cpu` (gloo, no graphs) is a smoke test.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.distributed as dist

from layer_setup import (Captured, GemmFloor, add_shape_args, build, capture, echoc_layer, fwd_bwd, inputs,
                         model_flops, module_fwd_bwd, plain_layer, reference_check, rel, synchronize, time_ms)
from peers import torchtitan_moe
from real_rows import REAL_ROW_BACKENDS, skip_reason
from echoc.errors import EchocError
from runtime import comm, flops as model_flops_lib, p2p

VARIANTS = ["torch_graph", "torch_graph_inline_wgrad", "torch_graph_nccl", "torch_graph_one_stream", "torch_eager",
            "sync_eager", "torchtitan_eager", "torchtitan_graph", "torchtitan_compile", "floor_routed", "floor"]


def echo_checks(args, device, checks, times):
    """The cloned layer: eager vs reference, captured graph replayed with new routing vs eager."""
    spec, ref, model, gm = build(args, "torch", device, echo=True)
    x0, g0 = inputs(args, device, 0)
    y, gx, _, stats = fwd_bwd(gm, model, x0, g0)
    checks["echo_clones"] = int(stats[:, 3].sum())
    checks["echo_dropped"] = int(stats[:, 0].sum())
    reference_check(ref, x0, g0, y, gx, checks, "echo_eager")
    rec = stats[:, 1].double().reshape(1)
    allrec = [torch.empty_like(rec) for _ in range(dist.get_world_size())]
    dist.all_gather(allrec, rec)
    allrec = torch.cat(allrec)
    checks["echo_token_straggler"] = float(allrec.max() / allrec.mean())
    cap = Captured(echoc_layer(gm), model, x0, g0)
    worst = 0.0
    for step in range(1, 4):
        x, gy = inputs(args, device, 10 + step)
        y_c, gx_c, grads_c, _ = cap.replay(x, gy)
        y_c, gx_c = y_c.clone(), gx_c.clone()
        grads_c = {k: v.clone() for k, v in grads_c.items()}
        y_e, gx_e, grads_e, _ = fwd_bwd(gm, model, x, gy)
        errs = [rel(y_c, y_e), rel(gx_c, gx_e)] + [rel(grads_c[k], grads_e[k]) for k in grads_e]
        worst = max(worst, max(errs))
    checks["echo_graph_vs_eager_worst_rel_err"] = worst
    times["echo_graph"] = time_ms(cap.graph.replay, args.iters)
    _, _, model_s, gm_s = build(args, "sync", device, echo=False)
    with torch.no_grad():
        model_s.mlp.router.expert_bias.copy_(model.mlp.router.expert_bias)
    times["sync_eager_skewed"] = time_ms(lambda: fwd_bwd(gm_s, model_s, x0, g0), args.iters)
    _, _, model_t, gm_t = build(args, "torch", device, echo=False)
    with torch.no_grad():
        model_t.mlp.router.expert_bias.copy_(model.mlp.router.expert_bias)
    cap_t = Captured(echoc_layer(gm_t), model_t, x0, g0)
    times["torch_graph_skewed"] = time_ms(cap_t.graph.replay, args.iters)


def echoc_variants(args, device, checks, times):
    """torch backend (eager check vs reference, graph replays vs eager, timings) and sync.
    Returns the reference layer, the eager output and input gradient on x0, and the routed rows
    per local expert of x0's routing (for the floor)."""
    spec, ref, model, gm = build(args, "torch", device)
    x0, g0 = inputs(args, device, 0)
    y_e, gx_e, grads_e, stats = fwd_bwd(gm, model, x0, g0)
    # the reference sees every rank's tokens (experts serve all ranks)
    reference_check(ref, x0, g0, y_e, gx_e, checks, "eager")
    checks["dropped_eager"] = int(stats[:, 0].sum())
    with torch.no_grad():
        counts_all = gm(x0)[2][0]                               # [ep, E]
    L, r = spec.experts_per_rank, comm.group_rank("ep")
    rows_per_expert = counts_all[:, r * L:(r + 1) * L].sum(0)   # rows this rank's experts get (no drops)

    if device.type == "cuda":
        cap = Captured(echoc_layer(gm), model, x0, g0)
        worst = 0.0
        for step in range(1, 4):
            x, gy = inputs(args, device, step)
            y_c, gx_c, grads_c, st_c = cap.replay(x, gy)
            y_c, gx_c = y_c.clone(), gx_c.clone()
            grads_c = {k: v.clone() for k, v in grads_c.items()}
            checks[f"replay{step}_received_rows"] = int(st_c[:, 1].sum())
            y_r, gx_r, grads_r, _ = fwd_bwd(gm, model, x, gy)
            errs = [rel(y_c, y_r), rel(gx_c, gx_r)] + [rel(grads_c[k], grads_r[k]) for k in grads_r]
            worst = max(worst, max(errs))
        checks["graph_vs_eager_worst_rel_err"] = worst
        cap.replay(x0, g0)  # time on x0's routing, the floor's rows
        times["torch_graph"] = time_ms(cap.graph.replay, args.iters, device)
        del cap
        inline_wgrad_variant(args, device, gm, model, (x0, g0), checks, times)
        _, _, model_1, gm_1 = build(args, "torch", device, overlap=False)   # everything on one stream
        y_1, gx_1, _, _ = fwd_bwd(gm_1, model_1, x0, g0)
        checks["one_stream_vs_two_y_equal"] = bool(torch.equal(y_1, y_e))
        checks["one_stream_vs_two_dx_equal"] = bool(torch.equal(gx_1, gx_e))
        cap = Captured(echoc_layer(gm_1), model_1, x0, g0)
        times["torch_graph_one_stream"] = time_ms(cap.graph.replay, args.iters, device)
        del cap, gm_1, model_1
        if spec.token_exchange == "p2p":
            exchange_variant(args, device, (x0, g0, y_e, gx_e), checks, times)
            p2p.setup(spec.token_exchange)    # back to the first module's exchange for its eager timing
    times["torch_eager"] = time_ms(lambda: fwd_bwd(gm, model, x0, g0), args.iters, device)
    y_t, gx_t, _, _ = fwd_bwd(gm, model, x0, g0)
    del gm, model
    _, _, model_s, gm_s = build(args, "sync", device, overlap=False)    # the classic baseline: one stream
    y_s, gx_s, _, _ = fwd_bwd(gm_s, model_s, x0, g0)
    checks["sync_vs_torch_y"] = rel(y_s, y_t)
    checks["sync_vs_torch_dx"] = rel(gx_s, gx_t)
    times["sync_eager"] = time_ms(lambda: fwd_bwd(gm_s, model_s, x0, g0), args.iters, device)
    return ref, (x0, g0, y_t, gx_t), rows_per_expert


def inline_wgrad_variant(args, device, gm, model, inputs, checks, times):
    """The layer with backends.wgrad_overlap off (its expert weight gradients inside the FFN's
    backward, on the main stream): the same numbers as `gm`, bitwise, and its captured time."""
    x0, g0 = inputs
    y_d, gx_d, grads_d, _ = fwd_bwd(gm, model, x0, g0)     # fresh: an earlier capture accumulated into .grad
    y_d, gx_d, grads_d = y_d.clone(), gx_d.clone(), {k: v.clone() for k, v in grads_d.items()}
    _, _, model_w, gm_w = build(args, "torch", device, wgrad=False)
    y_w, gx_w, grads_w, _ = fwd_bwd(gm_w, model_w, x0, g0)
    checks["inline_wgrad_vs_deferred_all_equal"] = bool(
        torch.equal(y_w, y_d) and torch.equal(gx_w, gx_d) and all(torch.equal(grads_w[k], grads_d[k]) for k in grads_d))
    cap = Captured(echoc_layer(gm_w), model_w, x0, g0)
    times["torch_graph_inline_wgrad"] = time_ms(cap.graph.replay, args.iters, device)


def exchange_variant(args, device, eager, checks, times):
    """The same layer with backends.exchange 'nccl' (the capacity-padded all_to_all): the same numbers
    as 'p2p' up to the rounding of each rank's summed rows (runtime/p2p_moves.py), and its captured time."""
    x0, g0, y_e, gx_e = eager
    _, _, model_n, gm_n = build(args, "torch", device, exchange="nccl")
    y_n, gx_n, _, _ = fwd_bwd(gm_n, model_n, x0, g0)
    checks["nccl_vs_p2p_y"], checks["nccl_vs_p2p_dx"] = rel(y_e, y_n), rel(gx_e, gx_n)
    cap = Captured(echoc_layer(gm_n), model_n, x0, g0)
    times["torch_graph_nccl"] = time_ms(cap.graph.replay, args.iters, device)


def real_row_variants(args, device, eager, checks, times, notes):
    """symm_mem and deepep: eager output and input gradient vs the torch backend's, then one CUDA
    graph replayed with new routing (vs eager), timed. Skipped with the reason below 2 GPUs."""
    x0, g0, y_t, gx_t = eager
    for backend in REAL_ROW_BACKENDS:
        if why := skip_reason(backend, dist.get_world_size(), device.type):
            notes[backend] = why
            continue
        try:
            _, _, model, gm = build(args, backend, device)
        except EchocError as e:           # the backend refuses this shape (e.g. symm_mem's slot limit)
            notes[backend] = f"skipped: {e}"
            continue
        y, gx, _, _ = fwd_bwd(gm, model, x0, g0)
        checks[f"{backend}_vs_torch_y"], checks[f"{backend}_vs_torch_dx"] = rel(y, y_t), rel(gx, gx_t)
        cap = Captured(echoc_layer(gm), model, x0, g0)
        x1, g1 = inputs(args, device, 1)
        y_c, gx_c = (t.clone() for t in cap.replay(x1, g1)[:2])
        y_r, gx_r, _, _ = fwd_bwd(gm, model, x1, g1)
        checks[f"{backend}_graph_vs_eager"] = max(rel(y_c, y_r), rel(gx_c, gx_r))
        cap.replay(x0, g0)
        times[f"{backend}_graph"] = time_ms(cap.graph.replay, args.iters, device)
        times[f"{backend}_eager"] = time_ms(lambda: fwd_bwd(gm, model, x0, g0), args.iters, device)
        del cap, gm, model


def peer_eager(args, device, ref, eager, checks, times, notes):
    """torchtitan's layer with the reference's weights, eager, checked against echoc's output."""
    why = torchtitan_moe.available()
    if why:
        notes["torchtitan"] = f"skipped: {why}"
        return None
    x0, g0, y_t, gx_t = eager
    tt = torchtitan_moe.build(ref.mlp)
    y_p, gx_p = module_fwd_bwd(tt, x0, g0)
    checks["torchtitan_vs_echoc_y"] = rel(y_p, y_t)
    checks["torchtitan_vs_echoc_dx"] = rel(gx_p, gx_t)
    times["torchtitan_eager"] = time_ms(lambda: module_fwd_bwd(tt, x0, g0), args.iters, device)
    return tt, y_p


def peer_graph(args, device, peer, eager, checks, times, notes):
    """The peer captured in one CUDA graph (last but one: a failed capture is reported, not fatal)."""
    (tt, y_p), (x0, g0) = peer, eager[:2]
    try:
        cap = Captured(plain_layer(tt), tt, x0, g0)
        times["torchtitan_graph"] = time_ms(cap.graph.replay, args.iters, device)
        checks["torchtitan_graph_vs_eager_y"] = rel(cap.y, y_p)
    except Exception as e:  # a peer that does not capture is a finding, not a failure
        notes["torchtitan_graph"] = f"capture failed: {type(e).__name__}: {str(e)[:200]}"


def peer_compile(args, device, peer, eager, times, notes):
    """The peer under torch.compile (default mode), launched eagerly; compile time in the notes."""
    tt, (x0, g0) = peer[0], eager[:2]
    try:
        compiled = torch.compile(tt)
        t0 = time.perf_counter()
        module_fwd_bwd(compiled, x0, g0)
        synchronize(device)
        notes["torchtitan_compile_s"] = round(time.perf_counter() - t0, 1)
        times["torchtitan_compile"] = time_ms(lambda: module_fwd_bwd(compiled, x0, g0), args.iters, device)
    except Exception as e:
        notes["torchtitan_compile"] = f"failed: {type(e).__name__}: {str(e)[:200]}"


def floor_variants(args, device, rows_per_expert, times):
    floor = GemmFloor(rows_per_expert, args.hidden, args.ffn, args.tokens, device)
    for name, fn in (("floor_routed", floor.routed), ("floor", floor.both)):
        if device.type == "cuda":
            g = capture(fn)
            times[name] = time_ms(g.replay, args.iters, device)
        else:
            times[name] = time_ms(fn, args.iters, device)
    return floor.rows_total


def report(args, world, times, flops, notes):
    """One table: ms, × floor, × the fastest torchtitan variant, model TFLOP/s, MFU (against the
    bf16 peak measured in this run, notes["bf16_peak_tflops"])."""
    peak = notes.get("bf16_peak_tflops")
    peers = {k: v for k, v in times.items() if k.startswith("torchtitan")}
    peer = min(peers, key=peers.get) if peers else None
    floor = times.get("floor")
    print(f"\nMoE layer fwd+bwd: {world} GPU(s), EP {world}, {args.tokens} tokens/rank, H {args.hidden}, "
          f"{args.experts} experts top-{args.top_k}, F {args.ffn}, 1 shared expert (F {args.ffn}), "
          f"capacity {args.capacity}, bf16")
    print(f"{'variant':<20}{'ms/layer':>10}{'× floor':>10}{'× ' + (peer or 'peer'):>24}{'TFLOP/s':>10}{'MFU':>8}")
    rows = {}
    for k in [v for v in VARIANTS if v in times] + [k for k in times if k not in VARIANTS]:
        ms = times[k]
        rows[k] = {"ms": ms, "x_floor": ms / floor if floor else None,
                   "x_peer": ms / times[peer] if peer else None,
                   # floor_routed does the routed GEMMs only: its rate counts those FLOPs alone
                   "tflops": (flops - model_flops(args.tokens, args.hidden, args.ffn) if k == "floor_routed"
                              else flops) / ms / 1e9}
        xf = f"{rows[k]['x_floor']:.2f}" if floor else "-"
        xp = f"{rows[k]['x_peer']:.2f}" if peer else "-"
        rows[k]["mfu"] = rows[k]["tflops"] / peak if peak else None
        mfu = f"{rows[k]['mfu']:.1%}" if peak else "-"
        print(f"{k:<20}{ms:>10.3f}{xf:>10}{xp:>24}{rows[k]['tflops']:>10.1f}{mfu:>8}")
    for k, v in notes.items():
        print(f"note {k}: {v}")
    return peer, rows


def main():
    ap = argparse.ArgumentParser()
    add_shape_args(ap)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--no-compile", dest="compile", action="store_false", help="skip torchtitan under torch.compile")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: gloo smoke test, no graphs")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "moe_layer.json"))
    args = ap.parse_args()
    if args.device == "cuda":
        local = int(os.environ.get("LOCAL_RANK", 0))
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        dist.init_process_group("nccl", device_id=device)
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    world = dist.get_world_size()
    comm.init_groups(world, 1)
    rank = dist.get_rank()
    checks, times, notes = {}, {}, {}
    notes["bf16_peak_tflops"] = model_flops_lib.measure_bf16_peak_tflops(device)   # None on CPU

    def save():  # after every stage, so a run cut short still leaves its numbers
        if rank == 0:
            flops = model_flops(rows, args.hidden, args.ffn)
            dev = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
            json.dump({"args": vars(args), "world": world, "device": dev, "torch": torch.__version__,
                       "times_ms": times, "rows_rank0": rows, "model_flops_rank0": flops,
                       "checks": checks, "notes": notes}, open(args.out, "w"), indent=2)

    ref, eager, rows_per_expert = echoc_variants(args, device, checks, times)
    peer = peer_eager(args, device, ref, eager, checks, times, notes)
    rows = floor_variants(args, device, rows_per_expert, times)
    save()
    if world >= 2 and device.type == "cuda":
        echo_checks(args, device, checks, times)
        save()
    else:
        notes["echo"] = "cloned-layer part skipped: it needs EP >= 2 and a GPU"
    real_row_variants(args, device, eager, checks, times, notes)
    save()
    if peer and device.type == "cuda":
        peer_graph(args, device, peer, eager, checks, times, notes)
        save()
    if peer and args.compile:
        peer_compile(args, device, peer, eager, times, notes)
    save()

    if rank == 0:
        peer_name, table = report(args, world, times, model_flops(rows, args.hidden, args.ffn), notes)
        print("checks:", json.dumps(checks))
        data = json.load(open(args.out))
        data |= {"table": table, "peer": peer_name}
        json.dump(data, open(args.out, "w"), indent=2)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
