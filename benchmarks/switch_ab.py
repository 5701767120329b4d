"""A/B of one kernel switch: selection + sparse GEMV at the 13B shapes with the switch off and on,
alternating ``--rounds`` times (the two builds of each kernel coexist), so drift between rounds
shows as spread, not as a gain.

* ``--switch pdl``: programmatic dependent launch (``topk_select.USE_PDL``); one token, both
  loops.
* ``--switch row-chunk``: rows written (and listed) in chunks of ``topk_select.ROW_CHUNK`` channels
  (on; ``--on`` tries another size) against one chunk for the whole row (off); one token with
  either loop, and a batch of 4 through the dense fallback.
* ``--switch row-chunk-batches``: larger batches in chunks too (``ROW_CHUNK_MAX_TOKENS`` 16, on)
  against whole rows above 4 tokens (off, as shipped); batches of 8 and 16 through the fallback.
* ``--switch thr-window``: the range test's window around the threshold guess
  (``THRESHOLD_WINDOW``) against even slices; one token with either loop, 4 and 16 tokens.
* ``--switch range-programs``: 4 range-test programs per SM (``--on`` tries another number)
  against the shipped ``RANGE_PROGRAMS_PER_SM``; with the window, more programs mean narrower
  slices and fewer bisection steps, and more loads of the row. One token, 4 and 16 tokens.

* ``--base DIR``: instead of a switch, this checkout's kernels (on) against another build of them
  (off): DIR holds ``kernels/`` of another commit, e.g. from
  ``mkdir -p DIR && git archive COMMIT kernels | tar -x -C DIR``; one token, both loops.

Every call passes a threshold guess, kept per shape and sparsity as a vLLM layer keeps one.

    python3 benchmarks/switch_ab.py --switch pdl     # needs CUDA (pdl: compute capability 9.0+)
    python3 benchmarks/switch_ab.py --switch row-chunk [--on 2048]
    python3 benchmarks/switch_ab.py --switch row-chunk-batches
    python3 benchmarks/switch_ab.py --switch thr-window
    python3 benchmarks/switch_ab.py --switch range-programs [--on 8]
    python3 benchmarks/switch_ab.py --base /tmp/base

Timing as bench_kernels.time_us.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import statistics
import sys
from pathlib import Path

import torch
from bench_kernels import GPU_SHAPES, L2_BYTES, keeps_for, time_us

import acttail_kernels as ak
from acttail_kernels import topk_select as select_module
from acttail_kernels.topk_select import guess_tensor, keep_tensor


ONE_TOKEN = [(1, ak.GemvPath.LIST), (1, ak.GemvPath.WALK)]
# switch -> (the module settings it switches together: (module, name, off, on); (batch size, path)s)
SWITCHES = {
    "pdl": ([(select_module, "USE_PDL", False, True)], ONE_TOKEN),
    "row-chunk": (
        [(select_module, "ROW_CHUNK", 1 << 15, select_module.ROW_CHUNK)],  # 2**15 > MAX_CHANNELS: one chunk a row
        ONE_TOKEN + [(4, ak.GemvPath.DENSE)],
    ),
    "row-chunk-batches": (
        [(select_module, "ROW_CHUNK_MAX_TOKENS", 4, 16)],
        [(8, ak.GemvPath.DENSE), (16, ak.GemvPath.DENSE)],
    ),
    "thr-window": (
        [(select_module, "THRESHOLD_WINDOW", 0, select_module.THRESHOLD_WINDOW)],
        ONE_TOKEN + [(4, ak.GemvPath.DENSE), (16, ak.GemvPath.DENSE)],
    ),
    "range-programs": (
        [(select_module, "RANGE_PROGRAMS_PER_SM", select_module.RANGE_PROGRAMS_PER_SM, 4)],
        ONE_TOKEN + [(4, ak.GemvPath.DENSE), (16, ak.GemvPath.DENSE)],
    ),
}


def load_base(checkout: Path):
    """``kernels/`` of another commit under ``checkout``, imported as ``acttail_kernels_base``."""
    package = checkout / "kernels"
    spec = importlib.util.spec_from_file_location(
        "acttail_kernels_base", package / "__init__.py", submodule_search_locations=[str(package)])
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
    parser.add_argument("--shapes", nargs="*", default=[s.name for s in GPU_SHAPES if s.name.startswith("13b")])
    args = parser.parse_args()
    flags, runs = SWITCHES[args.switch] if args.switch else ([], ONE_TOKEN)
    builds = {False: load_base(args.base) if args.base else ak, True: ak}
    if args.on is not None and args.switch not in ("row-chunk", "range-programs"):
        parser.error("--on goes with --switch row-chunk or range-programs")
    if args.on is not None:
        flags = [(module, name, off, args.on) for module, name, off, _ in flags]
    shipped = [getattr(module, name) for module, name, _, _ in flags]
    dtype, device = torch.bfloat16, "cuda"
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {dtype}; {args.switch or args.base}: "
          f"microseconds per call, median of {args.rounds} alternating rounds (min-max)")
    print(f"{'shape':14s} {'M':>3s} {'s':>4s} {'path':>5s} {'off':>17s} {'on':>17s}")
    for shape in (s for s in GPU_SHAPES if s.name in args.shapes):
        instances = min(16, max(2, -(-4 * L2_BYTES // (shape.n * shape.k * 2))))
        weights_t = [ak.prepare_weight(torch.randn(shape.n, shape.k, dtype=dtype, device=device) * 0.02)
                     for _ in range(instances)]
        for m, path in runs:
            xs = [torch.randn(m, shape.k, dtype=dtype, device=device) for _ in range(instances)]
            for sparsity in (0.5, 0.8):
                keeps = keeps_for(shape, sparsity)
                keep = keep_tensor(keeps, device)
                guesses = {on: guess_tensor(len(keeps), device) for on in builds}
                calls = {on: [functools.partial(build.sparse_linear, x, w, None, shape.seg_bounds, keeps, keep=keep,
                                                path=build.GemvPath(path.value), thr_guess=guesses[on])
                              for x, w in zip(xs, weights_t)]
                         for on, build in builds.items()}
                times: dict[bool, list[float]] = {False: [], True: []}
                for _ in range(args.rounds):
                    for on in (False, True):
                        for module, name, off_value, on_value in flags:
                            setattr(module, name, on_value if on else off_value)
                        times[on].append(time_us(calls[on], xs))
                cells = [f"{statistics.median(t):5.1f} ({min(t):4.1f}-{max(t):4.1f})" for t in times.values()]
                print(f"{shape.name:14s} {m:3d} {sparsity:4.2f} {path.value:>5s} {cells[0]:>17s} {cells[1]:>17s}",
                      flush=True)

    for (module, name, _, _), value in zip(flags, shipped):
        setattr(module, name, value)


if __name__ == "__main__":
    main()
