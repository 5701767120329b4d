"""Observability: the files of the deploy/ stack agree with each other, and every query of the Grafana
dashboard returns data from a real Prometheus scraping a real vLLM server (with ActTail) under load.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time

import aiohttp
import numpy as np
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

from acttail_vllm.dev.server import VllmServer
from benchmarks.load_bench import (
    DENSE_CONTROL,
    BenchReport,
    EngineTimes,
    LoadRun,
    LoadSpec,
    LoadSummary,
    RequestRecord,
    ServerRun,
    _keep_server_evidence,
    _stream_one,
    cpu_shares,
    format_cpu_list,
    format_spread,
    format_table,
    main,
    parse_cpu_list,
    physical_cores,
    pooled,
    run_load,
    summaries_of,
    ttft_ratio_interval,
    warmed_run,
)
from deploy.local_prometheus import LocalPrometheus, finite_values, prometheus_binary
from deploy.stack import (
    COMPOSE_PATH,
    DASHBOARD_PATH,
    DEPLOY_DIR,
    PROMETHEUS_CONFIG_PATH,
    StackFileError,
    concrete_expr,
    load_compose,
    load_dashboard,
    load_dashboard_providers,
    load_datasources,
    load_prometheus_config,
)
from tests.conftest import shipped_profile

# Panels vLLM fills with its own metric names (checked on vLLM 0.32's /metrics) and ActTail's.
EXPECTED_METRICS = (
    "vllm:generation_tokens_total",
    "vllm:prompt_tokens_total",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:inter_token_latency_seconds_bucket",
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "acttail_info",
    "acttail_projection_sparsity_ratio",
    "acttail_kept_fraction_ratio",
    "acttail_tokens_total",
    "acttail_profile_build_seconds",
)


def all_targets():
    return [(panel, target) for panel in load_dashboard().query_panels() for target in panel.targets]


def test_dashboard_covers_the_metrics_and_uses_the_provisioned_datasource():
    dashboard = load_dashboard()
    (datasource,) = load_datasources().datasources
    exprs = " ".join(t.expr for _, t in all_targets())
    assert [m for m in EXPECTED_METRICS if m not in exprs] == []
    assert {t.datasource.uid for _, t in all_targets()} == {datasource.uid}
    assert len({p.id for p in dashboard.panels}) == len(dashboard.panels)
    # rate windows follow the scrape interval (short tests and slow production scrapes alike)
    assert all("$__rate_interval" in t.expr for _, t in all_targets() if "rate(" in t.expr)


def test_stack_files_point_at_each_other():
    services = load_compose().services
    vllm, prometheus, grafana = services["vllm"], services["prometheus"], services["grafana"]
    (job,) = load_prometheus_config().scrape_configs
    assert job.static_configs[0].targets == ["vllm:8000"]
    assert "--port=8000" in vllm.command and "--quantization=acttail" in vllm.command
    assert vllm.deploy["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert vllm.environment["ACTTAIL_PROFILE"] in vllm.mounts()

    assert (DEPLOY_DIR / prometheus.mounts()["/etc/prometheus/prometheus.yml"]).resolve() == PROMETHEUS_CONFIG_PATH
    (datasource,) = load_datasources().datasources
    assert datasource.url == "http://prometheus:9090"
    assert datasource.jsonData["timeInterval"] == load_prometheus_config().global_.scrape_interval
    (provider,) = load_dashboard_providers().providers
    grafana_mounts = grafana.mounts()
    assert (DEPLOY_DIR / grafana_mounts[provider.options["path"]]).resolve() == DASHBOARD_PATH.parent
    assert (DEPLOY_DIR / grafana_mounts["/etc/grafana/provisioning"]).is_dir()


def test_rate_interval_is_the_only_variable():
    assert concrete_expr("rate(x[$__rate_interval])", "30s") == "rate(x[30s])"
    with pytest.raises(StackFileError, match=r"unsupported Grafana variable"):
        concrete_expr('rate(x{model="$model"}[5m])', "30s")


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not on PATH (Debian package prometheus)")
def test_promtool_accepts_the_config_and_every_dashboard_query(tmp_path):
    check = subprocess.run(["promtool", "check", "config", str(PROMETHEUS_CONFIG_PATH)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    # promtool parses PromQL offline only inside rule files: one recording rule per query
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:panel{panel.id}:{target.refId}", "expr": concrete_expr(target.expr, "1m")}
                    for panel, target in all_targets()
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    check = subprocess.run(["promtool", "check", "rules", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def compose_command() -> list[str] | None:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return None


@pytest.mark.skipif(
    compose_command() is None, reason="neither docker-compose nor the docker compose plugin is installed"
)
def test_compose_file_is_valid(tmp_path):
    profile = tmp_path / "profile.json"
    profile.write_text("{}")
    env = {"PATH": os.environ["PATH"], "ACTTAIL_MODEL_DIR": str(tmp_path), "ACTTAIL_PROFILE_FILE": str(profile)}
    check = subprocess.run(
        [*compose_command(), "-f", str(COMPOSE_PATH), "config", "-q"], capture_output=True, text=True, env=env
    )
    assert check.returncode == 0, check.stdout + check.stderr
    # without the model directory the stack refuses to start, naming the variable
    env.pop("ACTTAIL_MODEL_DIR")
    check = subprocess.run(
        [*compose_command(), "-f", str(COMPOSE_PATH), "config", "-q"], capture_output=True, text=True, env=env
    )
    assert check.returncode != 0 and "ACTTAIL_MODEL_DIR" in check.stderr


def test_load_summary_counts_only_successful_requests():
    spec = LoadSpec(num_requests=3, concurrency=2, max_tokens=5)
    records = [
        RequestRecord(sent_s=0.0, ttft_s=0.1, e2e_s=0.5, prompt_tokens=4, completion_tokens=5),
        RequestRecord(sent_s=0.0, ttft_s=0.3, e2e_s=0.7, prompt_tokens=6, completion_tokens=5),
        RequestRecord(sent_s=0.5, e2e_s=2.0, error="ReadTimeout: too slow"),
    ]
    run = LoadRun(url="http://x", model="m", spec=spec, started_at=0.0, duration_s=2.0, records=records)
    summary = LoadSummary.of("dense", run)
    assert (summary.requests_ok, summary.requests_failed) == (2, 1)
    assert summary.output_tokens_per_s == pytest.approx(10 / 2.0)
    assert summary.total_tokens_per_s == pytest.approx(20 / 2.0)
    assert summary.ttft_s.p50 == pytest.approx(0.2)
    assert summary.tpot_s.mean == pytest.approx(0.1)  # (0.5 - 0.1) / 4 and (0.7 - 0.3) / 4
    assert summary.first_errors == ["ReadTimeout: too slow"]


def test_pooled_rounds_are_one_run_of_all_their_requests():
    spec = LoadSpec(num_requests=1, concurrency=1, max_tokens=5)

    def run(duration_s: float, ttft_s: float) -> LoadRun:
        record = RequestRecord(sent_s=0.0, ttft_s=ttft_s, e2e_s=ttft_s + 0.4, prompt_tokens=4, completion_tokens=5)
        return LoadRun(url="http://x", model="m", spec=spec, started_at=0.0, duration_s=duration_s, records=[record])

    summary = pooled("acttail", [run(1.0, 0.1), run(3.0, 0.3)])
    assert (summary.label, summary.requests_ok, summary.duration_s) == ("acttail", 2, 4.0)
    assert summary.output_tokens_per_s == pytest.approx(10 / 4.0)
    assert summary.ttft_s.p50 == pytest.approx(0.2)


def test_dense_control_is_a_second_dense_server_compared_like_acttail(monkeypatch, capsys):
    started = []

    def bench(args, specs, servers, cpus):
        started.extend(servers)
        record = RequestRecord(sent_s=0.0, ttft_s=0.1, e2e_s=0.5, prompt_tokens=4, completion_tokens=5)

        def run(duration_s: float) -> LoadRun:
            return LoadRun(
                url="http://x", model="m", spec=specs[0], started_at=0.0, duration_s=duration_s, records=[record]
            )

        return [ServerRun(label=label, run=run(1.0 + i)) for i, (label, _, _) in enumerate(started)]

    monkeypatch.setattr("benchmarks.load_bench._bench_started_servers", bench)
    main(["--model", "/m", "--sparsity", "0.8", "--dense-control", "--vllm-args", "--dtype bfloat16"])
    assert [(label, args, env) for label, args, env in started] == [
        ("dense", ["--dtype", "bfloat16"], {}),
        (DENSE_CONTROL, ["--dtype", "bfloat16"], {}),
        ("acttail 80%", ["--dtype", "bfloat16", "--quantization", "acttail"], {"ACTTAIL_SPARSITY": "0.8"}),
    ]
    control_row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith(DENSE_CONTROL))
    assert "0.500x" in control_row  # compared with dense (2 s against 1 s), as the ActTail servers are


def test_each_concurrency_sends_rounds_per_stream_and_at_least_min_requests(monkeypatch):
    sent = {}

    def bench(args, specs, servers, cpus):
        sent.update({spec.concurrency: spec.num_requests for spec in specs})
        return []

    monkeypatch.setattr("benchmarks.load_bench._bench_started_servers", bench)
    main(["--model", "/m", "--sparsity", "0.8", "--concurrency", "1,4,16", "--rounds", "4", "--min-requests", "24"])
    assert sent == {1: 24, 4: 24, 16: 64}
    sent.clear()
    main(["--model", "/m", "--sparsity", "0.8", "--concurrency", "1,4"])
    assert sent == {1: 8, 4: 16}  # 4 rounds, at least 8


@pytest.mark.parametrize(
    ("argv", "named"),
    [
        (["--url", "a=http://x", "--max-tokens-spread", "1.5"], "--max-tokens-spread 1.5"),
        (["--url", "a=http://x", "--dense-control"], "--dense-control"),
        (["--url", "a=http://x", "--concurrency", "16,64", "--request-rate", "6"], "--request-rate 6.0"),
        (["--url", "a=http://x", "--request-rate", "0"], "--request-rate 0.0"),
        (["--url", "a=http://x", "--pin-cpus"], "--pin-cpus"),
        (["--url", "a=http://x", "--start-rotation", "1"], "--start-rotation"),
        (["--model", "/m", "--sparsity", "0.8", "--cpu-rotation", "1"], "--cpu-rotation"),
    ],
)
def test_load_bench_refuses_options_it_cannot_honour_in_one_line(argv, named, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert named in error and ("e.g." in error or "--url" in error)  # the problem and the fix


def test_pinned_servers_get_whole_cores_of_their_own_and_the_client_the_first(tmp_path):
    # sysfs of 6 cores with hyperthreads numbered as Linux does on x86 (cpu N and N + 6 share a core)
    for cpu in range(12):
        topology = tmp_path / f"cpu{cpu}" / "topology"
        topology.mkdir(parents=True)
        topology.joinpath("thread_siblings_list").write_text(f"{cpu % 6},{cpu % 6 + 6}\n")
    assert parse_cpu_list("0-2,8,10-11") == [0, 1, 2, 8, 10, 11]
    cores = physical_cores(range(12), sysfs=tmp_path)
    assert cores == [[0, 6], [1, 7], [2, 8], [3, 9], [4, 10], [5, 11]]
    assert physical_cores([3, 4], sysfs=tmp_path / "absent") == [[3], [4]]

    client, shares = cpu_shares(cores, servers=2)
    assert shares == [[1, 7, 2, 8], [3, 9, 4, 10]]
    assert client == [0, 6, 5, 11]  # the first core and the one left over
    with pytest.raises(ValueError, match=r"--pin-cpus: 6 servers and the client need 7 physical cores.*drop --pin"):
        cpu_shares(cores, servers=6)


def test_pin_cpus_runs_each_started_server_on_its_share(monkeypatch, tmp_path):
    """main pins the client and hands each server its share; VllmServer starts the process there."""
    pinned, given = [], {}
    monkeypatch.setattr("benchmarks.load_bench.physical_cores", lambda cpus: [[0], [1], [2], [3], [4]])
    monkeypatch.setattr("benchmarks.load_bench.os.sched_setaffinity", lambda pid, cpus: pinned.append(cpus))

    def bench(args, specs, servers, cpus):
        given.update(cpus)
        return []

    monkeypatch.setattr("benchmarks.load_bench._bench_started_servers", bench)
    monkeypatch.setattr("benchmarks.load_bench.summaries_of", lambda runs: [])
    main(["--model", "/m", "--sparsity", "0.5,0.8", "--pin-cpus", "--output", str(tmp_path / "r.json")])
    assert pinned == [[0, 4]]
    assert given == {"client": [0, 4], "dense": [1], "acttail 50%": [2], "acttail 80%": [3]}
    assert BenchReport.model_validate_json((tmp_path / "r.json").read_text()).cpus == given
    monkeypatch.undo()

    one_cpu = min(os.sched_getaffinity(0))
    server = VllmServer("m", cpus=frozenset({one_cpu}))
    monkeypatch.setattr(
        server, "command", lambda: [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"]
    )
    server.start()
    assert server.process.wait(timeout=60) == 0
    assert server.log().strip() == str([one_cpu])
    server.stop()


def _record_started_servers(monkeypatch, cores: list[list[int]]) -> list[tuple[list[str], dict[str, list[int]]]]:
    """main on a machine of these physical cores, starting no server: each call's (start order,
    CPUs per label) is appended to the list returned."""
    started = []
    monkeypatch.setattr("benchmarks.load_bench.physical_cores", lambda cpus: cores)
    monkeypatch.setattr("benchmarks.load_bench.os.sched_setaffinity", lambda pid, cpus: None)

    def bench(args, specs, servers, cpus):
        started.append(([label for label, _, _ in servers], dict(cpus)))
        return []

    monkeypatch.setattr("benchmarks.load_bench._bench_started_servers", bench)
    monkeypatch.setattr("benchmarks.load_bench.summaries_of", lambda runs: [])
    return started


def test_start_rotation_changes_only_the_order_servers_start_in(monkeypatch, tmp_path):
    started = _record_started_servers(monkeypatch, [[0], [1], [2], [3]])
    argv = ["--model", "/m", "--sparsity", "0.8", "--dense-control", "--pin-cpus", "--output", str(tmp_path / "r.json")]
    main(argv)
    main([*argv, "--start-rotation", "1"])
    (order0, cpus0), (order1, cpus1) = started
    assert order0 == ["dense", DENSE_CONTROL, "acttail 80%"]
    assert order1 == [DENSE_CONTROL, "acttail 80%", "dense"]
    assert cpus1 == cpus0 and cpus0["dense"] == [1]  # each label keeps its cores
    assert BenchReport.model_validate_json((tmp_path / "r.json").read_text()).started == order1


def test_cpu_rotation_moves_only_the_cores_and_pool_names_them(monkeypatch, tmp_path, capsys):
    given = _record_started_servers(monkeypatch, [[0], [1], [2], [3, 4], [5], [6]])
    argv = ["--model", "/m", "--sparsity", "0.8", "--dense-control", "--pin-cpus"]
    main([*argv, "--output", str(tmp_path / "a.json")])
    main([*argv, "--cpu-rotation", "1", "--output", str(tmp_path / "b.json")])
    (order0, cpus0), (order1, cpus1) = given
    assert order1 == order0 == ["dense", DENSE_CONTROL, "acttail 80%"]
    assert cpus0 == {"client": [0, 5, 6], "dense": [1], DENSE_CONTROL: [2], "acttail 80%": [3, 4]}
    assert [cpus1[label] for label in order0] == [cpus0[DENSE_CONTROL], cpus0["acttail 80%"], cpus0["dense"]]
    assert cpus1["client"] == cpus0["client"]

    main(["--pool", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    lines = capsys.readouterr().out.splitlines()
    report1 = next(line for line in lines if line.startswith("report 1:"))
    assert report1.endswith("CPUs client 0,5-6; dense 2; dense again 3-4; acttail 80% 1")
    assert parse_cpu_list(format_cpu_list([1, 2, 3, 5, 7, 8])) == [1, 2, 3, 5, 7, 8]
    assert format_cpu_list([1, 2, 3, 5, 7, 8]) == "1-3,5,7-8"


def test_decode_bench_table_compares_first_token_times_where_a_run_recorded_them():
    from benchmarks.vllm_decode_bench import format_table

    row = {"shape": "7b", "batch": 1, "sparsity": 0.8, "dense_tok_s": 160.0, "tok_s": 280.0}
    older = {**row, "dense_decode_tok_s": 167.0, "decode_tok_s": 301.0}
    newer = {**older, "batch": 4, "dense_first_token_seconds": 0.0250, "first_token_seconds": 0.0275}
    lines = format_table([older, newer]).splitlines()
    assert lines[0].endswith("| first token ms: dense | acttail | vs dense |")
    assert lines[2].endswith("| 167 | 301 | 1.80x | - | - | - |")
    assert lines[3].endswith("| 167 | 301 | 1.80x | 25.0 | 27.5 | 1.10x |")


def test_pool_prints_runs_of_several_reports_as_one_table_and_each_reports_ratios(tmp_path, capsys):
    spec = LoadSpec(num_requests=1, concurrency=1, max_tokens=5)

    def server_run(label: str, round_: int, ttft_s: float) -> ServerRun:
        record = RequestRecord(sent_s=0.0, ttft_s=ttft_s, e2e_s=ttft_s + 0.4, prompt_tokens=4, completion_tokens=5)
        run = LoadRun(url="http://x", model="m", spec=spec, started_at=0.0, duration_s=1.0, records=[record])
        return ServerRun(label=label, round=round_, run=run)

    # two runs of fresh servers, two rounds each: acttail's TTFT 2x dense's in the first, 1x in the second
    first = [server_run("dense", r, 0.1) for r in (0, 1)] + [server_run("acttail 80%", r, 0.2) for r in (0, 1)]
    second = [server_run("dense", r, 0.3) for r in (0, 1)] + [server_run("acttail 80%", r, 0.3) for r in (0, 1)]
    paths = []
    for i, (runs, started) in enumerate([(first, ["dense", "acttail 80%"]), (second, ["acttail 80%", "dense"])]):
        paths.append(tmp_path / f"run{i}.json")
        report = BenchReport(summaries=[], vllm_args=["--dtype", "bfloat16"], started=started, runs=runs)
        paths[-1].write_text(report.model_dump_json())
    main(["--pool", *map(str, paths), "--output", str(tmp_path / "pooled.json")])
    out = capsys.readouterr().out.splitlines()
    acttail_row = next(line for line in out if line.startswith("acttail 80%")).split()
    assert acttail_row[-1] == "1.250x"  # TTFT p50 over all 8 requests: 0.25 against 0.2
    assert f"report 1: {paths[1]}, started acttail 80% / dense" in out
    per_report = out[next(i for i, line in enumerate(out) if line.startswith("per report, against the dense")) + 1]
    assert per_report.split()[-4:] == ["2.000x", "1.000x", "(1.000x,", "1.414x)"]  # and the geometric means
    pooled_report = BenchReport.model_validate_json((tmp_path / "pooled.json").read_text())
    assert sorted({r.round for r in pooled_report.runs}) == [0, 1, 2, 3]  # rounds numbered on

    other = tmp_path / "other.json"
    other.write_text(BenchReport(summaries=[], vllm_args=["--dtype", "float16"], runs=first).model_dump_json())
    for bad, named in [(other, "pool reports of the same servers"), (tmp_path / "absent.json", "not a load_bench")]:
        with pytest.raises(SystemExit, match=named):
            main(["--pool", str(paths[0]), str(bad)])
    # reports of servers that do not pool still give each one's ratios to its own dense server
    main(["--ratios", str(paths[0]), str(other)])
    out = capsys.readouterr().out.splitlines()
    assert out[1] == f"report 1: {other}, `vllm serve` --dtype float16"
    assert out[-1].split()[3:] == ["1.000x", "1.000x;", "2.000x", "2.000x", "(1.000x,", "2.000x)"]
    with pytest.raises(SystemExit, match="--ratios .*absent.json: not a load_bench report"):
        main(["--ratios", str(paths[0]), str(tmp_path / "absent.json")])


def test_spread_lengths_are_the_same_for_every_run_and_sent_as_asked(monkeypatch):
    spec = LoadSpec(num_requests=40, concurrency=4, max_tokens=128, max_tokens_spread=0.5)
    lengths = spec.max_tokens_list()
    assert lengths == spec.max_tokens_list()  # every server of a comparison gets these
    assert min(lengths) >= 64 and max(lengths) <= 192 and len(set(lengths)) > 10
    assert LoadSpec(num_requests=3, max_tokens=7).max_tokens_list() == [7, 7, 7]
    asked = []

    async def fake_stream(client, model, prompt, max_tokens, t0):
        asked.append(max_tokens)
        return RequestRecord(sent_s=0.0, ttft_s=0.01, e2e_s=0.02, prompt_tokens=1, completion_tokens=max_tokens)

    monkeypatch.setattr("benchmarks.load_bench._stream_one", fake_stream)
    run = run_load("http://127.0.0.1:9", "m", spec)
    assert asked == lengths  # sent in order, each with its own length
    assert run.completion_tokens == sum(lengths)


def _sse(payload: dict | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


async def _stream_from(events: list[bytes], gap_s: float) -> RequestRecord:
    """``_stream_one`` against a real HTTP server that streams ``events``, ``gap_s`` apart."""

    async def completions(request: web.Request) -> web.StreamResponse:
        assert (await request.json())["stream"] is True
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in events:
            await asyncio.sleep(gap_s)
            await response.write(event)
        return response

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    async with TestServer(app) as server, aiohttp.ClientSession(base_url=str(server.make_url("/"))) as session:
        return await _stream_one(session, "m", "p", 3, time.perf_counter())


def test_time_to_first_token_is_the_first_streamed_token_even_when_its_text_is_held_back():
    # vLLM streams a chunk per token; a byte token that is not yet a whole character comes as ""
    token = {"choices": [{"index": 0, "text": "", "finish_reason": None}], "usage": None}
    text = {"choices": [{"index": 0, "text": '\u00e9 "prompt_tokens"', "finish_reason": None}], "usage": None}
    usage = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 3}}
    events = [_sse(token), _sse(text), _sse(text), _sse(usage), _sse("[DONE]")]
    record = asyncio.run(_stream_from(events, 0.03))
    assert 0.02 < record.ttft_s < record.first_text_s - 0.02  # the first chunk, not the first text
    assert record.e2e_s > record.first_text_s and (record.prompt_tokens, record.completion_tokens) == (3, 3)
    with pytest.raises(RuntimeError, match="the server streamed an error: overloaded"):
        asyncio.run(_stream_from([_sse(text), _sse({"error": "overloaded"})], 0.0))
    with pytest.raises(RuntimeError, match="without a usage chunk"):
        asyncio.run(_stream_from([_sse(text), _sse("[DONE]")], 0.0))
    records = [
        record,
        RequestRecord(sent_s=0.0, ttft_s=0.01, first_text_s=0.01, e2e_s=0.1, completion_tokens=5),
        RequestRecord(sent_s=0.0, ttft_s=0.01, first_text_s=None, e2e_s=0.1, completion_tokens=5),
    ]
    run = LoadRun(url="u", model="m", spec=LoadSpec(concurrency=3), started_at=0.0, duration_s=1.0, records=records)
    table = format_table([LoadSummary.of("acttail 80%", run)])
    older = run.model_copy(update={"records": [RequestRecord(sent_s=0.0, ttft_s=0.01, e2e_s=0.1)]})
    assert "streamed no text" not in format_table([LoadSummary.of("dense", older)])  # no first text kept
    assert "acttail 80% 3: 2 of 3 first tokens streamed no text, first text " in table
    lag = float(table.split("first text ")[1].split(" ms")[0])
    assert abs(lag - 1000 * (record.first_text_s - record.ttft_s)) < 0.1 and "1 never any" in table


def test_ttft_ratio_interval_brackets_a_true_ratio_and_narrows_with_more_requests():
    rng = np.random.default_rng(1)
    dense = rng.lognormal(np.log(0.05), 0.3, 400)
    low, high = ttft_ratio_interval(1.5 * rng.lognormal(np.log(0.05), 0.3, 400), dense)
    assert 1.3 < low < 1.5 < high < 1.7  # a 1.5x slower server, told apart from an equal one
    assert ttft_ratio_interval(dense, dense) == ttft_ratio_interval(dense, dense)  # seeded
    few_low, few_high = ttft_ratio_interval(dense[:24], dense[:24])
    many_low, many_high = ttft_ratio_interval(dense, dense)
    assert few_low < many_low < 1 < many_high < few_high

    def run(ttfts) -> LoadRun:
        records = [RequestRecord(sent_s=0.0, ttft_s=float(t), e2e_s=1.0, completion_tokens=5) for t in ttfts]
        spec = LoadSpec(concurrency=1)
        return LoadRun(url="u", model="m", spec=spec, started_at=0.0, duration_s=1.0, records=records)

    summaries = [LoadSummary.of("dense", run(dense)), LoadSummary.of("acttail 80%", run(1.5 * dense))]
    line = next(line for line in format_table(summaries).splitlines() if "drawn again" in line)
    expected_low, expected_high = ttft_ratio_interval(1.5 * dense, dense)
    assert line == (
        "acttail 80% 1: TTFT p50 1.500x dense's; its 400 and dense's 400 requests drawn again put 95% of it "
        f"within {expected_low:.3f}-{expected_high:.3f}x"
    )
    assert "drawn again" not in format_table(summaries[:1])
    assert "ttft_sample_s" not in summaries[0].model_dump_json()  # reports keep the records instead


def test_first_wave_is_what_a_closed_loop_sent_before_any_request_ended():
    def run(ttfts: list[float], spec: LoadSpec | None = None) -> LoadRun:
        # two streams: requests 0 and 1 sent at once, each next one when one of them has ended
        sent = [0.0, 0.001, 0.5, 0.6]
        records = [RequestRecord(sent_s=t, ttft_s=f, e2e_s=0.5, completion_tokens=5) for t, f in zip(sent, ttfts)]
        spec = spec or LoadSpec(concurrency=2)
        return LoadRun(url="u", model="m", spec=spec, started_at=0.0, duration_s=1.2, records=records)

    dense = LoadSummary.of("dense", run([0.2, 0.4, 0.05, 0.07]))
    acttail = LoadSummary.of("acttail 80%", run([0.3, 0.5, 0.05, 0.07]))
    assert dense.first_wave.requests == 2 and dense.first_wave.ttft_s.p50 == pytest.approx(0.3)
    assert dense.first_wave.later_ttft_s.p50 == pytest.approx(0.06)
    assert pooled("dense", [run([0.2, 0.4, 0.05, 0.07])] * 3).first_wave.requests == 6  # each run's first two
    line = format_table([dense, acttail]).splitlines()[-1]
    assert line == (
        "acttail 80% 2: TTFT p50 of the first wave (2 requests sent before any ended) 400.0 ms, "
        "of the 2 after it 60.0 ms (1.333x and 1.000x dense's)"
    )
    open_loop = LoadSpec(concurrency=2, request_rate=5.0)
    assert LoadSummary.of("dense", run([0.2, 0.4, 0.05, 0.07], open_loop)).first_wave is None  # no wave sent at once
    assert LoadSummary.of("dense", run([0.2, 0.4, 0.05, 0.07], LoadSpec(concurrency=1))).first_wave is None


def test_open_loop_sends_each_request_at_its_arrival_time_with_at_most_concurrency_in_flight(monkeypatch):
    spec = LoadSpec(num_requests=30, concurrency=3, max_tokens=5, request_rate=100.0)
    due = spec.arrival_times()
    assert due == spec.arrival_times()  # every server of a comparison gets these times
    assert all(a < b for a, b in zip(due, due[1:])) and 0.1 < due[-1] < 0.6  # 30 at about 100/s
    assert LoadSpec(num_requests=2).arrival_times() == [None, None]  # closed loop
    in_flight, most = 0, 0

    async def fake_stream(client, model, prompt, max_tokens, t0):
        nonlocal in_flight, most
        sent = time.perf_counter() - t0
        in_flight += 1
        most = max(most, in_flight)
        await asyncio.sleep(0.02)  # three streams of 20 ms keep up with 100 requests/s but not always
        in_flight -= 1
        return RequestRecord(sent_s=sent, ttft_s=0.01, e2e_s=0.02, prompt_tokens=1, completion_tokens=max_tokens)

    monkeypatch.setattr("benchmarks.load_bench._stream_one", fake_stream)
    run = run_load("http://127.0.0.1:9", "m", spec)
    sent = sorted(r.sent_s for r in run.records)
    assert all(s >= d - 1e-3 for s, d in zip(sent, due))  # none before it is due
    assert most <= 3 and run.duration_s >= due[-1]
    row = format_table([LoadSummary.of("dense", run)]).splitlines()[1].split()
    assert (row[1], row[-1]) == ("3@100/s", "-")  # named by its rate; no full-batch decode rate


def test_interleaved_rounds_pool_per_server_and_pair_by_round(tmp_path, capsys):
    spec = LoadSpec(num_requests=1, concurrency=4, max_tokens=5)

    def server_run(label: str, round_: int, duration_s: float, ttft_s: float) -> ServerRun:
        record = RequestRecord(sent_s=0.0, ttft_s=ttft_s, e2e_s=ttft_s + 0.4, prompt_tokens=4, completion_tokens=5)
        run = LoadRun(url="http://x", model="m", spec=spec, started_at=0.0, duration_s=duration_s, records=[record])
        return ServerRun(label=label, round=round_, run=run)

    # the order of a round rotates: acttail ran first in round 1
    runs = [
        server_run("dense", 0, 1.0, 0.1),
        server_run("acttail 80%", 0, 2.0, 0.1),
        server_run("acttail 80%", 1, 1.0, 0.3),
        server_run("dense", 1, 4.0, 0.1),
    ]
    dense, acttail = summaries_of(runs)
    assert (dense.label, dense.duration_s, acttail.label, acttail.duration_s) == ("dense", 5.0, "acttail 80%", 3.0)
    ratios = ["0.500x", "4.000x;", "1.000x", "3.000x", "(1.414x,", "1.732x)"]  # then their geometric means
    assert format_spread(runs).splitlines()[1].split()[3:] == ratios
    untimed = [server_run("dense", 0, 1.0, 0.1), server_run("acttail 80%", 0, 2.0, 0.1)]
    for r in untimed:
        r.run.records[0].ttft_s = None  # no first token timed: no TTFT ratio to average
    assert format_spread(untimed).splitlines()[1].split()[3:] == ["0.500x;", "(0.500x,", "-)"]
    report = BenchReport(summaries=[dense, acttail], runs=runs)
    assert BenchReport.model_validate_json(report.model_dump_json()).runs[2].round == 1


def vllm_metrics_text(requests_done: int, prefill_s: float) -> str:
    """A /metrics page of two engines with vLLM's per-request histograms (the other series elided)."""
    lines = []
    for engine in ("0", "1"):
        for name, total in [
            ("vllm:request_queue_time_seconds", 0.5),
            ("vllm:request_prefill_time_seconds", prefill_s),
            ("vllm:time_to_first_token_seconds", 1.0 + prefill_s),
            ("vllm:request_decode_time_seconds", 4.0),
        ]:
            labels = f'engine="{engine}",model_name="m"'
            lines += [
                f"# TYPE {name} histogram",
                f'{name}_bucket{{{labels},le="+Inf"}} {requests_done}',
                f"{name}_count{{{labels}}} {requests_done}",
                f"{name}_sum{{{labels}}} {total}",
            ]
    return "\n".join(lines) + "\n"


