"""The quality report: do ActTail budgets beat uniform budgets, on held-out text, on several models?

Everything runs through the PyTorch reference forward (transformers + the package's TopK hooks,
``acttail_vllm.eval.reference``), float32 by default, no vLLM and no network. The data comes from
the files ``acttail eval export-data`` writes (``tuning.txt``, ``report.txt``, ``lambada.txt``,
``<task>.jsonl``), so hosts without the data package can run it.

Phases (``--phase``):

``tune``    on the ``tuning`` text only (first ``--tune-tokens`` tokens): uniform and every
            ``acttail`` variant (``--alpha-powers`` x ``--s-maxes``) at ``--tune-sparsities`` on
            every model. The variant with the lowest mean over models and sparsities of
            log(ppl_variant / ppl_uniform) is chosen; written to OUT/tuning.json.
``report``  held out, with the chosen variant (``--chosen FILE``, a tuning.json or quality.json,
            or ``--alpha-power P --acttail-s-max S``): perplexity on ``report`` (BoolQ passages)
            and ``lambada`` (novels), dense + uniform + alphapruning + acttail at ``--sparsities``;
            the controls on ``report`` at ``--control-sparsities`` (per-type: each projection type
            gets acttail's parameter-weighted type mean in every layer; shuffle: alphas permuted
            across layers within each type, ``--shuffle-seeds``); zero-shot multiple choice dense
            and under each method at ``--mc-sparsities``.
``all``     tune, then report, in one run.
``merge``   combine the quality.json of several runs (``--inputs``) into one report.

Writes OUT/quality.json (every number, each phase with the command that ran it), OUT/quality.md
(tables: change vs uniform, the goals met or not, budgets' type means) and OUT/budgets_<model>.json
(alpha and the sparsity of every projection under every budget).

    python3 -m benchmarks.quality_sweep --phase all --model smollm2=DIR [--model NAME=DIR ...] \\
        --data-dir evaldata --out quality

Cost. Per model the defaults score about 7.4M token-passes in the report (each held-out text
dense and under 15 budgets, 9 controls on ``report``, 7 multiple-choice runs over ~340k tokens) and
0.36M in tuning. Measured on one H200 (float32, TopK at 70%, batches of 1024-token windows): 20 / 22 /
44 us per token for the SmolLM2-135M / Gemma 3 270M / Qwen2.5-0.5B shapes (12 / 16 / 28 dense),
i.e. about 15-25 TFLOP/s effective, the default ``--assumed-tflops`` of the printed estimates.
``--max-tokens``, ``--mc-limit`` and fewer sparsities cut it.

A check that it runs, on a CPU: ``--device cpu --tune-tokens 256 --max-tokens 256 --context 128
--mc-limit 4 --alpha-powers 0,3 --s-maxes 0.95``.
"""

from __future__ import annotations

import argparse
import math
import random
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from acttail_vllm.cli import _fraction
from acttail_vllm.eval.data import DEFAULT_TASKS, LAMBADA_TEXT, McTask, multiple_choice_items, text_file
from acttail_vllm.eval.engines import ReferenceEngine, score_requests
from acttail_vllm.eval.evaluator import DEFAULT_CONTEXT, Evaluator, TokenStream, task_accuracy
from acttail_vllm.eval.records import DTYPES, RunSettings, TaskAccuracy
from acttail_vllm.eval.reference import decoder_layers, sparse_modules, sparsified
from acttail_vllm.eval.report import markdown_table, relative_change, write_json, write_result
from acttail_vllm.eval.scoring import ScoreRequest, sliding_windows
from acttail_vllm.profiling.allocation import (
    DEFAULT_EPS,
    DEFAULT_ESTIMATOR,
    DEFAULT_S_MAX,
    AllocationSpec,
    allocate,
    weighted_mean,
)
from acttail_vllm.profiling.builder import profile_from_weights
from acttail_vllm.profiling.profile import PROJECTION_NAMES, Profile

TUNING_TEXT = "tuning"
REPORT_TEXT = "report"
HELD_OUT_TEXTS = (REPORT_TEXT, LAMBADA_TEXT)
#: The issue's goal: acttail's perplexity change against uniform at these sparsities, at most
#: (below uniform at every sparsity from 50% to 80%; 3% / 15% / 25% below at 50% / 70% / 80%).
PPL_GOALS: dict[float, float] = {0.5: -0.03, 0.6: 0.0, 0.7: -0.15, 0.8: -0.25}
#: ... and zero-shot accuracy at this sparsity not below uniform's.
MC_GOAL_SPARSITY = 0.5
METHODS = ("uniform", "alphapruning", "acttail")
#: Bytes of logits one forward may hold (batch x length x vocabulary x 4): Gemma's 262k vocabulary
#: makes 1024 float32 positions 1 GiB.
DEFAULT_LOGITS_GIB = 8.0

