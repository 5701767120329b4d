#!/usr/bin/env bash
# The GPU numbers of the docs, one step per command, each step well under 10 minutes on one H200. Run
# from the repo root on a CUDA host where vLLM 0.26 and this project are installed (offline hosts:
# ../shared/gpu/README.md, whose setup installs the project; then `source .gpu/kit/env.sh`).
# tiles, kernels and switches need no vLLM, only torch, Triton, pydantic and the project installed:
#   python3 -m pip install --no-index --no-deps --no-build-isolation -e .
# On a host without pydantic, `bash benchmarks/gpu_session.sh pydantic-wheels` here first takes its wheels from the
# vLLM bundle into .gpu/pydantic; carry that folder and run there, before the line above:
#   python3 -m pip install --no-index --no-deps .gpu/pydantic/*.whl
#
#   bash benchmarks/gpu_session.sh tiles       # one-token GEMV tiles per shape (kernels/measured/<GPU>/gemv_tiles.json)
#   bash benchmarks/gpu_session.sh kernels     # kernel tests (bf16), kernel table + crossover (.../crossover.json)
#   bash benchmarks/gpu_session.sh switches    # A/B of the selection options (benchmarks/experiments/switch_ab.py)
#   bash benchmarks/gpu_session.sh profile     # time to build a 13B-shape profile (ESD + alpha fits) on the GPU
#   bash benchmarks/gpu_session.sh serve13b    # `vllm serve` 13B shape: dense vs acttail defaults at 50/80%, concurrency 1-64
#   bash benchmarks/gpu_session.sh serve7b     # the same at the 7B shape
#   (INTERLEAVE=3: all servers at once, the load sent to them in turn 3 times; SPARSITIES=0.8 one of them;
#   CONTROL=1 a second dense server, the scatter between identical servers; CONCURRENCY=16,64 a part;
#   SPREAD=0.5 request lengths 64-192 tokens instead of 128, so that streams do not run in lockstep;
#   RATE=2,6,20 Poisson arrivals at those requests/s, one per concurrency, which then caps those in flight;
#   PIN=1 each server on physical cores of its own, the client on the first core; START=1 the servers started
#   rotated by one place: runs with START=0,1,2 pooled by `python3 -m benchmarks.load_bench --pool A.json B.json C.json`;
#   CPUROT=1 with PIN=1 each server on the next server's cores: runs with CPUROT=0,1,2 pooled the same way;
#   MIN_REQUESTS=24 the fewest requests per concurrency, 4 per stream above: TTFT p50 of 8 single-stream prompts scatters)
#   bash benchmarks/gpu_session.sh host        # host time per eager op call against the dense layer's
#   bash benchmarks/gpu_session.sh layout      # dense GEMM on the kernel layout [K, N] vs vLLM's [N, K], M = 16-8192
#   bash benchmarks/gpu_session.sh stall       # Triton compilations after startup, 1,000 mixed-length requests
#   bash benchmarks/gpu_session.sh prefill     # a prefill step's wall and GPU time, dense and 80% engines in turn
#                                              # (ENGINES='dense 0.8 dense 0.8' the order, SHAPE=13b, PROMPTS=1,4
#                                              # prompts of 256 tokens a step: 32 fill one of `vllm serve`'s 8,192-token steps)
#   bash benchmarks/gpu_session.sh decode13b   # vLLM decode tok/s, 13B shape, dense vs s in {0.5,0.7,0.8,0.9}
#   bash benchmarks/gpu_session.sh decode7b    # the same at the 7B shape
#   (SPARSITIES=0.5,0.8 / BATCHES=1,16 pick a part; EXTEND=benchmarks/results/h200/decode_13b.json adds
#   sparsities to an earlier run, reusing its dense numbers: one table in two calls of < 10 min;
#   OPTIONS='{"max_sparse_tokens": 1}' passes more ActTail options, TAG=name suffixes the result files;
#   PROMPT=256 prompts of 256 tokens: the first-token columns then compare a served prompt's prefill in the engine)
#   bash benchmarks/gpu_session.sh bundle-parts  # here: the vLLM bundle (.gpu/vb1-3) cut into parts that fit beside the checkout
#   bash benchmarks/gpu_session.sh gguf-parts  # here: the quality study's GGUFs in parts that fit beside the checkout (.gpu/gguf)
#   bash benchmarks/gpu_session.sh models      # there: join the parts carried to /tmp/gguf, convert to HF dirs
#   bash benchmarks/gpu_session.sh quality-tune     # after models: acttail's variant chosen on the tuning text
#   bash benchmarks/gpu_session.sh quality-report   # held-out perplexity (2 texts), controls, multiple choice
#   bash benchmarks/gpu_session.sh served           # SmolLM2 served by vLLM against the reference forward
#   bash benchmarks/gpu_session.sh reproducibility  # what TopK does to reproducibility (docs/reproducibility.md)
#   bash benchmarks/gpu_session.sh eagerdecode 13b  # decode tok/s dense vs 50%/80% under --enforce-eager (13b or 7b)
#   bash benchmarks/gpu_session.sh familytables  # tiles, kernel table, crossover at the Llama-3-8B (= Mistral-7B)
#                                                # and Qwen2.5-7B shapes, added to this GPU's tables (SHAPES= one of them)
#   bash benchmarks/gpu_session.sh familydecode llama3-8b   # batch-1 decode tok/s, dense vs 50% and 80%, one
#                                                # model per call: llama3-8b, qwen2.5-7b or mistral-7b
#
# Results land in $OUT (default out/gpu). Budgets built by vLLM's loader hook are cached in
# $ACTTAIL_CACHE (default /tmp/acttail-cache), so later steps re-allocate instead of recomputing alphas.
# serve needs a tokenizer directory (TOKENIZER_DIR, default .gpu/tok); the quality steps
# need the exported data (EVAL_DATA, default .gpu/evaldata: `acttail eval export-data --out .gpu/evaldata`).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
export ACTTAIL_CACHE=${ACTTAIL_CACHE:-/tmp/acttail-cache}
python=${PYTHON:-python3}
measured() {  # path of this GPU's measured table $1 (kernels/measured/<GPU>/$1)
  $python -c "import sys, torch; from acttail_kernels.measured import table_path
print(table_path(sys.argv[1], torch.cuda.get_device_name()))" "$1"
}

