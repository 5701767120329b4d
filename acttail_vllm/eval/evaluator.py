"""``Evaluator``: one model and how to run it, scoring any profile (or none) on token streams and
multiple-choice tasks; ``run_sweep``, the comparison of allocation methods at several sparsities.

Text is tokenised once, here, and vLLM gets token-id prompts, so both engines score the same ids
in the same windows.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from acttail_vllm.errors import ActTailError
from acttail_vllm.eval.data import McTask, MultipleChoiceItem, load_text, multiple_choice_items
from acttail_vllm.eval.engines import ReferenceEngine, VllmEngine, score_requests, windowed_nll
from acttail_vllm.eval.records import (
    MultipleChoiceResult,
    PerplexityResult,
    ProfileInfo,
    RunSettings,
    SweepResult,
    TaskAccuracy,
    label,
)
from acttail_vllm.eval.scoring import ScoreRequest, continuation_request, perplexity, pick_choice
from acttail_vllm.profiling.allocation import AllocationSpec
from acttail_vllm.profiling.fingerprint import fingerprint_of
from acttail_vllm.profiling.profile import Profile

DEFAULT_CONTEXT = 1024


def task_accuracy(
    task: McTask, items: Sequence[MultipleChoiceItem], choice_scores: Sequence[Sequence[float]]
) -> TaskAccuracy:
    """Accuracy from each item's per-choice summed log-likelihoods (raw, and per character)."""
    if len(items) != len(choice_scores) or not items:
        raise ValueError(f"need one list of choice scores per item, got {len(choice_scores)} for {len(items)} items")
    right = [pick_choice(scores) == item.answer_index for item, scores in zip(items, choice_scores)]
    right_norm = [
        pick_choice(scores, [len(choice) for choice in item.choices]) == item.answer_index
        for item, scores in zip(items, choice_scores)
    ]
    return TaskAccuracy(
        task=task,
        items=len(items),
        acc=sum(right) / len(items),
        acc_norm=sum(right_norm) / len(items),
        right=right,
        right_norm=right_norm,
    )


@dataclass(frozen=True)
class TokenStream:
    """A text tokenised once; ``label`` is what the user named it by. ``bos``: the token the
    tokenizer starts every text with (None if it adds none), not in ``ids``: every perplexity
    window starts with it, as the model saw every text in training."""

    label: str
    ids: tuple[int, ...]
    max_tokens: int | None
    bos: int | None = None


