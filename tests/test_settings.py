"""Where budgets come from: precedence and validation (no vLLM needed)."""

import shutil

import pytest

from acttail_vllm.serving.settings import (
    DEFAULT_SERVE_SPARSITY,
    MODEL_DIR_PROFILE_NAME,
    SettingsError,
    SparsityPolicy,
    resolve_budget_source,
)
from tests.conftest import shipped_profile


def copy_profile(path):
    shutil.copy(shipped_profile("acttail", 50), path)
    return path


@pytest.fixture
def profile_file(tmp_path):
    return copy_profile(tmp_path / "p.json")


def test_default_is_loader_hook_at_default_target(tmp_path):
    source = resolve_budget_source(None, tmp_path, env={})
    assert source.kind == "loader_hook"
    assert source.settings.sparsity == DEFAULT_SERVE_SPARSITY
    assert source.origin == "the default target"


def test_explicit_beats_env_and_model_dir(tmp_path, profile_file):
    copy_profile(tmp_path / MODEL_DIR_PROFILE_NAME)
    source = resolve_budget_source(
        {"quant_method": "acttail", "sparsity": 0.7}, tmp_path, env={"ACTTAIL_PROFILE": str(profile_file)}
    )
    assert (source.kind, source.settings.sparsity) == ("loader_hook", 0.7)
    assert source.origin == "vLLM quantization_config"


def test_env_beats_model_dir(tmp_path):
    copy_profile(tmp_path / MODEL_DIR_PROFILE_NAME)
    source = resolve_budget_source(None, tmp_path, env={"ACTTAIL_SPARSITY": "0.6"})
    assert (source.kind, source.settings.sparsity, source.origin) == (
        "loader_hook", 0.6, "env ACTTAIL_SPARSITY"
    )


def test_model_dir_profile_found(tmp_path):
    copy_profile(tmp_path / MODEL_DIR_PROFILE_NAME)
    source = resolve_budget_source(None, tmp_path, env={})
    assert source.kind == "profile"
    assert source.settings.profile == tmp_path / MODEL_DIR_PROFILE_NAME
    assert source.profile.target_sparsity == 0.5  # read once, here


def test_a_profile_read_before_is_not_read_again(tmp_path, profile_file):
    first = resolve_budget_source(None, None, env={"ACTTAIL_PROFILE": str(profile_file)})
    profile_file.write_text("{}")  # unreadable now: only a second read would notice
    again = resolve_budget_source(None, tmp_path, env={"ACTTAIL_PROFILE": str(profile_file)}, known=first)
    assert again.profile is first.profile


def test_sparsity_above_s_max_is_refused_with_the_settings(tmp_path):
    with pytest.raises(SettingsError, match="s_max 0.6 is below the target sparsity 0.8"):
        resolve_budget_source({"s_max": 0.6}, tmp_path, env={"ACTTAIL_SPARSITY": "0.8"})


def test_options_without_source_keep_their_values(tmp_path):
    """A quantization_config that only sets options (policy) still falls through to env."""
    source = resolve_budget_source(
        {"quant_method": "acttail", "policy": "decode"}, tmp_path, env={"ACTTAIL_SPARSITY": "0.3"}
    )
    assert source.settings.policy is SparsityPolicy.DECODE
    assert source.settings.sparsity == 0.3


@pytest.mark.parametrize("value", ["1.2", "-0.1", "1"])
def test_sparsity_out_of_range_names_the_problem(tmp_path, value):
    with pytest.raises(SettingsError, match=r"env ACTTAIL_SPARSITY.*sparsity.*less than 1|greater than or equal to 0"):
        resolve_budget_source(None, tmp_path, env={"ACTTAIL_SPARSITY": value})


def test_sparsity_not_a_number(tmp_path):
    with pytest.raises(SettingsError, match="ACTTAIL_SPARSITY='lots' is not a number"):
        resolve_budget_source(None, tmp_path, env={"ACTTAIL_SPARSITY": "lots"})


def test_missing_profile_file(tmp_path):
    with pytest.raises(SettingsError, match="does not exist"):
        resolve_budget_source(None, tmp_path, env={"ACTTAIL_PROFILE": str(tmp_path / "nope.json")})


def test_profile_and_sparsity_together_rejected(tmp_path, profile_file):
    with pytest.raises(SettingsError, match="either 'profile' or 'sparsity'"):
        resolve_budget_source({"profile": str(profile_file), "sparsity": 0.5}, tmp_path, env={})


def test_unknown_option_rejected(tmp_path):
    with pytest.raises(SettingsError, match="sparsty"):
        resolve_budget_source({"sparsty": 0.5}, tmp_path, env={})


@pytest.mark.parametrize("value", [0, -3, "many"])
def test_token_limit_must_be_a_positive_count(tmp_path, value):
    with pytest.raises(SettingsError, match=r"max_sparse_tokens: .*(greater than or equal to 1|integer).*got"):
        resolve_budget_source({"max_sparse_tokens": value}, tmp_path, env={"ACTTAIL_SPARSITY": "0.5"})