carry_room() {  # bytes one device command may carry beside this checkout's own files: 64 MiB less them, less 1 MiB
  local tree
  tree=$(git ls-files -z -c -o --exclude-standard | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
  echo $((63 * 1024 * 1024 - tree))
}

vllm_bundle=(.gpu/vb1/part00 .gpu/vb2/part01 .gpu/vb3/part02)  # the parts the kit's setup.sh joins, in order

case "${1:-}" in
bundle-parts)
  # Here, not on the host: the vLLM bundle's three parts (cut at 45 MB by ../shared/gpu/build_vllm_bundle.sh)
  # cut again into three equal ones, so that each fits a command beside this checkout and .gpu/kit; the
  # kit's setup.sh joins them as before.
  part=$(( ($(stat -c %s "${vllm_bundle[@]}" | awk '{s += $1} END {print s}') + 2) / 3 ))
  room=$(( $(carry_room) - $(du -sb .gpu/kit | cut -f1) ))
  if [ "$part" -gt "$room" ]; then
    echo "bundle-parts: a third of the vLLM bundle ($part bytes) does not fit beside this checkout's files ($room bytes left of 64 MiB); move large untracked files out of the tree" >&2
    exit 1
  fi
  cat "${vllm_bundle[@]}" | split -b "$part" -d -a 2 - .gpu/bundle.part
  for i in 0 1 2; do mv ".gpu/bundle.part0$i" "${vllm_bundle[$i]}"; done
  ls -l "${vllm_bundle[@]}"
  ;;
pydantic-wheels)
  # Here, not on the host: the vLLM bundle of ../shared/gpu/build_vllm_bundle.sh holds these wheels.
  rm -rf .gpu/pydantic && mkdir -p .gpu/pydantic
  cat "${vllm_bundle[@]}" | xz -d | tar -x -C .gpu/pydantic --strip-components=1 \
    --wildcards 'deps/pydantic-2*' 'deps/pydantic_core*' 'deps/annotated_types*' 'deps/typing_inspection*'
  ls .gpu/pydantic
  ;;
