"""Prometheus metrics for ActTail on vLLM's own ``/metrics`` endpoint.

The counters live in the worker process (next to the model), but vLLM serves ``/metrics`` from the
API-server process. The worker writes a small JSON snapshot of its counters every few seconds into a
directory shared through the environment; vLLM's stat-logger plugin hook (entry point
``vllm.stat_logger_plugins``) registers a collector in the API server that turns the snapshots into
metric families at scrape time. Labels are bounded: layer, projection and token path only.

Counts start when the engine is ready: vLLM's profile and warm-up runs (dummy batches, CUDA graph
captures) go through the sparse modules before any request. When vLLM reports the engine ready,
before it serves a request, the collector waits for a snapshot written after that moment and
subtracts it from everything it exports later. A snapshot whose worker died, or that has not been
rewritten for ``STALE_INTERVALS`` intervals, is not exported.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import BaseModel, ValidationError

from acttail_vllm.errors import ActTailError
from acttail_vllm.serving.stats import TOKEN_PATHS, ModuleStats, TokenPath

if TYPE_CHECKING:
    from acttail_vllm.serving.linear_method import SparseModules

logger = logging.getLogger(f"vllm.{__name__}")  # under "vllm": vLLM prints it
ENV_STATS_DIR = "ACTTAIL_STATS_DIR"
ENV_INTERVAL = "ACTTAIL_METRICS_INTERVAL_S"
DEFAULT_INTERVAL_S = 2.0
SNAPSHOT_SUFFIX = ".acttail.json"
#: A snapshot not rewritten for this many intervals is a dead or hung worker's, not exported.
STALE_INTERVALS = 10
#: How long the collector waits, at engine ready, for the worker's first snapshot after it.
READY_WAIT_INTERVALS = 3


class ProjectionSnapshot(BaseModel):
    layer: int
    projection: str
    configured_sparsity: float
    in_features: int
    #: input channels kept, summed over tokens; None where the device does not count them (GPUs:
    #: the kernels keep exactly ``budget_kept_fraction`` of a sparsified token's channels)
    kept_channels: int | None
    budget_kept_fraction: float
    #: whether the server's policy sparsifies this projection at any step size
    sparsified: bool = True


class WorkerSnapshot(BaseModel):
    """What one worker reports, counted since it started; the file format between worker and API
    server."""

    pid: int
    written_at: float  # unix time
    model: str
    profile_hash: str
    method: str
    target_sparsity: float
    policy: str
    max_sparse_tokens: int | None = None
    profile_build_seconds: float
    tokens: dict[TokenPath, int]
    projections: list[ProjectionSnapshot]

    @property
    def total_tokens(self) -> int:
        return sum(self.tokens.values())

    def since(self, baseline: WorkerSnapshot) -> WorkerSnapshot:
        """The counts this snapshot adds to ``baseline`` (an earlier one of the same worker)."""
        tokens = {path: count - baseline.tokens.get(path, 0) for path, count in self.tokens.items()}
        projections = [
            p.model_copy(update={"kept_channels": p.kept_channels - b.kept_channels})
            if p.kept_channels is not None and b.kept_channels is not None
            else p
            for p, b in zip(self.projections, baseline.projections)
        ]
        return self.model_copy(update={"tokens": tokens, "projections": projections})

    def kept_fraction(self, projection: ProjectionSnapshot) -> float | None:
        """Mean fraction of the projection's input channels kept per token (None before a token)."""
        if projection.kept_channels is None:
            return projection.budget_kept_fraction if projection.sparsified else 1.0
        if self.total_tokens == 0:
            return None
        return projection.kept_channels / (self.total_tokens * projection.in_features)


def metrics_interval_s() -> float:
    """Seconds between a worker's snapshots (``ACTTAIL_METRICS_INTERVAL_S``)."""
    raw = os.environ.get(ENV_INTERVAL)
    try:
        interval = DEFAULT_INTERVAL_S if raw is None else float(raw)
    except ValueError:
        interval = -1.0
    if not interval > 0:
        raise ActTailError(f"{ENV_INTERVAL}={raw!r} is not a positive number of seconds: set e.g. 2, or unset it")
    return interval


def share_metrics_across_processes() -> None:
    """Give this process and the engine processes it starts one snapshot directory."""
    if os.environ.get(ENV_STATS_DIR):
        return
    path = tempfile.mkdtemp(prefix="acttail-metrics-")
    os.environ[ENV_STATS_DIR] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)


def take_snapshot(modules: SparseModules) -> WorkerSnapshot:
    resolver = modules.resolver
    profile = resolver.profile
    projections: list[ProjectionSnapshot] = []
    tokens = dict.fromkeys(TOKEN_PATHS, 0)
    counted = False
    for state in modules.states:
        stats = ModuleStats.read(state.stats_host)
        if state.counts_stats and not counted:  # every token passes every module: count it once
            tokens, counted = stats.tokens, True
        for segment, name in enumerate(state.proj.projections):
            projections.append(
                ProjectionSnapshot(
                    layer=state.proj.layer,
                    projection=name,
                    configured_sparsity=profile.sparsity(state.proj.layer, name),
                    in_features=state.budget.in_features,
                    kept_channels=stats.kept_channels[segment] if state.counts_stats else None,
                    budget_kept_fraction=state.budget.kept_fractions[segment],
                    sparsified=state.ever_sparsified,
                )
            )
    settings = resolver.source.settings
    return WorkerSnapshot(
        pid=os.getpid(),
        written_at=time.time(),
        model=resolver.model_name,
        profile_hash=profile.content_hash(),
        method=profile.method,
        target_sparsity=profile.target_sparsity,
        policy=settings.policy.value,
        max_sparse_tokens=settings.max_sparse_tokens,
        profile_build_seconds=resolver.build_seconds,
        tokens=tokens,
        projections=projections,
    )


