"""Measure the per-type loss costs of TopK that the ``acttail`` allocation uses (``TYPE_COSTS``).

For each model and each projection type: that type alone is TopK-sparsified at ``--sparsity`` in
every layer (all other projections dense), and the rise of the mean negative log-likelihood per
token over the dense model, on the first ``--max-tokens`` of ``--text``, is divided by the
parameters of that type in millions. The last line is the mean over the models, as a
``TYPE_COSTS`` literal:

    taskset -c 0 python3 -m tools.measure_type_costs SMOLLM2_DIR GEMMA3_DIR --max-tokens 2048 --json costs.json

Forward: the PyTorch reference of ``acttail eval`` (``acttail_vllm.eval``), windows of
``--context`` tokens (each led by ``<bos>`` for a tokenizer that adds it).
"""

from __future__ import annotations

import argparse
import contextlib
import math
from pathlib import Path

import torch
from pydantic import BaseModel, ConfigDict

from acttail_vllm.eval.engines import ReferenceEngine, windowed_nll
from acttail_vllm.eval.evaluator import Evaluator, TokenStream
from acttail_vllm.eval.records import DEFAULT_BATCH_SIZE, DEVICES, RunSettings
from acttail_vllm.eval.reference import sparsified
from acttail_vllm.eval.report import markdown_table, write_json
from acttail_vllm.profiling.allocation import AllocationSpec
from acttail_vllm.profiling.builder import profile_model
from acttail_vllm.profiling.profile import PROJECTION_NAMES, Profile

DEFAULT_SPARSITY = 0.8
DEFAULT_CONTEXT = 512


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TypeCost(_Record):
    projection: str
    #: Parameters of this type over all layers.
    params: int
    #: Mean NLL per token (nats) with this type sparsified, minus the dense model's.
    delta_nll: float
    #: ``delta_nll`` per million parameters of this type: the entry of ``TYPE_COSTS``.
    cost: float


class ModelTypeCosts(_Record):
    model: str
    text: str
    max_tokens: int | None
    context: int
    sparsity: float
    tokens_scored: int
    dense_nll: float
    costs: list[TypeCost]


class TypeCostsResult(_Record):
    models: list[ModelTypeCosts]
    #: Mean cost of each type over the models: what ``TYPE_COSTS`` holds.
    mean: dict[str, float]


def one_type_sparse(base: Profile, projection: str, sparsity: float) -> Profile:
    """``base`` with ``sparsity`` on every ``projection`` and every other projection dense. Only the
    reference hooks read it (its allocation fields describe ``base``)."""
    profile = base.model_copy(deep=True)
    for layer in profile.layers:
        for name, entry in layer.projections.items():
            entry.sparsity = sparsity if name == projection else 0.0
    return profile


def mean_nll(evaluator: Evaluator, stream: TokenStream, context: int, profile: Profile | None) -> tuple[float, int]:
    """Mean NLL per scored token (nats) and the number scored, dense or under ``profile``."""
    model = evaluator.hf_model()
    engine = ReferenceEngine(model, torch.device(evaluator.settings.device))
    with contextlib.ExitStack() as stack:
        if profile is not None:
            stack.enter_context(sparsified(model, profile))
        nll, tokens = windowed_nll(engine, stream.ids, context, None, evaluator.settings.batch_size, bos=stream.bos)
    return nll / tokens, tokens


def measure_model(
    settings: RunSettings, text: str, max_tokens: int | None, context: int, sparsity: float, types: list[str]
) -> ModelTypeCosts:
    evaluator = Evaluator(settings, progress=False)
    stream = evaluator.token_stream(text, max_tokens)
    # The budgets come from the shapes only; a uniform profile carries them (and the model's layout).
    base = profile_model(settings.model, AllocationSpec(sparsity, "uniform"), device=settings.device)
    dense, tokens = mean_nll(evaluator, stream, context, None)
    costs = []
    present = [name for name in types if any(name in layer.projections for layer in base.layers)]
    for projection in present:
        sparse, _ = mean_nll(evaluator, stream, context, one_type_sparse(base, projection, sparsity))
        params = sum(
            layer.projections[projection].param_count for layer in base.layers if projection in layer.projections
        )
        costs.append(
            TypeCost(
                projection=projection, params=params, delta_nll=sparse - dense, cost=(sparse - dense) / (params / 1e6)
            )
        )
        print(f"{settings.model}: {projection} at {sparsity:g}: dNLL {sparse - dense:.4f}", flush=True)
    return ModelTypeCosts(
        model=settings.model,
        text=text,
        max_tokens=max_tokens,
        context=context,
        sparsity=sparsity,
        tokens_scored=tokens,
        dense_nll=dense,
        costs=costs,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", metavar="MODEL", help="Hugging Face model directories")
    parser.add_argument("--text", default="tuning", help="slice name or text file (see acttail eval ppl --text)")
    parser.add_argument("--max-tokens", type=int, default=2048)
    parser.add_argument("--context", type=int, default=DEFAULT_CONTEXT)
    parser.add_argument("--sparsity", type=float, default=DEFAULT_SPARSITY)
    parser.add_argument("--device", choices=DEVICES, default="cpu")
    parser.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument(
        "--types", default=",".join(PROJECTION_NAMES), help="comma-separated projection types to measure"
    )
    parser.add_argument("--json", type=Path, metavar="OUT.json", help="also write the result here")
    args = parser.parse_args(argv)
    types = args.types.split(",")
    if unknown := sorted(set(types) - set(PROJECTION_NAMES)):
        parser.error(f"unknown projection type(s) {', '.join(unknown)}: choose from {', '.join(PROJECTION_NAMES)}")

    results = [
        measure_model(
            RunSettings(model=model, device=args.device, batch_size=args.batch_size),
            args.text,
            args.max_tokens,
            args.context,
            args.sparsity,
            types,
        )
        for model in args.models
    ]
    mean = {}
    for name in PROJECTION_NAMES:
        costs = [c.cost for r in results for c in r.costs if c.projection == name]
        if costs:
            mean[name] = math.fsum(costs) / len(costs)
    result = TypeCostsResult(models=results, mean=mean)
    for r in results:
        print(f"\n{r.model}: {r.tokens_scored} tokens of {r.text}, context {r.context}, dense nll {r.dense_nll:.4f}\n")
        rows = [[c.projection, f"{c.params:,}", f"{c.delta_nll:.4f}", f"{c.cost:.4f}"] for c in r.costs]
        print(markdown_table(["type", "params", "dNLL", "dNLL per M params"], rows))
    print("\nTYPE_COSTS = {" + ", ".join(f'"{name}": {value:.3f}' for name, value in mean.items()) + "}")
    if args.json:
        write_json(result, args.json)


if __name__ == "__main__":
    main()
