"""The main job on the shipped default model: serve SmolLM2-135M-Instruct with ActTail through
vLLM's OpenAI-compatible server, ask it something, and show the sparsity it applied.

    python -m acttail_vllm.dev.demo [--profile PATH]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import openai

from acttail_vllm.dev.models import ensure_smollm2
from acttail_vllm.dev.server import VllmServer

DEFAULT_PROFILE = Path(__file__).resolve().parents[2] / "profiles" / "smollm2-135m-instruct-acttail-50.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, default=DEFAULT_PROFILE)
    args = parser.parse_args()

    model = str(ensure_smollm2())
    print(f"model: {model}\nprofile: {args.profile}")
    start = time.perf_counter()
    server = VllmServer(
        model,
        ("--quantization", "acttail", "--max-model-len", "1024"),
        env={"ACTTAIL_PROFILE": str(args.profile), "ACTTAIL_METRICS_INTERVAL_S": "0.5"},
    )
    with server:
        print(f"vllm serve {model} --quantization acttail: healthy after {time.perf_counter() - start:.0f} s")
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        question = "What is the capital of France? Answer in one sentence."
        t0 = time.perf_counter()
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0.0
        )
        elapsed = time.perf_counter() - t0
        print(f"\nQ: {question}\nA: {chat.choices[0].message.content.strip()}")
        tokens = chat.usage.completion_tokens
        print(f"({tokens} tokens in {elapsed:.2f} s, {tokens / elapsed:.1f} tok/s on this machine)")
        time.sleep(1.0)
        metrics = server.metrics()
        print("\nActTail metrics (excerpt of /metrics):")
        for line in metrics.splitlines():
            if line.startswith(("acttail_info", "acttail_tokens_total", "acttail_profile_build")) or (
                line.startswith("acttail_kept_fraction_ratio") and 'layer="0"' in line
            ):
                print("  " + line)


if __name__ == "__main__":
    main()
