"""A tiny device abstraction: side streams, events and pinned memory.

CUDA (``torch.cuda``) and Ascend (``torch.npu`` from torch_npu) expose the same
Stream/Event/stream-context API, so one class covers both by looking up the
device module by the device type. CPU has no streams: work simply runs on the
calling thread and every event is "done" at once.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

__all__ = ["DeviceOps"]


class DeviceOps:
    """Streams and events of one device, or no-ops on CPU."""

    def __init__(self, device: torch.device | str) -> None:
        dev = torch.device(device)
        mod = getattr(torch, dev.type, None) if dev.type != "cpu" else None
        # Only use the module if it really has streams (cuda, npu, xpu...).
        self._mod: Any = mod if mod is not None and hasattr(mod, "Stream") and hasattr(mod, "Event") else None
        if self._mod is not None and dev.index is None:
            # "cuda" means the creating (forward) thread's current device: pin it down now,
            # other threads start on device 0.
            dev = torch.device(dev.type, self._mod.current_device())
        self.device = dev

    def bind_thread(self) -> None:
        """Make the device current on the calling thread. A new thread starts on device 0:
        without this, a rank on GPU 3 would make contexts and pinned memory on GPU 0 from
        its helper threads. No-op on CPU."""
        if self._mod is not None and hasattr(self._mod, "set_device"):
            self._mod.set_device(self.device)

    @property
    def has_streams(self) -> bool:
        return self._mod is not None

    def new_stream(self) -> Any:
        """A new side stream on the device, or None on CPU."""
        return self._mod.Stream(device=self.device) if self._mod is not None else None

    def current_stream(self) -> Any:
        return self._mod.current_stream(self.device) if self._mod is not None else None

    @contextlib.contextmanager
    def use_stream(self, stream: Any) -> Iterator[None]:
        """Make ``stream`` current on this thread (no-op for None / CPU)."""
        if self._mod is None or stream is None:
            yield
            return
        with self._mod.stream(stream):
            yield

    def record_event(self, stream: Any = None) -> Any:
        """Event recorded on ``stream`` (default: current stream); None on CPU."""
        if self._mod is None:
            return None
        ev = self._mod.Event()
        ev.record(stream if stream is not None else self.current_stream())
        return ev

    @staticmethod
    def event_done(ev: Any) -> bool:
        """Non-blocking completion check; None (CPU) is always done."""
        return ev is None or bool(ev.query())

    def wait_event(self, ev: Any, stream: Any = None) -> None:
        """Make ``stream`` (default: current) wait for ``ev`` on the device; the host does not block."""
        if ev is None or self._mod is None:
            return
        (stream if stream is not None else self.current_stream()).wait_event(ev)

    @staticmethod
    def wait_event_host(ev: Any, timeout_s: float) -> None:
        """Wait on the host for ``ev`` by polling ``query()`` (sleeping 20 µs, then up to 1 ms,
        between polls): for threads other than the forward thread, so that no synchronising
        CUDA call is made while the forward's sync-debug mode is on (it is process-wide).
        Raises TimeoutError after ``timeout_s``."""
        if ev is None or ev.query():
            return
        deadline = time.monotonic() + timeout_s
        nap = 20e-6
        while not ev.query():
            if time.monotonic() > deadline:
                raise TimeoutError(f"device event not complete after {timeout_s:.0f} s")
            time.sleep(nap)
            nap = min(nap * 2, 1e-3)

    def to_device(self, a: np.ndarray | torch.Tensor, dtype: torch.dtype = torch.int64) -> torch.Tensor:
        """``a`` as a ``dtype`` tensor on the device, copied on the current stream without
        blocking the host (pinned source, ``non_blocking``: torch keeps the pinned block
        alive until the copy ran). For threads other than the forward thread, whose
        consumers order themselves after an event of this stream. On CPU: a copy."""
        t = torch.as_tensor(a).to(dtype, copy=True)  # never a view of the caller's array
        if self._mod is None:
            return t
        try:
            t = t.pin_memory()
        except RuntimeError:  # pinning unavailable: a pageable copy (waits for the stream, here)
            return t.to(self.device)
        return t.to(self.device, non_blocking=True)

    def pinned_empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Host buffer for device->host copies: pinned where the device supports it."""
        pin = self._mod is not None
        try:
            return torch.empty(shape, dtype=dtype, pin_memory=pin)
        except RuntimeError:  # pinning unavailable (no driver, container limits): plain memory
            return torch.empty(shape, dtype=dtype)
