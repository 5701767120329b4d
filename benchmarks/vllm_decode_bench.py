"""vLLM end-to-end decode throughput: dense vs ActTail at Llama-2 shapes with random weights.

Runs on a CUDA host with vLLM installed (see ../shared/gpu/README.md for the offline bundle):

    python3 -m benchmarks.vllm_decode_bench --shapes 13b,7b --sparsities 0.5,0.7,0.8,0.9 --batches 1,4,16

Each configuration runs in its own process (a fresh vLLM engine: `--load-format dummy`, bf16, default
torch.compile and CUDA graphs), generates `--new-tokens` tokens after a `--prompt-len` prompt for
every request of a batch (ignore_eos), and reports tokens/s = batch * new_tokens / seconds (prefill
included, as in the dense baseline quoted in the README) and decode-only tokens/s: the tokens after
the first over the time after the first, the best time of a 1-token generate of the same prompts
subtracted; and that 1-token generate's time (the batch's prefill in the engine, a time to first
token without HTTP) against dense's. The first two differ most at batch 1, where the engine
captures CUDA graphs only up to 2 tokens (max_num_seqs 1), so the prefill runs uncaptured and
ActTail's op pays its host time there (benchmarks/host_overhead.py). ActTail budgets come from the
loader hook (alphas of the random weights, cached under $ACTTAIL_CACHE between configurations).
``--extend PRIOR.json`` adds sparsities to an earlier run: its dense tok/s are reused (no dense
engine) and its rows are kept, so one shape's table can be measured in two calls under 10 minutes.
``--enforce-eager`` runs every engine without CUDA graphs (vLLM's ``enforce_eager``), where each op
call pays its host time. ``--options '{"max_sparse_tokens": 1}'`` passes more ActTail options to
every ActTail engine (through ``hf_overrides``' ``quantization_config``, as ``vllm serve
--hf-overrides`` would).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import greedy_tokens, make_llm, token_prompts
from benchmarks.dummy_models import write_config


def run_worker(args: argparse.Namespace) -> None:
    """One engine, every batch size: prints one JSON line per batch."""
    from vllm import SamplingParams

    max_len = args.prompt_len + args.new_tokens + 16
    llm = make_llm(args.model, args.sparsity, max_len, max(args.batches), args.options, args.enforce_eager)
    params, first_token = greedy_tokens(args.new_tokens), greedy_tokens(1)
    for batch in args.batches:
        prompts = token_prompts(batch, args.prompt_len)
        # Warm up with the whole batch, so no first-time work at its prefill and step sizes is timed.
        llm.generate(prompts, SamplingParams(max_tokens=8, ignore_eos=True, detokenize=False), use_tqdm=False)
        best = {}
        for _ in range(args.repeats):
            for name, sampling in (("first", first_token), ("all", params)):
                start = time.perf_counter()
                outputs = llm.generate(prompts, sampling, use_tqdm=False)
                best[name] = min(best.get(name, float("inf")), time.perf_counter() - start)
        generated = sum(len(o.outputs[0].token_ids) for o in outputs)
        decode_s = best["all"] - best["first"]
        print(
            json.dumps(
                {
                    "batch": batch,
                    "tokens": generated,
                    "seconds": best["all"],
                    "tok_s": generated / best["all"],
                    "first_token_seconds": best["first"],
                    "decode_tok_s": (generated - batch) / decode_s,
                }
            ),
            flush=True,
        )


def run_config(model: Path, sparsity: str, args: argparse.Namespace, env: dict[str, str]) -> list[dict]:
    cmd = [
        sys.executable,
        "-m",
        "benchmarks.vllm_decode_bench",
        "--worker",
        "--model",
        str(model),
        "--sparsity",
        sparsity,
        "--batches",
        ",".join(map(str, args.batches)),
        "--prompt-len",
        str(args.prompt_len),
        "--new-tokens",
        str(args.new_tokens),
        "--repeats",
        str(args.repeats),
        "--options",
        json.dumps(args.options),
        *(["--enforce-eager"] if args.enforce_eager else []),
    ]
    worker_env = {**env} if sparsity == "dense" else {**env, "ACTTAIL_SPARSITY": sparsity}
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=worker_env, capture_output=True, text=True)
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not rows:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"{model.name} {sparsity}: worker failed with {proc.returncode}")
    budget_lines = [line for line in proc.stderr.splitlines() if "ActTail:" in line and "budgets ready" in line]
    print(
        f"# {model.name} {sparsity}: engine run {time.perf_counter() - start:.0f} s"
        + (f"; {budget_lines[-1].split('ActTail: ')[-1][:120]}" if budget_lines else ""),
        flush=True,
    )
    return rows


#: What each ActTail row keeps of the dense run of its batch, as ``dense_<field>``; ``--extend``
#: reads them back (older runs lack the later two).
DENSE_FIELDS = ("tok_s", "decode_tok_s", "first_token_seconds")


def _ratio_columns(dense: float | None, acttail: float | None, fmt: str) -> str:
    """``dense | acttail | acttail / dense``, or dashes where a run did not record them (older runs)."""
    if not (dense and acttail):
        return "- | - | -"
    return f"{dense:{fmt}} | {acttail:{fmt}} | {acttail / dense:.2f}x"


def format_table(results: list[dict]) -> str:
    """The markdown table of ``results``: tok/s with the prefill, decode only, and the time to the
    first token (a 1-token generate of the batch: its prefill, in the engine) against dense."""
    lines = [
        "| shape | batch | sparsity | options | dense tok/s | acttail tok/s | speedup "
        "| decode only: dense | acttail | speedup | first token ms: dense | acttail | vs dense |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        decode = _ratio_columns(r.get("dense_decode_tok_s"), r.get("decode_tok_s"), ".0f")
        first_ms = [
            None if r.get(key) is None else 1e3 * r[key] for key in ("dense_first_token_seconds", "first_token_seconds")
        ]
        first = _ratio_columns(*first_ms, ".1f")
        lines.append(
            f"| {r['shape']} | {r['batch']} | {r['sparsity']:.1f} | {json.dumps(r.get('options', {}))} | "
            f"{r['dense_tok_s']:.0f} | {r['tok_s']:.0f} | {r['tok_s'] / r['dense_tok_s']:.2f}x | {decode} | {first} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model")
    parser.add_argument("--sparsity", default="dense")
    parser.add_argument("--shapes", default="13b,7b")
    parser.add_argument("--sparsities", default="0.5,0.7,0.8,0.9")
    parser.add_argument("--batches", default="1,4,16", type=lambda s: [int(b) for b in s.split(",")])
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="write all rows here")
    parser.add_argument("--extend", type=Path, help="an earlier --json: keep its rows, reuse its dense tok/s")
    parser.add_argument("--options", type=json.loads, default={}, help="more ActTail options, a JSON object")
    parser.add_argument("--enforce-eager", action="store_true", help="no CUDA graphs: every op call is eager")
    args = parser.parse_args()
    if args.worker:
        run_worker(args)
        return

    root = Path(tempfile.mkdtemp(prefix="acttail-bench-"))
    env = {**os.environ, "ACTTAIL_CACHE": os.environ.get("ACTTAIL_CACHE", str(root / "cache"))}
    results = json.loads(args.extend.read_text()) if args.extend else []
    for shape in args.shapes.split(","):
        model = write_config(shape, root / f"{shape}-shape")
        earlier = {r["batch"]: {f: r.get(f"dense_{f}") for f in DENSE_FIELDS} for r in results if r["shape"] == shape}
        if set(args.batches) <= set(earlier):
            dense = earlier
            print(f"# {model.name} dense: tok/s from {args.extend}", flush=True)
        else:
            dense = {r["batch"]: r for r in run_config(model, "dense", args, env)}
        for sparsity in args.sparsities.split(","):
            same = (shape, float(sparsity), args.options)
            results = [r for r in results if (r["shape"], r["sparsity"], r.get("options", {})) != same]
            for row in run_config(model, sparsity, args, env):
                results.append(
                    {
                        "shape": shape,
                        "sparsity": float(sparsity),
                        "options": args.options,
                        **{f"dense_{f}": dense[row["batch"]].get(f) for f in DENSE_FIELDS},
                        **row,
                    }
                )
    results.sort(key=lambda r: (r["shape"], r["sparsity"], json.dumps(r.get("options", {})), r["batch"]))
    print("\n" + format_table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
