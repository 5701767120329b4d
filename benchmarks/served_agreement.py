"""What ``served_ppl`` and ``reproducibility`` share: the report text, the default profiles, the two
reference models (fp32 and its bf16 copy), and the pure comparisons of per-token log-probabilities."""

from __future__ import annotations

import copy
import math
import sys
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from acttail_vllm.eval.evaluator import Evaluator
from acttail_vllm.profiling.allocation import DEFAULT_METHOD, AllocationSpec
from acttail_vllm.profiling.profile import ProfileError

REPORT_TEXT = "report.txt"
SHIPPED_PROFILES = Path(__file__).resolve().parent.parent / "profiles"


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


def label_of(sparsity: float | None) -> str:
    return "dense" if sparsity is None else f"{DEFAULT_METHOD} {sparsity:.0%}"


def report_path(data_dir: Path) -> Path:
    path = data_dir / REPORT_TEXT
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: write it with `acttail eval export-data --out {data_dir}`")
    return path


def default_profile(evaluator: Evaluator, sparsity: float, out_dir: Path) -> Path:
    """The shipped profile of the default method at ``sparsity`` if one was made for this model (its
    fingerprint matches), else the same allocation built from this model's weights into ``out_dir``."""
    for path in sorted(SHIPPED_PROFILES.glob(f"*-{DEFAULT_METHOD}-{round(sparsity * 100)}.json")):
        try:
            profile = evaluator.load_profile(path)
        except ProfileError:
            continue
        if profile.allocation == AllocationSpec(sparsity):
            return path
    print(f"no shipped {label_of(sparsity)} profile fits {evaluator.settings.model}: building one", file=sys.stderr)
    built = evaluator.build_profile(out_dir, AllocationSpec(sparsity))
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # vLLM, started next, checks that the GPU memory it asks for is free
    return built


def reference_models(evaluator: Evaluator, dtypes: Sequence[str]) -> Iterator[tuple[str, torch.nn.Module]]:
    """The model in each of ``dtypes``: the float32 load, and bfloat16 as its rounded copy (the same
    weights as a bfloat16 load of a float32 checkpoint, and allowed on a CPU)."""
    base = evaluator.hf_model()  # the evaluator's dtype is float32
    for dtype in dtypes:
        yield dtype, base if dtype == "float32" else copy.deepcopy(base).to(getattr(torch, dtype))


@contextmanager
def maybe_sparsified(evaluator: Evaluator, model: torch.nn.Module, profile_path: Path | None) -> Iterator[None]:
    from acttail_vllm.eval.reference import sparsified

    with ExitStack() as stack:
        if profile_path is not None:
            stack.enter_context(sparsified(model, evaluator.load_profile(profile_path)))
        yield


# --- pure comparisons ---------------------------------------------------------------------------


def mean_abs_diff(a: Sequence[torch.Tensor], b: Sequence[torch.Tensor]) -> float:
    """Mean |a - b| over every token of the paired sequences (same lengths, same tokens)."""
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        raise ValueError("the two runs scored different tokens: compare log-probabilities of the same tokens only")
    diffs = torch.cat([(x.double() - y.double()).abs() for x, y in zip(a, b)])
    return diffs.mean().item() if diffs.numel() else 0.0


def mean_nll(logprobs: Sequence[torch.Tensor]) -> float:
    """Mean negative log-likelihood per token (nats)."""
    tokens = sum(len(lp) for lp in logprobs)
    return -math.fsum(lp.sum().item() for lp in logprobs) / tokens


class Tolerance(Record):
    """How far apart served and reference may be and still count as the same model in bf16: the
    larger of what bf16 changes without TopK between the two engines (``dense_engine_gap``: dense
    served vs dense reference, same dtype) and what bf16 rounding alone changes in the sparse model
    (``dtype_gap``: reference bf16 vs reference fp32 at the same budgets). Gaps are |delta mean
    nll| in nats per token, i.e. |log ppl_a - log ppl_b|."""

    dense_engine_gap: float
    dtype_gap: float | None

    @property
    def value(self) -> float:
        return max(self.dense_engine_gap, self.dtype_gap or 0.0)

    @property
    def source(self) -> str:
        return "dense served-vs-reference" if self.value == self.dense_engine_gap else "reference bf16-vs-fp32"

    def admits(self, gap: float) -> bool:
        return abs(gap) <= self.value


def first_divergence(a: Sequence[int], b: Sequence[int]) -> int | None:
    """Index of the first position where two generations differ (None: identical)."""
    for index, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return index
    return None if len(a) == len(b) else min(len(a), len(b))
