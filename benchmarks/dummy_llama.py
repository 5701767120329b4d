"""Llama-2-shaped model directories for `--load-format dummy` (random weights, real speed).

    python3 -m benchmarks.dummy_llama 13b /tmp/llama-2-13b-shape [--tokenizer DIR]

writes config.json of that shape. vLLM's dummy loader makes the weights. ``--tokenizer`` copies a
tokenizer in (for servers that take text) and sets the vocabulary to its size; the linear layers,
which are all ActTail touches, keep the Llama-2 shapes either way.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

SHAPES = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32},
    "13b": {"hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40, "num_attention_heads": 40},
}
LLAMA2_VOCAB = 32000
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def write_config(shape: str, path: Path, tokenizer: Path | None = None) -> Path:
    """A Llama-2 config.json of ``shape`` in ``path`` (created), with ``tokenizer``'s files if given."""
    path.mkdir(parents=True, exist_ok=True)
    dims = SHAPES[shape]
    vocab = LLAMA2_VOCAB
    if tokenizer is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer / name).is_file():
                shutil.copy(tokenizer / name, path / name)
        vocab = json.loads((tokenizer / "config.json").read_text())["vocab_size"]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab,
        "num_key_value_heads": dims["num_attention_heads"],
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        **dims,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(SHAPES))
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer", type=Path, help="Hugging Face model directory to take the tokenizer from")
    args = parser.parse_args()
    print(write_config(args.shape, args.out, args.tokenizer))


if __name__ == "__main__":
    main()
