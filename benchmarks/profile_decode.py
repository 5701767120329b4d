"""Where a vLLM decode step spends its time: CUDA kernels per step (or, on a CPU, ops by their own
CPU time), dense vs ActTail.

Runs the engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so torch.profiler sees its
kernels, CUDA graph replays included; generates ``--steps`` tokens for ``--batch`` requests with
random weights of a model shape, and prints per decode step and batch size: kernels launched,
GPU microseconds, and the kernels by total time (name shortened). Without a GPU the same per op,
each op's time less that of the ops it calls (the profiler's own cost per op included). Compare
dense with ActTail:

    python3 -m benchmarks.profile_decode --shape 13b --sparsity dense --batches 1,16
    ACTTAIL_SPARSITY=0.8 python3 -m benchmarks.profile_decode --shape 13b --sparsity 0.8 --batches 1,16
"""

from __future__ import annotations

import argparse
import collections
import os
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import torch  # noqa: E402

from benchmarks.common import add_engine_args, greedy_tokens, shape_engine, token_prompts  # noqa: E402


def kernel_times(prof: torch.profiler.profile, cuda: bool) -> dict[str, list[float]]:
    """Kernel name -> durations in microseconds; on a CPU, op name -> self CPU times."""
    times: dict[str, list[float]] = collections.defaultdict(list)
    for event in prof.events():
        if cuda and event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name].append(event.time_range.elapsed_us())
        elif not cuda and event.device_type == torch.autograd.DeviceType.CPU:
            times[event.name].append(event.self_cpu_time_total)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(parser)
    parser.add_argument("--batches", default="1,16", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()

    llm = shape_engine(args, 64 + args.steps + 16, max(args.batches))
    params = greedy_tokens(args.steps)
    for batch in args.batches:
        prompts = token_prompts(batch, 64)
        llm.generate(prompts, params, use_tqdm=False)  # warm: every graph and kernel compiled
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        print(
            f"\n{args.shape} {args.sparsity} batch {batch}: {(time.perf_counter() - start) * 1e6 / args.steps:.0f} us "
            "wall per step (unprofiled)"
        )
        cuda = torch.cuda.is_available()
        activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
        with torch.profiler.profile(activities=[activity]) as prof:
            llm.generate(prompts, params, use_tqdm=False)
        title = f"{args.shape} {args.sparsity} batch {batch}"
        print_step_profile(kernel_times(prof, cuda), title, args.steps, args.top, "kernel" if cuda else "op")


def print_step_profile(times: dict[str, list[float]], title: str, steps: int, top: int, unit: str = "kernel") -> None:
    """Per step (one prefill among ``steps``): launches, their time, the top ``unit``s (kernels or ops)."""
    total = sum(sum(t) for t in times.values())
    launches = sum(len(t) for t in times.values())
    print(f"{title}: {launches / steps:.0f} {unit}s and {total / steps:.0f} us of {unit} time per step")
    print(f"{'us/step':>8s} {'n/step':>7s} {'us each':>8s}  {unit}")
    for name, durations in sorted(times.items(), key=lambda kv: -sum(kv[1]))[:top]:
        print(
            f"{sum(durations) / steps:8.0f} {len(durations) / steps:7.1f} {sum(durations) / len(durations):8.1f}  "
            f"{name[:110]}",
            flush=True,
        )


if __name__ == "__main__":
    main()
