"""Load generator for OpenAI-compatible vLLM servers: requests/s, tokens/s and latency percentiles
(TTFT, end to end, time per output token), dense against ActTail on the same server settings.

Against running servers (label=URL; the served model name is asked from /v1/models):

    python3 -m benchmarks.load_bench --url dense=http://gpu:8000 --url acttail=http://gpu:8001

Or let it start the servers one after the other with the same vLLM arguments (dense first, then
``--quantization acttail`` with the profile), each on loopback:

    python3 -m benchmarks.load_bench --model /models/Llama-3.1-8B-Instruct \\
        --profile profiles/llama-3.1-8b-acttail-50.json --vllm-args "--max-model-len 4096" \\
        --requests 500 --concurrency 32 --max-tokens 256 --output bench.json

``--interleave ROUNDS`` starts every server at once instead (each with its share of GPU memory, from
``--gpu-memory-utilization`` in ``--vllm-args``) and sends each concurrency's load to them in turn,
ROUNDS times with the order rotating, so that a drift of the machine falls on every server alike;
it prints each round's ratio against the dense round beside it, how far one run would stray.

Every request streams (for TTFT), ignores EOS (so both servers generate the same number of tokens)
and has its own timeout; the run ends after ``--requests`` requests whatever happens to them. TTFT
is the first streamed token, as vLLM counts it: the first chunk, whose text may be empty where the
detokenizer holds back a byte token that is not yet a whole character. Random weights can pick such
tokens (a request of the Llama-2-13B shape streamed 170 tokens and no text), and dense and ActTail
pick different ones, so timing the first text would charge a server for its outputs; the table says
how many first tokens streamed no text.
``--max-tokens-spread`` varies the requests' lengths (the same lengths on every server), so that
the streams of a closed loop do not end and restart in lockstep, which makes TTFT depend on whether
a wave of arrivals lands in one prefill step or two (benchmarks/experiments/lockstep_ttft.py). A
closed loop's first ``--concurrency`` requests go out together and their prompts queue for prefill
at once, so the table also gives the TTFT p50 of that first wave and of the requests after it.
Each ratio of TTFT p50s comes with a 95% bootstrap interval over the run's requests
(``ttft_ratio_interval``): how far the requests' own scatter moves it.
``--request-rate`` sends requests at seeded Poisson arrival times instead (open loop, as `vllm bench
serve --request-rate`; the same times on every server), ``--concurrency`` then capping how many are
in flight: arrivals no longer wait on the server's own completions, so TTFT compares servers under
the same offered load. ``--output`` writes the pooled summaries and every run with each request's
send time, TTFT and duration.

Beside the client's view it reports the engine's: the means of vLLM's own per-request histograms
(queue, prefill, TTFT, decode) over each run's requests, from the server's /metrics before and after
the run. They leave out the HTTP server and the client, so two servers' prefill times compare more
closely than their TTFT percentiles.

``--pin-cpus`` gives every started server its own physical cores, the same number each, and keeps
the client on the first core and any left over. Steps outside CUDA graphs (prefill beyond the
captured sizes) are host-bound, so servers that share cores, or share one with the client or with
the interrupts CPU 0 takes, differ by where the scheduler put them.

Identical servers started together keep offsets of their own through every round (TTFT p50 10-17%
apart on an H200, docs/performance.md), so one run cannot tell a server's offset from its method.
``--start-rotation K`` starts the servers rotated by K places (K = 1: the second one first), and
``--pool`` reads the reports of several runs, each of fresh servers, and prints their runs as one
table with each report's ratios:

    python3 -m benchmarks.load_bench --pool run0.json run1.json run2.json

``--ratios`` reads reports of servers that need not be the same (memory share, pinning, client)
and prints each report's ratios against its own dense server, in report order, and their
geometric means, which do not pool requests across servers.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import shlex
import sys
import time
from collections.abc import Sequence
from itertools import cycle
from pathlib import Path
from typing import TypeVar

import aiohttp
import numpy as np
import requests
from pydantic import BaseModel, ConfigDict, Field

#: Short, varied prompts: different prefixes so that prefix caching does not skip the prefill.
DEFAULT_PROMPTS: tuple[str, ...] = (
    "Explain why the sky is blue in two sentences.",
    "Write a short poem about a lighthouse keeper.",
    "List three uses of a paperclip that are not holding paper.",
    "Summarize the plot of a heist movie you invent on the spot.",
    "What are the main differences between a lake and a pond?",
    "Describe the smell of rain to someone who has never experienced it.",
    "Give step-by-step instructions for brewing a cup of green tea.",
    "Why do cats purr? Answer like a biology teacher.",
    "Translate 'good morning, how did you sleep?' into French and Spanish.",
    "Invent a board game for four players and describe its rules.",
    "What would happen if the Moon were twice as far from the Earth?",
    "Write a product description for a solar-powered backpack.",
)
PERCENTILES = (50, 90, 95, 99)
#: Random prompt token ids stay below this (every Llama-2-shaped and SmolLM2 vocabulary is larger).
TOKEN_ID_LIMIT = 30000


class LoadSpec(BaseModel):
    """What one load run sends: ``prompts``, or with ``prompt_tokens`` prompts of that many random
    token ids (each request its own, so prefix caching skips none of them)."""

    model_config = ConfigDict(frozen=True)

    num_requests: int = Field(200, gt=0)
    concurrency: int = Field(16, gt=0)
    max_tokens: int = Field(64, gt=0)
    request_timeout_s: float = Field(300.0, gt=0)
    prompts: tuple[str, ...] = Field(DEFAULT_PROMPTS, min_length=1)
    prompt_tokens: int | None = Field(None, gt=0)
    #: Each request asks for max_tokens x (1 +- up to this), the same lengths for every run of the
    #: spec: streams then end at different steps and new requests arrive while others decode, as on a
    #: live server. With equal lengths the streams of a closed loop end together and their
    #: successors arrive together, so TTFT measures whether a wave lands in one prefill step or two.
    max_tokens_spread: float = Field(0.0, ge=0.0, lt=1.0)
    #: Requests per second arriving at Poisson times (open loop), at most ``concurrency`` in flight;
    #: None: a closed loop of ``concurrency`` streams, each sending its next request when one ends.
    request_rate: float | None = Field(None, gt=0)

    @property
    def load(self) -> tuple[int, float | None]:
        """What runs of this spec are compared and pooled by: concurrency and arrival rate."""
        return self.concurrency, self.request_rate

    @property
    def load_name(self) -> str:
        """``16`` for a closed loop of 16 streams, ``16@6/s`` for 6 requests/s with at most 16 in flight."""
        return str(self.concurrency) if self.request_rate is None else f"{self.concurrency}@{self.request_rate:g}/s"

    def prompt_list(self) -> list[str | list[int]]:
        if self.prompt_tokens is None:
            return [prompt for prompt, _ in zip(cycle(self.prompts), range(self.num_requests))]
        rng = np.random.default_rng(int(time.time() * 1e6) % 2**32)
        return [rng.integers(100, TOKEN_ID_LIMIT, self.prompt_tokens).tolist() for _ in range(self.num_requests)]

    def max_tokens_list(self) -> list[int]:
        """Each request's max_tokens, in the order the requests are sent (a fixed seed: every server
        of a comparison gets the same lengths)."""
        spread = round(self.max_tokens * self.max_tokens_spread)
        if not spread:
            return [self.max_tokens] * self.num_requests
        lengths = np.random.default_rng(0).integers(
            self.max_tokens - spread, self.max_tokens + spread + 1, self.num_requests
        )
        return [max(1, int(n)) for n in lengths]

    def arrival_times(self) -> list[float | None]:
        """When each request is due, in seconds from the run's start (a fixed seed: the same on every
        server); None each in a closed loop, where a request goes as soon as a stream is free."""
        if self.request_rate is None:
            return [None] * self.num_requests
        gaps = np.random.default_rng(1).exponential(1.0 / self.request_rate, self.num_requests)
        return np.cumsum(gaps).tolist()


class RequestRecord(BaseModel):
    """One request as the client saw it (times in seconds from the run's start)."""

    sent_s: float
    #: the first token: vLLM streams a chunk for each, its text empty while the detokenizer holds
    #: back an incomplete character (random weights' byte tokens)
    ttft_s: float | None = None
    #: the first chunk with text; later than ``ttft_s`` where the first tokens decode to no text
    first_text_s: float | None = None
    e2e_s: float
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None


#: vLLM's per-request histograms (seconds), by the name the bench reports them under.
ENGINE_HISTOGRAMS: dict[str, str] = {
    "queue": "vllm:request_queue_time_seconds",  # arrival to scheduled
    "prefill": "vllm:request_prefill_time_seconds",  # scheduled to first token
    "ttft": "vllm:time_to_first_token_seconds",  # arrival to first token
    "decode": "vllm:request_decode_time_seconds",  # first token to last
}


class EngineTimes(BaseModel):
    """Sums of vLLM's per-request histograms over some requests, in seconds, and how many requests."""

    requests: int
    queue_s: float
    prefill_s: float
    ttft_s: float
    decode_s: float

    def __add__(self, other: EngineTimes) -> EngineTimes:
        return EngineTimes(**{k: v + getattr(other, k) for k, v in self})

    def __sub__(self, other: EngineTimes) -> EngineTimes:
        return EngineTimes(**{k: v - getattr(other, k) for k, v in self})

    def mean_ms(self, name: str) -> float:
        """Mean per request of one histogram (a key of ``ENGINE_HISTOGRAMS``), in milliseconds."""
        return 1000 * getattr(self, f"{name}_s") / self.requests if self.requests else float("nan")


def engine_times(url: str) -> EngineTimes | None:
    """The server's histogram sums so far (every engine's), or None where its /metrics does not
    have them all (not a vLLM server)."""
    from prometheus_client.parser import text_string_to_metric_families

    response = requests.get(f"{url}/metrics", timeout=30)
    if response.status_code != 200:
        return None
    sums: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name.endswith(("_sum", "_count")):
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
    names = [*ENGINE_HISTOGRAMS.values()]
    if not all(f"{name}_sum" in sums and f"{name}_count" in sums for name in names):
        return None
    # every request of a finished run is in each histogram once; the prefill count stands for them
    return EngineTimes(
        requests=int(sums[f"{ENGINE_HISTOGRAMS['prefill']}_count"]),
        **{f"{key}_s": sums[f"{name}_sum"] for key, name in ENGINE_HISTOGRAMS.items()},
    )


class LoadRun(BaseModel):
    url: str
    model: str
    spec: LoadSpec
    started_at: float  # unix time
    duration_s: float
    records: list[RequestRecord]
    #: vLLM's own times for this run's requests (None: the server has no such histograms)
    engine: EngineTimes | None = None

    @property
    def failures(self) -> list[RequestRecord]:
        return [r for r in self.records if r.error is not None]

    @property
    def completion_tokens(self) -> int:
        return sum(r.completion_tokens for r in self.records)


class Percentiles(BaseModel):
    mean: float
    p50: float
    p90: float
    p95: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Percentiles | None:
        if not values:
            return None
        p = np.percentile(np.asarray(values, dtype=np.float64), PERCENTILES)
        return cls(mean=float(np.mean(values)), **{f"p{q}": float(v) for q, v in zip(PERCENTILES, p)})


class FirstWave(BaseModel):
    """A closed loop's start: its first ``requests`` requests go out together, so their prompts
    queue for prefill at once (64 prompts of 256 tokens fill two of vLLM's 8,192-token steps). TTFT
    of those and of the requests after them, apart."""

    requests: int
    ttft_s: Percentiles
    later_ttft_s: Percentiles | None

    @classmethod
    def of(cls, records: Sequence[RequestRecord]) -> FirstWave | None:
        """Of a closed loop's successful requests: the first wave is every request sent before any
        ended (of pooled runs, each run's: a run sends its later requests as its own requests end)."""
        timed = [r for r in records if r.ttft_s is not None]
        if not timed:
            return None
        first_end = min(r.sent_s + r.e2e_s for r in timed)
        first = [r.ttft_s for r in timed if r.sent_s < first_end]
        later = [r.ttft_s for r in timed if r.sent_s >= first_end]
        return cls(requests=len(first), ttft_s=Percentiles.of(first), later_ttft_s=Percentiles.of(later))


class LoadSummary(BaseModel):
    label: str
    url: str
    model: str
    spec: LoadSpec
    requests_ok: int
    requests_failed: int
    duration_s: float
    requests_per_s: float
    output_tokens_per_s: float
    total_tokens_per_s: float
    ttft_s: Percentiles | None
    e2e_s: Percentiles | None
    #: (e2e - ttft) / (completion tokens - 1): the decode rate one request sees
    tpot_s: Percentiles | None
    first_errors: list[str]
    engine: EngineTimes | None = None
    #: requests whose first token streamed no text, and by how long their first text followed it
    #: (None: never, within the request)
    text_lags_s: list[float | None] = Field(default_factory=list)
    #: closed loops of several streams only
    first_wave: FirstWave | None = None
    #: every successful request's TTFT, for ``ttft_ratio_interval`` (not written to reports: their
    #: runs keep the records)
    ttft_sample_s: list[float] = Field(default_factory=list, exclude=True)

    @classmethod
    def of(cls, label: str, run: LoadRun) -> LoadSummary:
        ok = [r for r in run.records if r.error is None]
        ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
        tokens_out = sum(r.completion_tokens for r in ok)
        tokens_all = tokens_out + sum(r.prompt_tokens for r in ok)
        tpot = [
            (r.e2e_s - r.ttft_s) / (r.completion_tokens - 1)
            for r in ok
            if r.ttft_s is not None and r.completion_tokens > 1
        ]
        return cls(
            label=label,
            url=run.url,
            model=run.model,
            spec=run.spec,
            requests_ok=len(ok),
            requests_failed=len(run.failures),
            duration_s=run.duration_s,
            requests_per_s=len(ok) / run.duration_s,
            output_tokens_per_s=tokens_out / run.duration_s,
            total_tokens_per_s=tokens_all / run.duration_s,
            ttft_s=Percentiles.of(ttfts),
            e2e_s=Percentiles.of([r.e2e_s for r in ok]),
            tpot_s=Percentiles.of(tpot),
            first_errors=[r.error for r in run.failures[:5]],
            engine=run.engine,
            text_lags_s=[
                None if r.first_text_s is None else r.first_text_s - r.ttft_s
                for r in ok
                # older reports have no first text: their ttft_s was it
                if r.ttft_s is not None and "first_text_s" in r.model_fields_set and r.first_text_s != r.ttft_s
            ],
            first_wave=FirstWave.of(ok) if run.spec.request_rate is None and run.spec.concurrency > 1 else None,
            ttft_sample_s=ttfts,
        )


class ServerRun(BaseModel):
    """One run of one spec on one server; ``round`` counts a server's runs of a spec from 0."""

    label: str
    round: int = Field(0, ge=0)
    run: LoadRun


class BenchReport(BaseModel):
    """The file ``--output`` writes: per server and concurrency the pooled summary, and every run
    with its requests (when each was sent, its TTFT and duration); with ``--pin-cpus`` the CPUs of
    the client and of each server."""

    summaries: list[LoadSummary]
    vllm_args: list[str] = Field(default_factory=list)
    cpus: dict[str, list[int]] | None = None
    #: The started servers' labels in the order they started.
    started: list[str] | None = None
    runs: list[ServerRun] = Field(default_factory=list)


async def _stream_one(
    session: aiohttp.ClientSession, model: str, prompt: str | list[int], max_tokens: int, t0: float
) -> RequestRecord:
    """One streamed completion. Only the chunks up to the first text and the usage chunk are
    parsed: at 64 streams a client that parsed every chunk (the openai SDK's) spends a whole core on
    some 5,000 chunks a second and queues them, which adds its own wait to every TTFT
    (benchmarks/experiments/client_capacity.py)."""
    sent = time.perf_counter()
    ttft = first_text = None
    usage = None
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    async with session.post("/v1/completions", json=body) as response:
        if response.status != 200:
            raise RuntimeError(f"HTTP {response.status}: {(await response.read())[:300]!r}")
        async for line in response.content:
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                break
            # JSON escapes a quote inside text, so these keys appear unescaped only as keys
            if first_text is not None and b'"prompt_tokens"' not in data and b'"error"' not in data:
                continue
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"the server streamed an error: {chunk['error']}")
            if chunk.get("choices"):
                now = time.perf_counter() - sent
                if ttft is None:
                    ttft = now
                if first_text is None and chunk["choices"][0].get("text"):
                    first_text = now
            usage = chunk.get("usage") or usage
    end = time.perf_counter()
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk")
    return RequestRecord(
        sent_s=sent - t0,
        ttft_s=ttft,
        first_text_s=first_text,
        e2e_s=end - sent,
        prompt_tokens=usage["prompt_tokens"],
        completion_tokens=usage["completion_tokens"],
    )


