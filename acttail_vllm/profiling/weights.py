"""Read a model's decoder projections one tensor at a time, never the whole model at once.

Sources: a Hugging Face model directory (config.json + *.safetensors, sharded or not), a GGUF file
(dequantised with the ``gguf`` package, Q/K rows un-permuted back to Hugging Face order), or a hub
id (downloaded with ``huggingface_hub`` when the hub is reachable). Every source yields
``(layer_index, proj_name, weight)`` with the weight in Hugging Face (out_features, in_features)
layout.
"""

from __future__ import annotations

import json
import re
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from acttail_vllm.profiling.profile import PROJECTION_NAMES

#: Architectures whose decoder layers carry the seven projections under Llama's names.
SUPPORTED_ARCHITECTURES: tuple[str, ...] = ("LlamaForCausalLM", "MistralForCausalLM")
#: GGUF ``general.architecture`` -> the Hugging Face architecture it converts to.
GGUF_ARCHITECTURES: dict[str, str] = {"llama": "LlamaForCausalLM"}
_HF_PROJECTION_MODULE = {name: ("self_attn" if name[0] in "qkvo" else "mlp") for name in PROJECTION_NAMES}
_GGUF_PROJECTION_TENSOR = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

Projection = tuple[int, str, torch.Tensor]


class WeightsError(ValueError):
    """A model that cannot be read; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class ModelWeights:
    """A readable model: what it is, and a way to stream its projections."""

    name: str
    architecture: str
    num_layers: int
    _stream: Callable[[], Iterator[Projection]]

    def projections(self) -> Iterator[Projection]:
        """Yield (layer, proj_name, weight) for every layer and every name in PROJECTION_NAMES."""
        return self._stream()


def _check_architecture(architecture: str, source: str) -> None:
    if architecture not in SUPPORTED_ARCHITECTURES:
        raise WeightsError(
            f"{source} is a {architecture} model; acttail reads Llama-family decoders only "
            f"({', '.join(SUPPORTED_ARCHITECTURES)})"
        )


def hf_tensor_name(layer: int, proj: str) -> str:
    return f"model.layers.{layer}.{_HF_PROJECTION_MODULE[proj]}.{proj}.weight"


def open_hf_directory(directory: Path) -> ModelWeights:
    """A Hugging Face model directory: config.json plus one or more *.safetensors files."""
    from safetensors import safe_open

    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"cannot read {config_path} ({exc}): is {directory} a Hugging Face model directory?") from None
    architecture = (config.get("architectures") or ["<none>"])[0]
    _check_architecture(architecture, str(directory))
    num_layers = int(config["num_hidden_layers"])
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise WeightsError(f"{directory} has a config.json but no *.safetensors weights")

    def stream() -> Iterator[Projection]:
        with ExitStack() as stack:
            # Opening a shard reads only its header; tensors are read one at a time below.
            handles = [stack.enter_context(safe_open(str(s), framework="pt")) for s in shards]
            where = {key: handle for handle in handles for key in handle.keys()}
            for layer in range(num_layers):
                for proj in PROJECTION_NAMES:
                    name = hf_tensor_name(layer, proj)
                    if name not in where:
                        raise WeightsError(f"{directory} has no tensor {name}")
                    yield layer, proj, where[name].get_tensor(name)

    return ModelWeights(directory.name, architecture, num_layers, stream)


def _gguf_scalar(reader, key: str, source: Path):
    field = reader.fields.get(key)
    if field is None:
        raise WeightsError(f"GGUF file {source} lacks metadata key {key!r}")
    return field.contents()


def unpermute_rotary_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation (``convert_hf_to_gguf.py`` ``permute``).

    llama.cpp interleaves the two rotary halves of each head's rows; Hugging Face keeps them as two
    contiguous halves. Same inverse as transformers' GGUF loader (``_reverse_permute_weights``).
    """
    head_dim_half = weight.shape[0] // num_heads // 2
    heads = weight.reshape(num_heads, head_dim_half, 2, *weight.shape[1:])
    return heads.swapaxes(1, 2).reshape(weight.shape)


def open_gguf(path: Path) -> ModelWeights:
    """A GGUF file (any quantisation the ``gguf`` package can dequantise)."""
    try:
        from gguf import GGUFReader, dequantize
    except ImportError:
        raise WeightsError("reading GGUF files needs the 'gguf' package: pip install 'acttail-vllm[gguf]'") from None
    try:
        reader = GGUFReader(str(path))
    except (ValueError, OSError) as exc:
        raise WeightsError(f"cannot read GGUF file {path}: {exc}") from None
    gguf_arch = _gguf_scalar(reader, "general.architecture", path)
    architecture = GGUF_ARCHITECTURES.get(gguf_arch, gguf_arch)
    _check_architecture(architecture, str(path))
    num_layers = int(_gguf_scalar(reader, f"{gguf_arch}.block_count", path))
    num_heads = int(_gguf_scalar(reader, f"{gguf_arch}.attention.head_count", path))
    num_kv_heads = int(_gguf_scalar(reader, f"{gguf_arch}.attention.head_count_kv", path))
    rotary_heads = {"q_proj": num_heads, "k_proj": num_kv_heads}
    tensors = {t.name: t for t in reader.tensors}

    def stream() -> Iterator[Projection]:
        for layer in range(num_layers):
            for proj in PROJECTION_NAMES:
                name = f"blk.{layer}.{_GGUF_PROJECTION_TENSOR[proj]}.weight"
                if name not in tensors:
                    raise WeightsError(f"GGUF file {path} has no tensor {name}")
                tensor = tensors[name]
                weight = dequantize(tensor.data, tensor.tensor_type)
                if proj in rotary_heads:
                    weight = unpermute_rotary_rows(weight, rotary_heads[proj])
                yield layer, proj, torch.from_numpy(np.ascontiguousarray(weight, dtype=np.float32))

    name = path.name.removesuffix(".gguf")
    return ModelWeights(name, architecture, num_layers, stream)


def _download(hub_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise WeightsError(f"{hub_id!r} is not a local path and huggingface_hub is not installed: pass a local model directory or GGUF file") from None
    try:
        return Path(snapshot_download(hub_id, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as exc:  # hub errors are many (offline, 404, gated); all mean the same here
        raise WeightsError(
            f"could not fetch {hub_id!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}); "
            "if this machine is offline, pass a local model directory or GGUF file instead"
        ) from None


def open_model(model: str | Path) -> ModelWeights:
    """A model directory, a GGUF file, or a hub id ("org/name")."""
    path = Path(model)
    if path.is_dir():
        return open_hf_directory(path)
    if path.is_file():
        if path.suffix == ".gguf":
            return open_gguf(path)
        raise WeightsError(f"{path} is a file but not a GGUF file (*.gguf): pass a GGUF file or a model directory")
    if path.exists():
        raise WeightsError(f"{path} is neither a model directory nor a GGUF file")
    if _HUB_ID.match(str(model)):
        return replace(open_hf_directory(_download(str(model))), name=str(model))
    raise WeightsError(f"{model} does not exist: pass a model directory, a GGUF file, or a hub id like org/name")