def test_engine_times_are_the_servers_histograms_over_the_runs_requests(monkeypatch):
    pages = iter([vllm_metrics_text(3, 0.6), vllm_metrics_text(5, 1.0)])  # before the run, after it

    class Page:
        status_code = 200

        def __init__(self):
            self.text = next(pages)

    monkeypatch.setattr("benchmarks.load_bench.requests.get", lambda url, timeout: Page())
    spec = LoadSpec(num_requests=4, concurrency=2, max_tokens=5)
    record = RequestRecord(sent_s=0.0, ttft_s=0.1, e2e_s=0.5, prompt_tokens=4, completion_tokens=5)
    run = LoadRun(url="http://x", model="m", spec=spec, started_at=0.0, duration_s=1.0, records=[record] * 4)
    monkeypatch.setattr("benchmarks.load_bench.run_load", lambda url, model, spec: run.model_copy())
    measured = warmed_run("http://x", "m", spec, warmup=0)
    # both engines' series summed, the page before the run subtracted: 4 requests, 0.8 s of prefill
    assert measured.engine.requests == 4
    assert measured.engine.mean_ms("prefill") == pytest.approx(200.0)
    assert measured.engine.mean_ms("queue") == pytest.approx(0.0)

    slower = EngineTimes(requests=4, queue_s=0.0, prefill_s=1.2, ttft_s=1.2, decode_s=8.0)
    acttail = pooled("acttail 80%", [measured.model_copy(update={"engine": slower})] * 2)
    assert acttail.engine.requests == 8 and acttail.engine.mean_ms("prefill") == pytest.approx(300.0)
    table = format_table([pooled("dense", [measured]), acttail]).splitlines()
    assert table[-2].split()[-2:] == ["1.500x", "1.500x"]  # prefill 300 against 200 ms; TTFT the same
    assert table[-2].split()[-3] == "100.0"  # the client's TTFT mean beside the engine's

    pages = iter(["# a server without vLLM's histograms\n"] * 2)
    assert warmed_run("http://x", "m", spec, warmup=0).engine is None
    assert "vLLM's own" not in format_table([LoadSummary.of("dense", run)])


