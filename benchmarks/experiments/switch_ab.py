"""A/B of one kernel switch: selection + sparse GEMV at the 13B shapes with two ``SelectOptions``,
off and on, alternating ``--rounds`` times (the two builds of each kernel coexist), so drift between
rounds shows as spread, not as a gain. "off" is the shipped options unless said otherwise.

* ``--switch pdl``: programmatic dependent launch (``use_pdl``) off and on; one token, both loops.
* ``--switch row-chunk``: rows written (and listed) in chunks of ``row_chunk`` channels (on;
  ``--on`` tries another size) against one chunk for the whole row (off); one token with either
  loop, and a batch of 4 through the dense fallback.
* ``--switch row-chunk-batches``: larger batches in chunks too (``row_chunk_max_tokens`` 16, on)
  against whole rows above 4 tokens; batches of 8 and 16 through the fallback.
* ``--switch thr-window``: the range test's window around the threshold guess
  (``threshold_window``) against even slices (off: 0); one token with either loop, 4 and 16 tokens.
* ``--switch range-programs``: 4 range-test programs per SM (``--on`` tries another number)
  against the shipped ``range_programs_per_sm``; with the window, more programs mean narrower
  slices and fewer bisection steps, and more loads of the row. One token, 4 and 16 tokens.

* ``--base DIR``: instead of a switch, this checkout's kernels (on) against another build of them
  (off), both with their own defaults: DIR holds ``kernels/`` of another commit, e.g. from
  ``mkdir -p DIR && git archive COMMIT kernels | tar -x -C DIR``; one token, both loops.

Every call passes a threshold guess, kept per shape and sparsity as a vLLM layer keeps one.

    python3 -m benchmarks.experiments.switch_ab --switch pdl     # needs CUDA (pdl: compute capability 9.0+)
    python3 -m benchmarks.experiments.switch_ab --switch row-chunk [--on 2048]
    python3 -m benchmarks.experiments.switch_ab --switch row-chunk-batches
    python3 -m benchmarks.experiments.switch_ab --switch thr-window
    python3 -m benchmarks.experiments.switch_ab --switch range-programs [--on 8]
    python3 -m benchmarks.experiments.switch_ab --base /tmp/base

Timing: ``benchmarks.common.time_us``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import statistics
import sys
from pathlib import Path

import torch

import acttail_kernels as ak
from acttail_kernels.topk_select import SHIPPED_OPTIONS, guess_tensor, keep_tensor
from benchmarks.common import GPU_SHAPES, keeps_for, random_inputs, random_instances, shapes_of, time_us

ONE_TOKEN = [(1, ak.GemvPath.LIST), (1, ak.GemvPath.WALK)]
FALLBACK_4_16 = [(4, ak.GemvPath.DENSE), (16, ak.GemvPath.DENSE)]
# switch -> (the SelectOptions field it switches, its off and on values, the (batch size, path)s timed)
SWITCHES = {
    "pdl": ("use_pdl", False, True, ONE_TOKEN),
    # 2**15 > MAX_CHANNELS: one chunk a row
    "row-chunk": ("row_chunk", 1 << 15, SHIPPED_OPTIONS.row_chunk, ONE_TOKEN + [(4, ak.GemvPath.DENSE)]),
    "row-chunk-batches": (
        "row_chunk_max_tokens",
        SHIPPED_OPTIONS.row_chunk_max_tokens,
        16,
        [(8, ak.GemvPath.DENSE), (16, ak.GemvPath.DENSE)],
    ),
    "thr-window": ("threshold_window", 0, SHIPPED_OPTIONS.threshold_window, ONE_TOKEN + FALLBACK_4_16),
    "range-programs": ("range_programs_per_sm", SHIPPED_OPTIONS.range_programs_per_sm, 4, ONE_TOKEN + FALLBACK_4_16),
}


def load_base(checkout: Path):
    """``kernels/`` of another commit under ``checkout``, imported as ``acttail_kernels_base``."""
    package = checkout / "kernels"
    spec = importlib.util.spec_from_file_location(
        "acttail_kernels_base", package / "__init__.py", submodule_search_locations=[str(package)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--switch", choices=SWITCHES)
    mode.add_argument("--base", type=Path, help="a checkout holding the other build's kernels/ (off)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--on", type=int, help="row-chunk, range-programs: the value to try (default: see above)")
    parser.add_argument("--shapes", nargs="*", default=[s.name for s in shapes_of("13b")])
    args = parser.parse_args()
    if args.on is not None and args.switch not in ("row-chunk", "range-programs"):
        parser.error("--on goes with --switch row-chunk or range-programs")
    # off / on: (the kernels, the keyword arguments their sparse_linear takes beyond the shipped call)
    if args.switch:
        field, off, on, runs = SWITCHES[args.switch]
        on = on if args.on is None else args.on
        builds = {
            switched: (ak, {"options": dataclasses.replace(SHIPPED_OPTIONS, **{field: value})})
            for switched, value in ((False, off), (True, on))
        }
    else:
        runs = ONE_TOKEN
        builds = {False: (load_base(args.base), {}), True: (ak, {})}
    dtype, device = torch.bfloat16, "cuda"
    print(
        f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {dtype}; {args.switch or args.base}: "
        f"microseconds per call, median of {args.rounds} alternating rounds (min-max)"
    )
    print(f"{'shape':14s} {'M':>3s} {'s':>4s} {'path':>5s} {'off':>17s} {'on':>17s}")
    for shape in (s for s in GPU_SHAPES if s.name in args.shapes):
        _, weights_t = random_instances(shape, dtype, device)
        for m, path in runs:
            xs = random_inputs(m, shape.k, len(weights_t), dtype, device)
            for sparsity in (0.5, 0.8):
                keeps = keeps_for(shape, sparsity)
                keep = keep_tensor(keeps, device)
                guesses = {on: guess_tensor(len(keeps), device) for on in builds}
                calls = {
                    on: [
                        functools.partial(
                            build.sparse_linear,
                            x,
                            w,
                            None,
                            shape.seg_bounds,
                            keeps,
                            keep=keep,
                            path=build.GemvPath(path.value),
                            thr_guess=guesses[on],
                            **extra,
                        )
                        for x, w in zip(xs, weights_t)
                    ]
                    for on, (build, extra) in builds.items()
                }
                times: dict[bool, list[float]] = {False: [], True: []}
                for _ in range(args.rounds):
                    for on in (False, True):
                        times[on].append(time_us(calls[on], xs))
                cells = [f"{statistics.median(t):5.1f} ({min(t):4.1f}-{max(t):4.1f})" for t in times.values()]
                print(
                    f"{shape.name:14s} {m:3d} {sparsity:4.2f} {path.value:>5s} {cells[0]:>17s} {cells[1]:>17s}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
