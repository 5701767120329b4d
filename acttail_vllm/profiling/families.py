"""The decoder families acttail reads and serves, and how their checkpoints differ.

To ActTail every family's decoder layer carries the seven projections of ``PROJECTION_NAMES``. What
differs is how a checkpoint stores them: Phi-3 fuses q|k|v and gate|up into one tensor each, and in
a mixture-of-experts layer the MLP is experts, which stay dense (only attention is sparsified
there). GQA widths, Qwen2's q/k/v bias, Gemma's q/k norms and activation change nothing ActTail
computes: bias and norms act on a projection's output, never on the input TopK sees.
"""

from __future__ import annotations

from dataclasses import dataclass


class UnsupportedArchitecture(ValueError):
    """A model of an architecture outside ``SUPPORTED_ARCHITECTURES``."""


@dataclass(frozen=True)
class Family:
    """One Hugging Face architecture as acttail reads it."""

    architecture: str  # config.json's ``architectures[0]``, which vLLM dispatches on
    gguf_architecture: str | None  # GGUF ``general.architecture`` (Mixtral is llama.cpp's llama with experts)
    fused: bool = False  # the checkpoint stores ``qkv_proj`` = q|k|v and ``gate_up_proj`` = gate|up
    moe: bool = False  # layers whose MLP is experts (no dense gate/up/down) have attention only

    @property
    def gguf_rotary_permuted(self) -> bool:
        """llama.cpp permutes Q/K rows only for its ``llama`` arch (rope type NORM); its other arches
        keep Hugging Face's row order (NEOX)."""
        return self.gguf_architecture == "llama"


FAMILIES: tuple[Family, ...] = (
    Family("LlamaForCausalLM", "llama"),
    Family("MistralForCausalLM", "llama"),
    Family("Qwen2ForCausalLM", "qwen2"),
    Family("Qwen3ForCausalLM", "qwen3"),
    Family("Gemma2ForCausalLM", "gemma2"),
    Family("Gemma3ForCausalLM", "gemma3"),
    Family("Phi3ForCausalLM", "phi3", fused=True),
    Family("MixtralForCausalLM", "llama", moe=True),
    Family("Qwen2MoeForCausalLM", "qwen2moe", moe=True),
    Family("Qwen3MoeForCausalLM", "qwen3moe", moe=True),
)
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(family.architecture for family in FAMILIES)


def family_of(architecture: str, source: str) -> Family:
    """The family of a Hugging Face architecture; ``source`` names the model in the error."""
    for family in FAMILIES:
        if family.architecture == architecture:
            return family
    raise UnsupportedArchitecture(
        f"{source} is a {architecture} model, which acttail does not support; it supports "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def gguf_family(gguf_architecture: str, has_experts: bool, source: str) -> Family:
    """The family of a GGUF file: its ``general.architecture`` and whether it has experts. The
    first family of an arch is the one llama.cpp's converter wrote it from (llama: Llama)."""
    for family in FAMILIES:
        if family.gguf_architecture == gguf_architecture and family.moe == has_experts:
            return family
    kind = f"GGUF architecture {gguf_architecture!r}" + (" with experts" if has_experts else "")
    known = sorted({f.gguf_architecture for f in FAMILIES if f.gguf_architecture})
    raise UnsupportedArchitecture(f"{source} is of {kind}; acttail reads GGUF architectures {', '.join(known)}")
