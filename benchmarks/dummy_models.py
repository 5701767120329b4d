"""Model directories of a real model's shape for `--load-format dummy` (random weights, real speed).

    python3 -m benchmarks.dummy_models llama3-8b /tmp/llama3-8b-shape [--tokenizer DIR]

writes config.json of that model: Llama-2 7B/13B, Llama-3-8B, Mistral-7B-v0.1, Qwen2.5-7B and
Qwen2.5-0.5B (their q/k/v bias comes with the architecture). vLLM's dummy loader makes the
weights. ``--tokenizer`` copies a tokenizer in (for servers that take text) and sets the vocabulary
to its size; the linear layers, which are all ActTail touches, keep the model's shapes either way.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

_LLAMA2 = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": 32000,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
}
#: name -> config.json fields beyond the shared ones below (the published configs' values).
MODELS: dict[str, dict] = {
    "7b": {
        **_LLAMA2,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
    },
    "13b": {
        **_LLAMA2,
        "hidden_size": 5120,
        "intermediate_size": 13824,
        "num_hidden_layers": 40,
        "num_attention_heads": 40,
        "num_key_value_heads": 40,
    },
    "llama3-8b": {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
        "rope_theta": 500000.0,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
    "mistral-7b": {
        "architectures": ["MistralForCausalLM"],
        "model_type": "mistral",
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
        "rope_theta": 10000.0,
        "sliding_window": None,
        "rms_norm_eps": 1e-5,
        "bos_token_id": 1,
        "eos_token_id": 2,
    },
    "qwen2.5-7b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": 152064,
        "hidden_size": 3584,
        "intermediate_size": 18944,
        "num_hidden_layers": 28,
        "num_attention_heads": 28,
        "num_key_value_heads": 4,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 28,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "qwen2.5-0.5b": {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rms_norm_eps": 1e-6,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 24,
        "tie_word_embeddings": True,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
    },
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def write_config(model: str, path: Path, tokenizer: Path | None = None) -> Path:
    """config.json of ``model`` (a key of MODELS) in ``path`` (created), with ``tokenizer``'s files
    if given."""
    path.mkdir(parents=True, exist_ok=True)
    config = {"hidden_act": "silu", "torch_dtype": "bfloat16", "tie_word_embeddings": False, **MODELS[model]}
    if tokenizer is not None:
        for name in TOKENIZER_FILES:
            if (tokenizer / name).is_file():
                shutil.copy(tokenizer / name, path / name)
        config["vocab_size"] = json.loads((tokenizer / "config.json").read_text())["vocab_size"]
    (path / "config.json").write_text(json.dumps(config, indent=2))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=sorted(MODELS))
    parser.add_argument("out", type=Path)
    parser.add_argument("--tokenizer", type=Path, help="Hugging Face model directory to take the tokenizer from")
    args = parser.parse_args()
    print(write_config(args.model, args.out, args.tokenizer))


if __name__ == "__main__":
    main()
