"""vLLM stat-logger plugin (entry point ``vllm.stat_logger_plugins``): puts ActTail's worker
snapshots on the API server's ``/metrics`` (see ``metrics.py``)."""

from __future__ import annotations

import os
from pathlib import Path

from vllm.v1.metrics.loggers import StatLoggerBase
from vllm.v1.metrics.prometheus import get_prometheus_registry

from acttail_vllm.errors import logs_startup_errors
from acttail_vllm.serving.metrics import ENV_STATS_DIR, ActTailCollector


class ActTailStatLogger(StatLoggerBase):
    _collector: ActTailCollector | None = None  # one per API-server process

    @logs_startup_errors
    def __init__(self, vllm_config, engine_index: int = 0) -> None:
        directory = os.environ.get(ENV_STATS_DIR)
        if vllm_config.model_config.quantization != "acttail" or not directory:
            return
        if ActTailStatLogger._collector is None:
            ActTailStatLogger._collector = ActTailCollector(Path(directory))
            get_prometheus_registry().register(ActTailStatLogger._collector)

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
        """Nothing per step: the collector reads the worker's counters at scrape time."""

    def log_engine_initialized(self) -> None:
        """The engine is ready and no request has run: count from here (see ``metrics.py``)."""
        if ActTailStatLogger._collector is not None:
            ActTailStatLogger._collector.engine_ready()
