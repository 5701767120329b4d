"""Convert a GGUF file into a Hugging Face model directory (safetensors, config, tokenizer) that
transformers, vLLM and ``acttail`` load.

    python3 -m tools.gguf_to_hf GGUF OUT_DIR [--dtype float32|bfloat16]      # from the repo root

Needs torch, transformers and the ``gguf`` package only (a host without a package index can take
the pure-Python wheel: ``pip install --no-index --no-deps --target SITE gguf-*.whl`` and put SITE
on PYTHONPATH). The weights are de-quantised by transformers' GGUF loader; the tokenizer keeps the
GGUF's ``add_bos_token`` (Gemma needs ``<bos>``). OUT_DIR must not exist yet.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from acttail_vllm.dev.models import convert_gguf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("gguf", type=Path, metavar="GGUF")
    parser.add_argument("out_dir", type=Path, metavar="OUT_DIR")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args(argv)
    if not args.gguf.is_file():
        parser.error(f"{args.gguf} is not a file")
    if args.out_dir.exists():
        parser.error(f"{args.out_dir} exists: give a new directory")
    convert_gguf(args.gguf.resolve(), args.out_dir, args.dtype)
    print(f"wrote {args.out_dir} ({args.dtype})")


if __name__ == "__main__":
    main()
