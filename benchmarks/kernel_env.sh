#!/usr/bin/env bash
# The kernel steps of gpu_session.sh (tiles, kernels, switches) and selection_costs.py need no vLLM:
# torch, Triton and pydantic, with this project importable. On the offline GPU host that saves the
# three-call bundle setup of ../shared/gpu/README.md.
#
#   bash benchmarks/kernel_env.sh prepare    # here, once: pydantic's wheels from the vLLM bundle into .gpu/pyd
#   source benchmarks/kernel_env.sh          # there (device carry [".gpu/pyd"]): acttail_kernels importable
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ "${1:-}" = prepare ]; then
  set -euo pipefail
  wheels=$(mktemp -d)
  cat "$root"/.gpu/vb1/part00 "$root"/.gpu/vb2/part01 "$root"/.gpu/vb3/part02 | xz -d \
    | tar -x -C "$wheels" --wildcards '*deps/pydantic-2*' '*deps/pydantic_core*' '*deps/annotated_types*' \
      '*deps/typing_inspection*'
  rm -rf "$root/.gpu/pyd"
  for wheel in "$wheels"/*/*.whl; do python3 -m zipfile -e "$wheel" "$root/.gpu/pyd"; done
  rm -rf "$wheels"
  echo "pydantic for the GPU host's Python in $root/.gpu/pyd ($(du -sh "$root/.gpu/pyd" | cut -f1)); carry it"
else
  mkdir -p /tmp/acttail-kernels-path
  ln -sfn "$root/kernels" /tmp/acttail-kernels-path/acttail_kernels
  export PYTHONPATH=/tmp/acttail-kernels-path:$root/.gpu/pyd${PYTHONPATH:+:$PYTHONPATH}
fi
