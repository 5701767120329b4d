"""Soak: ``vllm serve`` of SmolLM2-135M-Instruct on CPU with ActTail's defaults (budgets computed
from the weights at the default target) under a long streaming load on loopback, a share of the
streams cancelled by the client, then SIGTERM.

    python -m benchmarks.soak --requests 2000 --concurrency 32 --output soak.json

Every request streams a completion of a random token-id prompt (``--prompt-tokens`` MIN,MAX) for a
random number of new tokens (``--max-tokens`` MIN,MAX, EOS ignored). A ``--cancel`` share of the
streams is closed by the client after a random number of received tokens, at least one and fewer
than asked. Checks (all must hold):

- no 5xx, and every stream ends as planned (complete, or closed by the client);
- a completed stream received exactly the tokens it asked for, and its usage says so;
- vLLM's counters against what the clients received, over the run:
  ``vllm:request_success_total`` counts the completed streams, ``vllm:request_generation_tokens_sum``
  their tokens, exactly; ``vllm:prompt_tokens_total`` every stream's prompt tokens, exactly (each
  got its first token, so each prompt was prefilled); ``vllm:generation_tokens_total`` adds the
  tokens vLLM generated for the cancelled streams, which lie between what their clients read and
  what they asked for (tokens in flight when a client leaves are generated but never read);
- the resident memory of the server's processes at the end is less than 5% above their memory
  after the first ``--baseline-after`` streams (``SoakSpec.rss_growth``);
- after SIGTERM to the API server every process of the server has exited, the API server with
  status 0, within 10 s (``SoakSpec.shutdown_limit_s``).

``--dense`` runs the same load against vLLM without ActTail, as a control.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import shlex
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import openai
import psutil
from pydantic import BaseModel, ConfigDict, Field

from acttail_vllm.cli import HelpWithDefaults
from acttail_vllm.dev.models import ensure_smollm2
from acttail_vllm.dev.server import VllmServer

SERVE_ARGS = ("--enforce-eager", "--max-model-len", "512")
ACTTAIL_ARGS = ("--quantization", "acttail")
#: Prompt token ids are drawn from here (ordinary tokens of the SmolLM2 vocabulary).
TOKEN_IDS = (1000, 40000)
#: vLLM's counters the checks read, summed over their series.
COUNTERS = (
    "vllm:request_success_total",
    "vllm:request_generation_tokens_sum",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
)
RSS_SAMPLE_S = 5.0


class SoakSpec(BaseModel):
    model_config = ConfigDict(frozen=True)

    requests: int = Field(2000, gt=0)
    concurrency: int = Field(32, gt=0)
    prompt_tokens: tuple[int, int] = (8, 64)
    max_tokens: tuple[int, int] = (2, 16)
    cancel: float = Field(0.1, ge=0.0, le=1.0)
    seed: int = 0
    baseline_after: int = Field(200, ge=0)
    rss_growth: float = 0.05
    shutdown_limit_s: float = 10.0
    request_timeout_s: float = 600.0


class Stream(BaseModel):
    """One request as planned and as the client saw it."""

    prompt_tokens: int
    max_tokens: int
    cancel_after: int | None  # close the stream after this many tokens (None: read to the end)
    outcome: Literal["completed", "cancelled", "failed"] = "failed"
    received: int = 0
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    http_status: int | None = None
    error: str | None = None


class RssSample(BaseModel):
    seconds: float
    streams_done: int
    rss_bytes: int  # the server's processes together
    by_process: dict[str, int]  # "pid name" -> bytes


class Check(BaseModel):
    name: str
    ok: bool
    detail: str


class SoakResult(BaseModel):
    spec: SoakSpec
    vllm_args: list[str]
    duration_s: float
    counters_before: dict[str, float]
    counters_after: dict[str, float]
    rss: list[RssSample]
    #: the resident memory of the server's processes that live from the baseline to the end (a
    #: compiler the worker runs for a moment is not the server growing)
    rss_baseline_bytes: int | None
    rss_end_bytes: int | None
    shutdown_s: float
    exit_code: int | None
    processes_left: int
    checks: list[Check]
    streams: list[Stream]

    @property
    def passed(self) -> bool:
        return all(check.ok for check in self.checks)


def plan(spec: SoakSpec) -> tuple[list[Stream], list[list[int]]]:
    rng = random.Random(spec.seed)
    streams, prompts = [], []
    for _ in range(spec.requests):
        prompt = [rng.randint(*TOKEN_IDS) for _ in range(rng.randint(*spec.prompt_tokens))]
        max_tokens = rng.randint(*spec.max_tokens)
        cancel_after = rng.randint(1, max_tokens - 1) if max_tokens > 1 and rng.random() < spec.cancel else None
        streams.append(Stream(prompt_tokens=len(prompt), max_tokens=max_tokens, cancel_after=cancel_after))
        prompts.append(prompt)
    return streams, prompts


async def run_stream(client: openai.AsyncOpenAI, model: str, prompt: list[int], stream: Stream) -> None:
    """Fill in ``stream`` from one streamed completion (each chunk's logprobs list its tokens)."""
    try:
        response = await client.completions.create(
            model=model,
            prompt=prompt,
            max_tokens=stream.max_tokens,
            temperature=0.0,
            logprobs=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        async for chunk in response:
            for choice in chunk.choices:
                stream.received += len(choice.logprobs.tokens) if choice.logprobs else 0
            if chunk.usage is not None:
                stream.usage_prompt_tokens = chunk.usage.prompt_tokens
                stream.usage_completion_tokens = chunk.usage.completion_tokens
            if stream.cancel_after is not None and stream.received >= stream.cancel_after:
                await response.close()  # the client leaves: vLLM aborts the request
                stream.outcome = "cancelled"
                return
        stream.outcome = "completed"
    except openai.APIStatusError as exc:
        stream.http_status, stream.error = exc.status_code, f"{type(exc).__name__}: {exc}"
    except Exception as exc:  # every failure is a result to report
        stream.error = f"{type(exc).__name__}: {exc}"


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rss_by_process(pid: int) -> dict[str, int]:
    """Resident bytes of each process of the server (API server, engine core, ...)."""
    rss = {}
    for process in process_tree(pid):
        try:
            rss[f"{process.pid} {process.name()}"] = process.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return rss


def counters(metrics_text: str) -> dict[str, float]:
    values = {}
    for name in COUNTERS:
        found = re.findall(rf"^{re.escape(name)}(?:\{{[^}}]*\}})? (\S+)$", metrics_text, re.M)
        values[name] = sum(float(v) for v in found)
    return values


async def load(server: VllmServer, spec: SoakSpec, streams: list[Stream], prompts: list[list[int]]) -> list[RssSample]:
    """Run every stream, ``spec.concurrency`` at a time, sampling the server's memory meanwhile."""
    client = openai.AsyncOpenAI(
        base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=spec.request_timeout_s
    )
    queue = list(range(len(streams)))
    done = 0
    samples: list[RssSample] = []
    start = time.perf_counter()

    def sample() -> None:
        rss = rss_by_process(server.process.pid)
        samples.append(
            RssSample(
                seconds=time.perf_counter() - start, streams_done=done, rss_bytes=sum(rss.values()), by_process=rss
            )
        )

    async def worker() -> None:
        nonlocal done
        while queue:
            index = queue.pop(0)
            await run_stream(client, server.model, prompts[index], streams[index])
            done += 1
            if done == spec.baseline_after:
                sample()
            if done % 100 == 0:
                print(f"soak: {done}/{len(streams)} streams in {time.perf_counter() - start:.0f} s", file=sys.stderr)

    async def sampler() -> None:
        while True:
            sample()
            await asyncio.sleep(RSS_SAMPLE_S)

    sampling = asyncio.create_task(sampler())
    try:
        await asyncio.gather(*(worker() for _ in range(min(spec.concurrency, len(streams)))))
    finally:
        sampling.cancel()
        await client.close()
    return samples


def check(
    spec: SoakSpec,
    streams: list[Stream],
    before: dict[str, float],
    after: dict[str, float],
    baseline: int | None,
    end: int | None,
    shutdown_s: float,
    exit_code: int | None,
    left: int,
) -> list[Check]:
    delta = {name: after[name] - before[name] for name in COUNTERS}
    completed = [s for s in streams if s.outcome == "completed"]
    cancelled = [s for s in streams if s.outcome == "cancelled"]
    failed = [s for s in streams if s.outcome == "failed"]
    planned_cancels = sum(s.cancel_after is not None for s in streams)
    server_errors = [s for s in streams if s.http_status is not None and s.http_status >= 500]
    wrong = [
        s
        for s in completed
        if not s.received == s.max_tokens == s.usage_completion_tokens or s.usage_prompt_tokens != s.prompt_tokens
    ]
    completed_tokens = sum(s.received for s in completed)
    prompt_tokens = sum(s.prompt_tokens for s in streams)
    successes, completed_sum = delta["vllm:request_success_total"], delta["vllm:request_generation_tokens_sum"]
    prompt_counted, generated = delta["vllm:prompt_tokens_total"], delta["vllm:generation_tokens_total"]
    cancelled_generated = generated - completed_sum
    cancelled_read, cancelled_asked = sum(s.received for s in cancelled), sum(s.max_tokens for s in cancelled)
    growth = None if not baseline or end is None else end / baseline - 1
    return [
        Check(name="no 5xx", ok=not server_errors, detail=f"{len(server_errors)} responses with status >= 500"),
        Check(
            name="every stream ended as planned",
            ok=not failed and len(cancelled) == planned_cancels,
            detail=f"{len(completed)} completed, {len(cancelled)} cancelled by the client, {len(failed)} failed"
            + (f" (first: {failed[0].error})" if failed else ""),
        ),
        Check(
            name="completed streams got what they asked",
            ok=not wrong,
            detail=f"{len(completed) - len(wrong)}/{len(completed)} received max_tokens, as their usage says",
        ),
        Check(
            name="vllm:request_success_total = completed streams",
            ok=successes == len(completed),
            detail=f"{successes:.0f} vs {len(completed)}",
        ),
        Check(
            name="vllm:request_generation_tokens_sum = their tokens",
            ok=completed_sum == completed_tokens,
            detail=f"{completed_sum:.0f} vs {completed_tokens}",
        ),
        Check(
            name="vllm:prompt_tokens_total = prompt tokens sent",
            ok=prompt_counted == prompt_tokens,
            detail=f"{prompt_counted:.0f} vs {prompt_tokens}",
        ),
        Check(
            name="vllm:generation_tokens_total: cancelled in [read, asked]",
            ok=cancelled_read <= cancelled_generated <= cancelled_asked,
            detail=f"{generated:.0f} = {completed_sum:.0f} completed + {cancelled_generated:.0f} for cancelled "
            f"streams, which read {cancelled_read} and asked {cancelled_asked}",
        ),
        Check(
            name=f"RSS growth after {spec.baseline_after} streams < {spec.rss_growth:.0%}",
            ok=growth is not None and growth < spec.rss_growth,
            detail="no baseline"
            if growth is None
            else f"{baseline / 2**20:.0f} MiB -> {end / 2**20:.0f} MiB ({growth:+.2%})",
        ),
        Check(
            name=f"clean shutdown < {spec.shutdown_limit_s:g} s",
            ok=shutdown_s < spec.shutdown_limit_s and exit_code == 0 and left == 0,
            detail=f"{shutdown_s:.1f} s after SIGTERM, exit code {exit_code}, {left} processes left",
        ),
    ]


def shut_down(server: VllmServer, limit_s: float) -> tuple[float, int | None, int]:
    """SIGTERM to the API server, as a service manager sends it; seconds until every process of the
    server has exited, the API server's exit code, processes still alive after ``limit_s`` (killed)."""
    tree = process_tree(server.process.pid)
    start = time.perf_counter()
    server.process.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(tree, timeout=limit_s)
    seconds = time.perf_counter() - start
    for process in alive:
        process.kill()
    return seconds, server.process.wait(), len(alive)


def soak(model: str, spec: SoakSpec, extra_args: Sequence[str] = (), dense: bool = False) -> SoakResult:
    """``dense``: the same server without ActTail, a control."""
    streams, prompts = plan(spec)
    vllm_args = [*SERVE_ARGS, *(() if dense else ACTTAIL_ARGS), "--max-num-seqs", str(spec.concurrency), *extra_args]
    with VllmServer(model, vllm_args) as server:
        before = counters(server.metrics())
        start = time.perf_counter()
        samples = asyncio.run(load(server, spec, streams, prompts))
        duration = time.perf_counter() - start
        time.sleep(2.0)  # aborted requests settle in the counters
        after = counters(server.metrics())
        at_end = rss_by_process(server.process.pid)
        at_baseline = next((s.by_process for s in samples if s.streams_done >= spec.baseline_after), {})
        lasting = [name for name in at_baseline if name in at_end]
        baseline = sum(at_baseline[name] for name in lasting) if lasting else None
        end = sum(at_end[name] for name in lasting) if lasting else None
        shutdown_s, exit_code, left = shut_down(server, spec.shutdown_limit_s)
    checks = check(spec, streams, before, after, baseline, end, shutdown_s, exit_code, left)
    return SoakResult(
        spec=spec,
        vllm_args=vllm_args,
        duration_s=duration,
        counters_before=before,
        counters_after=after,
        rss=samples,
        rss_baseline_bytes=baseline,
        rss_end_bytes=end,
        shutdown_s=shutdown_s,
        exit_code=exit_code,
        processes_left=left,
        checks=checks,
        streams=streams,
    )


def format_table(result: SoakResult) -> str:
    spec = result.spec
    header = (
        f"soak: {spec.requests} streams at concurrency {spec.concurrency}, prompts {spec.prompt_tokens[0]}-"
        f"{spec.prompt_tokens[1]} tokens, {spec.max_tokens[0]}-{spec.max_tokens[1]} new tokens, "
        f"{spec.cancel:.0%} cancelled, in {result.duration_s:.0f} s"
    )
    width = max(len(c.name) for c in result.checks)
    rows = [f"{'ok' if c.ok else 'FAIL':<4}  {c.name:<{width}}  {c.detail}" for c in result.checks]
    return "\n".join([header, *rows, "PASSED" if result.passed else "FAILED"])


def _pair(text: str) -> tuple[int, int]:
    low, _, high = text.partition(",")
    return int(low), int(high or low)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=HelpWithDefaults)
    defaults = SoakSpec()
    parser.add_argument("--model", help="model directory (default: the cached SmolLM2-135M-Instruct)")
    parser.add_argument("--requests", type=int, default=defaults.requests, help="streams in all")
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency, help="streams in flight")
    parser.add_argument("--prompt-tokens", type=_pair, default=defaults.prompt_tokens, help="MIN,MAX prompt length")
    parser.add_argument("--max-tokens", type=_pair, default=defaults.max_tokens, help="MIN,MAX new tokens")
    parser.add_argument(
        "--cancel", type=float, default=defaults.cancel, help="share of streams the client closes early"
    )
    parser.add_argument(
        "--baseline-after", type=int, default=defaults.baseline_after, help="RSS baseline after this many streams"
    )
    parser.add_argument("--seed", type=int, default=defaults.seed, help="seed of the random plan")
    parser.add_argument("--vllm-args", default="", help="more `vllm serve` arguments, one string")
    parser.add_argument("--dense", action="store_true", help="serve without ActTail (a control run)")
    parser.add_argument("--output", type=Path, help="write the result here as JSON")
    args = parser.parse_args(argv)

    spec = SoakSpec(
        requests=args.requests,
        concurrency=args.concurrency,
        prompt_tokens=args.prompt_tokens,
        max_tokens=args.max_tokens,
        cancel=args.cancel,
        seed=args.seed,
        baseline_after=args.baseline_after,
    )
    result = soak(args.model or str(ensure_smollm2()), spec, shlex.split(args.vllm_args), args.dense)
    print(format_table(result))
    if args.output:
        args.output.write_text(result.model_dump_json(indent=1) + "\n")
        print(f"wrote {args.output}", file=sys.stderr)
    return 0 if result.passed else 1


if __name__ == "__main__":
    sys.exit(main())
