"""What a CPU step over a module's token limit pays for going through ActTail's op, against a branch
on the step size inside the compiled graph (``torch.cond``).

vLLM's CPU mode traces one graph for every step size, so a module sparsified at small steps calls
the op at every step, and the op sends the larger ones to vLLM's dense layer. Here one module as the
linear method leaves it on a CPU (budget set, policy auto, token limit ``--limit``, counting), its
step of ``--rows`` tokens compiled with inductor (dynamic step size) three ways, each on vLLM's
dense layer at that size: ``dense`` calls the dense layer alone (dense vLLM), ``op`` the module's
compiled call (the shipped route), ``cond`` a ``torch.cond`` on the step size whose dense branch is
the dense layer and whose sparse branch masks the input (traceable stand-in: the registered op
updates its counters in place, which a branch may not), with the counts added after the branch.
One thread, as vLLM's served worker runs on this project's 2-core machine; the three alternate
every round:

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
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod

    from acttail_kernels import cpu
    from acttail_vllm.serving.budgets import DecoderProjection, ModuleBudget
    from acttail_vllm.serving.linear_method import SparseLinearState
    from acttail_vllm.serving.op import register_sparse_linear_op
    from acttail_vllm.serving.settings import ActTailSettings

    register_sparse_linear_op()  # as vLLM's plugin does: compiled code calls the op, opaque
    gen = torch.Generator().manual_seed(0)
    weight = (torch.randn(sum(out_sizes), k, generator=gen) / k**0.5).to(dtype)
    layer = torch.nn.Module()
    names = tuple(f"seg{i}" for i in range(len(out_sizes)))
    layer.acttail = SparseLinearState(DecoderProjection(0, "gate_up_proj", names), out_sizes, (1, 1), on_gpu=False)
    layer.weight = torch.nn.Parameter(cpu.prepare_weight(weight, layer.acttail.seg_bounds), requires_grad=False)
    layer.acttail.add_dense_layer(UnquantizedLinearMethod(), weight.clone(), None)
    budget = ModuleBudget.from_sparsities((0.8,) * len(out_sizes), k)
    layer.acttail.set_budget(budget, ActTailSettings(), limit, counts_stats=True, ever_sparsified=True)
    return layer, budget


def compiled_ways(layer, budget, limit: int):
    from acttail_kernels import reference
    from acttail_vllm.serving.stats import TokenPath, new_stats, token_stat

    state = layer.acttail
    keep, segments = budget.seg_keep[0], len(budget.seg_keep)
    per_token = {"sparse": new_stats(segments), "dense": new_stats(segments)}  # counters a token adds
    per_token["sparse"][:segments] = torch.tensor(budget.seg_keep)
    per_token["sparse"][token_stat(TokenPath.SPARSE_GEMV, segments)] = 1
    per_token["dense"][:segments] = budget.in_features
    per_token["dense"][token_stat(TokenPath.UNSPARSIFIED, segments)] = 1

    def sparse_branch(x):
        return state.dense(x * reference.topk_mask(x, keep), None), per_token["sparse"] * x.shape[0]

    def dense_branch(x):
        return state.dense(x, None), per_token["dense"] * x.shape[0]

    def cond(x):
        y, counts = torch.cond(x.shape[0] <= limit, sparse_branch, dense_branch, (x,))
        state.stats.add_(counts)
        return y

    ways = {
        "dense": lambda x: state.dense(x, None),
        "op": lambda x: state.sparse_linear(x, layer.weight, None),
        "cond": cond,
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
    layer, budget = build_module([int(n) for n in args.out.split(",")], args.k, args.limit, dtype)
    ways = compiled_ways(layer, budget, args.limit)
    x = torch.randn(args.rows, args.k, dtype=dtype)
    expected = ways["dense"](x)
    for name, fn in ways.items():
        for rows in (1, args.rows):  # both branches traced and run once
            fn(torch.randn(rows, args.k, dtype=dtype))
        torch.testing.assert_close(fn(x), expected, rtol=0, atol=0, msg=f"{name} differs from the dense layer")
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
