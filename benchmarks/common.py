"""What the benchmarks, experiments and tuners share: the projection shapes (Llama-2 7B/13B, Llama-3-8B,
Qwen2.5-7B), budgets for a sparsity, random problem instances, CUDA-graph timing with L2 flushed, and
the vLLM engines of the end-to-end benches (random weights of a model's shape).

Every script runs from the repository root as a module (``python3 -m benchmarks.NAME``,
``python3 -m benchmarks.experiments.NAME``, ``python3 -m tools.NAME``), with this project installed
(``acttail_kernels`` is the top-level kernels/ folder: benchmarks/gpu_session.sh says how).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from acttail_kernels import prepare_weight
from acttail_kernels.measured import parse_measured_table
from benchmarks.dummy_models import write_config


@dataclass(frozen=True)
class Shape:
    """A projection's weight: its output segments (one for a plain projection) and input features."""

    name: str
    seg_widths: tuple[int, ...]
    k: int

    @property
    def n(self) -> int:
        return sum(self.seg_widths)

    @property
    def seg_bounds(self) -> list[int]:
        bounds = [0]
        for width in self.seg_widths:
            bounds.append(bounds[-1] + width)
        return bounds

    @property
    def model(self) -> str:
        """The model shape it belongs to: "13b", "llama3-8b", ..."""
        return self.name.rsplit(".", 1)[0]


def decoder_shapes(model: str, hidden: int, inter: int, kv_width: int | None = None) -> list[Shape]:
    """A decoder layer's projections, apart (q/o and k/v, one q/k/v/o where the model has as many
    KV heads as heads; gate/up; down) and as vLLM merges them (qkv with its GQA widths, gate_up)."""
    kv = kv_width or hidden
    apart = (
        [Shape(f"{model}.q/k/v/o", (hidden,), hidden)]
        if kv == hidden
        else [Shape(f"{model}.q/o", (hidden,), hidden), Shape(f"{model}.k/v", (kv,), hidden)]
    )
    return apart + [
        Shape(f"{model}.qkv", (hidden, kv, kv), hidden),
        Shape(f"{model}.gate/up", (inter,), hidden),
        Shape(f"{model}.gate_up", (inter, inter), hidden),
        Shape(f"{model}.down", (hidden,), inter),
    ]


#: Llama-2 7B and 13B: the shapes the tools measure by default.
GPU_SHAPES = decoder_shapes("7b", 4096, 11008) + decoder_shapes("13b", 5120, 13824)
#: Deployed GQA families (benchmarks/dummy_models.py has their configs). Mistral-7B's projections
#: are Llama-3-8B's: 4096 hidden, 14336 intermediate, 8 of 32 heads for k/v (head_dim 128).
FAMILY_SHAPES = decoder_shapes("llama3-8b", 4096, 14336, 8 * 128) + decoder_shapes("qwen2.5-7b", 3584, 18944, 4 * 128)
ALL_SHAPES = GPU_SHAPES + FAMILY_SHAPES
L2_BYTES = 50 * 2**20  # the L2 of the Hopper GPUs measured


def shapes_of(*models: str) -> list[Shape]:
    """The shapes of these models ("13b", "llama3-8b", ...)."""
    return [s for s in ALL_SHAPES if s.model in models]


def write_measured(path: Path, table) -> None:
    """Write a measured table (GEMV tiles, crossover) to ``path``, keeping the shapes of the table
    already there that this run did not measure (so one model's shapes can be added to it)."""
    if path.is_file():
        measured = {s.name for s in table.shapes}
        earlier = parse_measured_table(
            type(table),
            path,
            "its other shapes cannot be kept: delete it and measure again (tools.tune_crossover --from-output "
            "writes a run's printed kernel table)",
        ).shapes
        kept = [s for s in earlier if s.name not in measured]
        table = table.model_copy(update={"shapes": kept + list(table.shapes)})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(table.model_dump_json(indent=2) + "\n")


def keeps_for(shape: Shape, sparsity: float) -> list[int]:
    """One budget per segment: the channels a token keeps at ``sparsity``."""
    return [round((1.0 - sparsity) * shape.k)] * len(shape.seg_widths)


