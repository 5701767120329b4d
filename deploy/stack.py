"""The files of the monitoring stack in ``deploy/``, as pydantic models of the fields this project
relies on: the compose file, Prometheus's config, Grafana's provisioning and the dashboard.

Tests and ``render_dashboard.py`` read the same files the containers load, so a panel that Grafana
shows is a panel that the tests evaluate against a real Prometheus.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEPLOY_DIR = Path(__file__).resolve().parent
COMPOSE_PATH = DEPLOY_DIR / "docker-compose.yml"
PROMETHEUS_CONFIG_PATH = DEPLOY_DIR / "prometheus.yml"
DATASOURCES_PATH = DEPLOY_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yml"
DASHBOARD_PROVIDERS_PATH = DEPLOY_DIR / "grafana" / "provisioning" / "dashboards" / "acttail.yml"
DASHBOARD_PATH = DEPLOY_DIR / "grafana" / "dashboards" / "acttail-vllm.json"

#: Grafana's rate window variable: max(4 x scrape interval, query step + scrape interval).
RATE_INTERVAL = "$__rate_interval"
_LEGEND_LABEL = re.compile(r"\{\{\s*(\w+)\s*\}\}")
#: A short-syntax volume, HOST:CONTAINER[:MODE], where HOST may be ${VAR:?message} (colons inside).
_VOLUME = re.compile(r"^(?P<host>\$\{[^}]*\}|[^:]+):(?P<container>[^:]+)(?::(?:ro|rw))?$")


class StackFileError(ValueError):
    """A stack file that does not parse or misses what the stack needs."""


class _Lenient(BaseModel):
    """Third-party formats: keep the fields we read, accept the many we do not."""

    model_config = ConfigDict(extra="allow")


# --- Prometheus ------------------------------------------------------------------------------


class StaticConfig(_Lenient):
    targets: list[str]


class ScrapeConfig(_Lenient):
    job_name: str
    metrics_path: str = "/metrics"
    scrape_interval: str | None = None
    static_configs: list[StaticConfig]


class GlobalConfig(_Lenient):
    scrape_interval: str = "1m"
    evaluation_interval: str | None = None


class PrometheusConfig(_Lenient):
    global_: GlobalConfig = Field(default_factory=GlobalConfig, alias="global")
    scrape_configs: list[ScrapeConfig]

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(by_alias=True, exclude_none=True), sort_keys=False)


# --- Docker compose --------------------------------------------------------------------------


class ComposeService(_Lenient):
    image: str | None = None
    build: dict[str, str] | str | None = None
    command: list[str] | str | None = None
    environment: dict[str, str] | list[str] = Field(default_factory=dict)
    volumes: list[str] = Field(default_factory=list)
    ports: list[str] = Field(default_factory=list)
    deploy: dict | None = None

    def mounts(self) -> dict[str, str]:
        """{container path: host path or named volume} of the short-syntax volumes."""
        mounts = {}
        for volume in self.volumes:
            match = _VOLUME.match(volume)
            if match is None:
                raise StackFileError(f"volume {volume!r} is not HOST:CONTAINER[:ro|rw]")
            mounts[match["container"]] = match["host"]
        return mounts


class ComposeFile(_Lenient):
    services: dict[str, ComposeService]


# --- Grafana provisioning --------------------------------------------------------------------


class GrafanaDatasource(_Lenient):
    name: str
    uid: str
    type: str
    url: str
    jsonData: dict = Field(default_factory=dict)


class DatasourceProvisioning(_Lenient):
    apiVersion: int
    datasources: list[GrafanaDatasource]


class DashboardProvider(_Lenient):
    name: str
    type: Literal["file"]
    options: dict[str, str]


class DashboardProvisioning(_Lenient):
    apiVersion: int
    providers: list[DashboardProvider]


# --- Grafana dashboard -----------------------------------------------------------------------


class DatasourceRef(_Lenient):
    type: Literal["prometheus"]
    uid: str


class Target(_Lenient):
    refId: str
    expr: str = Field(min_length=1)
    legendFormat: str = ""
    instant: bool = False
    datasource: DatasourceRef

    def legend(self, labels: Mapping[str, str]) -> str:
        """The series name Grafana shows: ``{{label}}`` placeholders filled in."""
        if not self.legendFormat:
            return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or self.refId
        return _LEGEND_LABEL.sub(lambda m: labels.get(m.group(1), ""), self.legendFormat)


class GridPos(_Lenient):
    h: int = Field(gt=0)
    w: int = Field(gt=0, le=24)
    x: int = Field(ge=0, lt=24)
    y: int = Field(ge=0)


class Panel(_Lenient):
    id: int
    type: Literal["timeseries", "stat", "table", "barchart", "row"]
    title: str
    gridPos: GridPos
    targets: list[Target] = Field(default_factory=list)
    fieldConfig: dict = Field(default_factory=dict)
    options: dict = Field(default_factory=dict)

    @property
    def unit(self) -> str:
        return self.fieldConfig.get("defaults", {}).get("unit", "short")


class Dashboard(_Lenient):
    uid: str
    title: str
    schemaVersion: int
    panels: list[Panel]

    def query_panels(self) -> list[Panel]:
        return [p for p in self.panels if p.targets]


def concrete_expr(expr: str, rate_window: str) -> str:
    """``expr`` with Grafana's rate window replaced by ``rate_window`` (e.g. ``"30s"``), ready for
    Prometheus's HTTP API. Any other dashboard variable is an error: nothing else would fill it."""
    result = expr.replace(RATE_INTERVAL, rate_window)
    if "$" in result:
        raise StackFileError(f"unsupported Grafana variable in {expr!r}: only {RATE_INTERVAL} is filled in")
    return result


def _load(model: type[BaseModel], path: Path):
    try:
        text = path.read_text()
    except OSError as exc:
        raise StackFileError(f"cannot read {path}: {exc}") from None
    try:
        if path.suffix == ".json":
            return model.model_validate_json(text)
        return model.model_validate(yaml.safe_load(text))
    except (yaml.YAMLError, ValidationError) as exc:
        raise StackFileError(f"{path} is not a valid {model.__name__}: {exc}") from None


def load_dashboard(path: Path = DASHBOARD_PATH) -> Dashboard:
    return _load(Dashboard, path)


def load_compose(path: Path = COMPOSE_PATH) -> ComposeFile:
    return _load(ComposeFile, path)


def load_prometheus_config(path: Path = PROMETHEUS_CONFIG_PATH) -> PrometheusConfig:
    return _load(PrometheusConfig, path)


def load_datasources(path: Path = DATASOURCES_PATH) -> DatasourceProvisioning:
    return _load(DatasourceProvisioning, path)


def load_dashboard_providers(path: Path = DASHBOARD_PROVIDERS_PATH) -> DashboardProvisioning:
    return _load(DashboardProvisioning, path)
