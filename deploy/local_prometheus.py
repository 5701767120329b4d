"""A client for Prometheus's HTTP query API, and a real Prometheus server on loopback started from
the ``prometheus`` binary (Debian package ``prometheus``) with a generated config.

Used by tests/test_observability.py and render_dashboard.py:

    with LocalPrometheus(["127.0.0.1:8000"], scrape_interval_s=1) as prom:
        prom.query("sum(vllm:num_requests_running)")
"""

from __future__ import annotations

import math
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import requests
from pydantic import BaseModel, Field, ValidationError

from acttail_vllm.dev.server import held_port, wait_until_ok
from deploy.stack import GlobalConfig, PrometheusConfig, ScrapeConfig, StaticConfig

PROMETHEUS_BINARY = "prometheus"


class PrometheusError(RuntimeError):
    """Prometheus did not start, or answered a query with an error."""


class InstantSample(BaseModel):
    metric: dict[str, str]
    value: tuple[float, float]  # (unix time, value); Prometheus sends the value as a string


class RangeSeries(BaseModel):
    metric: dict[str, str]
    values: list[tuple[float, float]]


class _QueryData(BaseModel):
    resultType: Literal["vector", "matrix", "scalar", "string"]
    result: list[InstantSample] | list[RangeSeries] | list = Field(union_mode="left_to_right")


class _QueryResponse(BaseModel):
    """The envelope of /api/v1/query and /api/v1/query_range."""

    status: Literal["success", "error"]
    data: _QueryData | None = None
    errorType: str | None = None
    error: str | None = None


def prometheus_binary() -> str | None:
    return shutil.which(PROMETHEUS_BINARY)


class PrometheusClient:
    """Prometheus's HTTP query API (``/api/v1/query`` and ``/api/v1/query_range``)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def _get(self, endpoint: str, params: dict[str, str]) -> _QueryData:
        response = requests.get(f"{self.url}/api/v1/{endpoint}", params=params, timeout=30)
        try:
            body = _QueryResponse.model_validate_json(response.text)
        except ValidationError:
            raise PrometheusError(
                f"{self.url} is not a Prometheus query API: HTTP {response.status_code}, {response.text[:200]!r}"
            ) from None
        if body.status != "success" or body.data is None:
            raise PrometheusError(f"{params['query']!r}: {body.errorType}: {body.error}")
        return body.data

    def query(self, expr: str, at: float | None = None) -> list[InstantSample]:
        """Instant vector of ``expr`` at unix time ``at`` (now when None)."""
        params = {"query": expr, **({"time": f"{at:.3f}"} if at is not None else {})}
        data = self._get("query", params)
        if data.resultType != "vector":
            raise PrometheusError(f"{expr!r} gave a {data.resultType}, not an instant vector")
        return data.result

    def query_range(self, expr: str, start: float, end: float, step_s: float) -> list[RangeSeries]:
        params = {"query": expr, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step_s:g}"}
        return self._get("query_range", params).result


class LocalPrometheus(PrometheusClient):
    """Scrapes ``targets`` (``host:port`` of vLLM servers) every ``scrape_interval_s`` seconds; its
    config, data and log live in a temporary directory removed by ``stop``."""

    def __init__(self, targets: Sequence[str], scrape_interval_s: float = 1.0, startup_timeout_s: float = 60.0):
        binary = prometheus_binary()
        if binary is None:
            raise PrometheusError(
                "the prometheus binary is not on PATH: make prometheus (apt-get install prometheus, as root)"
            )
        self.binary = binary
        self.targets = list(targets)
        self.scrape_interval_s = scrape_interval_s
        self.startup_timeout_s = startup_timeout_s
        self._port_hold = held_port()
        self.port = self._port_hold.getsockname()[1]
        super().__init__(f"http://127.0.0.1:{self.port}")
        self.workdir: Path | None = None
        self.process: subprocess.Popen | None = None

    def config(self) -> PrometheusConfig:
        interval = f"{int(self.scrape_interval_s * 1000)}ms"
        return PrometheusConfig(
            **{"global": GlobalConfig(scrape_interval=interval, evaluation_interval=interval)},
            scrape_configs=[ScrapeConfig(job_name="vllm", static_configs=[StaticConfig(targets=self.targets)])],
        )

    def log(self) -> str:
        path = self.workdir / "prometheus.log" if self.workdir else None
        return path.read_text(errors="replace") if path and path.exists() else ""

    def start(self) -> LocalPrometheus:
        self.workdir = Path(tempfile.mkdtemp(prefix="acttail-prometheus-"))
        config_path = self.workdir / "prometheus.yml"
        config_path.write_text(self.config().to_yaml())
        with open(self.workdir / "prometheus.log", "wb") as log:
            self.process = subprocess.Popen(
                [
                    self.binary,
                    f"--config.file={config_path}",
                    f"--storage.tsdb.path={self.workdir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until_ok(
            self.process,
            f"{self.url}/-/ready",
            self.startup_timeout_s,
            0.5,
            lambda why: PrometheusError(f"prometheus {why}:\n{self.log()[-3000:]}"),
        )
        self._port_hold.close()  # prometheus listens on it now
        return self

    def stop(self) -> None:
        self._port_hold.close()
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> LocalPrometheus:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def wait_for_scrape_after(self, when: float, timeout_s: float = 30.0) -> None:
        """Block until every target was scraped after unix time ``when`` (its samples include
        everything that happened before then)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            scraped = self.query("timestamp(up)")
            if len(scraped) == len(self.targets) and all(s.value[1] > when for s in scraped):
                return
            time.sleep(self.scrape_interval_s / 2)
        raise PrometheusError(f"targets {self.targets} not scraped within {timeout_s}s after {when}")


def finite_values(samples: Sequence[InstantSample]) -> list[float]:
    return [s.value[1] for s in samples if math.isfinite(s.value[1])]
