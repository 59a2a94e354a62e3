#!/usr/bin/env bash
# Build the CUDA binary on a machine with no GPU and no CUDA install, for the
# H100/H200 machine (sm_90). Result: .gpu/vqclip.xz (carry `.gpu` to the GPU machine).
#
#   scripts/build-cuda.sh            # --features cuda
#   FEATURES=cudnn scripts/build-cuda.sh
#
# The toolkit is assembled from PyPI wheels (CUDA 13.0: the GPU machine's driver
# is 580.x, which rejects PTX from a newer nvcc). A cold build takes ~17 minutes
# on 2 cores, most of it nvcc compiling candle-kernels; keep target/ between builds.
set -euo pipefail
cd "$(dirname "$0")/.."

FEATURES=${FEATURES:-cuda}
PREFIX=${CUDA_PREFIX:-${XDG_CACHE_HOME:-$HOME/.cache}/cuda-13.0}
ROOT="$PREFIX/root"
PY=${PYTHON:-python3}

if [ ! -x "$ROOT/bin/nvcc" ]; then
  # The wheels are pinned to CUDA 13.0.x; the sonames are what the binary links.
  "$PY" -m pip install --no-deps --disable-pip-version-check --target "$PREFIX/pkgs" \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
  ln -sfn "$PREFIX/pkgs/nvidia/cu13" "$ROOT"
  ln -sfn lib "$ROOT/lib64"
  for f in "$ROOT"/lib/lib*.so.*; do
    b=$(basename "$f")
    case "$b" in *builtins*|*.alt.*) continue ;; esac
    ln -sfn "$b" "$ROOT/lib/${b%%.so.*}.so"
  done
fi

# libcuda.so comes with the driver; link against a stub that exports the driver API's names.
STUB="$ROOT/lib/stubs/libcuda.so"
if [ ! -e "$STUB" ]; then
  mkdir -p "$ROOT/lib/stubs"
  grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' "$ROOT/include/cuda.h" | tr -d ' (' | sort -u \
    | sed 's/.*/int &(void) { return 999; }/' > "$ROOT/lib/stubs/libcuda_stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB" "$ROOT/lib/stubs/libcuda_stub.c"
fi

if [ "$FEATURES" = cudnn ] && [ ! -e "$ROOT/include/cudnn.h" ]; then
  "$PY" -m pip install --no-deps --disable-pip-version-check --target "$PREFIX/cudnn-pkgs" nvidia-cudnn-cu13==9.19.0.56
  for h in "$PREFIX"/cudnn-pkgs/nvidia/cudnn/include/*.h; do ln -sfn "$h" "$ROOT/include/"; done
  for f in "$PREFIX"/cudnn-pkgs/nvidia/cudnn/lib/lib*.so.*; do
    b=$(basename "$f"); ln -sfn "$f" "$ROOT/lib/$b"; ln -sfn "$b" "$ROOT/lib/${b%%.so.*}.so"
  done
fi

export CUDA_ROOT=$ROOT CUDA_HOME=$ROOT CUDA_PATH=$ROOT NVCC=$ROOT/bin/nvcc PATH=$ROOT/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export LIBRARY_PATH="$ROOT/lib:$ROOT/lib/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"

cargo build --release --features "$FEATURES"
mkdir -p .gpu
strip -o .gpu/vqclip target/release/vqclip
xz -9 -f -T0 .gpu/vqclip
ls -l .gpu/vqclip.xz
echo "On the GPU machine: xz -dkf .gpu/vqclip.xz && export LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib"
