#!/usr/bin/env bash
# The GPU table of BENCHMARKS.md in one go (one CUDA device, run from the repository root):
# eager SparK step with --sync-debug, encoder alone with --sync-debug, then the compiled step,
# one model per compiled run so a slow compilation loses only its own row.
#   bash benchmarks/gpu_table.sh OUTDIR [MODEL ...]      (default models: resnet50 convnext_small)
# Without an installed sparsify it builds the installed layout (sparsify.adapters, sparsify.recipes)
# in a temporary folder, so it runs on a machine that cannot pip install.
set -u
out=${1:?usage: gpu_table.sh OUTDIR [MODEL ...]}; shift
models=("$@"); [ ${#models[@]} -gt 0 ] || models=(resnet50 convnext_small)
mkdir -p "$out"; out=$(cd "$out" && pwd)
root=$(cd "$(dirname "$0")/.." && pwd)
: "${BATCH:=128}" "${SIZE:=224}" "${STEPS:=20}" "${WARMUP:=3}" "${DEVICE:=cuda}" "${PREC:=bf16}"
: "${COMPILE_TIMEOUT:=300}"
if ! python3 -c "import sparsify.adapters" 2>/dev/null; then
  pkg=$(mktemp -d); cp -r "$root/sparsify" "$pkg/sparsify"; cp -r "$root/adapters" "$pkg/sparsify/adapters"
  cp -r "$root/recipes" "$pkg/sparsify/recipes"; cp -r "$root/benchmarks" "$pkg/benchmarks"; cd "$pkg"
else
  cd "$root"
fi
export PYTHONUNBUFFERED=1
common=(--batch "$BATCH" --size "$SIZE" --device "$DEVICE" --precision "$PREC" --steps "$STEPS" --warmup "$WARMUP")
[ "$DEVICE" = cuda ] && common+=(--channels-last)
python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__,
  torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
echo "== eager SparK step, --sync-debug"
python3 -m benchmarks.step --model "${models[@]}" "${common[@]}" --sync-debug --json "$out/gpu_eager.json" \
  || { echo "!! eager with --sync-debug failed; again without it"
       python3 -m benchmarks.step --model "${models[@]}" "${common[@]}" --json "$out/gpu_eager.json"; }
echo "== eager encoder alone, --sync-debug"
python3 -m benchmarks.step --model "${models[@]}" "${common[@]}" --encoder-only --sync-debug \
  --json "$out/gpu_enc.json" || echo "!! encoder-only run failed"
for m in "${models[@]}"; do
  echo "== compiled SparK step: $m"
  timeout "$COMPILE_TIMEOUT" python3 -m benchmarks.step --model "$m" "${common[@]}" --compile \
    --json "$out/gpu_compiled_$m.json" || echo "!! compiled $m failed or timed out (${COMPILE_TIMEOUT}s)"
done
