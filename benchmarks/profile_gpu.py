"""Time ``profile_from_weights`` on a Llama-2-13B-shaped model with random weights on one device.

40 layers x 7 projections (hidden 5120, intermediate 13824), random normal weights generated on the
device one projection at a time (never the whole model in memory), profiled once per eigenvalue
dtype and estimator. Prints total and per-stage seconds (stages: ``profiler.STAGES``; "read" is the
time spent generating the weights). Target on an H100: under 60 s per run.

    python3 -m benchmarks.profile_gpu                              # the full model on CUDA
    python3 -m benchmarks.profile_gpu --layers 2 --device cpu      # a quick check without a GPU
"""

from __future__ import annotations

import argparse
import time

import torch

from acttail_vllm.profiling.allocation import DEFAULT_ESTIMATOR, AllocationSpec
from acttail_vllm.profiling.builder import STAGES, profile_from_weights
from acttail_vllm.profiling.profile import PROJECTION_NAMES


def projection_shapes(hidden: int, intermediate: int, kv_dim: int) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each projection, Hugging Face layout."""
    return {
        "q_proj": (hidden, hidden),
        "k_proj": (kv_dim, hidden),
        "v_proj": (kv_dim, hidden),
        "o_proj": (hidden, hidden),
        "gate_proj": (intermediate, hidden),
        "up_proj": (intermediate, hidden),
        "down_proj": (hidden, intermediate),
    }


def random_weights(
    num_layers: int, shapes: dict[str, tuple[int, int]], device: torch.device, dtype: torch.dtype, seed: int
):
    gen = torch.Generator(device=device).manual_seed(seed)
    for layer in range(num_layers):
        for proj in PROJECTION_NAMES:
            yield layer, proj, torch.randn(*shapes[proj], generator=gen, device=device, dtype=dtype) * 0.02


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--hidden", type=int, default=5120)
    parser.add_argument("--intermediate", type=int, default=13824)
    parser.add_argument("--kv-dim", type=int, default=None, help="k/v output size (default: hidden, no GQA)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--weight-dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16")
    parser.add_argument("--eigen-dtypes", nargs="+", choices=("float64", "float32"), default=["float64", "float32"])
    parser.add_argument("--estimators", nargs="+", choices=("hill", "ww"), default=[DEFAULT_ESTIMATOR])
    parser.add_argument(
        "--linalg", choices=("default", "cusolver", "magma"), default="default", help="CUDA linalg backend"
    )
    parser.add_argument("--target", type=float, default=0.8)
    args = parser.parse_args()

    device = torch.device(args.device)
    if device.type == "cuda":
        if args.linalg != "default":
            torch.backends.cuda.preferred_linalg_library(args.linalg)
        torch.linalg.eigvalsh(torch.eye(8, device=device, dtype=torch.float64))  # CUDA / cuSOLVER start-up
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, linalg {args.linalg}")
    else:
        print(f"device: cpu ({torch.get_num_threads()} threads), torch {torch.__version__}")
    shapes = projection_shapes(args.hidden, args.intermediate, args.kv_dim or args.hidden)
    print(
        f"model: {args.layers} layers x {len(PROJECTION_NAMES)} projections, hidden {args.hidden}, "
        f"intermediate {args.intermediate}, weights {args.weight_dtype}"
    )

    for estimator in args.estimators:
        alphas_by_dtype: dict[str, list[float]] = {}
        for eigen_dtype in args.eigen_dtypes:
            stages: dict[str, float] = {}
            start = time.perf_counter()
            profile = profile_from_weights(
                "random-llama",
                "LlamaForCausalLM",
                args.layers,
                random_weights(args.layers, shapes, device, getattr(torch, args.weight_dtype), seed=0),
                AllocationSpec(args.target, estimator=estimator),
                eigen_dtype=getattr(torch, eigen_dtype),
                stage_seconds=stages,
            )
            total = time.perf_counter() - start
            alphas = [p.alpha for layer in profile.layers for p in layer.projections.values()]
            alphas_by_dtype[eigen_dtype] = alphas
            per_stage = " | ".join(f"{stage} {stages.get(stage, 0.0):.2f}" for stage in STAGES)
            print(
                f"estimator {estimator}, eigen dtype {eigen_dtype}: total {total:.2f} s | {per_stage} "
                f"| alpha {min(alphas):.3f}..{max(alphas):.3f}",
                flush=True,
            )
        if {"float64", "float32"} <= set(alphas_by_dtype):
            worst = max(abs(a - b) / b for a, b in zip(alphas_by_dtype["float32"], alphas_by_dtype["float64"]))
            print(f"estimator {estimator}: float32 vs float64 alpha, max relative difference {worst:.2e}")


if __name__ == "__main__":
    main()
