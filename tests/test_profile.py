"""Profile schema: round trip, the specific error of every bad input, and the fingerprint."""

from __future__ import annotations

import json
import re

import pytest
import torch

from acttail_vllm.profiling.allocation import weighted_mean
from acttail_vllm.profiling.fingerprint import model_fingerprint
from acttail_vllm.profiling.profile import PROJECTION_NAMES, Profile, ProfileError

SHAPES = {  # (out, in) of a tiny Llama layer
    "q_proj": (64, 64),
    "k_proj": (32, 64),
    "v_proj": (32, 64),
    "o_proj": (64, 64),
    "gate_proj": (128, 64),
    "up_proj": (128, 64),
    "down_proj": (64, 128),
}


def profile_dict(num_layers: int = 2, target: float = 0.5) -> dict:
    """A valid profile as plain JSON data; sparsities vary but keep the weighted mean at target."""
    layers, values, counts = [], [], []
    for index in range(num_layers):
        projections = {}
        for k, name in enumerate(PROJECTION_NAMES):
            out_features, in_features = SHAPES[name]
            sparsity = target + (0.1 if (index + k) % 2 else -0.1)
            projections[name] = {
                "alpha": 2.0 + k / 10,
                "sparsity": sparsity,
                "in_features": in_features,
                "out_features": out_features,
            }
            values.append(sparsity)
            counts.append(in_features * out_features)
        layers.append({"index": index, "projections": projections})
    achieved = weighted_mean(values, counts)
    return {
        "schema_version": 2,
        "tool_version": "0.1.0",
        "model": {
            "name": "tiny",
            "architecture": "LlamaForCausalLM",
            "num_layers": num_layers,
            "fingerprint": "a1b2c3d4e5f6a7b8",
        },
        "method": "acttail",
        "estimator": "hill",
        "eps": 0.2,
        "s_max": 0.95,
        "target_sparsity": achieved,
        "achieved_sparsity": achieved,
        "layers": layers,
    }


def write(tmp_path, data) -> str:
    path = tmp_path / "profile.json"
    path.write_text(json.dumps(data) if not isinstance(data, str) else data)
    return str(path)


def test_round_trip(tmp_path):
    original = Profile.model_validate(profile_dict())
    path = tmp_path / "sub" / "p.json"
    original.save(path)
    loaded = Profile.load(path)
    assert loaded == original
    assert loaded.content_hash() == original.content_hash()
    assert loaded.sparsity(1, "k_proj") == original.layers[1].projections["k_proj"].sparsity
    assert not list(path.parent.glob(".*.tmp")), "atomic save left its temp file"
    assert path.stat().st_mode & 0o777 == 0o644


def test_content_hash_is_short_and_tracks_content():
    data = profile_dict()
    first = Profile.model_validate(data).content_hash()
    assert len(first) == 16 and int(first, 16) >= 0
    data["layers"][0]["projections"]["q_proj"]["alpha"] += 1.0
    assert Profile.model_validate(data).content_hash() != first


def test_sparsity_lookup_errors():
    profile = Profile.model_validate(profile_dict())
    with pytest.raises(KeyError, match="layer 5 is not in this profile"):
        profile.sparsity(5, "q_proj")
    with pytest.raises(KeyError, match="layer 0 has no projection 'qkv_proj': it has q_proj, k_proj"):
        profile.sparsity(0, "qkv_proj")


def test_missing_file(tmp_path):
    with pytest.raises(ProfileError, match=rf"cannot read profile {tmp_path}/none.json"):
        Profile.load(tmp_path / "none.json")


def test_corrupt_json_names_the_path(tmp_path):
    path = write(tmp_path, '{"schema_version": 1, "layers": [')
    with pytest.raises(ProfileError, match=rf"profile {path} is not valid JSON"):
        Profile.load(path)


def test_wrong_schema_version_says_found_and_supported(tmp_path):
    data = profile_dict()
    data["schema_version"] = 3
    with pytest.raises(ProfileError, match=r"has schema_version 3; this acttail reads versions 1, 2: rebuild it"):
        Profile.load(write(tmp_path, data))


@pytest.mark.parametrize(("old", "new"), [("acttail", "alphapruning"), ("uniform", "uniform")])
def test_version_1_profile_reads_with_the_method_that_made_it(tmp_path, old, new):
    """Version 1's "acttail" was AlphaPruning's rule: it reads as alphapruning, budgets unchanged."""
    data = profile_dict()
    data["schema_version"], data["method"] = 1, old
    profile = Profile.load(write(tmp_path, data))
    assert (profile.schema_version, profile.method, profile.allocation.method) == (2, new, new)
    assert profile.layers == Profile.model_validate({**data, "schema_version": 2, "method": new}).layers
    profile.save(tmp_path / "again.json")
    assert json.loads((tmp_path / "again.json").read_text())["schema_version"] == 2
    assert Profile.load(tmp_path / "again.json") == profile


