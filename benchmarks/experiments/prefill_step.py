"""What a served prompt's prefill costs in one engine: wall time of a prefill step (a generate of one
token), its GPU kernel time, and the host time of ActTail's op calls in it.

Runs the engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so torch.profiler sees its
kernels and op calls. Each round prefills ``--prompts`` new prompts of ``--prompt-tokens`` tokens
together (one step: 1 x 256 is a single stream's prompt, 4 x 256 a wave at concurrency 4), every
round's prompts distinct so that the prefix cache never serves them. Prints the 10th, 50th and 90th
percentile and the mean of the wall time over ``--rounds``, then, from one profiled round: GPU time
of all kernels, of the GEMMs (names with gemm, nvjet, cutlass or xmma), and the CPU time inside
``acttail::sparse_linear`` calls. Run one engine per process, dense and ActTail one after the other
on the same GPU:

    python3 -m benchmarks.experiments.prefill_step --shape 13b --sparsity dense
    ACTTAIL_SPARSITY=0.8 python3 -m benchmarks.experiments.prefill_step --shape 13b --sparsity 0.8
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import statistics
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

import torch  # noqa: E402

from benchmarks.common import add_engine_args, greedy_tokens, shape_engine, token_prompts  # noqa: E402

GEMM = re.compile(r"gemm|nvjet|cutlass|xmma", re.IGNORECASE)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(parser)
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--prompts", default="1,4", type=lambda s: [int(p) for p in s.split(",")])
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    llm = shape_engine(args, args.prompt_tokens + 8, max(args.prompts))
    one_token = greedy_tokens(1)
    waves = itertools.count()  # each wave its own prompts, which the prefix cache has never seen

    def wave(prompts: int) -> list:
        return token_prompts(prompts, args.prompt_tokens, first=next(waves) * max(args.prompts))

    for prompts in args.prompts:
        for _ in range(3):  # warm: this step size compiled and its kernels loaded
            llm.generate(wave(prompts), one_token, use_tqdm=False)
        walls = []
        for _ in range(args.rounds):
            batch = wave(prompts)
            start = time.perf_counter()
            llm.generate(batch, one_token, use_tqdm=False)
            walls.append((time.perf_counter() - start) * 1e3)
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            llm.generate(wave(prompts), one_token, use_tqdm=False)
        deciles = statistics.quantiles(walls, n=10)  # p10, ..., p90
        gpu = gemm = op_cpu = 0.0
        op_calls = 0
        for event in prof.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:
                gpu += event.time_range.elapsed_us()
                gemm += event.time_range.elapsed_us() if GEMM.search(event.name) else 0.0
            elif event.name == "acttail::sparse_linear":
                op_cpu += event.cpu_time_total
                op_calls += 1
        print(
            f"{args.shape} {args.sparsity} {prompts} x {args.prompt_tokens} tokens: wall p10 / p50 / p90 "
            f"{' / '.join(f'{q:.1f}' for q in deciles[::4])} ms, mean {statistics.mean(walls):.1f} ms "
            f"({args.rounds} rounds); profiled round: GPU {gpu / 1e3:.2f} ms, GEMMs {gemm / 1e3:.2f} ms, "
            f"acttail op calls {op_calls} taking {op_cpu / 1e3:.2f} ms of CPU time",
            flush=True,
        )


if __name__ == "__main__":
    main()
