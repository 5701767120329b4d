"""Diagnostic: does AlphaPruning's alpha -> sparsity direction help on this model, or its opposite?

The ``alphapruning`` method gives projections with larger alpha (lighter ESD tail) more sparsity.
This script scores, on one text through the PyTorch reference, uniform budgets, that mapping, and
the same mapping with alphas mirrored (alpha' = min + max - alpha: heavier tail, more sparsity),
all re-allocated from one profile's alphas, at each target and eps:

    python3 -m benchmarks.experiments.direction_check --text tuning --max-tokens 8192 --sparsities 0.7,0.8 --eps 0.2
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from acttail_vllm.dev.models import ensure_smollm2
from acttail_vllm.eval.evaluator import DEFAULT_CONTEXT, Evaluator
from acttail_vllm.eval.records import RunSettings
from acttail_vllm.profiling.allocation import DEFAULT_ESTIMATOR, DEFAULT_S_MAX, AllocationSpec
from acttail_vllm.profiling.builder import reallocated
from acttail_vllm.profiling.profile import Profile


def mirrored(profile: Profile) -> Profile:
    """``profile`` with every alpha reflected within [min alpha, max alpha]."""
    alphas = [p.alpha for layer in profile.layers for p in layer.projections.values()]
    low, high = min(alphas), max(alphas)
    flipped = profile.model_copy(deep=True)
    for layer in flipped.layers:
        for proj in layer.projections.values():
            proj.alpha = low + high - proj.alpha
    return flipped


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="Hugging Face model directory (default: the cached SmolLM2-135M)")
    parser.add_argument("--text", default="tuning", help="slice name or text file (see acttail eval ppl --text)")
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT)
    parser.add_argument("--sparsities", default="0.7,0.8")
    parser.add_argument("--eps", default="0.2")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args()

    evaluator = Evaluator(RunSettings(model=args.model or str(ensure_smollm2()), device=args.device), progress=False)
    stream = evaluator.token_stream(args.text, args.max_tokens)
    work = Path(tempfile.mkdtemp(prefix="acttail-direction-"))
    base = evaluator.load_profile(
        evaluator.build_profile(work, AllocationSpec(0.5, "uniform", DEFAULT_ESTIMATOR, 0.0, DEFAULT_S_MAX))
    )
    sources = {"alphapruning": base, "mirrored": mirrored(base)}
    print(f"{args.text}: {len(stream.ids)} tokens, context {args.context}, estimator {DEFAULT_ESTIMATOR}")
    print("| sparsity | budgets | eps | ppl |\n|---|---|---|---|")
    for sparsity in (float(s) for s in args.sparsities.split(",")):
        runs = [("uniform", base, "uniform", 0.0)]
        runs += [
            (name, src, "alphapruning", float(eps)) for eps in args.eps.split(",") for name, src in sources.items()
        ]
        for name, source, method, eps in runs:
            path = work / f"{name}-eps{eps:g}-s{sparsity:g}.json"
            reallocated(source, AllocationSpec(sparsity, method, DEFAULT_ESTIMATOR, eps, DEFAULT_S_MAX)).save(path)
            result = evaluator.perplexity(stream, path, args.context)
            print(f"| {sparsity:.0%} | {name} | {eps:g} | {result.ppl:.1f} |", flush=True)


if __name__ == "__main__":
    main()