def random_instances(shape: Shape, dtype: torch.dtype, device: str) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Distinct random weights of ``shape`` at a trained layer's scale, as [N, K] (nn.Linear's layout)
    and in the kernels' layout: enough of them to overflow L2 about four times over, so no timed call
    finds its weight in L2."""
    weight_bytes = shape.n * shape.k * torch.finfo(dtype).bits // 8
    count = min(16, max(2, -(-4 * L2_BYTES // weight_bytes)))
    weights = [torch.randn(shape.n, shape.k, dtype=dtype, device=device) * 0.02 for _ in range(count)]
    return weights, [prepare_weight(w) for w in weights]


def random_inputs(m: int, k: int, count: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    """``count`` random [m, k] activations."""
    return [torch.randn(m, k, dtype=dtype, device=device) for _ in range(count)]


def time_us(calls: list, inputs: list[torch.Tensor]) -> float:
    """Median microseconds per call. Each call's input is first rewritten in place, as the previous
    op of a decoder layer leaves it in L2; that rewrite is timed alone and subtracted. All calls (one
    per problem instance, distinct weights: no L2 reuse between them) go in one CUDA graph whose
    replays are timed, L2 flushed before each. Wall clock on CPU."""
    if not torch.cuda.is_available():
        for call in calls:
            call()  # compile
        start = time.perf_counter()
        for call in calls:
            call()
        return (time.perf_counter() - start) * 1e6 / len(calls)
    import triton

    def replay_us(steps) -> float:
        for step in steps:
            step()  # compile, and allocate the tickets before capture
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for step in steps:
                step()
        return triton.testing.do_bench(graph.replay, warmup=10, rep=50, return_mode="median") * 1e3

    rewrites = [functools.partial(torch.Tensor.mul_, x, 1.0) for x in inputs]
    both = [step for pair in zip(rewrites, calls) for step in pair]
    return (replay_us(both) - replay_us(rewrites)) / len(calls)


# --- vLLM engines on random weights -----------------------------------------------------------


def make_llm(
    model: str, sparsity: str, max_model_len: int, max_num_seqs: int, options: dict, enforce_eager: bool = False
):
    """A vLLM engine on random weights of ``model``'s shape: dense, or ActTail with budgets for
    ``sparsity`` (ACTTAIL_SPARSITY must hold it: the loader hook reads it) and ``options``;
    ``enforce_eager``: no CUDA graphs, as ``vllm serve --enforce-eager``."""
    from vllm import LLM

    kwargs = {}
    if sparsity != "dense":
        kwargs["quantization"] = "acttail"
        if options:
            kwargs["hf_overrides"] = {"quantization_config": {"quant_method": "acttail", **options}}
    return LLM(
        model=model,
        load_format="dummy",
        dtype="bfloat16",
        skip_tokenizer_init=True,
        max_model_len=max_model_len,
        max_num_seqs=max_num_seqs,
        gpu_memory_utilization=0.85,
        enforce_eager=enforce_eager,
        **kwargs,
    )


def greedy_tokens(max_tokens: int):
    """Sampling for a timed generate: exactly ``max_tokens`` greedy tokens, ids only."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=max_tokens, ignore_eos=True, temperature=0.0, detokenize=False)


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    """--shape, --sparsity and --options of the one engine an in-process study runs (profile_decode,
    stall_probe)."""
    parser.add_argument("--shape", default="13b")
    parser.add_argument("--sparsity", default="dense")
    parser.add_argument("--options", type=json.loads, default={}, help="more ActTail options, a JSON object")


def shape_engine(args: argparse.Namespace, max_model_len: int, max_num_seqs: int):
    """``make_llm`` on random weights of ``args.shape``, as ``add_engine_args`` parsed it."""
    if args.sparsity != "dense" and os.environ.get("ACTTAIL_SPARSITY") != args.sparsity:
        raise SystemExit(f"set ACTTAIL_SPARSITY={args.sparsity} (the loader hook reads it)")
    model = write_config(args.shape, Path(tempfile.mkdtemp(prefix="acttail-engine-")) / f"{args.shape}-shape")
    return make_llm(str(model), args.sparsity, max_model_len, max_num_seqs, args.options)


def token_prompts(batch: int, prompt_len: int, first: int = 0) -> list:
    """``batch`` distinct prompts of ``prompt_len`` token ids (no tokenizer needed), prompts
    ``first`` to ``first + batch - 1`` of one sequence whose every prompt starts with other ids."""
    from vllm.inputs import TokensPrompt

    return [
        TokensPrompt(prompt_token_ids=[(7 * i + j) % 31000 + 100 for j in range(prompt_len)])
        for i in range(first, first + batch)
    ]
