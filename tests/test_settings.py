"""Where budgets come from: precedence, validation, and errors that name their source and fix
(no vLLM needed)."""

import logging
import re
import shutil

import pytest

from acttail_vllm import errors
from acttail_vllm.profiling.profile import ProfileError
from acttail_vllm.serving.settings import (
    DEFAULT_SERVE_SPARSITY,
    MODEL_DIR_PROFILE_NAME,
    OVERRIDES_FILE_ORIGIN,
    OVERRIDES_ORIGIN,
    SettingsError,
    SparsityPolicy,
    resolve_budget_source,
)
from tests.conftest import SCHEMA1_PROFILE, shipped_profile


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
    assert source.origin.name == "the default target 0.5"


def test_explicit_beats_env_and_model_dir(tmp_path, profile_file):
    copy_profile(tmp_path / MODEL_DIR_PROFILE_NAME)
    source = resolve_budget_source(
        {"quant_method": "acttail", "sparsity": 0.7}, tmp_path, env={"ACTTAIL_PROFILE": str(profile_file)}
    )
    assert (source.kind, source.settings.sparsity) == ("loader_hook", 0.7)
    assert source.origin == OVERRIDES_ORIGIN


def test_env_beats_model_dir(tmp_path):
    copy_profile(tmp_path / MODEL_DIR_PROFILE_NAME)
    source = resolve_budget_source(None, tmp_path, env={"ACTTAIL_SPARSITY": "0.6"})
    assert (source.kind, source.settings.sparsity, source.origin.name) == ("loader_hook", 0.6, "env ACTTAIL_SPARSITY")


def test_model_dir_profile_found(tmp_path):
    copy_profile(tmp_path / MODEL_DIR_PROFILE_NAME)
    source = resolve_budget_source(None, tmp_path, env={})
    assert source.kind == "profile"
    assert source.settings.profile == tmp_path / MODEL_DIR_PROFILE_NAME
    assert source.profile.target_sparsity == 0.5  # read once, here


def test_a_schema_1_profile_serves_as_alphapruning(tmp_path):
    source = resolve_budget_source(None, None, env={"ACTTAIL_PROFILE": str(SCHEMA1_PROFILE)})
    assert (source.kind, source.profile.method, source.profile.target_sparsity) == ("profile", "alphapruning", 0.5)


def test_a_profile_read_before_is_not_read_again(tmp_path, profile_file):
    first = resolve_budget_source(None, None, env={"ACTTAIL_PROFILE": str(profile_file)})
    profile_file.write_text("{}")  # unreadable now: only a second read would notice
    again = resolve_budget_source(None, tmp_path, env={"ACTTAIL_PROFILE": str(profile_file)}, known=first)
    assert again.profile is first.profile


def test_sparsity_above_s_max_is_refused_naming_both_sources(tmp_path):
    expected = (
        "invalid ActTail settings from env ACTTAIL_SPARSITY with the options of --hf-overrides quantization_config: "
        "settings: s_max 0.6 is below the target sparsity 0.8"
    )
    with pytest.raises(SettingsError, match=re.escape(expected)) as raised:
        resolve_budget_source({"s_max": 0.6}, tmp_path, env={"ACTTAIL_SPARSITY": "0.8"})
    fix = ": correct or unset ACTTAIL_SPARSITY, or correct quantization_config in --hf-overrides"
    assert str(raised.value).endswith(fix)


def test_a_bad_option_in_the_overrides_is_blamed_on_the_overrides(tmp_path):
    """Options without a budget fall through to the default target; their errors are still theirs."""
    with pytest.raises(SettingsError) as raised:
        resolve_budget_source({"quant_method": "acttail", "policy": "sometimes"}, tmp_path, env={})
    message = str(raised.value)
    assert message.startswith("invalid ActTail settings from --hf-overrides quantization_config: policy: ")
    assert "'auto', 'all' or 'decode'" in message and "(got 'sometimes')" in message
    assert message.endswith(": correct quantization_config in --hf-overrides")
    assert "default" not in message


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
    missing = tmp_path / "nope.json"
    expected = (
        f"ActTail profile {missing} (from env ACTTAIL_PROFILE) does not exist: build one with `acttail profile "
        "MODEL --sparsity S -o FILE`; correct or unset ACTTAIL_PROFILE"
    )
    with pytest.raises(SettingsError, match=re.escape(expected)):
        resolve_budget_source(None, tmp_path, env={"ACTTAIL_PROFILE": str(missing)})


def test_profile_that_is_a_directory_says_so(tmp_path):
    copy_profile(tmp_path / MODEL_DIR_PROFILE_NAME)
    expected = (
        f"ActTail profile {tmp_path} (from env ACTTAIL_PROFILE) is a directory, not a profile file: give the "
        f"JSON file `acttail profile MODEL --sparsity S -o FILE` wrote ({tmp_path / MODEL_DIR_PROFILE_NAME} is "
        "one); correct or unset ACTTAIL_PROFILE"
    )
    with pytest.raises(SettingsError, match=re.escape(expected)):
        resolve_budget_source(None, None, env={"ACTTAIL_PROFILE": str(tmp_path)})


def test_unreadable_profile_names_who_pointed_at_it(tmp_path):
    corrupt = tmp_path / "p.json"
    corrupt.write_text("{")
    expected = f"profile {corrupt} (from --hf-overrides quantization_config_file) is not valid JSON"
    with pytest.raises(ProfileError, match=re.escape(expected)):
        resolve_budget_source({"profile": str(corrupt)}, None, env={}, explicit_origin=OVERRIDES_FILE_ORIGIN)


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


class Recorder(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_startup_errors_are_logged_as_one_error_line_in_their_own_words():
    """What vLLM would bury in a traceback: logged first, the exception raised on unchanged."""

    @errors.logs_startup_errors
    def start(error: Exception) -> None:
        raise error

    recorder = Recorder()
    errors.logger.addHandler(recorder)
    try:
        with pytest.raises(SettingsError) as raised:
            resolve_budget_source(None, None, env={"ACTTAIL_SPARSITY": "1.5"})
        with pytest.raises(SettingsError):
            start(raised.value)
        with pytest.raises(KeyError):  # not a user's mistake: vLLM shows it as it is
            start(KeyError("x"))
    finally:
        errors.logger.removeHandler(recorder)
    assert [(r.levelname, r.getMessage()) for r in recorder.records] == [("ERROR", str(raised.value))]
    assert "\n" not in str(raised.value)
