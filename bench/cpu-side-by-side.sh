#!/usr/bin/env bash
# CPU figures for BENCHMARKS.md: `vqclip bench` and the PyTorch baseline on the same configs
# and the same number of threads, back to back, ROUNDS times (default 3), one JSON line per
# run, then per config the median of each side's medians and of the per-round ratios.
#
#   VQCLIP=target/release/vqclip PYTHON=/path/to/venv/bin/python bench/cpu-side-by-side.sh
#
# CONFIGS picks configs by name (default: all): tiny64-8 real128-8 real128-32 real256-8
# real256-32. OUT names the JSON-lines file (default: a temporary file, printed at the end).
# The Python side needs torch, transformers, kornia, pyyaml and
# `taming-transformers-rom1504 --no-deps`.
set -euo pipefail
cd "$(dirname "$0")/.."
VQ=${VQCLIP:-target/release/vqclip}
PY=${PYTHON:-python3}
THREADS=${THREADS:-$(nproc)}
STEPS=${STEPS:-3}
ROUNDS=${ROUNDS:-3}
CONFIGS=${CONFIGS:-tiny64-8 real128-8 real128-32 real256-8 real256-32}
OUT=${OUT:-$(mktemp -t cpu-side-by-side.XXXXXX.jsonl)}
: >"$OUT"

config() { # name -> size cutn clip vqgan pytorch-vqgan
  case $1 in
    tiny64-8) echo "64 8 tests/fixtures/clip-tiny tests/fixtures/vqgan-tiny tests/fixtures/vqgan-tiny/model.yaml" ;;
    real128-8) echo "128 8 ViT-B/32 vqgan_imagenet_f16_16384 f16_16384" ;;
    real128-32) echo "128 32 ViT-B/32 vqgan_imagenet_f16_16384 f16_16384" ;;
    real256-8) echo "256 8 ViT-B/32 vqgan_imagenet_f16_16384 f16_16384" ;;
    real256-32) echo "256 32 ViT-B/32 vqgan_imagenet_f16_16384 f16_16384" ;;
    *) echo "unknown config $1" >&2; exit 2 ;;
  esac
}

pair() { # round name
  local round=$1 name=$2 size cutn clip vqgan pt_vqgan
  read -r size cutn clip vqgan pt_vqgan <<<"$(config "$name")"
  "$VQ" bench --device cpu --threads "$THREADS" --size "$size" --cutn "$cutn" --steps "$STEPS" \
    --warmup 1 --clip "$clip" --vqgan "$vqgan" --json \
    | grep '^{' | sed "s/^{/{\"config\":\"$name\",\"round\":$round,/" | tee -a "$OUT"
  "$PY" bench/pytorch/bench_vqgan_clip.py --device cpu --threads "$THREADS" --size "$size" \
    --cutn "$cutn" --steps "$STEPS" --warmup 1 --clip "$clip" --vqgan "$pt_vqgan" --json \
    | grep '^{' | sed "s/^{/{\"config\":\"$name\",\"round\":$round,/" | tee -a "$OUT"
}

echo "# load average before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
for round in $(seq 1 "$ROUNDS"); do
  for name in $CONFIGS; do
    pair "$round" "$name"
  done
  echo "# load average after round $round: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
done

"$PY" - "$OUT" <<'PY'
import json, statistics, sys
runs = [json.loads(l) for l in open(sys.argv[1]) if l.startswith("{")]
print(f"# {len(runs)} runs in {sys.argv[1]}")
print("| config | vqclip ms/step | PyTorch ms/step | PyTorch / vqclip (median of rounds) | vqclip peak RSS | PyTorch peak RSS |")
print("|---|---|---|---|---|---|")
for name in dict.fromkeys(r["config"] for r in runs):
    side = lambda impl: {r["round"]: r for r in runs if r["config"] == name and r.get("implementation", r.get("impl")) == impl}
    vq, pt = side("vqclip"), side("pytorch")
    rounds = sorted(set(vq) & set(pt))
    if not rounds:
        continue
    med = lambda d, k: statistics.median(d[r][k] for r in rounds)
    ratio = statistics.median(pt[r]["median_ms_per_step"] / vq[r]["median_ms_per_step"] for r in rounds)
    gib = lambda d: max((d[r].get("peak_memory_bytes") or 0) for r in rounds) / 2**30
    print(f"| {name} | {med(vq, 'median_ms_per_step'):,.0f} | {med(pt, 'median_ms_per_step'):,.0f} | "
          f"{ratio:.2f} | {gib(vq):.2f} GiB | {gib(pt):.2f} GiB |")
PY