async def run_load_async(url: str, model: str, spec: LoadSpec) -> LoadRun:
    """Send ``spec.num_requests`` streaming completions, at most ``spec.concurrency`` at a time, each
    no earlier than its arrival time (open loop)."""
    streams = min(spec.concurrency, spec.num_requests)
    session = aiohttp.ClientSession(
        base_url=url,
        connector=aiohttp.TCPConnector(limit=streams),
        timeout=aiohttp.ClientTimeout(total=spec.request_timeout_s),
    )
    queue = list(zip(spec.prompt_list(), spec.max_tokens_list(), spec.arrival_times()))[::-1]  # popped: in order
    records: list[RequestRecord] = []
    started_at = time.time()
    t0 = time.perf_counter()

    async def worker() -> None:
        while queue:
            prompt, max_tokens, due = queue.pop()
            if due is not None:
                await asyncio.sleep(max(0.0, t0 + due - time.perf_counter()))
            sent = time.perf_counter()
            try:
                record = await asyncio.wait_for(
                    _stream_one(session, model, prompt, max_tokens, t0), spec.request_timeout_s
                )
            except Exception as exc:  # every failure is a result to report, not a reason to stop
                record = RequestRecord(
                    sent_s=sent - t0, e2e_s=time.perf_counter() - sent, error=f"{type(exc).__name__}: {exc}"
                )
            records.append(record)

    try:
        await asyncio.gather(*(worker() for _ in range(streams)))
    finally:
        await session.close()
    return LoadRun(
        url=url, model=model, spec=spec, started_at=started_at, duration_s=time.perf_counter() - t0, records=records
    )


