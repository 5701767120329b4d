"""Render the Grafana dashboard's panels to a PNG with matplotlib, from Prometheus data of a real run.

Grafana is not needed: the panels, their PromQL and their layout come from the dashboard JSON that
Grafana provisions (``deploy/grafana/dashboards/acttail-vllm.json``); time series come from
Prometheus's ``query_range``, tables, bar charts and stats from instant queries at the end. The
query results are saved next to the image (``.json``), so a figure can be redrawn without a rerun.

Start an ActTail vLLM server and a local Prometheus, send load, render (this made docs/dashboard.png):

    python -m deploy.render_dashboard --model DIR --profile profiles/smollm2-135m-instruct-acttail-50.json \\
        --vllm-args "--dtype float32 --max-model-len 512 --enforce-eager --max-num-seqs 8" -o docs/dashboard.png

Render a time range of an existing Prometheus (e.g. the compose stack's), or redraw saved data:

    python -m deploy.render_dashboard --prometheus http://localhost:9090 --start 1767000000 -o dash.png
    python -m deploy.render_dashboard --data docs/dashboard.json -o docs/dashboard.png
"""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

from deploy.local_prometheus import InstantSample, LocalPrometheus, PrometheusClient, RangeSeries  # noqa: E402
from deploy.stack import Dashboard, Panel, concrete_expr, load_dashboard  # noqa: E402

#: Grafana unit -> (multiplier, axis label)
UNITS = {"s": (1000.0, "ms"), "percentunit": (100.0, "%"), "short": (1.0, ""), "none": (1.0, "")}
INCHES_PER_COLUMN = 0.8
INCHES_PER_ROW = 0.45  # one gridPos height unit (Grafana: 30 px)
HIDDEN_LABELS = {"__name__", "job", "instance"}
SCRAPE_INTERVAL_S = 1.0
RATE_WINDOW = "10s"  # for the local run: Grafana would pick 4 x 1 s; 10 s is smoother


class TargetData(BaseModel):
    """One query's results: ``series`` for time-series panels, ``samples`` (at the end) otherwise."""

    name: str
    series: list[RangeSeries] = Field(default_factory=list)
    samples: list[InstantSample] = Field(default_factory=list)


class DashboardData(BaseModel):
    """Everything a rendering needs besides the dashboard JSON; saved as ``<output>.json``."""

    caption: str
    start: float
    end: float
    panels: dict[int, list[TargetData]]  # by panel id, one entry per target


def collect(
    dashboard: Dashboard, prom: PrometheusClient, start: float, end: float, window: str, caption: str
) -> DashboardData:
    step_s = max(1.0, math.ceil((end - start) / 600))
    panels = {}
    for panel in dashboard.query_panels():
        entries = []
        for target in panel.targets:
            expr = concrete_expr(target.expr, window)
            if panel.type == "timeseries":
                series = prom.query_range(expr, start, end, step_s)
                entries += [TargetData(name=target.legend(s.metric), series=[s]) for s in series]
            else:
                entries.append(TargetData(name=target.legend({}), samples=prom.query(expr, at=end)))
        panels[panel.id] = entries
    return DashboardData(caption=caption, start=start, end=end, panels=panels)


def unit_of(panel: Panel) -> tuple[float, str]:
    unit = panel.unit
    if unit.startswith("suffix:"):
        return 1.0, unit.removeprefix("suffix:").strip()
    return UNITS.get(unit, (1.0, unit))


def dashed_series(panel: Panel) -> re.Pattern | None:
    """The byRegexp override that gives series a dashed line, if the panel has one."""
    for override in panel.fieldConfig.get("overrides", []):
        styled = any(p["id"] == "custom.lineStyle" and p["value"].get("fill") == "dash" for p in override["properties"])
        if styled and override["matcher"]["id"] == "byRegexp":
            return re.compile(override["matcher"]["options"])
    return None


def draw_timeseries(ax, panel: Panel, entries: list[TargetData], start: float) -> None:
    scale, label = unit_of(panel)
    dashed = dashed_series(panel)
    stacked = panel.fieldConfig.get("defaults", {}).get("custom", {}).get("stacking", {}).get("mode") == "normal"
    curves = []
    for entry in entries:
        t, v = np.array(entry.series[0].values, dtype=np.float64).T
        curves.append((entry.name, t - start, v * scale))
    if stacked and curves:
        grid = np.unique(np.concatenate([t for _, t, _ in curves]))
        parts = [np.interp(grid, t, np.nan_to_num(v)) for _, t, v in curves]
        ax.stackplot(grid, *parts, labels=[n for n, _, _ in curves], alpha=0.7)
    else:
        for name, t, v in curves:
            is_dashed = bool(dashed and dashed.match(name))
            ax.plot(t, v, lw=1.0 if is_dashed else 1.6, ls="--" if is_dashed else "-", label=name)
    ax.set_ylabel(label)
    ax.set_xlabel("seconds since start")
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7, ncol=2 if len(curves) > 4 else 1, loc="upper left")