class Evaluator:
    """One model and how to run it; scores any profile (or none) on token streams and tasks."""

    def __init__(self, settings: RunSettings, progress: bool = True):
        if settings.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda was asked for but CUDA is not available here: use --device cpu")
        if settings.dtype == "bfloat16" and settings.device == "cpu":
            raise ValueError("bfloat16 is for CUDA runs; on the CPU use --dtype float32")
        if not (Path(settings.model) / "config.json").is_file():
            raise ValueError(f"{settings.model} is not a Hugging Face model directory (no config.json in it)")
        from transformers import AutoTokenizer

        self.settings = settings
        self.progress = progress
        self.tokenizer = AutoTokenizer.from_pretrained(settings.model)
        self._hf_model: torch.nn.Module | None = None
        self._fingerprint: str | None = None

    # model, profiles

    def hf_model(self) -> torch.nn.Module:
        if self._hf_model is None:
            from transformers import AutoModelForCausalLM

            model = AutoModelForCausalLM.from_pretrained(self.settings.model, dtype=getattr(torch, self.settings.dtype))
            self._hf_model = model.to(self.settings.device).eval()
        return self._hf_model

    def fingerprint(self) -> str:
        """The fingerprint ``acttail profile`` records for this model, read from its weight files."""
        if self._fingerprint is None:
            from acttail_vllm.profiling.weights import open_model

            source = open_model(self.settings.model)
            self._fingerprint = fingerprint_of(source.architecture, source.projections())
        return self._fingerprint

    def load_profile(self, path: Path) -> Profile:
        """The profile at ``path``, refused unless it was made for this model."""
        return Profile.load(path, self.fingerprint(), model_name=self.settings.model)

    def build_profile(self, directory: Path, spec: AllocationSpec) -> Path:
        """A profile of this model in ``directory``, computed once (or re-allocated from the alphas of
        another one there) and reused on later calls."""
        from acttail_vllm.profiling.builder import profile_model
        from acttail_vllm.profiling.profile_cache import cached_profile

        def compute() -> Profile:
            return profile_model(self.settings.model, spec, device=self.settings.device, progress=self.progress)

        cached = cached_profile(Path(directory), "", self.load_profile, compute, spec)
        for problem in cached.problems:
            print(f"acttail eval: warning: {problem}", file=sys.stderr)
        if cached.path is None:
            raise ActTailError(
                f"the profiles of a sweep are files, and {directory} cannot be written: choose another --out"
            )
        return cached.path

    @contextmanager
    def engine(self, profile_path: Path | None, max_len: int) -> Iterator[ReferenceEngine | VllmEngine]:
        profile = None if profile_path is None else self.load_profile(profile_path)
        if self.settings.engine == "vllm":
            with VllmEngine(self.settings, profile_path, max_model_len=max_len + 1) as engine:
                yield engine
            return
        from acttail_vllm.eval.reference import sparsified

        model = self.hf_model()
        with ExitStack() as stack:
            if profile is not None:
                stack.enter_context(sparsified(model, profile))
            yield ReferenceEngine(model, torch.device(self.settings.device))

    def _profile_info(self, profile_path: Path | None) -> ProfileInfo | None:
        return None if profile_path is None else ProfileInfo.of(profile_path, self.load_profile(profile_path))

    # measurements

    def token_stream(self, text: str, max_tokens: int | None = None) -> TokenStream:
        """Tokenise ``text`` (a slice name or file, see ``load_text``), keeping the first ``max_tokens``."""
        if max_tokens is not None and max_tokens < 2:
            raise ValueError(f"--max-tokens must be at least 2, got {max_tokens}")
        ids = self.tokenizer(load_text(text), verbose=False).input_ids
        bos = self.tokenizer.bos_token_id
        if bos is None or ids[:1] != [bos]:
            return TokenStream(text, tuple(ids[:max_tokens]), max_tokens)
        return TokenStream(text, tuple(ids[1:][:max_tokens]), max_tokens, bos)

    def perplexity(
        self, stream: TokenStream, profile_path: Path | None, context: int = DEFAULT_CONTEXT, stride: int | None = None
    ) -> PerplexityResult:
        info = self._profile_info(profile_path)
        with self.engine(profile_path, min(context, len(stream.ids) + (stream.bos is not None))) as engine:
            start = time.perf_counter()
            nll_sum, tokens = windowed_nll(
                engine,
                stream.ids,
                context,
                stride,
                self.settings.batch_size,
                f"ppl {label(info)}",
                self.progress,
                stream.bos,
            )
            seconds = time.perf_counter() - start
        return PerplexityResult(
            **self.settings.model_dump(),
            profile=info,
            text=stream.label,
            context=context,
            stride=stride or context,
            max_tokens=stream.max_tokens,
            tokens_scored=tokens,
            nll=nll_sum / tokens,
            ppl=perplexity(nll_sum, tokens),
            seconds=seconds,
        )

    def choice_requests(self, item: MultipleChoiceItem) -> list[ScoreRequest]:
        context = self.tokenizer(item.context).input_ids
        return [
            continuation_request(context, self.tokenizer(item.context + choice).input_ids) for choice in item.choices
        ]

    def multiple_choice(
        self, tasks: Sequence[str], profile_path: Path | None, limit: int | None = None, data_dir: str | None = None
    ) -> MultipleChoiceResult:
        items = {McTask(task): multiple_choice_items(task, limit, data_dir) for task in tasks}
        requests = {task: [self.choice_requests(item) for item in task_items] for task, task_items in items.items()}
        flat = [r for per_task in requests.values() for per_item in per_task for r in per_item]
        info = self._profile_info(profile_path)
        with self.engine(profile_path, max(len(r.ids) for r in flat)) as engine:
            start = time.perf_counter()
            logprobs = score_requests(engine, flat, self.settings.batch_size, f"mc {label(info)}", self.progress)
            seconds = time.perf_counter() - start
        sums = iter([lp.sum().item() for lp in logprobs])
        accuracies = [
            task_accuracy(task, task_items, [[next(sums) for _ in item.choices] for item in task_items])
            for task, task_items in items.items()
        ]
        return MultipleChoiceResult(
            **self.settings.model_dump(),
            profile=info,
            limit=limit,
            data_dir=data_dir,
            tasks=accuracies,
            seconds=seconds,
        )


def run_sweep(
    evaluator: Evaluator,
    stream: TokenStream,
    profile_dir: Path,
    specs: Sequence[AllocationSpec],
    context: int = DEFAULT_CONTEXT,
    stride: int | None = None,
) -> SweepResult:
    """Dense once, then every allocation in ``specs`` (one estimator, eps and s_max), with profiles
    built into (or reused from) ``profile_dir``."""
    dense = evaluator.perplexity(stream, None, context, stride)
    runs = [evaluator.perplexity(stream, evaluator.build_profile(profile_dir, spec), context, stride) for spec in specs]
    first = specs[0]
    return SweepResult(estimator=first.estimator, eps=first.eps, s_max=first.s_max, dense=dense, runs=runs)
