"""Time to first token when a closed loop's streams run in lockstep, against lengths spread apart.

``load_bench`` runs each stream as a closed loop: a request, then the next once it ends. With every
request asking for the same number of tokens, a concurrency's streams end in the same step and their
successors arrive together; the engine, idle for that moment, schedules the first arrival alone and
the rest one prefill later, or all of them at once, depending on sub-millisecond timing. TTFT then
measures how a wave splits rather than how fast a prefill runs. ``--max-tokens-spread`` gives each
request its own length (the same lengths for every server). This runs both on one dense vLLM server
of SmolLM2-135M on the CPU and prints each run's TTFTs, sorted:

    python3 -m benchmarks.experiments.lockstep_ttft [--requests 48] [--concurrency 4]
"""

from __future__ import annotations

import argparse

import numpy as np

from acttail_vllm.dev.models import ensure_smollm2
from acttail_vllm.dev.server import VllmServer
from benchmarks.load_bench import LoadSpec, LoadSummary, run_load, served_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--prompt-tokens", type=int, default=128)
    args = parser.parse_args()
    serve_args = ["--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "8"]
    with VllmServer(str(ensure_smollm2()), serve_args) as server:
        model = served_model(server.url)
        run_load(server.url, model, LoadSpec(num_requests=8, concurrency=args.concurrency, max_tokens=16))  # warm-up
        for spread in (0.0, 0.5, 0.0, 0.5):
            spec = LoadSpec(
                num_requests=args.requests,
                concurrency=args.concurrency,
                max_tokens=args.max_tokens,
                prompt_tokens=args.prompt_tokens,
                max_tokens_spread=spread,
            )
            run = run_load(server.url, model, spec)
            ttft_ms = np.sort([1e3 * r.ttft_s for r in run.records if r.ttft_s is not None])
            gaps_ms = 1e3 * np.diff(np.sort([r.sent_s for r in run.records]))
            summary = LoadSummary.of("dense", run)
            p50_ms, p90_ms = 1e3 * summary.ttft_s.p50, 1e3 * summary.ttft_s.p90
            print(
                f"spread {spread}: out tok/s {summary.output_tokens_per_s:.1f}, TTFT p50 {p50_ms:.0f} ms "
                f"(p10 {np.percentile(ttft_ms, 10):.0f}, p90 {p90_ms:.0f}); "
                f"requests sent within 5 ms of the one before: {np.mean(gaps_ms < 5):.0%}",
                flush=True,
            )
            print("  TTFT, ms, sorted:", " ".join(f"{t:.0f}" for t in ttft_ms), flush=True)


if __name__ == "__main__":
    main()
