#!/usr/bin/env bash
# Every measurement behind docs/PERFORMANCE.md. Run on a quiet machine (nothing else busy):
#   bash benchmarks/performance.sh docs/perf        # JSON lines per measurement in docs/perf/
set -euo pipefail
out=${1:-docs/perf}
mkdir -p "$out"
git rev-parse --short HEAD > "$out/COMMIT"
lscpu | grep "Model name" > "$out/MACHINE"; nproc >> "$out/MACHINE"
rc=".venv/bin/rowcol"
py=".venv/bin/python"
bench() {  # name, then rowcol bench flags
  local name=$1; shift
  echo "== $name: rowcol bench $*" >&2
  $rc bench "$@" --json > "$out/bench-$name.json"
}
for amp in fp32 bf16; do
  a=(); [ "$amp" = bf16 ] && a=(--amp bf16)
  bench "vit_tiny32-infer-$amp"  --model vit_pe_tiny_patch4_32 --mode infer --batch-size 64 --steps 5 --repeats 9 "${a[@]}"
  bench "vit_tiny32-train-$amp"  --model vit_pe_tiny_patch4_32 --mode train --batch-size 64 --steps 3 --repeats 9 "${a[@]}"
  bench "vit_s16-infer-$amp"     --model vit_pe_small_patch16_224 --mode infer --batch-size 16 --steps 3 --warmup 1 --latency-iters 10 "${a[@]}"
  bench "vit_s16-train-$amp"     --model vit_pe_small_patch16_224 --mode train --batch-size 16 --steps 2 --warmup 1 --repeats 9 "${a[@]}"
  bench "r50-infer-$amp"         --model resnet50_pe --mode infer --batch-size 16 --steps 3 --warmup 1 --latency-iters 10 --channels-last "${a[@]}"
  bench "r50-train-$amp"         --model resnet50_pe --mode train --batch-size 16 --steps 2 --warmup 1 --repeats 9 --channels-last "${a[@]}"
  bench "vit_nano32-train-$amp"  --model vit_pe_nano_patch4_32 --mode train --batch-size 128 --steps 3 --repeats 9 "${a[@]}"
  bench "r26cifar-train-$amp"    --model resnet26_pe_cifar --mode train --batch-size 128 --steps 3 --repeats 9 --channels-last "${a[@]}"
done
for m in vit_pe_nano_patch4_32 resnet26_pe_cifar; do
  echo "== loop vs timm: $m" >&2
  PYTHONPATH=. $py benchmarks/loop_vs_timm.py --model $m --steps 15 --repeats 3 > "$out/loop-$m.json"
done
tmp=$(mktemp -d)
for m in vit_pe_tiny_patch4_32 vit_tiny_patch4_32 vit_pe_small_patch16_224 vit_small_patch16_224 resnet50_pe resnet50 resnet26_pe_cifar resnet26_cifar; do
  echo "== export $m" >&2
  $rc export --model $m --format onnx --output "$tmp/$m.onnx" --json > "$out/export-$m.json"
done
rm -rf "$tmp"
