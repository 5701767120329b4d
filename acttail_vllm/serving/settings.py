"""What the ActTail quantization method is asked to do, and where its budgets come from.

Pure pydantic + environment logic, no vLLM import, so every rule here is testable on its own.
Budget sources, highest precedence first (the chosen one is logged at startup):

1. vLLM's own configuration surface: ``--hf-overrides`` carrying a ``quantization_config`` dict
   (``{"quant_method": "acttail", "profile": ..., "sparsity": ...}``) or a
   ``quantization_config_file`` pointing at a profile JSON.
2. Environment variables ``ACTTAIL_PROFILE`` (a profile JSON) or ``ACTTAIL_SPARSITY`` (a target).
3. A profile file named ``acttail_profile.json`` inside the model directory.
4. The model-loader hook: budgets computed from the loaded weights at the target sparsity
   (``DEFAULT_SERVE_SPARSITY`` unless given), cached by model fingerprint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from acttail_vllm.cache import cache_root
from acttail_vllm.errors import ActTailError
from acttail_vllm.profiling.allocation import (
    DEFAULT_EPS,
    DEFAULT_ESTIMATOR,
    DEFAULT_METHOD,
    DEFAULT_S_MAX,
    AllocationSpec,
    Method,
)
from acttail_vllm.profiling.profile import Profile, named

#: Target used by the loader hook when nothing else names one: conservative, since quality
#: drops quickly past ~70% on small models (see the README's quality table).
DEFAULT_SERVE_SPARSITY = 0.5
MODEL_DIR_PROFILE_NAME = "acttail_profile.json"
ENV_PROFILE = "ACTTAIL_PROFILE"
ENV_SPARSITY = "ACTTAIL_SPARSITY"


class SettingsError(ActTailError, ValueError):
    """Invalid ActTail settings; the message says what is wrong, where it came from and the fix."""


class SettingsOrigin(BaseModel):
    """Where settings came from, as errors and logs name it, and how the user changes them."""

    model_config = ConfigDict(frozen=True)

    name: str  # "env ACTTAIL_SPARSITY"
    fix: str  # "correct or unset ACTTAIL_SPARSITY"

    def with_options_from(self, options: SettingsOrigin) -> SettingsOrigin:
        """This source's budget together with the other settings of ``options``."""
        return SettingsOrigin(
            name=f"{self.name} with the options of {options.name}", fix=f"{self.fix}, or {options.fix}"
        )


#: ``--hf-overrides '{"quantization_config": {...}}'`` (vLLM hands its dict to ``ActTailConfig``).
OVERRIDES_ORIGIN = SettingsOrigin(
    name="--hf-overrides quantization_config", fix="correct quantization_config in --hf-overrides"
)
#: ``--hf-overrides '{"quantization_config_file": "p.json"}'``.
OVERRIDES_FILE_ORIGIN = SettingsOrigin(
    name="--hf-overrides quantization_config_file", fix="correct quantization_config_file in --hf-overrides"
)
DEFAULT_ORIGIN = SettingsOrigin(
    name=f"the default target {DEFAULT_SERVE_SPARSITY}",
    fix=f"set a target with {ENV_SPARSITY} or 'sparsity' in --hf-overrides quantization_config",
)


class SparsityPolicy(str, Enum):
    #: sparsify a step where that makes the module faster than the dense layer, run other steps as
    #: the dense model: on a GPU by its crossover table (on an H200, single-token steps), on a CPU
    #: by each module's race against vLLM's dense layer at startup
    AUTO = "auto"
    #: every token's inputs are sparsified, prefill included (the paper's protocol)
    ALL = "all"
    #: only decode tokens (requests generating one token this step); prefill stays dense
    DECODE = "decode"


