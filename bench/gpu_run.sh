#!/usr/bin/env bash
# The GPU checks and benchmarks in one call (device machines: carry .whl for pydantic, and for
# torchtitan 0.3.0 + spmd_types, tyro, docstring-parser, typeguard: the layer bench's peer).
#   bash bench/gpu_run.sh [moe_layer|layer|profile|iteration|cli|arena|loss|all] [extra args for iteration.py]
# layer: issue 11's two shapes, profile (bench/profile_layer.py, with the floor's and torchtitan's
# kernels) then the layer bench with the torchtitan peer and the GEMM floor (bench/moe_layer.py),
# EP = the GPUs here; profile: the profile part alone.
set -uo pipefail
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
if [ -d .whl ] && { ! python3 -c "import pydantic" 2>/dev/null || ! python3 -c "import torchtitan" 2>/dev/null; }; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONPATH=$PWD:${PYTHONPATH:-}
OUT=${OUT:-.}
what=${1:-all}; shift || true
ngpu=$(python3 -c "import torch; print(torch.cuda.device_count())")
python3 -c "import torch, pydantic; print('torch', torch.__version__, 'gpus', torch.cuda.device_count(), torch.cuda.get_device_name())"
if [ "$what" = all ] || [ "$what" = moe_layer ]; then
  timeout 240 torchrun --standalone --nproc-per-node "$ngpu" bench/moe_layer.py --out "$OUT/moe_layer.json" 2>&1 | tee "$OUT/moe_layer.log" | grep -v Warning
fi
if [ "$what" = layer ] || [ "$what" = profile ]; then
  shapes=("2048 64 1024" "6144 32 2048")   # hidden, experts, expert FFN
  for shape in "${shapes[@]}"; do
    read -r h e f <<< "$shape"
    timeout 100 python3 bench/profile_layer.py --hidden "$h" --experts "$e" --ffn "$f" --floor --peer \
      --out "$OUT/profile_layer_h$h.json" 2>&1 | tee "$OUT/profile_layer_h$h.log" | grep -v Warning
  done
fi
if [ "$what" = layer ]; then
  for shape in "${shapes[@]}"; do
    read -r h e f <<< "$shape"
    timeout 200 torchrun --standalone --nproc-per-node "$ngpu" bench/moe_layer.py --hidden "$h" --experts "$e" \
      --ffn "$f" --out "$OUT/moe_layer_h$h.json" 2>&1 | tee "$OUT/moe_layer_h$h.log" | grep -v Warning
  done
fi
if [ "$what" = all ] || [ "$what" = planner ]; then
  timeout 120 python3 bench/planner_time.py --out "$OUT/planner_time.json" 2>&1 | tee "$OUT/planner_time.log" | grep -v Warning
fi
if [ "$what" = cli ]; then
  # the user's path: echoc run of glm5-mini scaled to the GPUs here, full-iteration graph, checkpoints
  timeout 300 python3 -m echoc run specs/glm5-mini.yaml --nproc "$ngpu" --set cluster.gpus_per_node="$ngpu" \
    --set parallel.ep="$ngpu" --set model.num_layers=4 --set train.steps=60 --set train.log_interval=5 \
    --set train.data.kind=text --set train.data.path=specs/data/tiny.txt \
    --set train.checkpoint.dir=/tmp/ck --set train.checkpoint.interval=20 \
    --metrics "$OUT/cli_metrics.jsonl" 2>&1 | tee "$OUT/cli.log" | grep -v Warning | tail -5
  ls /tmp/ck
  shift $#
  what=iteration
  set -- --variants graph,eager,sync --lr 3e-4 --steps 40
fi
if [ "$what" = arena ]; then
  # the user's path with the planned arena (the default): echoc run, graph, ECHO + recompute
  timeout 200 python3 -m echoc run specs/glm5-mini.yaml --nproc "$ngpu" --set cluster.gpus_per_node="$ngpu" \
    --set parallel.ep="$ngpu" --set model.num_layers=4 --set train.steps=30 --set train.log_interval=5 \
    --set train.data.kind=text --set train.data.path=specs/data/tiny.txt \
    --metrics "$OUT/cli_arena_metrics.jsonl" 2>&1 | tee "$OUT/cli_arena.log" | grep -v Warning | tail -3
  shift $#
  what=iteration
  set -- --variants graph,graph_allocator,eager,eager_allocator,sync,echo_recompute_graph,echo_recompute_graph_allocator
fi
if [ "$what" = loss ]; then
  # the loss: the fused Triton kernels checked on the GPU, then reference / chunked / fused timed
  timeout 120 python3 -m pytest -q tests/gpu/test_loss_cuda.py 2>&1 | tail -2
  timeout 300 python3 bench/loss.py --out "$OUT/loss.json" 2>&1 | tee "$OUT/loss.log" | grep -v Warning
  shift $#
  what=done
fi
if [ "$what" = all ] || [ "$what" = iteration ]; then
  timeout 400 torchrun --standalone --nproc-per-node "$ngpu" bench/iteration.py --out "$OUT/iteration.json" "$@" 2>&1 | tee "$OUT/iteration.log" | grep -v Warning
fi
