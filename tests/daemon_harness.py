"""Shared helpers for the daemon/ctl tests: a unique shm prefix, the daemon as a subprocess,
a node-leader stand-in that writes windows, and polling helpers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from eplbd.shm import remove_prefix

REPO = Path(__file__).resolve().parents[1]
SHM = Path("/dev/shm")


def unique_prefix(tag: str = "t") -> str:
    return f"eplbdtest{tag}{uuid.uuid4().hex[:10]}."


def cleanup_prefix(prefix: str) -> None:
    """Remove every segment and doorbell a test created under ``prefix``."""
    remove_prefix(prefix)


def write_config(path: Path, **keys: Any) -> Path:
    lines = []
    for k, v in keys.items():
        lines.append(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}")
    path.write_text("\n".join(lines) + "\n")
    return path


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("EPLBD_", "NOTIFY_SOCKET", "WATCHDOG_"))}
    env.pop("JOURNAL_STREAM", None)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


class DaemonProc:
    """``python -m eplbd.cli run --config PATH`` with stderr captured in a file."""

    def __init__(self, config: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "eplbd.cli", "run", "--config", str(config)],
            stdout=subprocess.DEVNULL,
            stderr=self._log,
            env=env or child_env(),
            cwd=REPO,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def lines(self, needle: str = "") -> list[str]:
        return [ln for ln in self.log().splitlines() if needle in ln]

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait()
        self._log.close()
        return rc

    def kill9(self) -> None:
        self.proc.kill()
        self.proc.wait()
        self._log.close()


def wait_for(pred: Callable[[], Any], timeout: float = 10.0, interval: float = 0.01, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or pred}")
        time.sleep(interval)


def skewed_loads(rng: np.random.Generator, L: int, E: int, tokens: int = 4096) -> np.ndarray:
    """[L, E] int64 counts with a few hot experts (different per layer)."""
    out = np.empty((L, E), dtype=np.int64)
    for l in range(L):
        w = rng.zipf(1.6, size=E).astype(np.float64)
        w = np.minimum(w, 50.0)
        out[l] = rng.multinomial(tokens, w / w.sum())
    return out


class Leader:
    """Plays the node leader: owns the domain, writes windows, rings the doorbell."""

    def __init__(self, name: str, g: Any, steps_per_window: int = 10, ring_capacity: int = 64, seed: int = 0):
        from eplbd.shm import Domain

        self.dom = Domain.create(name, g, ring_capacity=ring_capacity)
        self.g = g
        self.k = steps_per_window
        self.next_id = 0
        self.rng = np.random.default_rng(seed)

    def write(self, loads: np.ndarray | None = None, ring: bool = True) -> int:
        wid = self.next_id
        if loads is None:
            loads = skewed_loads(self.rng, self.g.num_layers, self.g.num_experts)
        epoch, _ = self.dom.read_placement()
        self.dom.write_window(wid, loads, epoch=epoch, step_begin=wid * self.k, step_end=(wid + 1) * self.k)
        if ring:
            self.dom.ring_doorbell()
        self.next_id += 1
        return wid

    def close(self, unlink: bool = True) -> None:
        with contextlib.suppress(Exception):
            if unlink:
                self.dom.unlink()
        with contextlib.suppress(Exception):
            self.dom.close()


@contextlib.contextmanager
def leader(name: str, g: Any, **kw: Any) -> Iterator[Leader]:
    ld = Leader(name, g, **kw)
    try:
        yield ld
    finally:
        ld.close()


def run_py(code: str, timeout: float = 60.0, **env: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (a third process that only reads shm)."""
    return subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=child_env(**env),
        cwd=REPO,
    )
