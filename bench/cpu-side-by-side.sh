#!/usr/bin/env bash
# CPU figures for BENCHMARKS.md: `vqclip bench` and the PyTorch baseline on the same
# configs, back to back, one JSON line each. Not run by CI.
#
#   VQCLIP=target/release/vqclip PYTHON=/path/to/venv/bin/python bench/cpu-side-by-side.sh
#
# The Python side needs torch, transformers, kornia, pyyaml and
# `taming-transformers-rom1504 --no-deps`.
set -euo pipefail
cd "$(dirname "$0")/.."
VQ=${VQCLIP:-target/release/vqclip}
PY=${PYTHON:-python3}
THREADS=${THREADS:-$(nproc)}
STEPS=${STEPS:-3}

pair() { # size cutn vqclip-models... -- pytorch-models...
  local size=$1 cutn=$2 clip=$3 vqgan=$4 pt_vqgan=$5
  "$VQ" bench --device cpu --size "$size" --cutn "$cutn" --steps "$STEPS" --warmup 1 \
    --clip "$clip" --vqgan "$vqgan" --json
  "$PY" bench/pytorch/bench_vqgan_clip.py --device cpu --threads "$THREADS" --size "$size" \
    --cutn "$cutn" --steps "$STEPS" --warmup 1 --clip "$clip" --vqgan "$pt_vqgan" --json \
    | grep '^{'
}

echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
pair 64 8 tests/fixtures/clip-tiny tests/fixtures/vqgan-tiny tests/fixtures/vqgan-tiny/model.yaml
pair 128 8 ViT-B/32 vqgan_imagenet_f16_16384 f16_16384
echo "# load average after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