tiles)
  # Into this GPU's folder (the crossover, step kernels, is measured with these tiles) and $OUT.
  $python -m tools.tune_gemv_tiles --write 2>&1 | tee "$OUT/gemv_tiles.txt"
  cp "$(measured gemv_tiles.json)" "$OUT/"
  ;;
kernels)
  { $python -m pytest -q tests/test_kernels.py 2>&1 || true; } | tail -5 | tee "$OUT/kernel_tests.txt"
  $python -m tools.tune_crossover --check --write 2>&1 | grep -v "^  measured" | tee "$OUT/bench_kernels.txt"
  cp "$(measured crossover.json)" "$OUT/"
  ;;
switches)
  for switch in pdl row-chunk row-chunk-batches thr-window range-programs; do
    $python -m benchmarks.experiments.switch_ab --switch $switch 2>&1 | tee "$OUT/switch_$switch.txt"
  done
  ;;
profile)
  $python -m benchmarks.profile_gpu 2>&1 | tail -15 | tee "$OUT/profile_gpu.txt"
  ;;
serve13b | serve7b)
  # Defaults against dense as a user sees them: `vllm serve` of the shape (random weights, CUDA graphs),
  # dense then acttail at each sparsity, each at every concurrency (256-token prompts, 128 new tokens).
  # INTERLEAVE=3: every server up at once, each with 0.85 / (servers) of the memory, and each
  # concurrency's load sent to them in turn 3 times (load_bench --interleave); files end in _interleaved.
  # CONTROL=1 adds a second dense server: its ratios to dense are the bench's own scatter.
  shape=${1#serve}
  model=/tmp/llama-2-$shape-shape-tok
  sparsities=${SPARSITIES:-0.5,0.8}
  util=0.85 name=serve_$shape${TAG:+_$TAG}
  if [ -n "${INTERLEAVE:-}" ]; then
    servers=$((1 + ${CONTROL:-0} + $(echo "$sparsities" | tr ',' '\n' | wc -l)))
    util=$($python -c "import sys; print(round(0.85 / int(sys.argv[1]), 2))" "$servers")
    name=serve_${shape}_interleaved${TAG:+_$TAG}
  fi
  $python -m benchmarks.dummy_models "$shape" "$model" --tokenizer "${TOKENIZER_DIR:-.gpu/tok}"
  $python -m benchmarks.load_bench --model "$model" --sparsity "$sparsities" ${INTERLEAVE:+--interleave $INTERLEAVE} \
    ${CONTROL:+--dense-control} ${PIN:+--pin-cpus} ${START:+--start-rotation $START} ${CPUROT:+--cpu-rotation $CPUROT} \
    --vllm-args "--load-format dummy --dtype bfloat16 --max-model-len 2048 --max-num-seqs 64 \
      --gpu-memory-utilization $util --compilation-config '{\"cudagraph_capture_sizes\":[1,2,4,8,16,24,32,48,64]}'" \
    --concurrency "${CONCURRENCY:-1,4,16,64}" --rounds 4 --min-requests "${MIN_REQUESTS:-24}" --prompt-tokens 256 --max-tokens 128 \
    --max-tokens-spread "${SPREAD:-0}" ${RATE:+--request-rate $RATE} \
    --output "$OUT/$name.json" --server-logs "$OUT/$name" 2>&1 | grep --line-buffered -v "^starting" | tee "$OUT/$name.txt"
  gzip -dc "$OUT/$name"/acttail_*.log.gz | grep -E "ActTail" | cut -c1-300 | tail -12
  gzip -dc "$OUT/$name"/acttail_*.metrics.gz | grep -E "^acttail_(info|tokens_total)"
  ;;
host)
  $python -m benchmarks.host_overhead 2>&1 | tee "$OUT/host_overhead.txt"
  ;;