def write_snapshot(snapshot: WorkerSnapshot, directory: Path) -> None:
    path = directory / f"worker-{snapshot.pid}{SNAPSHOT_SUFFIX}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(snapshot.model_dump_json())
    os.replace(tmp, path)  # a scrape never reads half a file


def start_snapshot_writer(modules: SparseModules) -> threading.Thread | None:
    """Write this worker's snapshot now and then every ACTTAIL_METRICS_INTERVAL_S seconds."""
    directory = os.environ.get(ENV_STATS_DIR)
    if not directory:
        return None
    interval = metrics_interval_s()
    stop = threading.Event()

    def run() -> None:
        while True:
            try:
                write_snapshot(take_snapshot(modules), Path(directory))
            except OSError as exc:  # the directory went away: the server is shutting down
                logger.debug("ActTail metrics snapshot not written: %s", exc)
                return
            if stop.wait(interval):
                return

    thread = threading.Thread(target=run, name="acttail-metrics", daemon=True)
    thread.start()
    atexit.register(stop.set)
    return thread


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def read_snapshots(directory: Path, max_age_s: float, now: float | None = None) -> list[WorkerSnapshot]:
    """The snapshots of live workers, rewritten within ``max_age_s`` seconds, by pid."""
    now = time.time() if now is None else now
    snapshots = []
    for path in sorted(directory.glob(f"*{SNAPSHOT_SUFFIX}")):
        try:
            snapshot = WorkerSnapshot.model_validate_json(path.read_text())
        except (OSError, ValidationError) as exc:
            logger.warning("ActTail metrics: skipping unreadable snapshot %s: %s", path, exc)
            continue
        if _alive(snapshot.pid) and now - snapshot.written_at <= max_age_s:
            snapshots.append(snapshot)
    return sorted(snapshots, key=lambda s: s.pid)


class ActTailCollector:
    """Turns worker snapshots into Prometheus metric families at scrape time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.interval_s = metrics_interval_s()
        #: by worker pid: its counts when the engine became ready (vLLM's warm-up runs)
        self.baselines: dict[int, WorkerSnapshot] = {}

    def snapshots(self, now: float | None = None) -> list[WorkerSnapshot]:
        return read_snapshots(self.directory, STALE_INTERVALS * self.interval_s, now)

    def engine_ready(self) -> None:
        """Take every live worker's counts now as the baseline: called when vLLM reports the engine
        ready, before it serves a request, so what they count from here on is served tokens."""
        ready_at = time.time()
        wait_s = READY_WAIT_INTERVALS * self.interval_s
        deadline = time.monotonic() + wait_s
        while True:
            live = self.snapshots()
            fresh = [s for s in live if s.written_at >= ready_at]
            if live and len(fresh) == len(live):
                break
            if time.monotonic() > deadline:
                logger.warning(
                    "ActTail metrics: no worker snapshot came within %.1f s of the engine being ready; "
                    "acttail_tokens_total counts vLLM's warm-up tokens too",
                    wait_s,
                )
                return
            time.sleep(min(0.05, self.interval_s / 4))
        self.baselines = {s.pid: s for s in fresh}
        warm_up = sum(s.total_tokens for s in fresh)
        logger.info("ActTail metrics: counting from engine ready (%d tokens of vLLM's warm-up runs left out)", warm_up)

    def collect(self) -> Iterator[Metric]:
        snapshots = [s.since(self.baselines[s.pid]) if s.pid in self.baselines else s for s in self.snapshots()]
        info = GaugeMetricFamily(
            "acttail_info",
            "ActTail configuration of the served model (value is always 1).",
            labels=["model", "profile_hash", "method", "target_sparsity", "policy", "max_sparse_tokens"],
        )
        configured = GaugeMetricFamily(
            "acttail_projection_sparsity_ratio",
            "Configured activation sparsity of each projection (fraction of input channels dropped).",
            labels=["layer", "projection"],
        )
        kept = GaugeMetricFamily(
            "acttail_kept_fraction_ratio",
            "Mean fraction of input channels kept per served token: a sparsified token keeps its "
            "projection's k (exact by construction, kernel-tested), a token left dense all of them.",
            labels=["layer", "projection"],
        )
        tokens = CounterMetricFamily(
            "acttail_tokens",
            "Served tokens by path, counted at one module: TopK selection then the sparse GEMV "
            "(sparse_gemv), TopK selection then a dense GEMM on the sparsified input "
            "(selection_dense_gemm: cuBLAS on GPUs, oneDNN on CPU), or the dense layer on the "
            "whole input (unsparsified: policy, max_sparse_tokens). vLLM's warm-up runs are not counted.",
            labels=["path"],
        )
        build = GaugeMetricFamily(
            "acttail_profile_build_seconds",
            "Seconds spent resolving budgets at startup (building or loading and checking the profile).",
        )
        for snap in snapshots[:1]:  # one model per server: the first worker speaks for it
            info.add_metric(
                [
                    snap.model,
                    snap.profile_hash,
                    snap.method,
                    f"{snap.target_sparsity:g}",
                    snap.policy,
                    "none" if snap.max_sparse_tokens is None else str(snap.max_sparse_tokens),
                ],
                1,
            )
            for proj in snap.projections:
                labels = [str(proj.layer), proj.projection]
                configured.add_metric(labels, proj.configured_sparsity)
                fraction = snap.kept_fraction(proj)
                if fraction is not None:
                    kept.add_metric(labels, fraction)
            for path in TOKEN_PATHS:
                tokens.add_metric([path.value], snap.tokens.get(path, 0))
            build.add_metric([], snap.profile_build_seconds)
        yield from (info, configured, kept, tokens, build)
