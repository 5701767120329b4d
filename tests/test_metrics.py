"""Worker snapshots and the collector that puts them on /metrics, without a server: warm-up tokens
left out, dead or silent workers not exported, token paths named for what they are."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from acttail_vllm.errors import ActTailError
from acttail_vllm.serving import metrics
from acttail_vllm.serving.metrics import (
    ActTailCollector,
    ProjectionSnapshot,
    WorkerSnapshot,
    metrics_interval_s,
    read_snapshots,
    write_snapshot,
)
from acttail_vllm.serving.stats import TokenPath

IN_FEATURES = 8


def snapshot(pid: int, tokens: int, kept: int, written_at: float | None = None) -> WorkerSnapshot:
    """One q_proj; every token through the selection + dense GEMM (as on CPU)."""
    return WorkerSnapshot(
        pid=pid,
        written_at=time.time() if written_at is None else written_at,
        model="m",
        profile_hash="h",
        method="acttail",
        target_sparsity=0.5,
        policy="auto",
        profile_build_seconds=1.0,
        tokens={TokenPath.SPARSE_GEMV: 0, TokenPath.SELECTION_DENSE_GEMM: tokens, TokenPath.UNSPARSIFIED: 0},
        projections=[
            ProjectionSnapshot(
                layer=0,
                projection="q_proj",
                configured_sparsity=0.5,
                in_features=IN_FEATURES,
                kept_channels=kept,
                budget_kept_fraction=0.5,
            )
        ],
    )


def exported(collector: ActTailCollector) -> str:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry).decode()


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_an_uncounted_projection_reports_its_budget_or_all_channels_if_never_sparsified():
    """On a GPU only one module counts: the others keep their budget's fraction where the policy
    sparsifies them, and every channel where it never does."""
    counted = snapshot(pid=1, tokens=10, kept=40)
    budget = counted.projections[0].model_copy(update={"kept_channels": None, "budget_kept_fraction": 0.3})
    assert counted.kept_fraction(counted.projections[0]) == 40 / (10 * IN_FEATURES)
    assert counted.kept_fraction(budget) == 0.3
    assert counted.kept_fraction(budget.model_copy(update={"sparsified": False})) == 1.0


def test_snapshots_of_dead_or_silent_workers_are_not_exported(tmp_path):
    now = time.time()
    write_snapshot(snapshot(dead_pid(), 5, 20, written_at=now), tmp_path)
    live = snapshot(os.getpid(), 5, 20, written_at=now)  # this process: alive
    write_snapshot(live, tmp_path)
    assert read_snapshots(tmp_path, max_age_s=10.0, now=now) == [live]
    assert read_snapshots(tmp_path, max_age_s=10.0, now=now + 11.0) == []  # alive, but not rewritten


def test_the_collector_counts_from_engine_ready(tmp_path, monkeypatch):
    """vLLM's warm-up runs counted before the engine is ready are left out of every metric."""
    monkeypatch.setenv(metrics.ENV_INTERVAL, "0.1")
    pid = os.getpid()
    write_snapshot(snapshot(pid, tokens=2048, kept=2048 * 4), tmp_path)  # warm-up, as the worker sees it
    collector = ActTailCollector(tmp_path)
    before_ready = exported(collector)
    assert 'acttail_tokens_total{path="selection_dense_gemm"} 2048.0' in before_ready

    ready = threading.Thread(target=collector.engine_ready)
    ready.start()
    time.sleep(0.2)
    assert ready.is_alive()  # waits for a snapshot written after it was called
    write_snapshot(snapshot(pid, tokens=2048, kept=2048 * 4), tmp_path)  # the worker's next write
    ready.join(timeout=5)
    assert not ready.is_alive()
    idle = exported(collector)
    assert 'acttail_tokens_total{path="selection_dense_gemm"} 0.0' in idle
    assert "acttail_kept_fraction_ratio{" not in idle  # nothing served yet: no fraction to show

    write_snapshot(snapshot(pid, tokens=2048 + 10, kept=2048 * 4 + 10 * 3), tmp_path)  # 10 tokens kept 3 of 8
    served = exported(collector)
    assert 'acttail_tokens_total{path="selection_dense_gemm"} 10.0' in served
    assert 'acttail_tokens_total{path="sparse_gemv"} 0.0' in served
    assert 'acttail_tokens_total{path="unsparsified"} 0.0' in served
    assert 'acttail_kept_fraction_ratio{layer="0",projection="q_proj"} 0.375' in served


def test_engine_ready_without_a_worker_gives_up_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.setenv(metrics.ENV_INTERVAL, "0.05")
    collector = ActTailCollector(tmp_path)
    start = time.monotonic()
    collector.engine_ready()
    assert time.monotonic() - start < 2.0
    assert collector.baselines == {}


@pytest.mark.parametrize("value", ["0", "-1", "soon"])
def test_a_bad_interval_names_the_variable(monkeypatch, value):
    monkeypatch.setenv(metrics.ENV_INTERVAL, value)
    with pytest.raises(ActTailError, match=f"ACTTAIL_METRICS_INTERVAL_S='{value}' is not a positive number"):
        metrics_interval_s()