layout)
  $python -m benchmarks.experiments.dense_layout 2>&1 | tee "$OUT/dense_layout.txt"
  ;;
stall)
  # Triton compilations after startup over 1,000 requests of 1-2000-token prompts, acttail defaults.
  ACTTAIL_SPARSITY=${SPARSITY:-0.8} $python -m benchmarks.stall_probe --shape "${SHAPE:-13b}" \
    --sparsity "${SPARSITY:-0.8}" --mixed 1000 --new-tokens 8 2>&1 | grep -vE "^(INFO|WARNING|\(EngineCore)" \
    | tee "$OUT/stall_probe.txt"
  ;;
prefill)
  # benchmarks/experiments/prefill_step.py, one engine per process; the first ActTail engine also
  # computes the budgets (about 50 s at the 13B shape), later ones reuse them from $ACTTAIL_CACHE.
  for s in ${ENGINES:-dense 0.8 dense 0.8}; do
    ACTTAIL_SPARSITY=$s timeout 240 $python -m benchmarks.experiments.prefill_step --shape "${SHAPE:-13b}" \
      --sparsity "$s" --prompts "${PROMPTS:-1,4}" --rounds 30 2>&1 | grep -E "tokens: wall|compile without|ERROR|Traceback" | tee -a "$OUT/prefill_step.txt" \
      || true  # an engine out of time leaves the others to run
  done
  ;;
decode13b | decode7b)
  shape=${1#decode}
  $python -m benchmarks.vllm_decode_bench --shapes "$shape" --sparsities "${SPARSITIES:-0.5,0.7,0.8,0.9}" --batches "${BATCHES:-1,4,16}" \
    --prompt-len "${PROMPT:-64}" --new-tokens 128 --repeats 3 --json "$OUT/decode_$shape${TAG:+_$TAG}.json" ${EXTEND:+--extend "$EXTEND"} \
    ${OPTIONS:+--options "$OPTIONS"} 2>&1 | tee "$OUT/decode_$shape${TAG:+_$TAG}.txt"
  ;;
familytables)
  # The kernel test (tests/test_kernels.py) has the GQA qkv shapes; this adds those models' shapes to the
  # tables the dispatch reads, with a full-size correctness pass at each before timing.
  models=${SHAPES:-llama3-8b qwen2.5-7b}
  $python -m tools.tune_gemv_tiles --write --shapes $models 2>&1 | tee "$OUT/gemv_tiles_families.txt"
  $python -m tools.tune_crossover --check --write --shapes $models 2>&1 | grep -v "^  measured" \
    | tee "$OUT/bench_kernels_families.txt"
  cp "$(measured gemv_tiles.json)" "$(measured crossover.json)" "$OUT/"
  ;;
eagerdecode)
  # Dense vs 50% and 80% without CUDA graphs (`--enforce-eager`), where every op call pays its host time.
  shape=${2:?name a shape: 13b or 7b}
  $python -m benchmarks.vllm_decode_bench --shapes "$shape" --sparsities 0.5,0.8 --batches "${BATCHES:-1,16}" \
    --new-tokens 64 --repeats 2 --enforce-eager --json "$OUT/decode_${shape}_eager.json" 2>&1 | tee "$OUT/decode_${shape}_eager.txt"
  ;;
familydecode)
  # Three engines (dense, 50%, 80%) of one model's shape, random weights, CUDA graphs; decode-only tok/s.
  shape=${2:?name a model: llama3-8b, qwen2.5-7b or mistral-7b}
  $python -m benchmarks.vllm_decode_bench --shapes "$shape" --sparsities 0.5,0.8 --batches 1 --new-tokens 64 \
    --repeats 2 --json "$OUT/decode_$shape.json" 2>&1 | tee "$OUT/decode_$shape.txt"
  ;;
gguf-parts)
  # Here, not on the host: the quality study's three GGUFs (SmolLM2-135M-Instruct, Gemma 3 270M,
  # Qwen2.5-Coder-0.5B-Instruct-AWQ) from their packages, concatenated and split into parts that fit a
  # command's 64 MiB with the tree, in .gpu/gguf with a MANIFEST (name, size, sha256) and the gguf wheel
  # (GGUF_WHEEL). Carry one part per command (and MANIFEST and the wheel with the first) and copy each
  # to /tmp/gguf there; step `models` then joins them.
  rm -rf .gpu/gguf && mkdir -p .gpu/gguf
  $python - <<'PY' > .gpu/gguf/MANIFEST