class ActTailSettings(BaseModel):
    """Options of the ``acttail`` method, as given in a ``quantization_config`` dict."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    quant_method: Literal["acttail"] = "acttail"
    profile: Path | None = None
    sparsity: float | None = Field(default=None, ge=0.0, lt=1.0)
    method: Method = DEFAULT_METHOD
    estimator: str = DEFAULT_ESTIMATOR
    eps: float = Field(default=DEFAULT_EPS, ge=0.0)  # alphapruning only
    s_max: float = Field(default=DEFAULT_S_MAX, gt=0.0, lt=1.0)
    policy: SparsityPolicy = SparsityPolicy.AUTO
    #: steps of more tokens than this run the dense model, unsparsified: where the GPU runs the
    #: dense fallback anyway, the selection only costs time (vLLM pads a decode batch to its CUDA
    #: graph size, and that padded size counts). None: every step is sparsified.
    max_sparse_tokens: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _one_source(self) -> ActTailSettings:
        if self.profile is not None and self.sparsity is not None:
            raise ValueError(
                "give either 'profile' or 'sparsity', not both: a profile already fixes every projection's sparsity"
            )
        if self.sparsity is not None:
            _ = self.allocation  # AllocationSpec checks the five together (a sparsity above s_max, ...)
        return self

    @property
    def allocation(self) -> AllocationSpec:
        """What the loader hook allocates (a profile source has none: its file fixes the budgets)."""
        return AllocationSpec(self.sparsity, self.method, self.estimator, self.eps, self.s_max)

    @classmethod
    def parse(cls, raw: Mapping[str, Any], origin: SettingsOrigin) -> ActTailSettings:
        """Validate ``raw``; errors name ``origin`` (where the values came from) and its fix."""
        try:
            return cls.model_validate(dict(raw))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'settings'}: "
                f"{err['msg'].removeprefix('Value error, ')} (got {err['input']!r})"
                for err in exc.errors()
            )
            raise SettingsError(f"invalid ActTail settings from {origin.name}: {problems}: {origin.fix}") from None


class BudgetSource(BaseModel):
    """The resolved answer to "where do this server's budgets come from". A profile source holds
    the profile, read and validated once when the source is resolved."""

    model_config = ConfigDict(frozen=True)

    kind: Literal["profile", "loader_hook"]
    origin: SettingsOrigin
    settings: ActTailSettings
    profile: Profile | None = None

    def describe(self) -> str:
        s = self.settings
        if self.kind == "profile":
            return f"{named(s.profile, self.origin.name)}, policy {s.policy.value}"
        return (
            f"loader hook: {s.method} budgets at target sparsity {s.sparsity} computed from the "
            f"loaded weights (estimator {s.estimator}, eps {s.eps}; target from {self.origin.name}), "
            f"policy {s.policy.value}"
        )


def _env_settings(env: Mapping[str, str]) -> tuple[dict[str, Any], SettingsOrigin] | None:
    raw: dict[str, Any] = {}
    if env.get(ENV_PROFILE):
        raw["profile"] = env[ENV_PROFILE]
    if env.get(ENV_SPARSITY):
        try:
            raw["sparsity"] = float(env[ENV_SPARSITY])
        except ValueError:
            raise SettingsError(
                f"{ENV_SPARSITY}={env[ENV_SPARSITY]!r} is not a number: set a sparsity in [0, 1), e.g. 0.5, or unset it"
            ) from None
    if not raw:
        return None
    names = " and ".join(k for k in (ENV_PROFILE, ENV_SPARSITY) if env.get(k))
    return raw, SettingsOrigin(name=f"env {names}", fix=f"correct or unset {names}")


def resolve_budget_source(
    explicit: Mapping[str, Any] | None,
    model_dir: str | os.PathLike[str] | None,
    env: Mapping[str, str] = os.environ,
    known: BudgetSource | None = None,
    explicit_origin: SettingsOrigin = OVERRIDES_ORIGIN,
) -> BudgetSource:
    """Pick the budget source by the documented precedence and validate it. ``explicit`` came
    from ``explicit_origin``. A profile that ``known`` (an earlier answer in this process) already
    read is not read again."""
    if explicit is not None and ({"profile", "sparsity"} & set(explicit)):
        origin = explicit_origin
        settings = ActTailSettings.parse(explicit, origin)
    else:
        # Options without a budget (policy, eps, ...): wrong ones are the overrides' fault alone,
        # whichever source the budget then comes from.
        options = dict(explicit or {})
        ActTailSettings.parse(options, explicit_origin)
        from_env = _env_settings(env)
        model_profile = Path(model_dir) / MODEL_DIR_PROFILE_NAME if model_dir else None
        if from_env is not None:
            budget, origin = from_env
        elif model_profile is not None and model_profile.is_file():
            budget = {"profile": model_profile}
            origin = SettingsOrigin(name="the model directory", fix=f"correct or remove {model_profile}")
        else:
            budget, origin = {"sparsity": DEFAULT_SERVE_SPARSITY}, DEFAULT_ORIGIN
        if set(options) - {"quant_method"}:
            origin = origin.with_options_from(explicit_origin)
        settings = ActTailSettings.parse({**options, **budget}, origin)
    if settings.profile is not None:
        _check_profile_path(settings.profile, origin)
        if known is not None and known.profile is not None and known.settings.profile == settings.profile:
            profile = known.profile
        else:
            profile = Profile.load(settings.profile, origin=origin.name)
        return BudgetSource(kind="profile", origin=origin, settings=settings, profile=profile)
    return BudgetSource(kind="loader_hook", origin=origin, settings=settings)


def _check_profile_path(path: Path, origin: SettingsOrigin) -> None:
    build = "`acttail profile MODEL --sparsity S -o FILE`"
    if path.is_dir():
        inside = path / MODEL_DIR_PROFILE_NAME
        hint = f" ({inside} is one)" if inside.is_file() else ""
        raise SettingsError(
            f"ActTail profile {path} (from {origin.name}) is a directory, not a profile file: give the "
            f"JSON file {build} wrote{hint}; {origin.fix}"
        )
    if not path.exists():
        raise SettingsError(
            f"ActTail profile {path} (from {origin.name}) does not exist: build one with {build}; {origin.fix}"
        )


def profile_cache_dir() -> Path:
    """Where the loader hook keeps the profiles it builds (keyed by model fingerprint)."""
    return cache_root() / "profiles"