def run_load(url: str, model: str, spec: LoadSpec) -> LoadRun:
    return asyncio.run(run_load_async(url, model, spec))


def served_model(url: str) -> str:
    """The one model a vLLM server serves (its /v1/models)."""
    models = requests.get(f"{url}/v1/models", timeout=30).json()["data"]
    if len(models) != 1:
        raise SystemExit(f"{url} serves {len(models)} models ({[m['id'] for m in models]}): pass --model-name")
    return models[0]["id"]


def format_table(summaries: Sequence[LoadSummary]) -> str:
    """One row per run; beside each non-dense run, its output tok/s and TTFT p50 against the dense
    run at the same concurrency (the first run labelled ``dense``). Then the engine's times, where
    the servers report them."""

    def ms(p: Percentiles | None, key: str) -> str:
        return "-" if p is None else f"{1000 * getattr(p, key):.1f}"

    dense = {s.spec.load: s for s in summaries if s.label == "dense"}
    header = (
        f"{'label':<13} {'load':>8} {'ok':>5} {'fail':>4} {'out tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
        f"{'TPOT p50':>9} {'TPOT p99':>9} {'decode tok/s':>12} {'vs dense: out tok/s':>19} {'TTFT p50':>9}   (ms)"
    )
    rows = []
    for s in summaries:
        base = dense.get(s.spec.load)
        full_batch = s.tpot_s is not None and s.spec.request_rate is None
        decode = f"{s.spec.concurrency / s.tpot_s.p50:.0f}" if full_batch else "-"
        ratios = ["", ""]
        if base is not None and s is not base and base.output_tokens_per_s > 0:
            ratios[0] = f"{s.output_tokens_per_s / base.output_tokens_per_s:.3f}x"
            if s.ttft_s is not None and base.ttft_s is not None:
                ratios[1] = f"{s.ttft_s.p50 / base.ttft_s.p50:.3f}x"
        rows.append(
            f"{s.label:<13} {s.spec.load_name:>8} {s.requests_ok:>5} {s.requests_failed:>4} "
            f"{s.output_tokens_per_s:>10.1f} {ms(s.ttft_s, 'p50'):>9} {ms(s.ttft_s, 'p99'):>9} "
            f"{ms(s.tpot_s, 'p50'):>9} {ms(s.tpot_s, 'p99'):>9} {decode:>12} {ratios[0]:>19} {ratios[1]:>9}"
        )
    note = (
        "load: concurrency (closed loop) or concurrency@requests/s (open loop); decode tok/s: concurrency / "
        "TPOT p50, the aggregate decode rate of a full batch (closed loop only)"
    )
    lags = [format_text_lags(s) for s in summaries if s.text_lags_s]
    intervals = [
        format_ttft_interval(s, base)
        for s in summaries
        if (base := dense.get(s.spec.load)) is not None and s is not base and s.ttft_sample_s and base.ttft_sample_s
    ]
    waves = [format_first_wave(s, dense.get(s.spec.load)) for s in summaries if s.first_wave is not None]
    engine = format_engine_table(summaries)
    return "\n".join([header, *rows, note, *lags, *intervals, *waves, *([engine] if engine else [])])