def test_server_evidence_is_kept_gzipped_under_server_logs(tmp_path):
    class Server:
        def metrics(self, timeout_s):
            return 'acttail_tokens_total{path="sparse_gemv"} 7.0\n'

        def log(self):
            return "ActTail budgets: from the weights\n"

    logs = tmp_path / "serve_13b"
    _keep_server_evidence(argparse.Namespace(server_logs=logs), "acttail 80%", Server())
    assert sorted(p.name for p in logs.iterdir()) == ["acttail_80.log.gz", "acttail_80.metrics.gz"]
    assert gzip.decompress((logs / "acttail_80.metrics.gz").read_bytes()).decode() == Server().metrics(30)
    assert gzip.decompress((logs / "acttail_80.log.gz").read_bytes()).decode() == Server().log()
    _keep_server_evidence(argparse.Namespace(server_logs=None), "dense", Server())  # not asked: nothing written
    assert len(list(logs.iterdir())) == 2


# --- the real thing ---------------------------------------------------------------------------

SERVE_ARGS = ("--dtype", "float32", "--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "8")
LOAD = LoadSpec(num_requests=200, concurrency=16, max_tokens=8, request_timeout_s=120)
SCRAPE_INTERVAL_S = 1.0


def served_counter(server: VllmServer, name: str) -> float:
    """Sum of a counter over its series, read from the server's /metrics directly."""
    text = server.metrics()
    values = re.findall(rf"^{re.escape(name)}(?:\{{.*\}})? (\S+)$", text, re.M)
    assert values, f"{name} is not on {server.url}/metrics"
    return sum(float(v) for v in values)


@pytest.mark.slow
def test_every_dashboard_query_has_data_under_load(smollm2_dir):
    if prometheus_binary() is None:
        pytest.skip("the prometheus binary is not installed: make prometheus (apt-get, as root)")
    model = str(smollm2_dir)
    env = {"ACTTAIL_PROFILE": str(shipped_profile("acttail", 50)), "ACTTAIL_METRICS_INTERVAL_S": "0.5"}
    with (
        VllmServer(model, (*SERVE_ARGS, "--quantization", "acttail"), env=env) as server,
        LocalPrometheus([f"127.0.0.1:{server.port}"], SCRAPE_INTERVAL_S) as prom,
    ):
        prom.wait_for_scrape_after(time.time())
        assert [s.value[1] for s in prom.query("up")] == [1.0], prom.log()[-2000:]

        run = warmed_run(server.url, model, LOAD, warmup=0)
        assert len(run.records) == LOAD.num_requests
        assert run.failures == []
        # the engine's own times for the same requests: every one counted, and its TTFT, which
        # leaves out HTTP and the client, no longer than the client's
        assert run.engine.requests == LOAD.num_requests
        assert run.engine.prefill_s > 0 and run.engine.decode_s > 0
        assert run.engine.ttft_s <= sum(r.ttft_s for r in run.records)
        # the worker's ActTail snapshot lags by up to one interval; then one more scrape
        time.sleep(1.0)
        prom.wait_for_scrape_after(time.time())
        at = time.time()

        (generated,) = finite_values(prom.query("sum(vllm:generation_tokens_total)", at=at))
        assert generated == served_counter(server, "vllm:generation_tokens_total")
        assert generated == run.completion_tokens == LOAD.num_requests * LOAD.max_tokens  # ignore_eos

        # the rate window Grafana would choose for a dashboard spanning the load
        window = f"{math.ceil(at - run.started_at) + 2}s"
        empty = []
        for panel, target in all_targets():
            expr = concrete_expr(target.expr, window)
            if not finite_values(prom.query(expr, at=at)):
                empty.append(f"{panel.title} [{target.refId}]: {expr}")
        assert empty == [], "dashboard queries without data:\n" + "\n".join(empty)
