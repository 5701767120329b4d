"""The file formats of ``acttail eval``: how a model was run, and what it measured. Every result
carries the command line that measures it again."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Literal, get_args

from pydantic import BaseModel, ConfigDict, Field

from acttail_vllm.eval.data import McTask
from acttail_vllm.profiling.profile import Profile

Engine = Literal["reference", "vllm"]
Device = Literal["cpu", "cuda"]
Dtype = Literal["float32", "bfloat16"]
ENGINES: tuple[str, ...] = get_args(Engine)
DEVICES: tuple[str, ...] = get_args(Device)
DTYPES: tuple[str, ...] = get_args(Dtype)
DEFAULT_BATCH_SIZE = 4


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunSettings(_Record):
    """How a model is run; every result carries these, so its command can be rebuilt."""

    model: str
    engine: Engine = "reference"
    device: Device = "cpu"
    dtype: Dtype = "float32"
    batch_size: int = Field(default=DEFAULT_BATCH_SIZE, ge=1)

    def flags(self) -> list[str]:
        return [
            "--engine",
            self.engine,
            "--device",
            self.device,
            "--dtype",
            self.dtype,
            "--batch-size",
            str(self.batch_size),
        ]


class ProfileInfo(_Record):
    """The profile a result was measured under (absent: dense)."""

    path: str
    content_hash: str
    method: str
    estimator: str
    eps: float
    target_sparsity: float

    @classmethod
    def of(cls, path: Path, profile: Profile) -> ProfileInfo:
        return cls(
            path=str(path),
            content_hash=profile.content_hash(),
            method=profile.method,
            estimator=profile.estimator,
            eps=profile.eps,
            target_sparsity=profile.target_sparsity,
        )


def _profile_flags(profile: ProfileInfo | None) -> list[str]:
    return ["--dense"] if profile is None else ["--profile", profile.path]


def label(profile: ProfileInfo | None) -> str:
    return "dense" if profile is None else f"{profile.method} {profile.target_sparsity:.0%}"


class PerplexityResult(RunSettings):
    profile: ProfileInfo | None
    #: A slice name (ci, tuning, report) or a text file's path.
    text: str
    context: int
    stride: int
    max_tokens: int | None
    tokens_scored: int
    #: Mean negative log-likelihood per scored token, in nats.
    nll: float
    ppl: float
    seconds: float

    @property
    def label(self) -> str:
        return label(self.profile)

    def command(self) -> str:
        """The ``acttail eval ppl`` command line that measures this result again."""
        limit = [] if self.max_tokens is None else ["--max-tokens", str(self.max_tokens)]
        return shlex.join(
            [
                "acttail",
                "eval",
                "ppl",
                self.model,
                *_profile_flags(self.profile),
                "--text",
                self.text,
                "--context",
                str(self.context),
                "--stride",
                str(self.stride),
                *limit,
                *self.flags(),
            ]
        )


class TaskAccuracy(_Record):
    task: McTask
    items: int
    #: Share of items whose right answer has the highest summed log-likelihood.
    acc: float
    #: The same with each sum divided by the answer's length in characters.
    acc_norm: float
    #: Per item, in file order: whether the raw and the normalised pick were right. Two runs on the
    #: same items compare item by item (``paired_accuracy``). Empty in records written without them.
    right: list[bool] = []
    right_norm: list[bool] = []


class MultipleChoiceResult(RunSettings):
    profile: ProfileInfo | None
    limit: int | None
    data_dir: str | None
    tasks: list[TaskAccuracy]
    seconds: float

    @property
    def label(self) -> str:
        return label(self.profile)

    def command(self) -> str:
        """The ``acttail eval mc`` command line that measures this result again."""
        limit = [] if self.limit is None else ["--limit", str(self.limit)]
        data = [] if self.data_dir is None else ["--data-dir", self.data_dir]
        tasks = ",".join(t.task.value for t in self.tasks)
        return shlex.join(
            [
                "acttail",
                "eval",
                "mc",
                self.model,
                *_profile_flags(self.profile),
                "--tasks",
                tasks,
                *limit,
                *data,
                *self.flags(),
            ]
        )


class SweepResult(_Record):
    """Dense and every (method, sparsity) on one token stream, budgets from one estimator and eps."""

    estimator: str
    eps: float
    s_max: float
    dense: PerplexityResult
    runs: list[PerplexityResult]

    def run(self, method: str, sparsity: float) -> PerplexityResult | None:
        return next(
            (r for r in self.runs if r.profile.method == method and r.profile.target_sparsity == sparsity), None
        )
