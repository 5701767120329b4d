"""Wall time of each of a series of ``generate`` calls on one engine, and the Triton kernels compiled
during each: finds one-time stalls that best-of-N decode timings hide.

    ACTTAIL_SPARSITY=0.8 python3 -m benchmarks.stall_probe --shape 13b --sparsity 0.8 [--options JSON]
    ACTTAIL_SPARSITY=0.8 python3 -m benchmarks.stall_probe --shape 13b --sparsity 0.8 --mixed 1000

The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) so Triton's compile hook sees
the engine's compilations. Calls, one request each: a warm-up like vllm_decode_bench's (8 tokens),
the same 64-token prompt three times (prefix-cached after the first), then prompts not seen before
of 64, 100 and 700 tokens (700: above vLLM's largest CUDA-graph size, so run eagerly). With
``--mixed N``: one call of N requests whose prompts are 1 to ``--max-prompt`` tokens long (uniform,
seeded), batched by the engine as a server would, with ``--new-tokens`` each; the kernels compiled
while the engine started (its warm-up and CUDA-graph capture) are not counted.
"""

from __future__ import annotations

import argparse
import os
import random
import time

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"

from benchmarks.common import add_engine_args, greedy_tokens, shape_engine  # noqa: E402

COMPILED: list[str] = []


def record_compile(*args, **kwargs) -> bool:
    """Triton's jit_cache_hook: called before each compilation (or disk-cache load) of a kernel."""
    COMPILED.append(kwargs["fn"].name)
    return False  # compile as usual


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_engine_args(parser)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--mixed", type=int, help="N requests of mixed prompt lengths in one call")
    parser.add_argument("--max-prompt", type=int, default=2000)
    args = parser.parse_args()

    import triton
    from vllm.inputs import TokensPrompt

    def prompt(length: int, seed: int) -> TokensPrompt:
        return TokensPrompt(prompt_token_ids=[(7 * seed + 13 * j) % 31000 + 100 for j in range(length)])

    if args.mixed:
        llm = shape_engine(args, args.max_prompt + args.new_tokens, 64)
        triton.knobs.runtime.jit_cache_hook = record_compile
        rng = random.Random(0)
        prompts = [prompt(rng.randint(1, args.max_prompt), seed) for seed in range(args.mixed)]
        start = time.perf_counter()
        outputs = llm.generate(prompts, greedy_tokens(args.new_tokens), use_tqdm=False)
        wall = time.perf_counter() - start
        tokens = sum(len(o.prompt_token_ids) for o in outputs)
        print(
            f"{args.shape} {args.sparsity} {args.options or ''}: {args.mixed} requests, prompts of 1 to "
            f"{args.max_prompt} tokens ({tokens} in all), {args.new_tokens} new tokens each, in {wall:.1f} s"
        )
        print(f"Triton compilations after startup: {len(COMPILED)} {sorted(set(COMPILED))}")
        return

    llm = shape_engine(args, 1024, 1)
    triton.knobs.runtime.jit_cache_hook = record_compile

    calls = [("warm-up, 8 new tokens", prompt(64, 0), 8)]
    calls += [(f"same 64-token prompt, run {i + 1}", prompt(64, 0), args.new_tokens) for i in range(3)]
    calls += [(f"new {n}-token prompt", prompt(n, n), args.new_tokens) for n in (64, 100, 700)]
    print(f"{args.shape} {args.sparsity} {args.options or ''}: wall time of each generate call, one request")
    print(f"{'call':32s} {'s':>7s} {'tok/s':>7s}  Triton compilations during the call")
    for name, tokens, new_tokens in calls:
        del COMPILED[:]
        params = greedy_tokens(new_tokens)
        start = time.perf_counter()
        llm.generate([tokens], params, use_tqdm=False)
        wall = time.perf_counter() - start
        print(f"{name:32s} {wall:7.3f} {new_tokens / wall:7.1f}  {len(COMPILED)} {sorted(set(COMPILED))}", flush=True)


if __name__ == "__main__":
    main()
