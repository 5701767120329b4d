"""How to run the dense fallback (cuBLAS on the sparsified input) of a merged projection, measured.

Above the crossover batch size ``sparse_linear`` multiplies each output segment's sparsified input
by the dense weight. A merged projection (QKV: 3 segments, gate_up: 2) has one sparsified copy of x
per segment, ``xs`` [S, M, K]. This prints, per shape and batch size, microseconds for:

* dense:      F.linear(x, W), W [N, K] (what vLLM runs without ActTail; no selection);
* dense_t:    x @ Wt, Wt [K, N] (the kernel layout; no selection);
* per_seg:    dispatch.per_segment_dense: one cuBLAS call per segment, then torch.cat (xs given);
* stacked:    dispatch.stacked_dense, the fallback up to 16 tokens for segments of unequal widths
              (xs given): one cuBLAS call on xs viewed as [S*M, K], then each segment's own rows (a cat);
* bmm:        dispatch.batched_dense, the fallback up to 16 tokens for equally wide segments
              (Llama-2's qkv and gate_up): one batched cuBLAS call whose output view strides into
              [M, N], so no copy follows;
* select:     topk_select alone, writing xs.

Then selection alone against the number of range-test programs per SM
(``SelectOptions.range_programs_per_sm``): more programs decide more threshold bits at once, each
loads the row.

    python3 -m benchmarks.experiments.fallback_variants     # needs CUDA; timing: benchmarks.common.time_us
"""

from __future__ import annotations

import functools

import torch

from acttail_kernels.dispatch import batched_dense, per_segment_dense, stacked_dense
from acttail_kernels.topk_select import SelectOptions, keep_tensor, topk_select
from benchmarks.common import GPU_SHAPES, keeps_for, random_inputs, random_instances, time_us


def main() -> None:
    dtype, device = torch.bfloat16, "cuda"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {dtype}; microseconds per call")
    print(
        f"{'shape':14s} {'M':>3s} {'dense':>7s} {'dense_t':>7s} {'per_seg':>7s} {'stacked':>7s} "
        f"{'bmm':>7s} {'select':>7s}"
    )
    for shape in GPU_SHAPES:
        for m in (2, 4, 8, 16):
            weights, weights_t = random_instances(shape, dtype, device)
            xs = random_inputs(m, shape.k, len(weights), dtype, device)
            keep = keep_tensor(keeps_for(shape, 0.5), device)
            sels = [topk_select(x, keep, with_list=False).xs for x in xs]
            bounds = shape.seg_bounds
            equal_merged = len(set(shape.seg_widths)) == 1 < len(shape.seg_widths)
            if equal_merged:  # the in-place batched GEMM must give what one GEMM per segment gives
                torch.testing.assert_close(
                    batched_dense(sels[0], weights_t[0], None), per_segment_dense(sels[0], weights_t[0], None, bounds)
                )

            def timed(fn, args, inputs):
                return time_us([functools.partial(fn, *a) for a in args], inputs)

            cols = [
                timed(torch.nn.functional.linear, zip(xs, weights), xs),
                timed(torch.matmul, zip(xs, weights_t), xs),
                timed(lambda s, w: per_segment_dense(s, w, None, bounds), zip(sels, weights_t), sels),
                timed(lambda s, w: stacked_dense(s, w, None, bounds), zip(sels, weights_t), sels),
                timed(lambda s, w: batched_dense(s, w, None), zip(sels, weights_t), sels) if equal_merged else None,
                timed(lambda x: topk_select(x, keep, with_list=False), [(x,) for x in xs], xs),
            ]
            print(
                f"{shape.name:14s} {m:3d} " + " ".join("      -" if c is None else f"{c:7.1f}" for c in cols),
                flush=True,
            )

    per_sm = (1, 2, 4, 8, 16)
    print(f"\nselection us by range programs per SM {per_sm}")
    for k, segs in ((5120, 1), (5120, 3), (13824, 1)):
        for m in (1, 4, 16):
            xs = random_inputs(m, k, 8, dtype, device)
            keep = keep_tensor([k // 2] * segs, device)
            cols = []
            for programs in per_sm:
                options = SelectOptions(range_programs_per_sm=programs)
                calls = [functools.partial(topk_select, x, keep, False, options=options) for x in xs]
                cols.append(time_us(calls, xs))
            print(f"K={k:5d} S={segs} M={m:2d} " + " ".join(f"{c:6.1f}" for c in cols), flush=True)


if __name__ == "__main__":
    main()