import hashlib
from acttail_vllm.dev.models import GEMMA3_270M, QWEN25_CODER_05B, ensure_chunked_gguf, smollm2_gguf
for name, path in (("smollm2", smollm2_gguf()), ("gemma3", ensure_chunked_gguf(GEMMA3_270M)),
                   ("qwen05", ensure_chunked_gguf(QWEN25_CODER_05B))):
    print(name, path, path.stat().st_size, hashlib.sha256(path.read_bytes()).hexdigest())
PY
  cp "${GGUF_WHEEL:?the gguf wheel (pip download gguf)}" .gpu/gguf/
  cut -d' ' -f2 .gpu/gguf/MANIFEST | xargs cat | split -b $(($(carry_room) - $(du -sb .gpu/gguf | cut -f1))) -d -a 2 - .gpu/gguf/part.
  ls -l .gpu/gguf
  ;;
models)
  # On the host, after the parts of step gguf-parts are in /tmp/gguf: join, check, and convert each
  # model to a float32 Hugging Face directory in /tmp/models/NAME (smollm2, gemma3, qwen05).
  # MODELS=smollm2 converts only the models named; SmolLM2 comes first, so parts 00 and 01 hold it.
  mkdir -p /tmp/site /tmp/models
  $python -m pip install -q --no-index --no-deps --target /tmp/site /tmp/gguf/gguf-*.whl
  cat /tmp/gguf/part.* > /tmp/gguf/all
  offset=0
  while read -r name _ size sha; do
    start=$offset offset=$((offset + size))
    case " ${MODELS:-$name} " in *" $name "*) ;; *) continue ;; esac
    dd if=/tmp/gguf/all of="/tmp/gguf/$name.gguf" bs=1M iflag=skip_bytes,count_bytes skip="$start" count="$size" status=none
    echo "$sha  /tmp/gguf/$name.gguf" | sha256sum -c -
    $python -m tools.gguf_to_hf "/tmp/gguf/$name.gguf" "/tmp/models/$name" --dtype float32
  done < /tmp/gguf/MANIFEST
  rm /tmp/gguf/all
  ;;
quality-tune | quality-report)
  # Issue-19 study over the three models of step models: the tune phase picks acttail's variant on the
  # tuning text, the report phase reads that choice (from /tmp/quality, where both phases write).
  models=(--model smollm2=/tmp/models/smollm2 --model gemma3=/tmp/models/gemma3 --model qwen05=/tmp/models/qwen05)
  data=(--data-dir "${EVAL_DATA:-.gpu/evaldata}")
  if [ "$1" = quality-tune ]; then
    $python -m benchmarks.quality_sweep --phase tune "${models[@]}" "${data[@]}" --out /tmp/quality/tune "${@:2}"
  else
    $python -m benchmarks.quality_sweep --phase report --chosen /tmp/quality/tune/tuning.json "${models[@]}" \
      "${data[@]}" --out /tmp/quality/report "${@:2}"
  fi
  cp -r /tmp/quality "$OUT/"
  ;;
served)
  # Issue 19: SmolLM2 served by vLLM (bf16, CUDA graphs, policy all) against the reference forward,
  # then what TopK does to reproducibility (dtype, batch composition, kernel path).
  $python -m benchmarks.served_ppl --model /tmp/models/smollm2 --data-dir "${EVAL_DATA:-.gpu/evaldata}" \
    --out "$OUT/served_ppl" "${@:2}"
  ;;
reproducibility)
  $python -m benchmarks.reproducibility --model /tmp/models/smollm2 --data-dir "${EVAL_DATA:-.gpu/evaldata}" \
    --out "$OUT/reproducibility" "${@:2}"
  ;;
*)
  sed -n '2,30p' "$0"
  exit 2
  ;;
esac