def draw_barchart(ax, panel: Panel, entries: list[TargetData]) -> None:
    scale, label = unit_of(panel)
    x_field = panel.options.get("xField", "layer")
    keys = sorted({s.metric[x_field] for e in entries for s in e.samples}, key=lambda k: (len(k), k))
    width = 0.8 / max(len(entries), 1)
    for i, entry in enumerate(entries):
        values = {s.metric[x_field]: s.value[1] * scale for s in entry.samples}
        ax.bar(np.arange(len(keys)) + i * width, [values.get(k, np.nan) for k in keys], width, label=entry.name)
    ax.set_xticks(np.arange(len(keys)) + 0.4 - width / 2, keys, fontsize=7)
    ax.set_xlabel(x_field)
    ax.set_ylabel(label)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=7)


def is_layer_projection_table(entries: list[TargetData]) -> bool:
    samples = [s for e in entries for s in e.samples]
    return bool(samples) and all("layer" in s.metric and "projection" in s.metric for s in samples)


def draw_layer_projection_heatmaps(fig, box, panel: Panel, entries: list[TargetData]) -> None:
    """A table keyed by (layer, projection), drawn as one heatmap per query on a shared scale."""
    scale, label = unit_of(panel)
    layers = sorted({int(s.metric["layer"]) for e in entries for s in e.samples})
    projections = list(dict.fromkeys(s.metric["projection"] for e in entries for s in e.samples))
    grids = []
    for entry in entries:
        grid = np.full((len(projections), len(layers)), np.nan)
        for s in entry.samples:
            grid[projections.index(s.metric["projection"]), layers.index(int(s.metric["layer"]))] = s.value[1] * scale
        grids.append(grid)
    low, high = np.nanmin(grids), np.nanmax(grids)
    x0, y0, w, h = box
    for i, (entry, grid) in enumerate(zip(entries, grids)):
        ax = fig.add_axes((x0 + i * w / len(entries), y0, w / len(entries) * 0.9, h))
        image = ax.imshow(grid, aspect="auto", cmap="RdYlGn_r", vmin=low, vmax=high)
        ax.set_yticks(range(len(projections)), projections, fontsize=7)
        ax.set_xticks(range(len(layers)), [str(layer) for layer in layers], fontsize=6)
        ax.set_xlabel("layer")
        ax.set_title(f"{panel.title}: {entry.name}", fontsize=10, loc="left")
        fig.colorbar(image, ax=ax, fraction=0.03, pad=0.01).set_label(label, fontsize=7)


def draw_table(ax, entries: list[TargetData]) -> None:
    rows = [{k: v for k, v in s.metric.items() if k not in HIDDEN_LABELS} for e in entries for s in e.samples]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    ax.axis("off")
    if rows:
        table = ax.table(cellText=[[row.get(c, "") for c in columns] for row in rows], colLabels=columns, loc="center")
        table.auto_set_font_size(False)
        table.set_fontsize(8)


def draw_stat(ax, panel: Panel, entries: list[TargetData]) -> None:
    scale, label = unit_of(panel)
    values = [s.value[1] * scale for e in entries for s in e.samples]
    decimals = panel.fieldConfig.get("defaults", {}).get("decimals", 2)
    ax.axis("off")
    ax.text(
        0.5, 0.4, f"{values[0]:.{decimals}f} {label}" if values else "no data", ha="center", va="center", fontsize=22
    )


