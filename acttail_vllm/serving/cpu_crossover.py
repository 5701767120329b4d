"""Policy ``auto`` on a CPU: up to which step size each module's sparse GEMV beats dense vLLM.

A GPU reads that from a crossover table measured offline per GPU model (``kernels/measured``).
CPUs differ too much for tables: the answer depends on the machine's memory bandwidth, its cores
and vLLM's GEMM for that CPU (oneDNN, zentorch or sgl-kernel, on its own prepacked weight), and on
each layer's width, since the GEMV pays per kept row. So a server measures it once at startup, on
its own weights: every module at one token, then at twice as many while any module still wins, up
to ``STEP_SIZES[-1]``. Each round goes through all the modules in model order, as a decode step
does, so their weights come from memory as they do while serving, not from a warm cache.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

#: Step sizes tried, in order; a module is sparsified up to the largest one it won at, every smaller
#: one included (a module that loses at some size is not tried at larger ones).
STEP_SIZES = (1, 2, 4, 8, 16)
#: Rounds per step size; each call's time is the median of its rounds.
ROUNDS = 5


@dataclass(frozen=True)
class TimedModule:
    """One module as the measurement calls it: both functions take [rows, in_features] inputs."""

    in_features: int
    sparse: Callable[[torch.Tensor], torch.Tensor]  # the selection and the GEMV over the kept rows
    dense: Callable[[torch.Tensor], torch.Tensor]  # the dense layer vLLM runs


def _median_times(
    calls: Sequence[tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]],
    rounds: int,
    clock: Callable[[], float],
) -> list[float]:
    """Each (function, input)'s median time over ``rounds`` rounds, each round calling all in order."""
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(rounds):
        for samples, (fn, x) in zip(times, calls):
            start = clock()
            fn(x)
            samples.append(clock() - start)
    return [statistics.median(samples) for samples in times]


def largest_faster_steps(
    modules: Sequence[TimedModule],
    dtype: torch.dtype,
    step_sizes: Sequence[int] = STEP_SIZES,
    rounds: int = ROUNDS,
    clock: Callable[[], float] = time.perf_counter,
) -> list[int]:
    """Per module, the largest of ``step_sizes`` at which its sparse call took less time than its
    dense one, at that size and every smaller one; 0 where it lost at the first."""
    largest = [0] * len(modules)
    contenders = list(range(len(modules)))
    generator = torch.Generator().manual_seed(0)
    for rows in step_sizes:
        if not contenders:
            break
        widths = {modules[i].in_features for i in contenders}
        inputs = {k: torch.randn(rows, k, generator=generator).to(dtype) for k in widths}
        racing = [modules[i] for i in contenders]
        dense = _median_times([(m.dense, inputs[m.in_features]) for m in racing], rounds, clock)
        sparse = _median_times([(m.sparse, inputs[m.in_features]) for m in racing], rounds, clock)
        contenders = [i for i, d, s in zip(contenders, dense, sparse) if s < d]
        for i in contenders:
            largest[i] = rows
    return largest