BudgetKind = Literal["uniform", "alphapruning", "acttail", "per-type", "shuffle"]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Variant(_Record):
    """An ``acttail`` setting: the within-type alpha exponent and the cap on any projection."""

    alpha_power: float
    s_max: float = Field(gt=0.0, lt=1.0)

    @property
    def label(self) -> str:
        return f"alpha_power {self.alpha_power:g}, s_max {self.s_max:g}"


class Budget(_Record):
    """How one run's sparsities were made: a method (or a control of ``acttail``) at a target."""

    kind: BudgetKind
    target: float
    #: The acttail variant (acttail and its controls).
    variant: Variant | None = None
    #: alphapruning's spread.
    eps: float | None = None
    #: The shuffle control's seed.
    seed: int | None = None

    @property
    def label(self) -> str:
        return f"shuffle {self.seed}" if self.kind == "shuffle" else self.kind


class PerplexityRun(_Record):
    text: str
    #: None: dense.
    budget: Budget | None
    tokens_scored: int
    #: Mean negative log-likelihood per scored token, in nats.
    nll: float
    ppl: float
    seconds: float


class MultipleChoiceRun(_Record):
    budget: Budget | None
    tasks: list[TaskAccuracy]
    seconds: float

    @property
    def mean_acc(self) -> float:
        return math.fsum(t.acc for t in self.tasks) / len(self.tasks)


class ModelTuning(_Record):
    model: str
    path: str
    dense: PerplexityRun
    runs: list[PerplexityRun]

    def run(self, budget: Budget) -> PerplexityRun:
        return next(r for r in self.runs if r.budget == budget)


class VariantScore(_Record):
    variant: Variant
    #: Mean over models and sparsities of log(ppl_variant / ppl_uniform).
    mean_log_ratio: float


class Tuning(_Record):
    command: str
    context: int
    max_tokens: int
    sparsities: list[float]
    models: list[ModelTuning]
    scores: list[VariantScore]
    chosen: Variant


class ModelReport(_Record):
    name: str
    path: str
    architecture: str
    command: str
    context: int
    max_tokens: int | None
    mc_limit: int
    #: Parameter-weighted mean alpha of each projection type.
    alpha_type_means: dict[str, float]
    #: Budget label and target (``acttail@0.7``) -> projection type -> parameter-weighted mean sparsity.
    budget_type_means: dict[str, dict[str, float]]
    perplexity: list[PerplexityRun]
    multiple_choice: list[MultipleChoiceRun]
    seconds: dict[str, float]

    def ppl(self, text: str, budget: Budget | None) -> PerplexityRun | None:
        return next((r for r in self.perplexity if r.text == text and r.budget == budget), None)

    def mc(self, budget: Budget | None) -> MultipleChoiceRun | None:
        return next((r for r in self.multiple_choice if r.budget == budget), None)


class QualityReport(_Record):
    device: str
    dtype: str
    chosen: Variant
    alphapruning_eps: float
    tuning: Tuning | None
    models: list[ModelReport]


class ProjectionBudgets(_Record):
    layer: int
    projection: str
    alpha: float
    params: int
    #: Budget label and target -> sparsity.
    sparsity: dict[str, float]


class ModelBudgets(_Record):
    model: str
    projections: list[ProjectionBudgets]


# --- budgets --------------------------------------------------------------------------------


def type_means(values: Sequence[float], counts: Sequence[int], projections: Sequence[str]) -> dict[str, float]:
    """Parameter-weighted mean of ``values`` per projection type."""
    return {
        proj: weighted_mean(
            [v for v, p in zip(values, projections) if p == proj], [n for n, p in zip(counts, projections) if p == proj]
        )
        for proj in dict.fromkeys(projections)
    }


def per_type(values: Sequence[float], counts: Sequence[int], projections: Sequence[str]) -> list[float]:
    """Control: each projection gets its type's parameter-weighted mean, the same in every layer."""
    means = type_means(values, counts, projections)
    return [means[p] for p in projections]


def shuffled_within_type(values: Sequence[float], projections: Sequence[str], seed: int) -> list[float]:
    """Control: ``values`` permuted across layers within each projection type (seeded)."""
    rng = random.Random(seed)
    out = list(values)
    for proj in dict.fromkeys(projections):
        where = [i for i, p in enumerate(projections) if p == proj]
        picked = [values[i] for i in where]
        rng.shuffle(picked)
        for i, value in zip(where, picked):
            out[i] = value
    return out


