"""Read a model's decoder projections one tensor at a time, never the whole model at once.

Sources: a Hugging Face model directory (config.json + *.safetensors, sharded or not), a GGUF file
(dequantised with the ``gguf`` package; Q/K rows of llama.cpp's ``llama`` arch un-permuted back to
Hugging Face order), or a hub id (downloaded with ``huggingface_hub`` when the hub is reachable).
Every source yields ``(layer_index, proj_name, weight)`` with the weight in Hugging Face
(out_features, in_features) layout, for every family of ``families.FAMILIES``.
"""

from __future__ import annotations

import itertools
import json
import re
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from acttail_vllm.profiling.families import Family, family_of, gguf_family
from acttail_vllm.profiling.profile import PROJECTION_NAMES

#: The Hugging Face module inside a decoder layer of each projection and of Phi-3's fused ones.
_HF_MODULE = {
    name: ("self_attn" if name[0] in "qkvo" else "mlp") for name in (*PROJECTION_NAMES, "qkv_proj", "gate_up_proj")
}
#: llama.cpp's tensor of each projection; its phi3 arch stores q|k|v as attn_qkv and gate|up as ffn_up.
_GGUF_TENSOR = {
    "q_proj": "attn_q",
    "k_proj": "attn_k",
    "v_proj": "attn_v",
    "o_proj": "attn_output",
    "gate_proj": "ffn_gate",
    "up_proj": "ffn_up",
    "down_proj": "ffn_down",
}
_GGUF_FUSED_TENSOR = {**_GGUF_TENSOR, "qkv_proj": "attn_qkv", "gate_up_proj": "ffn_up"}
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")

Projection = tuple[int, str, torch.Tensor]
#: A layer's [out, in] weight of a module named as in Hugging Face (``q_proj``, Phi-3's ``qkv_proj``,
#: ...), or None where the layer has no such tensor.
ModuleReader = Callable[[int, str], torch.Tensor | None]


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
        """Yield (layer, proj_name, weight) for every layer: every name in PROJECTION_NAMES, or in
        a mixture-of-experts layer the attention projections alone (its experts stay dense)."""
        return self._stream()


def hf_tensor_name(layer: int, module: str) -> str:
    return f"model.layers.{layer}.{_HF_MODULE[module]}.{module}.weight"


def decoder_projections(
    family: Family, num_layers: int, num_heads: int, num_kv_heads: int, read: ModuleReader, source: str
) -> Iterator[Projection]:
    """Every layer's projections in PROJECTION_NAMES order, whatever the checkpoint's layout: fused
    tensors are split into their projections (Phi-3), and a mixture-of-experts layer, whose MLP is
    experts, yields its attention projections alone."""

    def required(layer: int, module: str) -> torch.Tensor:
        weight = read(layer, module)
        if weight is None:
            raise WeightsError(f"{source} has no {module} weight in layer {layer}")
        return weight

    for layer in range(num_layers):
        if family.fused:
            qkv = required(layer, "qkv_proj")
            # rows are q (num_heads heads), then k and v (num_kv_heads heads each)
            head_dim, rest = divmod(qkv.shape[0], num_heads + 2 * num_kv_heads)
            if rest:
                raise WeightsError(
                    f"{source}: layer {layer} qkv_proj has {qkv.shape[0]} rows, not a multiple of the "
                    f"{num_heads} + 2 x {num_kv_heads} heads of its config"
                )
            attention = qkv.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim])
            gate_up = read(layer, "gate_up_proj")
            gate, up = (None, None) if gate_up is None else gate_up.chunk(2)
        else:
            attention = tuple(required(layer, name) for name in ("q_proj", "k_proj", "v_proj"))
            gate = read(layer, "gate_proj")
            up = None if gate is None else required(layer, "up_proj")
        yield from zip(itertools.repeat(layer), ("q_proj", "k_proj", "v_proj"), attention)
        yield layer, "o_proj", required(layer, "o_proj")
        if gate is None and family.moe:
            continue  # experts: dense
        if gate is None:
            gate_module = "gate_up_proj" if family.fused else "gate_proj"
            raise WeightsError(f"{source} has no {gate_module} weight in layer {layer}")
        down = required(layer, "down_proj")
        yield from ((layer, "gate_proj", gate), (layer, "up_proj", up), (layer, "down_proj", down))


