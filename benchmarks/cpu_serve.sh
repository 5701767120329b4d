#!/usr/bin/env bash
# `vllm serve` on this CPU: dense against ActTail's defaults at 50% and 80%, the servers one after
# the other, for SmolLM2-135M-Instruct (real weights) and the Qwen2.5-0.5B shape (random weights).
#   bash benchmarks/cpu_serve.sh OUT_DIR [smollm2|qwen0.5b ...]
# Each writes OUT_DIR/serve_cpu_<model>.{txt,json} (the first line of the .txt is the command) and
# the servers' logs and final /metrics, gzipped, under OUT_DIR/logs_<model>/.
set -euo pipefail
out=${1:?OUT_DIR}
shift
python=${PYTHON:-python3}
mkdir -p "$out"
smollm2=$($python -c "from acttail_vllm.dev.models import ensure_smollm2; print(ensure_smollm2())")
models=("$@")
[ ${#models[@]} -gt 0 ] || models=(smollm2 qwen0.5b)
for model in "${models[@]}"; do
  extra=
  case $model in
  smollm2) dir=$smollm2 ;;
  qwen0.5b)
    dir=$(mktemp -d)/qwen2.5-0.5b-shape
    $python -m benchmarks.dummy_models qwen2.5-0.5b "$dir" --tokenizer "$smollm2" >/dev/null
    extra="--load-format dummy" ;;
  *) echo "unknown model $model (smollm2, qwen0.5b)" >&2; exit 2 ;;
  esac
  args=(--model "$dir" --sparsity 0.5,0.8 --concurrency 1,4 --rounds 2 --warmup 2 --prompt-tokens 128 --max-tokens 64
    --vllm-args "--dtype bfloat16 --max-model-len 1024 --max-num-seqs 8 $extra" --output "$out/serve_cpu_$model.json"
    --server-logs "$out/logs_$model")
  {
    echo "# bash benchmarks/cpu_serve.sh OUT $model: $(nproc) CPUs ($(lscpu | sed -n 's/^Model name: *//p')), $(date -u +%F), code of $(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes')"
    $python -m benchmarks.load_bench "${args[@]}" 2>&1 | grep -v "^starting"
  } | tee "$out/serve_cpu_$model.txt"
done