def budget_key(budget: Budget) -> str:
    return f"{budget.label}@{budget.target:g}"


# --- one model ------------------------------------------------------------------------------


class ModelRunner:
    """One model on the device: its alphas, budgets, and scoring under any sparsities."""

    def __init__(self, name: str, path: str, args: argparse.Namespace):
        self.name, self.path, self.args = name, path, args
        self.evaluator = Evaluator(
            RunSettings(model=path, device=args.device, dtype=args.dtype, batch_size=1), progress=False
        )
        self.tokenizer = self.evaluator.tokenizer
        self.model = self.evaluator.hf_model()
        self.engine = ReferenceEngine(self.model, torch.device(args.device))
        self.vocab = self.model.get_output_embeddings().weight.shape[0]
        self.architecture = type(self.model).__name__
        modules = [(proj, module) for proj, module in sparse_modules(self.model)]
        if any(len(proj.projections) != 1 for proj, _ in modules):
            raise ValueError(f"{path}: fused projections (qkv_proj, gate_up_proj) are not supported here")
        start = time.perf_counter()
        self.base = profile_from_weights(
            name,
            self.architecture,
            len(decoder_layers(self.model)),
            ((proj.layer, proj.module, module.weight.detach()) for proj, module in modules),
            AllocationSpec(0.0, "uniform", args.estimator),
        )
        self.alpha_seconds = time.perf_counter() - start
        self.keys = [
            (layer.index, proj) for layer in self.base.layers for proj in PROJECTION_NAMES if proj in layer.projections
        ]
        entries = [self.base.layers[layer].projections[proj] for layer, proj in self.keys]
        self.alphas = [p.alpha for p in entries]
        self.counts = [p.param_count for p in entries]
        self.projections = [proj for _, proj in self.keys]
        self.linear_params = sum(self.counts)

    def sparsities(self, budget: Budget) -> list[float]:
        """Every projection's sparsity under ``budget``; the weighted mean is checked against the target."""
        alphas = self.alphas
        if budget.kind == "shuffle":
            alphas = shuffled_within_type(alphas, self.projections, budget.seed)
        if budget.kind in ("uniform", "alphapruning"):
            spec = AllocationSpec(budget.target, budget.kind, self.args.estimator, budget.eps or 0.0, DEFAULT_S_MAX)
            values = allocate(alphas, self.counts, spec, self.projections)
        else:
            variant = budget.variant
            spec = AllocationSpec(budget.target, "acttail", self.args.estimator, DEFAULT_EPS, variant.s_max)
            values = allocate(alphas, self.counts, spec, self.projections, alpha_power=variant.alpha_power)
        if budget.kind == "per-type":
            values = per_type(values, self.counts, self.projections)
        mean = weighted_mean(values, self.counts)
        if abs(mean - budget.target) > 1e-9:
            raise AssertionError(f"{self.name} {budget_key(budget)}: weighted mean {mean} is not the target")
        return values

    def profile(self, budget: Budget) -> Profile:
        """The base profile with ``budget``'s sparsities: what the reference hooks read."""
        values = dict(zip(self.keys, self.sparsities(budget)))
        layers = [
            layer.model_copy(
                update={
                    "projections": {
                        proj: p.model_copy(update={"sparsity": values[(layer.index, proj)]})
                        for proj, p in layer.projections.items()
                    }
                }
            )
            for layer in self.base.layers
        ]
        return self.base.model_copy(
            update={"layers": layers, "target_sparsity": budget.target, "achieved_sparsity": budget.target}
        )

    def token_stream(self, text: str, max_tokens: int | None) -> TokenStream:
        """The named text from the data dir, tokenised once (its ``bos``, if any, leads every window)."""
        return self.evaluator.token_stream(str(text_file(self.args.data_dir, text)), max_tokens)

    def batch_size(self, length: int) -> int:
        """Sequences per forward: as many as keep the logits within ``--logits-gib``."""
        fit = int(self.args.logits_gib * 2**30) // (length * self.vocab * 4)
        return max(1, min(self.args.max_batch, fit))

    def _scored(self, budget: Budget | None, requests: Sequence[ScoreRequest]) -> tuple[list[torch.Tensor], float]:
        batch = self.batch_size(max(len(r.ids) for r in requests))
        start = time.perf_counter()
        if budget is None:
            logprobs = score_requests(self.engine, requests, batch)
        else:
            with sparsified(self.model, self.profile(budget)):
                logprobs = score_requests(self.engine, requests, batch)
        return logprobs, time.perf_counter() - start

    def perplexity(self, text: str, stream: TokenStream, budget: Budget | None) -> PerplexityRun:
        windows = sliding_windows(len(stream.ids), self.args.context, bos=stream.bos)
        logprobs, seconds = self._scored(budget, [window.request(stream.ids) for window in windows])
        nll = -math.fsum(lp.sum().item() for lp in logprobs)
        tokens = sum(len(lp) for lp in logprobs)
        run = PerplexityRun(
            text=text,
            budget=budget,
            tokens_scored=tokens,
            nll=nll / tokens,
            ppl=math.exp(nll / tokens),
            seconds=seconds,
        )
        print(f"{self.name} {text} {describe(budget)}: ppl {run.ppl:.3f} ({seconds:.1f} s)", flush=True)
        return run

    def multiple_choice(self, items: dict[McTask, list], budget: Budget | None) -> MultipleChoiceRun:
        requests = {
            task: [self.evaluator.choice_requests(item) for item in task_items] for task, task_items in items.items()
        }
        flat = [r for per_task in requests.values() for per_item in per_task for r in per_item]
        logprobs, seconds = self._scored(budget, flat)
        sums = iter([lp.sum().item() for lp in logprobs])
        tasks = [
            task_accuracy(task, task_items, [[next(sums) for _ in item.choices] for item in task_items])
            for task, task_items in items.items()
        ]
        run = MultipleChoiceRun(budget=budget, tasks=tasks, seconds=seconds)
        accs = " ".join(f"{t.task.value} {t.acc:.3f}" for t in tasks)
        print(f"{self.name} mc {describe(budget)}: {accs} ({seconds:.1f} s)", flush=True)
        return run

    def flops_per_token(self, context: int) -> float:
        """Forward FLOPs per token: the projections, the output layer, and attention over half a window."""
        config = self.model.config.get_text_config()
        heads, head_dim = config.num_attention_heads, getattr(config, "head_dim", None)
        attention_width = heads * (head_dim or config.hidden_size // heads)
        attention = 2 * 2 * len(self.base.layers) * attention_width * context / 2
        return 2.0 * (self.linear_params + self.vocab * config.hidden_size) + attention

    def close(self) -> None:
        del self.engine, self.model
        self.evaluator._hf_model = None
        if self.args.device == "cuda":
            torch.cuda.empty_cache()


def describe(budget: Budget | None) -> str:
    if budget is None:
        return "dense"
    variant = "" if budget.variant is None else f" ({budget.variant.label})"
    return f"{budget.label}{variant} {budget.target:.0%}"


# --- phases ---------------------------------------------------------------------------------


def tune_variants(args: argparse.Namespace) -> list[Variant]:
    return [Variant(alpha_power=p, s_max=s) for p in args.alpha_powers for s in args.s_maxes]


def run_tuning(args: argparse.Namespace, command: str) -> Tuning:
    variants = tune_variants(args)
    models = []
    for name, path in args.model:
        runner = ModelRunner(name, path, args)
        stream = runner.token_stream(TUNING_TEXT, args.tune_tokens)
        report_cost(runner, len(stream.ids) * (1 + len(args.tune_sparsities) * (1 + len(variants))), "tuning")
        dense = runner.perplexity(TUNING_TEXT, stream, None)
        budgets = [Budget(kind="uniform", target=s) for s in args.tune_sparsities]
        budgets += [Budget(kind="acttail", target=s, variant=v) for v in variants for s in args.tune_sparsities]
        runs = [runner.perplexity(TUNING_TEXT, stream, budget) for budget in budgets]
        models.append(ModelTuning(model=name, path=path, dense=dense, runs=runs))
        runner.close()
    scores = []
    for variant in variants:
        ratios = [
            m.run(Budget(kind="acttail", target=s, variant=variant)).nll - m.run(Budget(kind="uniform", target=s)).nll
            for m in models
            for s in args.tune_sparsities
        ]
        scores.append(VariantScore(variant=variant, mean_log_ratio=math.fsum(ratios) / len(ratios)))
    chosen = min(scores, key=lambda score: score.mean_log_ratio).variant
    print(f"chosen acttail variant: {chosen.label}", flush=True)
    return Tuning(
        command=command,
        context=args.context,
        max_tokens=args.tune_tokens,
        sparsities=args.tune_sparsities,
        models=models,
        scores=scores,
        chosen=chosen,
    )


def report_cost(runner: ModelRunner, token_passes: int, what: str) -> None:
    """Print the planned work and its time at ``--assumed-tflops`` (a sustained float32 rate)."""
    flops = token_passes * runner.flops_per_token(runner.args.context)
    print(
        f"{runner.name} {what}: {token_passes:,} token-passes, {flops / 1e15:.3f} PFLOP, "
        f"~{flops / (runner.args.assumed_tflops * 1e12):.0f} s at {runner.args.assumed_tflops:g} TFLOP/s "
        f"(+ TopK); alphas took {runner.alpha_seconds:.1f} s",
        flush=True,
    )


def method_budgets(chosen: Variant, eps: float, targets: Sequence[float]) -> list[Budget]:
    """uniform, alphapruning and acttail (the chosen variant) at each target."""
    made = {
        "uniform": lambda s: Budget(kind="uniform", target=s),
        "alphapruning": lambda s: Budget(kind="alphapruning", target=s, eps=eps),
        "acttail": lambda s: Budget(kind="acttail", target=s, variant=chosen),
    }
    return [made[method](s) for s in targets for method in METHODS]


def run_report(args: argparse.Namespace, command: str, chosen: Variant, on_model) -> list[ModelReport]:
    items = {McTask(task): multiple_choice_items(task, args.mc_limit, args.data_dir) for task in args.tasks}
    reports = []
    for name, path in args.model:
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        runner = ModelRunner(name, path, args)
        seconds["load"] = time.perf_counter() - start

        controls = [Budget(kind="per-type", target=s, variant=chosen) for s in args.control_sparsities]
        controls += [
            Budget(kind="shuffle", target=s, variant=chosen, seed=seed)
            for seed in args.shuffle_seeds
            for s in args.control_sparsities
        ]
        streams = {text: runner.token_stream(text, args.max_tokens) for text in HELD_OUT_TEXTS}
        mc_tokens = sum(
            len(r.ids) for task_items in items.values() for i in task_items for r in runner.evaluator.choice_requests(i)
        )
        ppl_passes = sum(len(stream.ids) for stream in streams.values()) * (
            1 + len(method_budgets(chosen, args.alphapruning_eps, args.sparsities))
        )
        ppl_passes += len(streams[REPORT_TEXT].ids) * len(controls)
        report_cost(
            runner,
            ppl_passes + mc_tokens * (1 + len(method_budgets(chosen, args.alphapruning_eps, args.mc_sparsities))),
            "report",
        )

        start = time.perf_counter()
        perplexity = [
            runner.perplexity(text, stream, budget)
            for text, stream in streams.items()
            for budget in [None, *method_budgets(chosen, args.alphapruning_eps, args.sparsities)]
        ]
        perplexity += [runner.perplexity(REPORT_TEXT, streams[REPORT_TEXT], budget) for budget in controls]
        seconds["perplexity"] = time.perf_counter() - start
        start = time.perf_counter()
        mc = (
            [
                runner.multiple_choice(items, budget)
                for budget in [None, *method_budgets(chosen, args.alphapruning_eps, args.mc_sparsities)]
            ]
            if items
            else []
        )
        seconds["multiple_choice"] = time.perf_counter() - start

        all_budgets = {
            budget_key(b): b
            for b in [
                *method_budgets(chosen, args.alphapruning_eps, sorted({*args.sparsities, *args.mc_sparsities})),
                *controls,
            ]
        }
        sparsities = {key: runner.sparsities(b) for key, b in all_budgets.items()}
        write_json(
            ModelBudgets(
                model=name,
                projections=[
                    ProjectionBudgets(
                        layer=layer,
                        projection=proj,
                        alpha=alpha,
                        params=count,
                        sparsity={k: v[i] for k, v in sparsities.items()},
                    )
                    for i, ((layer, proj), alpha, count) in enumerate(zip(runner.keys, runner.alphas, runner.counts))
                ],
            ),
            args.out / f"budgets_{name}.json",
        )
        report = ModelReport(
            name=name,
            path=path,
            architecture=runner.architecture,
            command=command,
            context=args.context,
            max_tokens=args.max_tokens,
            mc_limit=args.mc_limit,
            alpha_type_means=type_means(runner.alphas, runner.counts, runner.projections),
            budget_type_means={k: type_means(v, runner.counts, runner.projections) for k, v in sparsities.items()},
            perplexity=perplexity,
            multiple_choice=mc,
            seconds=seconds,
        )
        runner.close()
        reports.append(report)
        on_model(reports)
    return reports


# --- the report -----------------------------------------------------------------------------


def change(value: float, reference: float) -> str:
    return f"{relative_change(value, reference):+.1%}"


def tuning_tables(tuning: Tuning) -> list[str]:
    header = ["acttail variant", *(f"{m.model} @{s:.0%}" for m in tuning.models for s in tuning.sparsities)]
    header.append("mean log(ppl / uniform)")
    uniform_ppl = [m.run(Budget(kind="uniform", target=s)).ppl for m in tuning.models for s in tuning.sparsities]
    rows = [["uniform (ppl)", *(f"{ppl:.2f}" for ppl in uniform_ppl), ""]]
    for score in sorted(tuning.scores, key=lambda sc: sc.mean_log_ratio):
        v = score.variant
        cells = []
        for m in tuning.models:
            for s in tuning.sparsities:
                run, uniform = (
                    m.run(Budget(kind="acttail", target=s, variant=v)),
                    m.run(Budget(kind="uniform", target=s)),
                )
                cells.append(f"{run.ppl:.2f} ({change(run.ppl, uniform.ppl)})")
        label = v.label + (" **(chosen)**" if v == tuning.chosen else "")
        rows.append([label, *cells, f"{score.mean_log_ratio:+.4f}"])
    dense = ", ".join(f"{m.model} {m.dense.ppl:.2f}" for m in tuning.models)
    return [
        f"## Tuning: `tuning` text, first {tuning.max_tokens} tokens, context {tuning.context}",
        f"Dense perplexity: {dense}. Chosen: **{tuning.chosen.label}**.",
        markdown_table(header, rows),
        f"Command: `{tuning.command}`",
    ]


def ppl_table(model: ModelReport, text: str, chosen: Variant, eps: float) -> tuple[str, list[tuple[str, bool]]]:
    dense = model.ppl(text, None)
    targets = sorted(
        {r.budget.target for r in model.perplexity if r.text == text and r.budget and r.budget.kind == "uniform"}
    )
    rows, goals = [], []
    for s in targets:
        uniform = model.ppl(text, Budget(kind="uniform", target=s))
        alphapruning = model.ppl(text, Budget(kind="alphapruning", target=s, eps=eps))
        acttail = model.ppl(text, Budget(kind="acttail", target=s, variant=chosen))
        goal = PPL_GOALS.get(round(s, 2))
        verdict = ""
        if goal is not None:
            met = relative_change(acttail.ppl, uniform.ppl) <= goal
            verdict = f"{goal:+.0%}: {'met' if met else 'NOT met'}"
            goals.append((f"{text} {s:.0%} ({goal:+.0%})", met))
        rows.append(
            [
                f"{s:.0%}",
                f"{uniform.ppl:.2f}",
                f"{alphapruning.ppl:.2f} ({change(alphapruning.ppl, uniform.ppl)})",
                f"{acttail.ppl:.2f} ({change(acttail.ppl, uniform.ppl)})",
                verdict,
            ]
        )
    header = ["sparsity", "uniform", f"alphapruning (eps {eps:g})", "acttail", "goal (acttail vs uniform)"]
    title = f"### Perplexity on `{text}` ({dense.tokens_scored} tokens scored; dense {dense.ppl:.3f})"
    return title + "\n\n" + markdown_table(header, rows), goals


def controls_table(model: ModelReport, chosen: Variant) -> str:
    runs = [
        r for r in model.perplexity if r.text == REPORT_TEXT and r.budget and r.budget.kind in ("per-type", "shuffle")
    ]
    labels = list(dict.fromkeys(r.budget.label for r in runs))
    targets = sorted({r.budget.target for r in runs})
    rows = []
    for s in targets:
        uniform = model.ppl(REPORT_TEXT, Budget(kind="uniform", target=s)).ppl
        acttail = model.ppl(REPORT_TEXT, Budget(kind="acttail", target=s, variant=chosen)).ppl
        cells = [f"{s:.0%}", f"{uniform:.2f}", f"{acttail:.2f} ({change(acttail, uniform)})"]
        for label in labels:
            run = next(r for r in runs if r.budget.label == label and r.budget.target == s)
            cells.append(f"{run.ppl:.2f} ({change(run.ppl, uniform)})")
        rows.append(cells)
    return f"### Controls on `{REPORT_TEXT}` (change vs uniform)\n\n" + markdown_table(
        ["sparsity", "uniform", "acttail", *labels], rows
    )


def mc_table(model: ModelReport, chosen: Variant, eps: float) -> tuple[str, list[tuple[str, bool]]]:
    tasks = [t.task.value for t in model.multiple_choice[0].tasks]
    items = model.multiple_choice[0].tasks[0].items
    rows = []
    for run in model.multiple_choice:
        cells = [f"{t.acc:.3f} / {t.acc_norm:.3f}" for t in run.tasks]
        rows.append([describe(run.budget), *cells, f"{run.mean_acc:.4f}"])
    goals = []
    uniform = model.mc(Budget(kind="uniform", target=MC_GOAL_SPARSITY))
    acttail = model.mc(Budget(kind="acttail", target=MC_GOAL_SPARSITY, variant=chosen))
    if uniform and acttail:
        goals.append(
            (f"zero-shot mean acc at {MC_GOAL_SPARSITY:.0%} not below uniform", acttail.mean_acc >= uniform.mean_acc)
        )
    title = f"### Zero-shot multiple choice (first {items} items per task; acc / acc_norm)"
    return title + "\n\n" + markdown_table(["run", *tasks, "mean acc"], rows), goals


def budgets_table(model: ModelReport) -> str:
    types = list(model.alpha_type_means)
    rows = [["alpha (mean)", *(f"{model.alpha_type_means[t]:.2f}" for t in types)]]
    for key, means in model.budget_type_means.items():
        if not key.startswith("uniform"):
            rows.append([key, *(f"{means[t]:.3f}" for t in types)])
    return "### Budgets: parameter-weighted mean sparsity per projection type\n\n" + markdown_table(
        ["budget", *types], rows
    )


def markdown(report: QualityReport) -> str:
    sections = [
        "# ActTail quality report",
        f"{report.device}, {report.dtype}; acttail variant **{report.chosen.label}**; alphapruning eps "
        f"{report.alphapruning_eps:g}. Goal on held-out text: acttail perplexity at least 3% / 15% / 25% "
        "below uniform's at 50% / 70% / 80% (and below it at 60%), and zero-shot accuracy at 50% not below uniform's.",
    ]
    if report.tuning is not None:
        sections += tuning_tables(report.tuning)
    summary_rows = []
    model_sections = []
    for model in report.models:
        goals: list[tuple[str, bool]] = []
        parts = [f"## {model.name} ({model.architecture}, `{model.path}`)"]
        for text in HELD_OUT_TEXTS:
            if model.ppl(text, None) is not None:
                table, met = ppl_table(model, text, report.chosen, report.alphapruning_eps)
                parts.append(table)
                goals += met
        if any(r.budget and r.budget.kind in ("per-type", "shuffle") for r in model.perplexity):
            parts.append(controls_table(model, report.chosen))
        if model.multiple_choice:
            table, met = mc_table(model, report.chosen, report.alphapruning_eps)
            parts.append(table)
            goals += met
        parts.append(budgets_table(model))
        timing = ", ".join(f"{k} {v:.0f} s" for k, v in model.seconds.items())
        parts.append(f"Context {model.context}, {timing}. Command: `{model.command}`")
        model_sections += parts
        for what, met in goals:
            summary_rows.append([model.name, what, "met" if met else "**NOT met**"])
    sections.append("## Goals")
    sections.append(markdown_table(["model", "criterion", "result"], summary_rows))
    return "\n\n".join(sections + model_sections) + "\n"


def write_outputs(report: QualityReport, out: Path) -> None:
    write_result(report, markdown(report), out, "quality")


# --- command line ---------------------------------------------------------------------------


def _csv(parse):
    return lambda text: [parse(item) for item in text.split(",") if item.strip()]


def _named_model(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"give NAME=DIR, got {text!r}")
    return name, path


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--phase", choices=("tune", "report", "all", "merge"), default="all")
    parser.add_argument("--model", type=_named_model, action="append", default=[], metavar="NAME=DIR")
    parser.add_argument("--data-dir", type=Path, help="files from `acttail eval export-data`")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--inputs", type=Path, nargs="*", default=[], help="merge: quality.json files")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--dtype", choices=DTYPES, default="float32")
    parser.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (default: strict float32)")
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT)
    parser.add_argument("--logits-gib", type=float, default=DEFAULT_LOGITS_GIB, help="logits held per forward")
    parser.add_argument("--max-batch", type=int, default=64, help="sequences per forward, at most")
    parser.add_argument("--assumed-tflops", type=float, default=20.0, help="for the printed time estimates")
    parser.add_argument("--estimator", default=DEFAULT_ESTIMATOR)
    # tuning
    parser.add_argument("--tune-tokens", type=int, default=16384, help="first N tokens of the tuning text")
    parser.add_argument("--tune-sparsities", type=_csv(_fraction), default=[0.5, 0.7, 0.8])
    parser.add_argument("--alpha-powers", type=_csv(float), default=[0.0, 1.5, 3.0])
    parser.add_argument("--s-maxes", type=_csv(_fraction), default=[0.9, 0.95])
    # report
    parser.add_argument("--chosen", type=Path, help="report: the tuning.json (or quality.json) that chose the variant")
    parser.add_argument("--alpha-power", type=float, help="report: the acttail variant, instead of --chosen")
    parser.add_argument("--acttail-s-max", type=_fraction, help="report: the acttail variant, instead of --chosen")
    parser.add_argument("--alphapruning-eps", type=_fraction, default=DEFAULT_EPS)
    parser.add_argument("--max-tokens", type=int, help="first N tokens of each held-out text")
    parser.add_argument("--sparsities", type=_csv(_fraction), default=[0.4, 0.5, 0.6, 0.7, 0.8])
    parser.add_argument("--control-sparsities", type=_csv(_fraction), default=[0.5, 0.7, 0.8])
    parser.add_argument("--shuffle-seeds", type=_csv(int), default=[1, 2])
    parser.add_argument("--mc-sparsities", type=_csv(_fraction), default=[0.5, 0.7])
    parser.add_argument("--tasks", type=_csv(str), default=list(DEFAULT_TASKS))
    parser.add_argument("--mc-limit", type=int, default=500, help="items per task (at most what was exported)")
    args = parser.parse_args(argv)
    if args.phase == "merge":
        if not args.inputs:
            parser.error("--phase merge needs --inputs A/quality.json B/quality.json ...")
        return args
    if not args.model or args.data_dir is None:
        parser.error(f"--phase {args.phase} needs --model NAME=DIR (one or more) and --data-dir")
    needed = {"tune": [TUNING_TEXT], "report": [*HELD_OUT_TEXTS], "all": [TUNING_TEXT, *HELD_OUT_TEXTS]}[args.phase]
    for text in needed:
        if not text_file(args.data_dir, text).is_file():
            parser.error(f"{text_file(args.data_dir, text)} is missing: write it with `acttail eval export-data`")
    if args.phase == "report":
        by_flags = args.alpha_power is not None and args.acttail_s_max is not None
        if (args.chosen is None) == (not by_flags):
            parser.error("--phase report needs the variant: --chosen FILE, or --alpha-power and --acttail-s-max")
    return args


