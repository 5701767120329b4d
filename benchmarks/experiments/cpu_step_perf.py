"""Where a CPU decode step's time goes, by library, sampled with Linux ``perf`` in vLLM's worker.

One engine of a model shape on random weights, its worker as a served one runs (one thread on this
project's 2-core machine), decodes ``--batch`` streams; ``perf record -e cpu-clock`` samples the
worker process during one timed generate. Dense vLLM, or ActTail at ``--sparsity`` with its modules
as the startup race set them or, with ``--route dense``, every step of every module with a dense
layer on that layer through the op (``cpu_dense_route.use_route``). Prints milliseconds per decode
step and the worker's samples by library, per new token of the timed generate (its prefill and the
worker's polling around it included; ``[JIT]`` is oneDNN's generated GEMM code, ``libpython`` the
interpreter):

    python3 -m benchmarks.experiments.cpu_step_perf --sparsity dense --batch 1
    python3 -m benchmarks.experiments.cpu_step_perf --sparsity 0.8 --route dense --batch 1
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path


def worker_pid() -> str:
    """vLLM's CPU worker process (``VLLM::Worker``) under this one."""
    pids = [p for p in os.listdir("/proc") if p.isdigit() and "Worker" in Path(f"/proc/{p}/comm").read_text()]
    if len(pids) != 1:
        raise SystemExit(f"expected one VLLM::Worker process, found {pids}")
    return pids[0]


def samples_by_library(perf_data: Path) -> collections.Counter[str]:
    """Samples per shared object, generated code (``perf-PID.map``) as ``[JIT]``."""
    script = subprocess.run(
        ["perf", "script", "-i", str(perf_data), "-F", "ip,dso", "-G"], capture_output=True, text=True, check=True
    )
    counts: collections.Counter[str] = collections.Counter()
    for line in script.stdout.splitlines():
        dso = line.rsplit("(", 1)[-1].rstrip(")").split("/")[-1]
        counts["[JIT]" if re.fullmatch(r"perf-\d+\.map", dso) else dso] += 1
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen2.5-0.5b")
    parser.add_argument("--sparsity", default="dense")
    parser.add_argument("--route", choices=["shipped", "dense"], default="shipped")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=128)
    args = parser.parse_args()
    if shutil.which("perf") is None:
        raise SystemExit("cpu_step_perf samples with Linux perf, which is not on PATH: install it (linux-tools)")

    from benchmarks.experiments.cpu_dense_route import decode_step_ms, use_route, worker_engine

    llm, prompts = worker_engine(args.shape, args.sparsity, args.batch, args.new_tokens)
    if args.sparsity != "dense":
        llm.collective_rpc(use_route, args=(args.route,))
    perf_data = Path(tempfile.mkdtemp(prefix="acttail-perf-")) / "worker.perf"

    @contextlib.contextmanager
    def perf_recording():
        perf = subprocess.Popen(
            ["perf", "record", "-q", "-e", "cpu-clock", "-F", "1000", "-p", worker_pid(), "-o", str(perf_data)]
        )
        time.sleep(0.5)  # perf attached
        yield
        perf.send_signal(2)
        perf.wait()

    step_ms = decode_step_ms(llm, prompts, args.new_tokens, perf_recording)
    counts = samples_by_library(perf_data)
    label = "dense" if args.sparsity == "dense" else f"acttail {args.sparsity}, route {args.route}"
    print(f"{args.shape}, {label}, batch {args.batch}: {step_ms:.2f} ms per decode step")
    print(f"worker samples (1 ms each) per new token, {sum(counts.values())} in all:")
    for dso, n in counts.most_common(12):
        print(f"  {n / args.new_tokens:7.2f}  {dso}")


if __name__ == "__main__":
    main()
