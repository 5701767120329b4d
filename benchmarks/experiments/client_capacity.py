"""How much TTFT the load bench's client adds by itself: ``load_bench``'s streaming client against a
stand-in server whose timing is known, one token per stream every ``--tpot-ms`` (all streams in
the same step, as vLLM's batches) after ``--ttft-ms``. ``--client openai`` times the openai SDK's
stream instead, which parses every chunk into a model object (the bench's client before it parsed
only what it times).

The stand-in answers `/v1/completions` with vLLM's stream of chunks (one per token, then usage,
then ``[DONE]``) from pre-built bytes, in a process of its own, so that it costs little next to the
client. Whatever TTFT the client reports above ``--ttft-ms`` is the client's own queueing: at 64
streams of 80 tokens/s each it handles about 5,000 chunks a second. Run on the machine whose
client you want to know (CPU only):

    python3 -m benchmarks.experiments.client_capacity --concurrency 1,16,64 --tpot-ms 12 [--client openai]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import time

import openai

from benchmarks import load_bench
from benchmarks.load_bench import LoadSpec, LoadSummary, RequestRecord, run_load


def _event(data: str) -> bytes:
    """One server-sent event as one HTTP chunk."""
    event = f"data: {data}\n\n".encode()
    return f"{len(event):x}\r\n".encode() + event + b"\r\n"


HEADER = {"id": "cmpl", "object": "text_completion", "created": 0, "model": "m"}
TOKEN = _event(json.dumps({**HEADER, "choices": [{"index": 0, "text": " a", "logprobs": None, "finish_reason": None}]}))
MODELS = json.dumps({"object": "list", "data": [{"id": "m", "object": "model"}]}).encode()


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, ttft: float, tpot: float, t0: float):
    # as uvicorn does: with Nagle on, a kept-alive connection's first chunk waited 40 ms for an ACK
    writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode().split("\r\n")
            length = next(
                (int(v) for k, _, v in (h.partition(": ") for h in lines) if k.lower() == "content-length"), 0
            )
            body = json.loads(await reader.readexactly(length)) if length else {}
            if lines[0].startswith("GET"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                writer.write(f"Content-Length: {len(MODELS)}\r\n\r\n".encode() + MODELS)
                continue
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
            await writer.drain()
            tokens = body["max_tokens"]
            await asyncio.sleep(ttft)
            for _ in range(tokens):
                writer.write(TOKEN)
                # the next step of a clock shared by every stream
                step = tpot * (1 + (time.perf_counter() - t0) // tpot)
                await asyncio.sleep(max(0.0, t0 + step - time.perf_counter()))
            usage = {"prompt_tokens": 1, "completion_tokens": tokens, "total_tokens": tokens + 1}
            writer.write(_event(json.dumps({**HEADER, "choices": [], "usage": usage})))
            writer.write(_event("[DONE]") + b"0\r\n\r\n")  # vLLM's last event, the last chunk
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


def _server_main(sock: socket.socket, ttft: float, tpot: float) -> None:
    async def main() -> None:
        t0 = time.perf_counter()
        server = await asyncio.start_server(lambda r, w: _serve(r, w, ttft, tpot, t0), sock=sock)
        await server.serve_forever()

    asyncio.run(main())


def openai_stream_one(url: str):
    """A ``load_bench._stream_one`` that streams through the openai SDK (one client per event loop)."""
    clients: dict[asyncio.AbstractEventLoop, openai.AsyncOpenAI] = {}

    async def stream_one(session, model, prompt, max_tokens, t0) -> RequestRecord:
        loop = asyncio.get_running_loop()
        if loop not in clients:
            clients[loop] = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        sent = time.perf_counter()
        ttft = usage = None
        stream = await clients[loop].completions.create(
            model=model, prompt=prompt, max_tokens=max_tokens, stream=True, stream_options={"include_usage": True}
        )
        async for chunk in stream:
            if chunk.choices and ttft is None:
                ttft = time.perf_counter() - sent
            usage = chunk.usage or usage
        return RequestRecord(
            sent_s=sent - t0,
            ttft_s=ttft,
            e2e_s=time.perf_counter() - sent,
            prompt_tokens=usage.prompt_tokens,
            completion_tokens=usage.completion_tokens,
        )

    return stream_one


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,16,64", type=lambda s: [int(c) for c in s.split(",")])
    parser.add_argument("--requests-per-stream", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--ttft-ms", type=float, default=20.0)
    parser.add_argument("--tpot-ms", type=float, default=12.0)
    parser.add_argument("--client", choices=("load_bench", "openai"), default="load_bench")
    args = parser.parse_args()

    sock = socket.create_server(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = multiprocessing.get_context("fork").Process(
        target=_server_main, args=(sock, args.ttft_ms / 1e3, args.tpot_ms / 1e3), daemon=True
    )
    server.start()
    if hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) > 1:  # client and server apart
        cpus = sorted(os.sched_getaffinity(0))
        os.sched_setaffinity(server.pid, cpus[1:])
        os.sched_setaffinity(0, cpus[:1])
    if args.client == "openai":
        load_bench._stream_one = openai_stream_one(f"http://127.0.0.1:{port}")
    print(
        f"{args.client} client; stand-in server: first token after {args.ttft_ms:g} ms, "
        f"then one every {args.tpot_ms:g} ms; "
        f"{args.max_tokens} tokens +- 50% a request; client and server on CPUs {os.sched_getaffinity(0)} and "
        f"{os.sched_getaffinity(server.pid)}"
    )
    print("streams  requests  chunks/s  TTFT p50  TTFT p90  TTFT p99  TPOT p50   (ms; TTFT less the stand-in's own)")
    for concurrency in args.concurrency:
        spec = LoadSpec(
            num_requests=concurrency * args.requests_per_stream,
            concurrency=concurrency,
            max_tokens=args.max_tokens,
            max_tokens_spread=0.5,
            prompts=("p",),
        )
        run = run_load(f"http://127.0.0.1:{port}", "m", spec)
        if run.failures:
            raise SystemExit(f"{len(run.failures)} requests failed: {run.failures[0].error}")
        summary = LoadSummary.of(args.client, run)
        p50, p90, p99 = (1e3 * getattr(summary.ttft_s, p) - args.ttft_ms for p in ("p50", "p90", "p99"))
        print(
            f"{concurrency:>7} {len(run.records):>9} {summary.output_tokens_per_s:>9.0f} "
            f"{p50:>9.1f} {p90:>9.1f} {p99:>9.1f} {1e3 * summary.tpot_s.p50:>9.1f}",
            flush=True,
        )
    server.terminate()


if __name__ == "__main__":
    main()