def ttft_ratio_interval(
    sample_s: Sequence[float], base_s: Sequence[float], level: float = 0.95, resamples: int = 2000, seed: int = 0
) -> tuple[float, float]:
    """Bootstrap interval of median(sample) / median(base): where the ratio of TTFT p50s lands when
    each side's requests are drawn again, with replacement. It holds the request-to-request scatter
    of one run only; a server's own offset, which two identical servers show, comes on top."""
    rng = np.random.default_rng(seed)

    def medians(values: Sequence[float]) -> np.ndarray:
        values = np.asarray(values, dtype=np.float64)
        return np.median(rng.choice(values, size=(resamples, len(values))), axis=1)

    low, high = np.quantile(medians(sample_s) / medians(base_s), [(1 - level) / 2, (1 + level) / 2])
    return float(low), float(high)


def format_ttft_interval(s: LoadSummary, base: LoadSummary) -> str:
    low, high = ttft_ratio_interval(s.ttft_sample_s, base.ttft_sample_s)
    ratio = s.ttft_s.p50 / base.ttft_s.p50  # the table's ratio, of the same requests
    return (
        f"{s.label} {s.spec.load_name}: TTFT p50 {ratio:.3f}x dense's; its {len(s.ttft_sample_s)} and dense's "
        f"{len(base.ttft_sample_s)} requests drawn again put 95% of it within {low:.3f}-{high:.3f}x"
    )


def format_first_wave(s: LoadSummary, base: LoadSummary | None) -> str:
    """TTFT p50 of a closed loop's first wave and of the requests after it, and against dense's."""
    wave = s.first_wave
    later = wave.later_ttft_s
    text = (
        f"{s.label} {s.spec.load_name}: TTFT p50 of the first wave ({wave.requests} requests sent before any "
        f"ended) {1000 * wave.ttft_s.p50:.1f} ms, of the {s.requests_ok - wave.requests} after it "
        + ("-" if later is None else f"{1000 * later.p50:.1f} ms")
    )
    dense = None if base is None or base is s else base.first_wave
    if dense is not None and later is not None and dense.later_ttft_s is not None:
        text += f" ({wave.ttft_s.p50 / dense.ttft_s.p50:.3f}x and {later.p50 / dense.later_ttft_s.p50:.3f}x dense's)"
    return text