def open_hf_directory(directory: Path) -> ModelWeights:
    """A Hugging Face model directory: config.json plus one or more *.safetensors files."""
    from safetensors import safe_open

    config_path = directory / "config.json"
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(
            f"cannot read {config_path} ({exc}): is {directory} a Hugging Face model directory?"
        ) from None
    architecture = (config.get("architectures") or ["<none>"])[0]
    family = family_of(architecture, str(directory))

    def config_int(key: str, default: int | None = None) -> int:
        value = config.get(key) or default
        if value is None:
            raise WeightsError(f"{config_path} has no {key}: is it a {architecture} config?")
        return int(value)

    num_layers = config_int("num_hidden_layers")
    num_heads = config_int("num_attention_heads")
    num_kv_heads = config_int("num_key_value_heads", num_heads)
    shards = sorted(directory.glob("*.safetensors"))
    if not shards:
        raise WeightsError(f"{directory} has a config.json but no *.safetensors weights")

    def stream() -> Iterator[Projection]:
        with ExitStack() as stack:
            # Opening a shard reads only its header; tensors are read one at a time below.
            handles = [stack.enter_context(safe_open(str(s), framework="pt")) for s in shards]
            where = {key: handle for handle in handles for key in handle.keys()}

            def read(layer: int, module: str) -> torch.Tensor | None:
                name = hf_tensor_name(layer, module)
                return where[name].get_tensor(name) if name in where else None

            yield from decoder_projections(family, num_layers, num_heads, num_kv_heads, read, str(directory))

    return ModelWeights(directory.name, architecture, num_layers, stream)


def _gguf_scalar(reader, key: str, source: Path, default=None):
    field = reader.fields.get(key)
    if field is None:
        if default is not None:
            return default
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
    has_experts = int(_gguf_scalar(reader, f"{gguf_arch}.expert_count", path, default=0)) > 0
    family = gguf_family(gguf_arch, has_experts, str(path))
    num_layers = int(_gguf_scalar(reader, f"{gguf_arch}.block_count", path))
    num_heads = int(_gguf_scalar(reader, f"{gguf_arch}.attention.head_count", path))
    num_kv_heads = int(_gguf_scalar(reader, f"{gguf_arch}.attention.head_count_kv", path))
    rotary_heads = {"q_proj": num_heads, "k_proj": num_kv_heads} if family.gguf_rotary_permuted else {}
    tensor_names = _GGUF_FUSED_TENSOR if family.fused else _GGUF_TENSOR
    tensors = {t.name: t for t in reader.tensors}

    def read(layer: int, module: str) -> torch.Tensor | None:
        tensor = tensors.get(f"blk.{layer}.{tensor_names.get(module)}.weight")
        if tensor is None:
            return None
        weight = dequantize(tensor.data, tensor.tensor_type)
        if module in rotary_heads:
            weight = unpermute_rotary_rows(weight, rotary_heads[module])
        return torch.from_numpy(np.require(weight, np.float32, ["C", "W"]))  # F32 tensors are read-only views

    def stream() -> Iterator[Projection]:
        return decoder_projections(family, num_layers, num_heads, num_kv_heads, read, f"GGUF file {path}")

    name = path.name.removesuffix(".gguf")
    return ModelWeights(name, family.architecture, num_layers, stream)


def _download(hub_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise WeightsError(
            f"{hub_id!r} is not a local path and huggingface_hub is not installed: "
            "pass a local model directory or GGUF file"
        ) from None
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
