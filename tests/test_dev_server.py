"""``VllmServer``: the port it holds for its server, and a server that has exited reported with its
exit code and the end of its log."""

from __future__ import annotations

import shutil
import socket
import sys

import pytest

from acttail_vllm.dev.server import ServerError, VllmServer, held_port


class ExitingServer(VllmServer):
    """Stands in for a ``vllm serve`` whose engine died: it logs one line and exits with 3."""

    def command(self) -> list[str]:
        return [sys.executable, "-c", "print('engine core died'); raise SystemExit(3)"]


def test_metrics_of_an_exited_server_raise_with_its_log():
    server = ExitingServer("model").start()
    try:
        assert server.wait_exit(30) == 3
        with pytest.raises(ServerError, match=r"(?s)vllm serve exited with 3:.*engine core died"):
            server.metrics()
    finally:
        server.stop()


def test_an_exiting_server_never_becomes_healthy_and_keeps_its_log():
    server = ExitingServer("model")
    with pytest.raises(ServerError, match=r"(?s)vllm serve exited with 3:.*engine core died"):
        with server:
            pass
    try:
        assert "engine core died" in server.log_path.read_text()
    finally:
        shutil.rmtree(server.workdir)


def bind_plainly(port: int) -> None:
    """Bind ``port`` as a search for a free port does (no SO_REUSEADDR)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))


def test_a_held_port_takes_vllms_listener_and_no_other_bind():
    from vllm.entrypoints.launchers.launcher import create_server_socket

    with held_port() as hold:
        port = hold.getsockname()[1]
        with pytest.raises(OSError):
            bind_plainly(port)
        with create_server_socket(("127.0.0.1", port), reuse_port=False) as listener:
            listener.listen()


def test_a_server_holds_its_port_until_it_stops():
    server = ExitingServer("model")
    with pytest.raises(OSError):
        bind_plainly(server.port)
    server.stop()
    bind_plainly(server.port)