def format_text_lags(s: LoadSummary) -> str:
    """How many of a run's first tokens streamed no text (a client that times the first text would
    see their TTFT later by the lag)."""
    lags = [lag for lag in s.text_lags_s if lag is not None]
    median = f", first text {1000 * float(np.median(lags)):.1f} ms later at the median" if lags else ""
    never = len(s.text_lags_s) - len(lags)
    return (
        f"{s.label} {s.spec.load_name}: {len(s.text_lags_s)} of {s.requests_ok} first tokens streamed no text"
        f"{median}{f', {never} never any' if never else ''}"
    )


def format_engine_table(summaries: Sequence[LoadSummary]) -> str:
    """vLLM's own mean times per request, one row per run that has them, and the client's TTFT mean
    beside its TTFT (their difference is time outside the engine: HTTP, tokenizer, streaming,
    client); beside each non-dense run, its prefill and TTFT means against the dense run at the same
    concurrency."""
    have = [s for s in summaries if s.engine is not None]
    if not have:
        return ""
    dense = {s.spec.load: s.engine for s in have if s.label == "dense"}
    header = (
        f"{'label':<13} {'load':>8} {'requests':>8} {'queue':>8} {'prefill':>8} {'TTFT':>8} {'decode':>9} "
        f"{'client TTFT':>11} {'vs dense: prefill':>17} {'TTFT':>7}   (ms)"
    )
    rows = []
    for s in have:
        engine, base = s.engine, dense.get(s.spec.load)
        ratios = ["", ""]
        if base is not None and engine is not base and base.requests:
            ratios = [f"{engine.mean_ms(key) / base.mean_ms(key):.3f}x" for key in ("prefill", "ttft")]
        rows.append(
            f"{s.label:<13} {s.spec.load_name:>8} {engine.requests:>8} {engine.mean_ms('queue'):>8.1f} "
            f"{engine.mean_ms('prefill'):>8.1f} {engine.mean_ms('ttft'):>8.1f} {engine.mean_ms('decode'):>9.1f} "
            f"{'-' if s.ttft_s is None else f'{1000 * s.ttft_s.mean:.1f}':>11} {ratios[0]:>17} {ratios[1]:>7}"
        )
    note = (
        "vLLM's own means per request (its histograms over the same requests): without HTTP and client; "
        "client TTFT: the client's mean"
    )
    return "\n".join([header, *rows, note])