def test_version_2_acttail_stays_acttail(tmp_path):
    assert Profile.load(write(tmp_path, profile_dict())).method == "acttail"


def test_missing_projection_names_layer_and_projection(tmp_path):
    data = profile_dict()
    del data["layers"][1]["projections"]["k_proj"]
    with pytest.raises(ProfileError, match=r"layers\.1: layer 1 is missing projection 'k_proj'"):
        Profile.load(write(tmp_path, data))


@pytest.mark.parametrize(("value", "bound"), [(1.0, "less than 1"), (-0.01, "greater than or equal to 0")])
def test_sparsity_outside_unit_interval(tmp_path, value, bound):
    data = profile_dict()
    data["layers"][0]["projections"]["v_proj"]["sparsity"] = value
    with pytest.raises(ProfileError, match=rf"layers\.0\.projections\.v_proj\.sparsity: Input should be {bound}"):
        Profile.load(write(tmp_path, data))


def test_achieved_must_match_the_recomputed_weighted_mean(tmp_path):
    data = profile_dict()
    data["layers"][0]["projections"]["down_proj"]["sparsity"] += 0.05
    with pytest.raises(ProfileError, match=r"does not match the parameter-weighted mean of the projection sparsities"):
        Profile.load(write(tmp_path, data))


def test_achieved_must_be_on_target(tmp_path):
    data = profile_dict()
    data["target_sparsity"] = data["achieved_sparsity"] + 0.002
    with pytest.raises(ProfileError, match=r"is off target_sparsity .* by more than 0.001"):
        Profile.load(write(tmp_path, data))


def test_layers_must_cover_the_model(tmp_path):
    data = profile_dict()
    data["model"]["num_layers"] = 3
    with pytest.raises(ProfileError, match=r"layers must be indexed 0\.\.2 in order"):
        Profile.load(write(tmp_path, data))


def test_fingerprint_mismatch_tells_how_to_fix(tmp_path):
    path = write(tmp_path, profile_dict())
    assert Profile.load(path, expected_fingerprint="a1b2c3d4e5f6a7b8").model.name == "tiny"
    expected = (
        r"was made for model tiny \(fingerprint a1b2c3d4e5f6\.\.\.\), this model is SmolLM2 "
        r"\(ffff00001111\.\.\.\): build one for this model with `acttail profile SmolLM2 --sparsity S -o FILE`"
    )
    with pytest.raises(ProfileError, match=expected):
        Profile.load(path, expected_fingerprint="ffff000011112222", model_name="SmolLM2")
    expected = rf"profile {re.escape(str(path))} \(from env ACTTAIL_PROFILE\) was made for model tiny"
    with pytest.raises(ProfileError, match=expected):
        Profile.load(path, expected_fingerprint="ffff000011112222", origin="env ACTTAIL_PROFILE")


def fingerprint_samples(dtype: torch.dtype) -> dict:
    rows = torch.randn(3, 16, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    return {
        (0, "q_proj"): (64, 64, rows[0].to(dtype)),
        (0, "k_proj"): (32, 64, rows[1].to(dtype)),
        (1, "q_proj"): (64, 64, rows[2].to(dtype)),
    }


def test_fingerprint_is_the_same_for_bf16_fp16_and_fp32_copies():
    prints = {
        model_fingerprint("LlamaForCausalLM", fingerprint_samples(d))
        for d in (torch.bfloat16, torch.float16, torch.float32)
    }
    assert len(prints) == 1


def test_fingerprint_rounds_fp32_through_bf16():
    exact = fingerprint_samples(torch.float32)
    nudged = {k: (o, i, r.clone()) for k, (o, i, r) in exact.items()}
    nudged[(0, "q_proj")][2][0] += nudged[(0, "q_proj")][2][0].abs() * 2**-12  # below bf16 resolution
    assert model_fingerprint("LlamaForCausalLM", nudged) == model_fingerprint("LlamaForCausalLM", exact)


def test_fingerprint_tracks_values_shapes_architecture_not_insertion_order():
    base = fingerprint_samples(torch.float32)
    reference = model_fingerprint("LlamaForCausalLM", base)
    assert model_fingerprint("LlamaForCausalLM", dict(reversed(list(base.items())))) == reference
    assert model_fingerprint("MistralForCausalLM", base) != reference
    changed_value = dict(base)
    changed_value[(1, "q_proj")] = (64, 64, base[(1, "q_proj")][2] * 2)
    assert model_fingerprint("LlamaForCausalLM", changed_value) != reference
    changed_shape = dict(base)
    changed_shape[(0, "k_proj")] = (48, 64, base[(0, "k_proj")][2])
    assert model_fingerprint("LlamaForCausalLM", changed_shape) != reference
    assert len(reference) == 64