def chosen_variant(args: argparse.Namespace) -> Variant:
    if args.chosen is None:
        return Variant(alpha_power=args.alpha_power, s_max=args.acttail_s_max)
    text = args.chosen.read_text(encoding="utf-8")
    if args.chosen.name == "tuning.json":
        return Tuning.model_validate_json(text).chosen
    return QualityReport.model_validate_json(text).chosen


def merge(paths: Sequence[Path]) -> QualityReport:
    """One report of the models of several runs with the same acttail variant."""
    reports = [QualityReport.model_validate_json(p.read_text(encoding="utf-8")) for p in paths]
    if len({r.chosen for r in reports}) != 1 or len({r.alphapruning_eps for r in reports}) != 1:
        raise ValueError("these reports were made with different acttail variants or alphapruning eps")
    tuning = next((r.tuning for r in reports if r.tuning is not None), None)
    models = {m.name: m for r in reports for m in r.models}
    return reports[0].model_copy(update={"tuning": tuning, "models": list(models.values())})


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.phase == "merge":
        write_outputs(merge(args.inputs), args.out)
        print(f"wrote {args.out / 'quality.json'}, {args.out / 'quality.md'}")
        return
    torch.backends.cuda.matmul.allow_tf32 = args.tf32
    torch.backends.cudnn.allow_tf32 = args.tf32
    command = shlex.join(["python3", "-m", "benchmarks.quality_sweep", *(sys.argv[1:] if argv is None else argv)])
    device = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    start = time.perf_counter()
    tuning = None
    if args.phase in ("tune", "all"):
        tuning = run_tuning(args, command)
        write_json(tuning, args.out / "tuning.json")
        chosen = tuning.chosen
    else:
        chosen = chosen_variant(args)
    report = QualityReport(
        device=device, dtype=args.dtype, chosen=chosen, alphapruning_eps=args.alphapruning_eps, tuning=tuning, models=[]
    )
    if args.phase in ("report", "all"):

        def save(models: list[ModelReport]) -> None:
            write_outputs(report.model_copy(update={"models": list(models)}), args.out)

        report = report.model_copy(update={"models": run_report(args, command, chosen, save)})
    write_outputs(report, args.out)
    print(f"done in {time.perf_counter() - start:.0f} s; wrote {args.out / 'quality.json'}, {args.out / 'quality.md'}")


if __name__ == "__main__":
    main()
