"""Prometheus metrics for ActTail on vLLM's own ``/metrics`` endpoint.

The counters live in the worker process (next to the model), but vLLM serves ``/metrics`` from the
API-server process. The worker writes a small JSON snapshot of its counters every few seconds into a
directory shared through the environment; vLLM's stat-logger plugin hook (entry point
``vllm.stat_logger_plugins``) registers a collector in the API server that turns the snapshots into
metric families at scrape time. Labels are bounded: layer and projection only.
"""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from pydantic import BaseModel, ValidationError

from acttail_vllm.serving.stats import ModuleStats

if TYPE_CHECKING:
    from acttail_vllm.serving.linear_method import SparseModules

logger = logging.getLogger(f"vllm.{__name__}")  # under "vllm": vLLM prints it
ENV_STATS_DIR = "ACTTAIL_STATS_DIR"
ENV_INTERVAL = "ACTTAIL_METRICS_INTERVAL_S"
SNAPSHOT_SUFFIX = ".acttail.json"


class ProjectionSnapshot(BaseModel):
    layer: int
    projection: str
    configured_sparsity: float
    kept_fraction: float | None  # None before the first token


class WorkerSnapshot(BaseModel):
    """What one worker reports; the file format between worker and API server."""

    model: str
    profile_hash: str
    method: str
    target_sparsity: float
    policy: str
    max_sparse_tokens: int | None = None
    profile_build_seconds: float
    sparse_path_tokens: int
    dense_path_tokens: int
    unsparsified_tokens: int
    projections: list[ProjectionSnapshot]


def share_metrics_across_processes() -> None:
    """Give this process and the engine processes it starts one snapshot directory."""
    if os.environ.get(ENV_STATS_DIR):
        return
    path = tempfile.mkdtemp(prefix="acttail-metrics-")
    os.environ[ENV_STATS_DIR] = path
    atexit.register(shutil.rmtree, path, ignore_errors=True)


def take_snapshot(modules: "SparseModules") -> WorkerSnapshot:
    resolver = modules.resolver
    profile = resolver.profile
    projections: list[ProjectionSnapshot] = []
    tokens = (0, 0, 0)
    for index, state in enumerate(modules.states):
        stats = ModuleStats.read(state.stats_host)
        if index == 0:  # every token passes every module: count it once
            tokens = (stats.sparse_tokens, stats.dense_tokens, stats.unsparsified_tokens)
        if state.counts_stats:
            fractions = stats.kept_fractions(state.budget.in_features)
        else:  # GPU: the kernel's exact per-segment k
            fractions = state.budget.kept_fractions
        for name, kept in zip(state.proj.projections, fractions):
            projections.append(
                ProjectionSnapshot(
                    layer=state.proj.layer,
                    projection=name,
                    configured_sparsity=profile.sparsity(state.proj.layer, name),
                    kept_fraction=None if kept != kept else kept,
                )
            )
    settings = resolver.source.settings
    return WorkerSnapshot(
        model=resolver.model_name,
        profile_hash=profile.content_hash(),
        method=profile.method,
        target_sparsity=profile.target_sparsity,
        policy=settings.policy.value,
        max_sparse_tokens=settings.max_sparse_tokens,
        profile_build_seconds=resolver.build_seconds,
        sparse_path_tokens=tokens[0],
        dense_path_tokens=tokens[1],
        unsparsified_tokens=tokens[2],
        projections=projections,
    )


def write_snapshot(snapshot: WorkerSnapshot, directory: Path) -> None:
    path = directory / f"worker-{os.getpid()}{SNAPSHOT_SUFFIX}"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(snapshot.model_dump_json())
    os.replace(tmp, path)  # a scrape never reads half a file


def start_snapshot_writer(modules: "SparseModules") -> threading.Thread | None:
    """Write this worker's snapshot now and then every ACTTAIL_METRICS_INTERVAL_S seconds."""
    directory = os.environ.get(ENV_STATS_DIR)
    if not directory:
        return None
    interval = float(os.environ.get(ENV_INTERVAL, "2"))
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


def read_snapshots(directory: Path) -> list[WorkerSnapshot]:
    snapshots = []
    for path in sorted(directory.glob(f"*{SNAPSHOT_SUFFIX}")):
        try:
            snapshots.append(WorkerSnapshot.model_validate_json(path.read_text()))
        except (OSError, ValidationError) as exc:
            logger.warning("ActTail metrics: skipping unreadable snapshot %s: %s", path, exc)
    return snapshots


class ActTailCollector:
    """Turns worker snapshots into Prometheus metric families at scrape time."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def collect(self) -> Iterator[Metric]:
        snapshots = read_snapshots(self.directory)
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
            "Mean fraction of input channels kept per token: measured from the applied TopK masks "
            "on CPU; on GPUs the kernels' per-segment k of a sparsified token (exact by construction, "
            "kernel-tested).",
            labels=["layer", "projection"],
        )
        tokens = CounterMetricFamily(
            "acttail_tokens",
            "Tokens by path, counted at one module: sparsified through the sparse kernel (sparse) or "
            "the dense fallback (dense), or left unsparsified by policy=decode or max_sparse_tokens "
            "(unsparsified).",
            labels=["path"],
        )
        build = GaugeMetricFamily(
            "acttail_profile_build_seconds",
            "Seconds spent resolving budgets at startup (building or loading and checking the profile).",
        )
        for snap in snapshots[:1]:  # one model per server: the first worker speaks for it
            info.add_metric(
                [snap.model, snap.profile_hash, snap.method, f"{snap.target_sparsity:g}", snap.policy,
                 "none" if snap.max_sparse_tokens is None else str(snap.max_sparse_tokens)], 1
            )
            for proj in snap.projections:
                labels = [str(proj.layer), proj.projection]
                configured.add_metric(labels, proj.configured_sparsity)
                if proj.kept_fraction is not None:
                    kept.add_metric(labels, proj.kept_fraction)
            tokens.add_metric(["sparse"], snap.sparse_path_tokens)
            tokens.add_metric(["dense"], snap.dense_path_tokens)
            tokens.add_metric(["unsparsified"], snap.unsparsified_tokens)
            build.add_metric([], snap.profile_build_seconds)
        yield from (info, configured, kept, tokens, build)