def _parse_urls(values: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for value in values:
        label, sep, url = value.partition("=")
        if not sep or not url.startswith("http"):
            raise SystemExit(f"--url {value!r}: expected LABEL=http://HOST:PORT, e.g. dense=http://127.0.0.1:8000")
        pairs.append((label, url.rstrip("/")))
    return pairs


def warmed_run(url: str, model: str, spec: LoadSpec, warmup: int) -> LoadRun:
    """``warmup`` unreported requests (first-batch compilation and allocations), then the run, with
    the engine's times of its requests."""
    if warmup:
        run_load(url, model, spec.model_copy(update={"num_requests": warmup, "request_rate": None}))
    before = engine_times(url)
    run = run_load(url, model, spec)
    after = engine_times(url)
    if before is not None and after is not None:
        run.engine = after - before
    return run


def merged_run(runs: Sequence[LoadRun]) -> LoadRun:
    """Several runs of one spec on one server as one: their requests together, over their summed
    durations."""
    records = [record for run in runs for record in run.records]
    engines = [run.engine for run in runs]
    engine = None if None in engines else sum(engines[1:], engines[0])
    duration_s = sum(run.duration_s for run in runs)
    return runs[0].model_copy(update={"records": records, "duration_s": duration_s, "engine": engine})


def pooled(label: str, runs: Sequence[LoadRun]) -> LoadSummary:
    """One summary of several runs of one spec on one server (``merged_run``)."""
    return LoadSummary.of(label, merged_run(runs))


def _by_server_and_load(runs: Sequence[ServerRun]) -> dict[tuple[str, tuple[int, float | None]], list[ServerRun]]:
    groups: dict[tuple[str, tuple[int, float | None]], list[ServerRun]] = {}
    for r in runs:
        groups.setdefault((r.label, r.run.spec.load), []).append(r)
    return groups


def summaries_of(runs: Sequence[ServerRun]) -> list[LoadSummary]:
    """Each server's runs of a load (concurrency and rate) pooled into one summary, in the order they
    first ran."""
    return [pooled(label, [r.run for r in group]) for (label, _), group in _by_server_and_load(runs).items()]


def format_spread(runs: Sequence[ServerRun], unit: str = "round") -> str:
    """Per label and load, each round's (``unit``'s) output tok/s and TTFT p50 against the dense
    one of the same number, and the geometric means of those ratios: how far one run's ratio strays,
    and where the ratios lie taken together."""
    groups = _by_server_and_load(runs)
    rounds = {key: {r.round: LoadSummary.of(r.label, r.run) for r in group} for key, group in groups.items()}
    lines = [
        f"per {unit}, against the dense {unit} beside it: out tok/s ratios; TTFT p50 ratios "
        "(their geometric means: out tok/s, TTFT p50)"
    ]
    for (label, load), summaries in rounds.items():
        dense = rounds.get(("dense", load), {})
        if label == "dense" or not dense:
            continue
        pairs = [(summaries[i], dense[i]) for i in sorted(summaries) if i in dense]
        out = [r.output_tokens_per_s / d.output_tokens_per_s for r, d in pairs]
        ttft = [r.ttft_s.p50 / d.ttft_s.p50 for r, d in pairs if r.ttft_s and d.ttft_s]
        load_name = next(iter(summaries.values())).spec.load_name
        lines.append(
            f"{label:<13} {load_name:>8}  "
            + " ".join(f"{x:.3f}x" for x in out)
            + "; "
            + " ".join(f"{x:.3f}x" for x in ttft)
            + f" ({_format_geometric_mean(out)}, {_format_geometric_mean(ttft)})"
        )
    return "\n".join(lines)


def _format_geometric_mean(ratios: Sequence[float]) -> str:
    return f"{float(np.exp(np.mean(np.log(ratios)))):.3f}x" if ratios else "-"  # no TTFT where none streamed


def _write_report(path: Path, report: BenchReport) -> None:
    path.write_text(report.model_dump_json(indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


def read_reports(paths: Sequence[Path], flag: str) -> list[BenchReport]:
    """The ``--output`` reports that ``flag`` names."""
    reports = []
    for path in paths:
        try:
            reports.append(BenchReport.model_validate_json(path.read_text()))
        except (OSError, ValueError) as error:
            first_line = str(error).splitlines()[0]
            raise SystemExit(
                f"{flag} {path}: not a load_bench report ({first_line}); pass files written by --output"
            ) from None
    return reports


def require_same_servers(paths: Sequence[Path], reports: Sequence[BenchReport]) -> None:
    """Reports whose requests pool must have run the same vLLM arguments."""
    for path, report in zip(paths, reports):
        if report.vllm_args != reports[0].vllm_args:
            raise SystemExit(
                f"--pool {path} ran `vllm serve` with {shlex.join(report.vllm_args)!r}, {paths[0]} with "
                f"{shlex.join(reports[0].vllm_args)!r}: pool reports of the same servers"
            )


def pooled_runs(reports: Sequence[BenchReport]) -> tuple[list[ServerRun], list[ServerRun]]:
    """(every run of the reports, rounds numbered on from report to report; each report's runs of
    a server and load merged into one, numbered by report)."""
    runs, per_report = [], []
    for i, report in enumerate(reports):
        offset = len({r.round for r in runs})
        runs += [r.model_copy(update={"round": offset + r.round}) for r in report.runs]
        for (label, _), group in _by_server_and_load(report.runs).items():
            per_report.append(ServerRun(label=label, round=i, run=merged_run([r.run for r in group])))
    return runs, per_report


def format_pool(
    paths: Sequence[Path],
    reports: Sequence[BenchReport],
    summaries: Sequence[LoadSummary],
    per_report: Sequence[ServerRun],
) -> str:
    """The pooled table, then each report's start order and ratios."""
    starts = [
        f"report {i}: {path}"
        + (f", started {' / '.join(r.started)}" if r.started else "")
        + (f", CPUs {'; '.join(f'{label} {format_cpu_list(c)}' for label, c in r.cpus.items())}" if r.cpus else "")
        for i, (path, r) in enumerate(zip(paths, reports))
    ]
    return "\n".join([format_table(summaries), *starts, format_spread(per_report, unit="report")])


def format_ratios(paths: Sequence[Path], reports: Sequence[BenchReport]) -> str:
    """Each report's ratios against its own dense server and their geometric means, for reports
    whose servers differ (memory share, client, pinning), whose requests therefore do not pool."""
    starts = [
        f"report {i}: {path}, `vllm serve` {shlex.join(r.vllm_args)}" for i, (path, r) in enumerate(zip(paths, reports))
    ]
    return "\n".join([*starts, format_spread(pooled_runs(reports)[1], unit="report")])


def format_cpu_list(cpus: Sequence[int]) -> str:
    """``cpus`` as a Linux CPU list (``1-5,8``), the inverse of ``parse_cpu_list``."""
    runs: list[list[int]] = []
    for cpu in sorted(cpus):
        if runs and cpu == runs[-1][1] + 1:
            runs[-1][1] = cpu
        else:
            runs.append([cpu, cpu])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def parse_cpu_list(text: str) -> list[int]:
    """CPUs of a Linux CPU list such as ``0-3,8,10-11`` (sysfs, ``taskset -c``)."""
    cpus = []
    for part in text.strip().split(","):
        first, _, last = part.partition("-")
        cpus += range(int(first), int(last or first) + 1)
    return cpus


def physical_cores(cpus: Sequence[int], sysfs: Path = Path("/sys/devices/system/cpu")) -> list[list[int]]:
    """``cpus`` grouped by physical core (hyperthread siblings together), ordered by lowest CPU; a CPU
    whose topology sysfs does not list is a core of its own."""
    cores: dict[int, list[int]] = {}
    for cpu in sorted(cpus):
        siblings = sysfs / f"cpu{cpu}" / "topology" / "thread_siblings_list"
        core = min(parse_cpu_list(siblings.read_text())) if siblings.is_file() else cpu
        cores.setdefault(core, []).append(cpu)
    return [cores[core] for core in sorted(cores)]


def cpu_shares(cores: Sequence[Sequence[int]], servers: int) -> tuple[list[int], list[list[int]]]:
    """(the client's CPUs, each server's CPUs): whole cores, as many for every server; the client
    keeps the first core (where CPU 0 and its interrupts are) and the cores left over."""
    per_server = (len(cores) - 1) // servers
    if per_server < 1:
        raise ValueError(
            f"--pin-cpus: {servers} servers and the client need {servers + 1} physical cores, this process may "
            f"use {len(cores)} ({', '.join(map(str, (cpu for core in cores for cpu in core)))}); drop --pin-cpus "
            "or start fewer servers"
        )
    shares = [
        [cpu for core in cores[1 + i * per_server : 1 + (i + 1) * per_server] for cpu in core] for i in range(servers)
    ]
    client = [cpu for core in [cores[0], *cores[1 + servers * per_server :]] for cpu in core]
    return client, shares


#: The label of ``--dense-control``'s second dense server.
DENSE_CONTROL = "dense again"


#: What a started server runs: its label, `vllm serve` arguments and environment.
ServerSpec = tuple[str, list[str], dict[str, str]]


def _server_runs(args: argparse.Namespace, vllm_args: list[str]) -> list[ServerSpec]:
    """Each server to start: dense first (and with ``--dense-control`` a second dense server, whose
    ratio to the first is the bench's own scatter), then ActTail's."""
    runs = [("dense", vllm_args, {})]
    if args.dense_control:
        runs.append((DENSE_CONTROL, vllm_args, {}))
    acttail_args = [*vllm_args, "--quantization", "acttail"]
    if args.profile:
        runs.append(("acttail", acttail_args, {"ACTTAIL_PROFILE": str(args.profile)}))
    runs += [(f"acttail {s:.0%}", acttail_args, {"ACTTAIL_SPARSITY": str(s)}) for s in args.sparsity or []]
    return runs


def _cpu_set(cpus: dict[str, list[int]], label: str) -> frozenset[int] | None:
    return frozenset(cpus[label]) if label in cpus else None


T = TypeVar("T")


def _rotated(items: Sequence[T], places: int) -> list[T]:
    """``items`` starting from the one ``places`` on, wrapping around."""
    first = places % len(items)
    return [*items[first:], *items[:first]]


def _pin_cpus(labels: Sequence[str], rotation: int = 0) -> dict[str, list[int]]:
    """Pin this process to the client's share and return {"client" and each label: CPUs}; label i gets
    share i + ``rotation`` (wrapping around)."""
    client, shares = cpu_shares(physical_cores(sorted(os.sched_getaffinity(0))), len(labels))
    shares = _rotated(shares, rotation)
    os.sched_setaffinity(0, client)
    cpus = {"client": client, **dict(zip(labels, shares))}
    print("CPUs: " + "; ".join(f"{label} {format_cpu_list(c)}" for label, c in cpus.items()), file=sys.stderr)
    return cpus


def _keep_server_evidence(args: argparse.Namespace, label: str, server) -> None:
    """Startup log (budgets, CUDA graphs) and final /metrics, under --server-logs; gzipped, since
    committed results travel with the checkout to every GPU command, whose size is capped."""
    if args.server_logs:
        args.server_logs.mkdir(parents=True, exist_ok=True)
        name = label.replace(" ", "_").replace("%", "")
        for suffix, text in (("metrics", server.metrics(timeout_s=30)), ("log", server.log())):
            with gzip.open(args.server_logs / f"{name}.{suffix}.gz", "wt") as out:
                out.write(text)


def _bench_started_servers(
    args: argparse.Namespace, specs: Sequence[LoadSpec], servers: Sequence[ServerSpec], cpus: dict[str, list[int]]
) -> list[ServerRun]:
    from acttail_vllm.dev.server import VllmServer

    runs = []
    for label, server_args, env in servers:
        print(f"starting the {label} server ...", file=sys.stderr)
        with VllmServer(str(args.model), server_args, env=env, cpus=_cpu_set(cpus, label)) as server:
            model = served_model(server.url)
            for spec in specs:
                runs.append(ServerRun(label=label, run=warmed_run(server.url, model, spec, args.warmup)))
                print(format_table(summaries_of(runs[-1:])), file=sys.stderr)
            _keep_server_evidence(args, label, server)
    return runs


def _bench_interleaved(
    args: argparse.Namespace, specs: Sequence[LoadSpec], server_specs: Sequence[ServerSpec], cpus: dict[str, list[int]]
) -> list[ServerRun]:
    """Every server up at once on the one GPU (``--vllm-args`` must leave each its share of the
    memory), then ``--interleave`` rounds of each spec sent to the servers in turn, the order rotating
    every round, so that drifts of the host and the GPU fall on every server alike."""
    from contextlib import ExitStack

    from acttail_vllm.dev.server import VllmServer

    runs: list[ServerRun] = []
    with ExitStack() as stack:
        servers = []
        for label, server_args, env in server_specs:
            print(f"starting the {label} server ...", file=sys.stderr)
            server = stack.enter_context(VllmServer(str(args.model), server_args, env=env, cpus=_cpu_set(cpus, label)))
            servers.append((label, server, served_model(server.url)))
        for spec in specs:
            spec_runs = []
            for i in range(args.interleave):
                for label, server, model in servers[i % len(servers) :] + servers[: i % len(servers)]:
                    run = warmed_run(server.url, model, spec, args.warmup if i == 0 else 0)
                    spec_runs.append(ServerRun(label=label, round=i, run=run))
            runs += spec_runs
            print(format_table(summaries_of(spec_runs)), file=sys.stderr)
        for label, server, _ in servers:
            _keep_server_evidence(args, label, server)
    print(format_spread(runs))
    return runs


def _numbers(parse):
    def parse_list(text: str) -> list:
        return [parse(item) for item in text.split(",") if item.strip()]

    return parse_list


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", action="append", metavar="LABEL=URL", help="a running server (repeatable)")
    target.add_argument("--model", type=Path, help="model directory: start a dense and an ActTail server on it")
    target.add_argument(
        "--pool",
        type=Path,
        nargs="+",
        metavar="REPORT",
        help="reports (--output) of earlier runs of the same servers: their runs pooled, and each report's ratios",
    )
    target.add_argument(
        "--ratios",
        type=Path,
        nargs="+",
        metavar="REPORT",
        help="reports (--output) of runs of any servers: each report's ratios, in report order, and their "
        "geometric means",
    )
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--profile", type=Path, help="ActTail profile JSON for the started ActTail server")
    budget.add_argument(
        "--sparsity",
        type=_numbers(float),
        help="ActTail target sparsities, one server each, comma-separated (budgets built at load)",
    )
    parser.add_argument("--vllm-args", default="", help="extra `vllm serve` arguments for both servers, one string")
    parser.add_argument("--model-name", help="model name for --url servers (default: what /v1/models lists)")
    parser.add_argument("--requests", type=int, help="requests per concurrency (default: --rounds x concurrency)")
    parser.add_argument(
        "--rounds", type=int, default=4, help="requests per concurrency = rounds x concurrency, at least --min-requests"
    )
    parser.add_argument(
        "--min-requests", type=int, default=8, help="at least this many requests per concurrency (percentiles of few)"
    )
    parser.add_argument("--concurrency", type=_numbers(int), default=[16], help="comma-separated, measured in order")
    parser.add_argument(
        "--prompt-tokens", type=int, help="prompts of this many random token ids instead of the text prompts"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--max-tokens-spread",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="each request asks for --max-tokens x (1 +- up to FRACTION), the same lengths on every server, "
        "so that streams do not start and end in lockstep (e.g. 0.5)",
    )
    parser.add_argument(
        "--request-rate",
        type=_numbers(float),
        metavar="RATES",
        help="requests/s arriving at Poisson times (open loop), one rate per --concurrency value, which then "
        "caps the requests in flight (e.g. --concurrency 16,64 --request-rate 6,20)",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    parser.add_argument("--warmup", type=int, default=8, help="requests sent before measuring (not reported)")
    parser.add_argument("--output", type=Path, help="write the report here as JSON")
    parser.add_argument(
        "--server-logs", type=Path, help="with --model: keep each server's log and final /metrics here, gzipped"
    )
    parser.add_argument(
        "--interleave",
        type=int,
        metavar="ROUNDS",
        help="with --model: start every server at once and send each concurrency's load to them in turn, "
        "ROUNDS times, the order rotating (give each server its share of GPU memory in --vllm-args)",
    )
    parser.add_argument(
        "--pin-cpus",
        action="store_true",
        help="with --model: run each server on physical cores of its own, as many for each, and this client "
        "on the first core and those left over",
    )
    parser.add_argument(
        "--start-rotation",
        type=int,
        default=0,
        metavar="K",
        help="with --model: start the servers rotated by K places (1: the second first), so that runs started "
        "in different orders and pooled with --pool tell a server's offset from its place in the start order",
    )
    parser.add_argument(
        "--cpu-rotation",
        type=int,
        default=0,
        metavar="K",
        help="with --pin-cpus: give each server the cores of the server K places after it, so that runs pooled "
        "with --pool tell a server's offset from the cores it ran on",
    )
    parser.add_argument(
        "--dense-control",
        action="store_true",
        help=f"with --model: also start a second dense server ({DENSE_CONTROL!r}), the same as the first, "
        "so its ratios to dense show what the bench measures between two identical servers",
    )
    args = parser.parse_args(argv)
    if args.ratios:
        print(format_ratios(args.ratios, read_reports(args.ratios, "--ratios")))
        return
    if args.pool:
        reports = read_reports(args.pool, "--pool")
        require_same_servers(args.pool, reports)
        runs, per_report = pooled_runs(reports)
        summaries = summaries_of(runs)
        print(format_pool(args.pool, reports, summaries, per_report))
        if args.output:
            _write_report(args.output, BenchReport(summaries=summaries, vllm_args=reports[0].vllm_args, runs=runs))
        return
    if not 0 <= args.max_tokens_spread < 1:
        parser.error(f"--max-tokens-spread {args.max_tokens_spread} is not a fraction in [0, 1): e.g. 0.5")
    rates = args.request_rate or [None] * len(args.concurrency)
    if len(rates) != len(args.concurrency) or not all(rate is None or rate > 0 for rate in rates):
        parser.error(
            f"--request-rate {','.join(map(str, args.request_rate))}: give one rate above 0 per --concurrency "
            f"value ({len(args.concurrency)}), e.g. --concurrency 16,64 --request-rate 6,20"
        )
    if args.dense_control and args.model is None:
        parser.error("--dense-control starts a second dense server, so it needs --model; with --url, add it as a --url")
    if args.start_rotation and args.model is None:
        parser.error("--start-rotation orders the servers it starts, so it needs --model; start --url servers yourself")
    if args.pin_cpus and args.model is None:
        parser.error("--pin-cpus pins the servers it starts, so it needs --model; pin --url servers with taskset")
    if args.cpu_rotation and not args.pin_cpus:
        parser.error("--cpu-rotation moves pinned servers' cores: add --pin-cpus, e.g. --pin-cpus --cpu-rotation 1")

    specs = [
        LoadSpec(
            num_requests=args.requests or max(args.min_requests, args.rounds * c),
            concurrency=c,
            max_tokens=args.max_tokens,
            max_tokens_spread=args.max_tokens_spread,
            request_timeout_s=args.timeout,
            prompt_tokens=args.prompt_tokens,
            request_rate=rate,
        )
        for c, rate in zip(args.concurrency, rates)
    ]
    vllm_args = shlex.split(args.vllm_args)
    if args.interleave is not None and (args.model is None or args.interleave < 1):
        parser.error("--interleave takes a number of rounds (1 or more) and --model: it starts the servers itself")
    cpus: dict[str, list[int]] = {}
    started = None
    if args.model is not None:
        if args.profile is None and args.sparsity is None:
            parser.error("--model needs --profile or --sparsity for the ActTail server")
        if args.profile is not None and not args.profile.is_file():
            parser.error(
                f"--profile {args.profile} does not exist: build one with `acttail profile MODEL --sparsity S -o FILE`"
            )
        servers = _server_runs(args, vllm_args)
        if args.pin_cpus:  # each label's cores whatever the start order
            try:
                cpus = _pin_cpus([label for label, _, _ in servers], args.cpu_rotation)
            except ValueError as error:
                parser.error(str(error))
        servers = _rotated(servers, args.start_rotation)
        started = [label for label, _, _ in servers]
        bench = _bench_interleaved if args.interleave else _bench_started_servers
        runs = bench(args, specs, servers, cpus)
    else:
        runs = [
            ServerRun(label=label, run=warmed_run(url, args.model_name or served_model(url), spec, args.warmup))
            for label, url in _parse_urls(args.url)
            for spec in specs
        ]

    summaries = summaries_of(runs)
    print(format_table(summaries))
    if args.output:
        _write_report(
            args.output,
            BenchReport(summaries=summaries, vllm_args=vllm_args, runs=runs, cpus=cpus or None, started=started),
        )


if __name__ == "__main__":
    main()
