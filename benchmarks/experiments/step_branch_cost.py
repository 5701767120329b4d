"""What a CPU step pays for ActTail on a module: through its op, or behind the branch on the step
size that the linear method compiles (``SparseLinearState.branch_on_step_size``).

vLLM's CPU mode traces one graph for every step size, so a module sparsified at small steps is in
every step's graph. Here one module as the linear method leaves it on a CPU (budget set, policy
auto, token limit ``--limit``, counting), its step of ``--rows`` tokens compiled with inductor
(dynamic step size) three ways: ``dense`` calls vLLM's dense layer alone (dense vLLM), ``op`` the
registered op, which sends a step over the limit to that layer from its Python, and ``branch``
the module's compiled call as shipped, a ``torch.cond`` on the step size between that layer and
the op. Over the limit the three compute the same; within it ``op`` and ``branch`` do, and
``dense`` is the layer they beat or not. One thread, as vLLM's served worker runs on this
project's 2-core machine; the three alternate every round:

    python3 -m benchmarks.experiments.step_branch_cost [--out 1536,1536 --in 576] [--rows 4] [--limit 2]
        [--dtype float32]

Prints each way's median microseconds per call over the rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def build_module(out_sizes: list[int], k: int, limit: int, dtype: torch.dtype):
    """A CPU module with its ActTail state as loading leaves it under policy auto, sparsified up to
    ``limit`` tokens (80% of its inputs dropped) and counting."""
    from acttail_vllm.dev.cpu_module import cpu_sparse_module
    from acttail_vllm.serving.budgets import DecoderProjection, ModuleBudget
    from acttail_vllm.serving.op import register_sparse_linear_op
    from acttail_vllm.serving.settings import ActTailSettings

    register_sparse_linear_op()  # as vLLM's plugin does: compiled code calls the op, opaque
    proj = DecoderProjection(0, "gate_up_proj", tuple(f"seg{i}" for i in range(len(out_sizes))))
    layer, _ = cpu_sparse_module(proj, out_sizes, k, torch.Generator().manual_seed(0), dtype)
    budget = ModuleBudget.from_sparsities((0.8,) * len(out_sizes), k)
    layer.acttail.set_budget(budget, ActTailSettings(), limit, counts_stats=True, ever_sparsified=True)
    return layer


def compiled_ways(layer):
    state = layer.acttail
    op_state = (state.keep, state.thr_guess, state.stats)
    ways = {
        "dense": lambda x: state.dense(x, None),
        "op": lambda x: torch.ops.acttail.sparse_linear(x, layer.weight, None, *op_state),
        "branch": lambda x: state.sparse_linear(x, layer.weight, None),
    }
    return {name: torch.compile(fn, backend="inductor", dynamic=True) for name, fn in ways.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="1536,1536", help="output segments (default: SmolLM2's gate_up)")
    parser.add_argument("--in", dest="k", type=int, default=576, help="input features")
    parser.add_argument("--rows", type=int, default=4, help="tokens of the timed step (over --limit: dense)")
    parser.add_argument("--limit", type=int, default=2, help="the module's token limit")
    parser.add_argument("--calls", type=int, default=500, help="calls per way and round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    args = parser.parse_args()
    torch.set_num_threads(1)
    dtype = getattr(torch, args.dtype)
    layer = build_module([int(n) for n in args.out.split(",")], args.k, args.limit, dtype)
    ways = compiled_ways(layer)
    x = torch.randn(args.rows, args.k, dtype=dtype)
    expected = ways["dense" if args.rows > args.limit else "op"](x)
    for name, fn in ways.items():
        for rows in (1, args.limit + 1):  # both sides of the limit traced and run once
            fn(torch.randn(rows, args.k, dtype=dtype))
        if name != "dense" or args.rows > args.limit:
            torch.testing.assert_close(fn(x), expected, rtol=0, atol=0, msg=f"{name} computes another step")
    times: dict[str, list[float]] = {name: [] for name in ways}
    with torch.no_grad():
        for _ in range(args.rounds):
            for name, fn in ways.items():
                start = time.perf_counter()
                for _ in range(args.calls):
                    fn(x)
                times[name].append((time.perf_counter() - start) / args.calls * 1e6)
    shape = f"out {args.out}, in {args.k}, {args.rows} tokens, limit {args.limit}, {args.dtype}"
    print(f"{shape}, 1 thread, torch {torch.__version__}")
    dense = statistics.median(times["dense"])
    for name, values in times.items():
        median = statistics.median(values)
        spread = f"rounds {min(values):.1f}-{max(values):.1f}"
        print(f"{name:6s} {median:8.1f} us a call ({median - dense:+.1f} over dense; {spread})")


if __name__ == "__main__":
    main()
