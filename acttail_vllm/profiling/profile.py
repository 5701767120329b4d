"""The ActTail profile: per-projection alpha and sparsity of one model, as a validated JSON file."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from acttail_vllm.errors import ActTailError
from acttail_vllm.profiling.allocation import AllocationSpec, Method, weighted_mean

SCHEMA_VERSION = 2
#: Versions ``Profile.load`` reads; older ones are upgraded when read (``Profile._upgrade``).
READABLE_SCHEMA_VERSIONS: tuple[int, ...] = (1, 2)
#: The seven linear projections of a Llama-family decoder layer, in Hugging Face naming.
PROJECTION_NAMES: tuple[str, ...] = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
)
#: What a mixture-of-experts layer has: its MLP is experts, which stay dense.
ATTENTION_PROJECTIONS: tuple[str, ...] = PROJECTION_NAMES[:4]
#: Stored achieved sparsity may differ this much from the recomputed weighted mean (JSON rounding).
RECOMPUTE_TOLERANCE = 1e-6
#: Achieved sparsity may differ this much from the target.
TARGET_TOLERANCE = 1e-3


def layer_projection_names(present: Iterable[str]) -> tuple[str, ...]:
    """The projections a decoder layer has, given those present: all seven, or the attention ones
    where no MLP projection is present (a mixture-of-experts layer)."""
    return PROJECTION_NAMES if set(present) - set(ATTENTION_PROJECTIONS) else ATTENTION_PROJECTIONS


class ProfileError(ActTailError, ValueError):
    """A profile file that cannot be used; the message says what is wrong and what to do."""


def _short(fingerprint: str) -> str:
    return f"{fingerprint[:12]}..."


def named(path: str | os.PathLike[str], origin: str | None) -> str:
    """How messages name a profile file: its path, and who pointed at it (an env variable, a flag)."""
    return f"profile {path}" if origin is None else f"profile {path} (from {origin})"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelInfo(_Strict):
    name: str
    architecture: str
    num_layers: int = Field(gt=0)
    fingerprint: str = Field(min_length=1)


class ProjectionProfile(_Strict):
    alpha: float = Field(allow_inf_nan=False)
    sparsity: float = Field(ge=0.0, lt=1.0)
    in_features: int = Field(gt=0)
    out_features: int = Field(gt=0)

    @property
    def param_count(self) -> int:
        return self.in_features * self.out_features


class LayerProfile(_Strict):
    index: int = Field(ge=0)
    projections: dict[str, ProjectionProfile]

    @model_validator(mode="after")
    def _all_projections(self) -> LayerProfile:
        unknown = sorted(set(self.projections) - set(PROJECTION_NAMES))
        if unknown:
            raise ValueError(
                f"layer {self.index} has unknown projection(s) {', '.join(unknown)}: "
                f"expected {', '.join(PROJECTION_NAMES)}"
            )
        for name in layer_projection_names(self.projections):
            if name not in self.projections:
                raise ValueError(f"layer {self.index} is missing projection {name!r}")
        return self


class Profile(_Strict):
    schema_version: Literal[2] = SCHEMA_VERSION
    tool_version: str
    model: ModelInfo
    method: Method
    estimator: str
    eps: float = Field(ge=0.0)
    s_max: float = Field(gt=0.0, lt=1.0)
    target_sparsity: float = Field(ge=0.0, lt=1.0)
    achieved_sparsity: float = Field(ge=0.0, lt=1.0)
    layers: list[LayerProfile]

    @model_validator(mode="before")
    @classmethod
    def _upgrade(cls, data: Any) -> Any:
        # Version 1 named AlphaPruning's rule "acttail": its budgets are those of today's alphapruning.
        if isinstance(data, dict) and data.get("schema_version") == 1:
            method = data.get("method")
            data = {**data, "schema_version": SCHEMA_VERSION}
            if method == "acttail":
                data["method"] = "alphapruning"
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Profile:
        indices = [layer.index for layer in self.layers]
        if indices != list(range(self.model.num_layers)):
            raise ValueError(
                f"layers must be indexed 0..{self.model.num_layers - 1} in order (model.num_layers), "
                f"found indices {indices}"
            )
        projections = [p for layer in self.layers for p in layer.projections.values()]
        recomputed = weighted_mean([p.sparsity for p in projections], [p.param_count for p in projections])
        if abs(recomputed - self.achieved_sparsity) > RECOMPUTE_TOLERANCE:
            raise ValueError(
                f"achieved_sparsity {self.achieved_sparsity} does not match the parameter-weighted "
                f"mean of the projection sparsities, {recomputed:.6f}"
            )
        if abs(self.achieved_sparsity - self.target_sparsity) > TARGET_TOLERANCE:
            raise ValueError(
                f"achieved_sparsity {self.achieved_sparsity} is off target_sparsity "
                f"{self.target_sparsity} by more than {TARGET_TOLERANCE}"
            )
        return self

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        expected_fingerprint: str | None = None,
        *,
        model_name: str | None = None,
        origin: str | None = None,
    ) -> Profile:
        """Read and validate ``path``; with ``expected_fingerprint``, also ``check_model``.
        ``origin`` (e.g. ``env ACTTAIL_PROFILE``) says in errors who pointed at the file."""
        path = Path(path)
        name = named(path, origin)
        try:
            raw = json.loads(path.read_text())
        except OSError as exc:
            raise ProfileError(f"cannot read {name}: {exc.strerror or exc}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ProfileError(f"{name} is not valid JSON ({exc}): rebuild it with `acttail profile`") from None
        if not isinstance(raw, dict):
            raise ProfileError(
                f"{name} holds a JSON {type(raw).__name__}, not an object: rebuild it with `acttail profile`"
            )
        if "schema_version" not in raw:
            raise ProfileError(
                f"{name} has no schema_version: is it an ActTail profile? Build one with `acttail profile`"
            )
        found = raw["schema_version"]
        if found not in READABLE_SCHEMA_VERSIONS:
            raise ProfileError(
                f"{name} has schema_version {found!r}; this acttail reads versions "
                f"{', '.join(map(str, READABLE_SCHEMA_VERSIONS))}: rebuild it with `acttail profile`"
            )
        try:
            profile = cls.model_validate(raw)
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or 'profile'}: {err['msg'].removeprefix('Value error, ')}"
                for err in exc.errors()
            )
            raise ProfileError(f"{name} is invalid: {problems}: rebuild it with `acttail profile`") from None
        if expected_fingerprint is not None:
            profile.check_model(expected_fingerprint, path, model_name, origin)
        return profile

    def check_model(
        self, fingerprint: str, path: str | os.PathLike[str], model_name: str | None = None, origin: str | None = None
    ) -> None:
        """ProfileError unless this profile (read from ``path``, pointed at by ``origin``) was made
        for the model whose fingerprint is ``fingerprint``; ``model_name`` names that model."""
        if self.model.fingerprint != fingerprint:
            raise ProfileError(
                f"{named(path, origin)} was made for model {self.model.name} (fingerprint "
                f"{_short(self.model.fingerprint)}), this model is {model_name or 'a different one'} "
                f"({_short(fingerprint)}): build one for this model with `acttail profile "
                f"{model_name or 'MODEL'} --sparsity S -o FILE` and pass that"
            )

    @property
    def allocation(self) -> AllocationSpec:
        """The settings its budgets were allocated with."""
        return AllocationSpec(self.target_sparsity, self.method, self.estimator, self.eps, self.s_max)

    def to_json(self) -> str:
        return self.model_dump_json(indent=2) + "\n"

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the profile as JSON; atomic, so a reader never sees half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(self.to_json())
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a profile is meant to be shared
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def sparsity(self, layer_index: int, proj_name: str) -> float:
        """Sparsity of one projection; KeyError naming what is missing."""
        if not 0 <= layer_index < len(self.layers):
            raise KeyError(f"layer {layer_index} is not in this profile (it has {len(self.layers)} layers)")
        projections = self.layers[layer_index].projections
        if proj_name not in projections:
            raise KeyError(f"layer {layer_index} has no projection {proj_name!r}: it has {', '.join(projections)}")
        return projections[proj_name].sparsity

    def content_hash(self) -> str:
        """Short sha256 of the canonical JSON (sorted keys, no whitespace)."""
        canonical = json.dumps(self.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]
