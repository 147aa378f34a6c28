"""systemd notify protocol: a real AF_UNIX datagram socket stands in for systemd."""

from __future__ import annotations

import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_harness import DaemonProc, child_env, cleanup_prefix, unique_prefix, wait_for, write_config

from eplbd.notify import Notifier, watchdog_interval

pytestmark = pytest.mark.timeout(60)


class Listener:
    """Collects datagrams sent to the socket (path or abstract '@name'), timestamped on
    arrival by a background thread."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(b"\0" + address[1:].encode() if address.startswith("@") else address)
        self.sock.settimeout(0.02)
        self.address = address
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._recv, daemon=True)
        self._thread.start()

    def _recv(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().split("\n") if line)
            with self._lock:
                self.messages.append((time.monotonic(), fields))

    def drain(self) -> list[dict[str, str]]:
        with self._lock:
            return [m for _, m in self.messages]

    def has(self, key: str, value: str | None = None) -> bool:
        return any(key in m and (value is None or m[key] == value) for m in self.drain())

    def times(self, key: str) -> list[float]:
        with self._lock:
            return [t for t, m in self.messages if key in m]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(1)
        self.sock.close()


@pytest.fixture
def prefix() -> Iterator[str]:
    p = unique_prefix("n")
    yield p
    cleanup_prefix(p)


def test_watchdog_interval_rules() -> None:
    assert watchdog_interval({}, pid=5) is None
    assert watchdog_interval({"WATCHDOG_USEC": "10000000"}, pid=5) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "5"}, pid=5) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "6"}, pid=5) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}, pid=5) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}, pid=5) is None


def test_notifier_is_silent_without_socket() -> None:
    n = Notifier({})
    assert not n.enabled and not n.ready() and not n.ping_watchdog()


def test_notifier_abstract_socket() -> None:
    addr = "@eplbd-test-" + uuid.uuid4().hex
    lst = Listener(addr)
    try:
        n = Notifier({"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "1000"})
        assert n.ready("hello")
        assert n.ping_watchdog(now=1e9)
        assert not n.ping_watchdog(now=1e9)  # not yet due again
        assert wait_for(lambda: lst.has("READY", "1") and lst.has("WATCHDOG", "1"), timeout=2)
        assert any(m.get("STATUS") == "hello" for m in lst.drain())
        n.close()
    finally:
        lst.close()


def _run_daemon(tmp_path: Path, prefix: str, env_extra: dict[str, str]) -> DaemonProc:
    conf = write_config(tmp_path / "c.toml", shm_prefix=prefix, discovery_interval_s=0.1)
    return DaemonProc(conf, tmp_path / "d.log", env=child_env(**env_extra))


def test_daemon_ready_watchdog_status_stopping(tmp_path: Path, prefix: str) -> None:
    path = str(tmp_path / "notify.sock")
    lst = Listener(path)
    try:
        d = _run_daemon(tmp_path, prefix, {"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "400000"})
        try:
            wait_for(lambda: lst.has("READY", "1"), timeout=10, what="READY=1")
            assert any("STATUS" in m for m in lst.drain())
            time.sleep(1.0)
            pings = lst.times("WATCHDOG")
            # Every 0.2 s (half of 0.4 s): about 5 in a second; allow a loaded machine.
            assert len(pings) >= 3, pings
            gaps = [b - a for a, b in zip(pings, pings[1:], strict=False)]
            assert max(gaps) < 0.4, gaps  # never let the 0.4 s watchdog expire
        finally:
            assert d.stop(signal.SIGTERM) == 0
        assert lst.has("STOPPING", "1")
    finally:
        lst.close()


def test_daemon_abstract_socket_and_foreign_watchdog_pid(tmp_path: Path, prefix: str) -> None:
    addr = "@eplbd-test-" + uuid.uuid4().hex
    lst = Listener(addr)
    try:
        # WATCHDOG_PID names another process: the watchdog is not ours to ping.
        env = {"NOTIFY_SOCKET": addr, "WATCHDOG_USEC": "100000", "WATCHDOG_PID": str(os.getpid())}
        d = _run_daemon(tmp_path, prefix, env)
        try:
            wait_for(lambda: lst.has("READY", "1"), timeout=10, what="READY=1 on abstract socket")
            time.sleep(0.4)
            assert not lst.has("WATCHDOG")
        finally:
            assert d.stop() == 0
    finally:
        lst.close()


def test_daemon_reload_notifies(tmp_path: Path, prefix: str) -> None:
    path = str(tmp_path / "n.sock")
    lst = Listener(path)
    try:
        d = _run_daemon(tmp_path, prefix, {"NOTIFY_SOCKET": path})
        try:
            wait_for(lambda: lst.has("READY", "1"), timeout=10)
            d.proc.send_signal(signal.SIGHUP)
            wait_for(lambda: lst.has("RELOADING", "1"), timeout=5, what="RELOADING=1")
            assert any("MONOTONIC_USEC" in m for m in lst.drain())
            wait_for(
                lambda: sum("READY" in m for m in lst.drain()) >= 2, timeout=5, what="READY after reload"
            )
        finally:
            assert d.stop() == 0
    finally:
        lst.close()
