#!/usr/bin/env bash
# Every CPU measurement behind docs/PERFORMANCE.md (about 40 minutes on 2 cores). On a quiet machine:
#   bash benchmarks/performance.sh [OUT]      # default OUT: docs/perf/cpu-<commit>; JSON per measurement,
#                                             # table.md, saved_tensors*.txt, profiles
set -euo pipefail
out=${1:-docs/perf/cpu-$(git rev-parse --short HEAD)}
mkdir -p "$out"
git rev-parse --short HEAD > "$out/COMMIT"
{ lscpu | grep "Model name"; nproc; } > "$out/MACHINE"
py=".venv/bin/python"
export PYTHONPATH=.
$py benchmarks/speed_table.py --out "$out" --repeats 11            # PE / dense img/s and peak memory
for a in "--model resnet26_pe_cifar --mode train --channels-last" "--model vit_pe_tiny_patch4_32 --mode infer" \
         "--model vit_pe_tiny_patch4_32 --mode train"; do           # bound by the host: 2 images, 1 thread
  set -- $a
  .venv/bin/rowcol bench $a --batch-size 2 --threads 1 --repeats 15 --steps 20 --json > "$out/host-${2}-${4}.json"
done
for a in "--model resnet26_pe_cifar --mode train --batch-size 16 --channels-last" \
         "--model vit_pe_tiny_patch4_32 --mode infer --batch-size 16" "--model vit_pe_tiny_patch4_32 --mode train --batch-size 16"; do
  for amp in "" "--amp bf16"; do                                    # ops dispatched per step
    set -- $a; tag=fp32; [ -z "$amp" ] || tag=bf16
    $py benchmarks/op_count.py $a $amp --json > "$out/ops-${2}-${4}-$tag.json"
  done
done
$py benchmarks/op_count.py --model resnet26_pe_cifar --mode train --batch-size 16 --channels-last --json \
  --off rowcol.models.resnet.PeStage.recompute_entry > "$out/ops-resnet26_pe_cifar-train-fp32-recompute_off.json"
for amp in "" "--amp bf16"; do                                      # what one GEMM for Q, K, V buys
  $py benchmarks/ab_switch.py --model vit_pe_small_patch16_224 --switch rowcol.layers.PeAttention.fused_qkv \
    --mode train --batch-size 16 --repeats 9 $amp
done > "$out/ab-fused_qkv-vit_s16.jsonl"
for amp in "" "--amp bf16"; do                                      # what the recomputed stage entry costs
  $py benchmarks/ab_switch.py --model resnet26_pe_cifar --switch rowcol.models.resnet.PeStage.recompute_entry \
    --mode train --batch-size 128 --channels-last --repeats 9 $amp
done > "$out/ab-recompute_entry-r26cifar.jsonl"
$py benchmarks/ab_switch.py --model resnet26_pe_cifar --switch rowcol.models.resnet.PeStage.recompute_entry \
  --mode train --batch-size 2 --threads 1 --steps 20 --repeats 15 --channels-last > "$out/ab-recompute_entry-r26cifar-host.json"
{
  for a in "--model resnet26_pe_cifar --batch-size 128 --channels-last" \
           "--model resnet26_pe_cifar --vs resnet26_pe_cifar_untied --batch-size 128 --channels-last" \
           "--model resnet50_pe --batch-size 16 --channels-last" \
           "--model resnet50_pe --vs resnet50_pe_untied --batch-size 16 --channels-last" "--model vit_pe_tiny_patch4_32 --batch-size 64" \
           "--model vit_pe_small_patch16_224 --batch-size 16" "--model vit_pe_nano_patch4_32 --batch-size 128"; do
    for amp in "" "--amp bf16"; do
      echo "$a $amp: $($py benchmarks/saved_tensors.py $a $amp --top 0 --peak | head -2 | tr '\n' ' ')"
    done
  done
} > "$out/saved_tensors.txt"                                         # bytes saved for backward, live peak
for amp in "" "--amp bf16"; do
  a="--model resnet26_pe_cifar --batch-size 128 --channels-last --off rowcol.models.resnet.PeStage.recompute_entry"
  echo "$a $amp: $($py benchmarks/saved_tensors.py $a $amp --top 0 --peak | head -2 | tr '\n' ' ')"
done > "$out/saved_tensors-recompute_off.txt"                        # the same without the recomputed entry
$py benchmarks/depthwise_bf16.py > "$out/depthwise_bf16.json"       # why the stage entry's conv runs in fp32
$py benchmarks/profile_pair.py --model resnet26_pe_cifar --mode train --batch-size 128 --channels-last --steps 3 \
  > "$out/profile-r26cifar-train-fp32.md"                            # where the CIFAR ResNet-PE's time goes
$py benchmarks/profile_pair.py --model vit_pe_small_patch16_224 --mode infer --batch-size 16 --steps 5 \
  > "$out/profile-vit_s16-infer-fp32.md"
for m in vit_pe_nano_patch4_32 resnet26_pe_cifar; do
  $py benchmarks/loop_vs_timm.py --model $m --steps 15 --repeats 3 > "$out/loop-$m.json"
done
tmp=$(mktemp -d)
for m in vit_pe_tiny_patch4_32 vit_tiny_patch4_32 vit_pe_small_patch16_224 vit_small_patch16_224 resnet50_pe resnet50 resnet26_pe_cifar resnet26_cifar; do
  .venv/bin/rowcol export --model $m --format onnx --output "$tmp/$m.onnx" --json > "$out/export-$m.json"
done
rm -rf "$tmp"