def render(dashboard: Dashboard, data: DashboardData, out: Path) -> None:
    """One figure laid out like Grafana's 24-column grid."""
    rows = max(p.gridPos.y + p.gridPos.h for p in dashboard.panels)
    header_in = 1.2
    fig = plt.figure(figsize=(24 * INCHES_PER_COLUMN, rows * INCHES_PER_ROW + header_in))
    top = 1 - header_in / fig.get_figheight()
    fig.suptitle(f"{dashboard.title}\n{data.caption}", y=1 - 0.1 / fig.get_figheight(), va="top", fontsize=11)
    unit_w, unit_h = 1 / 24, top / rows
    for panel in dashboard.panels:
        g = panel.gridPos
        if panel.type == "row":
            fig.text(0.01, top - (g.y + 0.8) * unit_h, panel.title, fontsize=13, weight="bold")
            continue
        # the panel's cell, less room for its title and axis labels
        box = (
            g.x * unit_w + 0.6 * unit_w,
            top - (g.y + g.h) * unit_h + 1.2 * unit_h,
            g.w * unit_w - 0.9 * unit_w,
            (g.h - 2.0) * unit_h,
        )
        entries = data.panels.get(panel.id, [])
        if panel.type == "table" and is_layer_projection_table(entries):
            draw_layer_projection_heatmaps(fig, box, panel, entries)
            continue
        ax = fig.add_axes(box)
        if panel.type == "timeseries":
            draw_timeseries(ax, panel, entries, data.start)
        elif panel.type == "barchart":
            draw_barchart(ax, panel, entries)
        elif panel.type == "table":
            draw_table(ax, entries)
        else:
            draw_stat(ax, panel, entries)
        ax.set_title(panel.title, fontsize=10, loc="left")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=80)
    plt.close(fig)


def run_and_collect(args: argparse.Namespace, dashboard: Dashboard) -> DashboardData:
    from acttail_vllm.dev.server import VllmServer
    from benchmarks.load_bench import LoadSpec, run_load

    env = {"ACTTAIL_PROFILE": str(args.profile), "ACTTAIL_METRICS_INTERVAL_S": "0.5"}
    server_args = [*shlex.split(args.vllm_args), "--quantization", "acttail"]
    with (
        VllmServer(str(args.model), server_args, env=env) as server,
        LocalPrometheus([f"127.0.0.1:{server.port}"], SCRAPE_INTERVAL_S) as prom,
    ):
        prom.wait_for_scrape_after(time.time())
        start = time.time()
        time.sleep(5)  # an idle baseline before the load
        phases = []
        for concurrency in args.concurrency:
            spec = LoadSpec(num_requests=args.requests, concurrency=concurrency, max_tokens=args.max_tokens)
            run = run_load(server.url, str(args.model), spec)
            phases.append(f"{args.requests} requests at concurrency {concurrency} ({len(run.failures)} failed)")
            print(f"{phases[-1]} in {run.duration_s:.1f} s", file=sys.stderr)
        time.sleep(5)
        prom.wait_for_scrape_after(time.time())
        caption = (
            f"{args.model.name}, ActTail profile {args.profile.name}, vllm serve {args.vllm_args}; load: "
            f"{', then '.join(phases)}, max_tokens {args.max_tokens}\n"
            f"drawn by deploy/render_dashboard.py from Prometheus query_range data of that run "
            f"(scrape {SCRAPE_INTERVAL_S:g} s, rate window {RATE_WINDOW})"
        )
        return collect(dashboard, prom, start, time.time(), RATE_WINDOW, caption)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", type=Path, help="model directory: run an ActTail server under load and render it")
    source.add_argument("--prometheus", help="URL of a Prometheus that scraped a server: render --start..--end")
    source.add_argument("--data", type=Path, help="redraw query results saved by an earlier run")
    parser.add_argument("--profile", type=Path, help="ActTail profile for --model")
    parser.add_argument("--vllm-args", default="", help="extra `vllm serve` arguments for --model, one string")
    parser.add_argument("--concurrency", default="16,4", help="comma-separated concurrency of successive load phases")
    parser.add_argument("--requests", type=int, default=64, help="requests per phase")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--start", type=float, help="unix time, with --prometheus")
    parser.add_argument("--end", type=float, help="unix time, with --prometheus (default: now)")
    parser.add_argument("--window", default="1m", help="rate window for --prometheus (Grafana: 4x the scrape interval)")
    parser.add_argument("-o", "--output", type=Path, default=Path("docs/dashboard.png"))
    args = parser.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    dashboard = load_dashboard()

    if args.data is not None:
        data = DashboardData.model_validate_json(args.data.read_text())
    elif args.model is not None:
        if args.profile is None or not args.profile.is_file():
            parser.error("--model needs --profile FILE (build one with `acttail profile MODEL --sparsity S -o FILE`)")
        data = run_and_collect(args, dashboard)
    else:
        if args.start is None:
            parser.error("--prometheus needs --start (unix time)")
        end = args.end or time.time()
        caption = f"{args.prometheus}, {time.ctime(args.start)} to {time.ctime(end)}, rate window {args.window}"
        data = collect(dashboard, PrometheusClient(args.prometheus), args.start, end, args.window, caption)
    if args.data is None:
        saved = args.output.with_suffix(".json")
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(data.model_dump_json() + "\n")
        print(f"wrote {saved}", file=sys.stderr)
    render(dashboard, data, args.output)
    print(f"wrote {args.output}", file=sys.stderr)


if __name__ == "__main__":
    main()
