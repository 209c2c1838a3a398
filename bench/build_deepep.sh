#!/usr/bin/env bash
# Build DeepEP's HybridEP (deep_ep.HybridEPBuffer) from a source tree you already have: nothing
# is fetched. The `deepep` backend (runtime/backends/deepep.py) is tested against commit
# 94a9f8f6b146 of github.com/deepseek-ai/DeepEP (branch hybrid-ep); DeepEP main (V2) needs
# NCCL >= 2.30.4 and the pip sdist does not build on the GPU image (docs/BENCHMARKS.md).
#
#   bench/build_deepep.sh SRC_DIR        # SRC_DIR: a checkout of that commit (with its submodules)
#
# Recipe measured on the H200 machines (torch 2.11 cu130, nvcc 13.0): about 120 s with 16 cores.
# The built extension stays in SRC_DIR and can be reused; the last line printed is the
# PYTHONPATH that makes `import deep_ep` work.
set -euo pipefail

PINNED=94a9f8f6b146
SRC=${1:?usage: bench/build_deepep.sh SRC_DIR  (DeepEP checkout, branch hybrid-ep, commit $PINNED)}
[ -f "$SRC/setup.py" ] && [ -f "$SRC/deep_ep/hybrid_ep_buffer.py" ] || {
    echo "$SRC is not a DeepEP hybrid-ep source tree (no setup.py / deep_ep/hybrid_ep_buffer.py)" >&2; exit 2; }
if git -C "$SRC" rev-parse HEAD >/dev/null 2>&1; then
    head=$(git -C "$SRC" rev-parse HEAD)
    case "$head" in
        "$PINNED"*) ;;
        *) echo "warning: $SRC is at ${head:0:12}, echoc is tested against $PINNED" >&2 ;;
    esac
fi

CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export CPATH="$CUDA_HOME/targets/x86_64-linux/include/cccl${CPATH:+:$CPATH}"

cd "$SRC"
python3 setup.py build_ext --inplace
python3 -c "import sys; sys.path.insert(0, '.'); from deep_ep import Buffer, HybridEPBuffer" \
    || { echo "built, but deep_ep does not import" >&2; exit 1; }
echo "export PYTHONPATH=$(pwd)\${PYTHONPATH:+:\$PYTHONPATH}"
