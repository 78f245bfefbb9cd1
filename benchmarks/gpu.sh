#!/usr/bin/env bash
# Every GPU measurement behind docs/PERFORMANCE.md, on one H100/H200, run from the repository root:
#   bash benchmarks/gpu.sh OUT [SECONDS]      # SECONDS: the whole budget (default 560, for a 10-minute call)
#   python benchmarks/perf_tables.py OUT      # the table again
# In order, each step in OUT: MACHINE; test_cuda.log (tests/test_cuda.py); the eager table
# (speed_table.py, every pair); ops-*.json (op_count.py); saved_tensors-*.txt (saved_tensors.py: memory kept
# for backward per module, live peak); ab-*.jsonl (ab_switch.py: the two switches on
# and off); profile-*.md (device time per op and kernel); then the compiled table, pair by pair in the
# order of COMPILED, until the budget is spent (the cells not made are listed at the end: a second
# call with --only finishes them, and finds inductor's cache warm).
set -uo pipefail
out=${1:?usage: bash benchmarks/gpu.sh OUT [SECONDS]}
budget=${2:-560}
mkdir -p "$out"
py=${PYTHON:-python3}
export PYTHONPATH=. PYTHONUNBUFFERED=1
# the machine may hold a stale .git: the hash of rowcol/'s sources names the code that ran
# (here: find rowcol -name '*.py' | sort | xargs sha1sum | sha1sum, at the commit sent)
{ nvidia-smi; nproc; echo "rowcol/ sources sha1: $(find rowcol -name '*.py' | sort | xargs sha1sum | sha1sum)"
  $py -c "import sys, torch, timm; print(sys.version, torch.__version__, timm.__version__, torch.cuda.get_device_name())"
} > "$out/MACHINE" 2>&1
# the CUDA path equals the CPU's (the two largest ViTs are left out for time)
timeout 100 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "not base_patch16 and not small_patch4" \
  > "$out/test_cuda.log" 2>&1
echo "tests/test_cuda.py: $(tail -1 "$out/test_cuda.log")"
$py benchmarks/speed_table.py --out "$out" --settings bf16 --deadline 150 > "$out/bench-eager.log" 2>&1
for a in "--model resnet26_pe_cifar --mode train --batch-size 128 --channels-last" \
         "--model vit_pe_tiny_patch4_32 --mode infer --batch-size 256" \
         "--model vit_pe_tiny_patch4_32 --mode train --batch-size 256"; do
  set -- $a
  timeout 20 $py benchmarks/op_count.py $a --amp bf16 --device cuda --json > "$out/ops-$2-$4.json" 2>>"$out/ops.log"
done
timeout 40 $py benchmarks/saved_tensors.py --model resnet26_pe_cifar --batch-size 128 --channels-last --amp bf16 \
  --peak --device cuda > "$out/saved_tensors-r26cifar-bf16.txt" 2>&1   # where the memory above dense sits
timeout 30 $py benchmarks/ab_switch.py --model resnet26_pe_cifar --switch rowcol.models.resnet.PeStage.recompute_entry \
  --mode train --batch-size 128 --channels-last --amp bf16 --repeats 9 > "$out/ab-recompute_entry-r26cifar.jsonl" \
  2>>"$out/ab.log"
timeout 30 $py benchmarks/ab_switch.py --model vit_pe_small_patch16_224 --switch rowcol.layers.PeAttention.fused_qkv \
  --mode train --batch-size 128 --amp bf16 --repeats 9 > "$out/ab-fused_qkv-vit_s16.jsonl" 2>>"$out/ab.log"
timeout 25 $py benchmarks/ab_switch.py --model vit_pe_tiny_patch4_32 --switch rowcol.layers.PeAttention.fused_qkv \
  --mode infer --batch-size 256 --amp bf16 --repeats 9 > "$out/ab-fused_qkv-vit_tiny32-infer.jsonl" 2>>"$out/ab.log"
timeout 60 $py benchmarks/speed_table.py --out "$out" --profile --settings bf16 \
  --only r26cifar-train vit_tiny32-infer vit_s16-train r50-train > "$out/profile.log" 2>&1
COMPILED="vit_s16-train vit_s16-infer vit_tiny32-train vit_tiny32-infer r50-train r50-untied-train r50-infer r26cifar-train r26cifar-untied-train"
left=$((budget - SECONDS - 5))
if ((left >= 60)); then
  $py benchmarks/speed_table.py --out "$out" --settings bf16-compile --deadline $left --prewarm $((left / 3)) \
    --only $COMPILED > "$out/bench-compile.log" 2>&1
else
  echo "compiled table: no time left ($left s)"
fi
cat "$out/table.md"
grep -h "not made" "$out"/bench-*.log || true
