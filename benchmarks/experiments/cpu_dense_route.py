"""Whether a CPU server's sparsified modules gain at a step size, measured in one engine.

Under ``auto`` a CPU server races each module's sparsified call against vLLM's dense layer at
startup and sparsifies the module up to the largest step it won (``cpu_crossover``); larger steps
run vLLM's dense layer through the op. Here one engine of a model shape on random weights, its
worker as a served one runs (one thread on this project's 2-core machine,
``VLLM_CPU_OMP_THREADS_BIND=0`` set here), decodes ``--batch`` streams with the modules as the race
set them (``shipped``) and with every module's steps on its dense layer through the same op
(``dense``: the call site's token limit set to 0 in the worker, ``collective_rpc``). The two
alternate every round, so the machine's drift falls on both:

    python3 -m benchmarks.experiments.cpu_dense_route [--shape qwen2.5-0.5b] [--batch 4] [--rounds 6]

Prints each round's milliseconds per decode step (tokens after the first over the time after the
first; a 1-token generate of the same prompts subtracted) and the medians.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

SPARSITY = "0.8"


def use_route(worker, route: str) -> None:
    """In the worker: every call site as the race set it (``shipped``), or with a token limit of 0
    (``dense``: every step of a module with a dense layer runs it through the op, as a step over the
    limit does)."""
    from acttail_vllm.serving import op

    shipped = op.CallSite.__dict__.get("shipped_run") or op.CallSite.run
    op.CallSite.shipped_run = shipped
    if route == "shipped":
        op.CallSite.run = shipped
        return
    dense_sites: dict[int, op.CallSite] = {}  # each call site with a limit of 0, made once

    def run(self, *args, **kwargs):
        site = self
        if self.dense is not None:
            site = dense_sites.get(id(self)) or dense_sites.setdefault(id(self), replace(self, max_sparse_tokens=0))
        return shipped(site, *args, **kwargs)

    op.CallSite.run = run


def worker_engine(shape: str, sparsity: str, batch: int, new_tokens: int):
    """An engine of ``shape`` on random weights, dense or ActTail at ``sparsity``, its worker as a
    served one runs (one thread on this project's 2-core machine), warmed up at ``batch`` streams
    (every step size compiled); and its prompts."""
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "0")
    os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"  # collective_rpc sends use_route pickled
    if sparsity != "dense":
        os.environ["ACTTAIL_SPARSITY"] = sparsity

    from benchmarks.common import greedy_tokens, make_llm, token_prompts
    from benchmarks.dummy_models import write_config

    model = write_config(shape, Path(tempfile.mkdtemp(prefix="acttail-route-")) / f"{shape}-shape")
    llm = make_llm(str(model), sparsity, 128 + new_tokens + 16, batch, {})
    prompts = token_prompts(batch, 128)
    llm.generate(prompts, greedy_tokens(16), use_tqdm=False)
    return llm, prompts


def decode_step_ms(llm, prompts, new_tokens: int, during=contextlib.nullcontext) -> float:
    """Milliseconds per decode step: a generate of ``new_tokens`` after the first, less a 1-token
    generate of the same prompts; ``during`` is entered around the long generate alone."""
    from benchmarks.common import greedy_tokens

    start = time.perf_counter()
    llm.generate(prompts, greedy_tokens(1), use_tqdm=False)
    first = time.perf_counter() - start
    with during():
        start = time.perf_counter()
        llm.generate(prompts, greedy_tokens(new_tokens + 1), use_tqdm=False)
        whole = time.perf_counter() - start
    return (whole - first) * 1e3 / new_tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    llm, prompts = worker_engine(args.shape, SPARSITY, args.batch, args.new_tokens)
    step_ms: dict[str, list[float]] = {"shipped": [], "dense": []}
    for rnd in range(args.rounds):
        for route in ("shipped", "dense") if rnd % 2 == 0 else ("dense", "shipped"):
            llm.collective_rpc(use_route, args=(route,))
            step_ms[route].append(decode_step_ms(llm, prompts, args.new_tokens))
        print(f"round {rnd}: " + ", ".join(f"{r} {v[-1]:.2f}" for r, v in step_ms.items()), flush=True)
    shipped, dense = (statistics.median(v) for v in step_ms.values())
    print(
        f"{args.shape}, {SPARSITY} sparsity, batch {args.batch}, ms per decode step, median of {args.rounds}: "
        f"as raced {shipped:.2f}, every module dense {dense:.2f} (as raced is {dense / shipped:.3f}x as fast)"
    )


if __name__ == "__main__":
    main()
