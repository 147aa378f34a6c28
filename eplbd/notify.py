"""The systemd notify protocol (sd_notify(3)), spoken directly over the datagram socket.

The protocol is one ``KEY=VALUE\\n...`` datagram per message to the AF_UNIX
socket named by ``$NOTIFY_SOCKET``; a name starting with ``@`` is in the
abstract namespace (leading NUL byte). Without ``$NOTIFY_SOCKET`` every call
is a no-op, so the daemon behaves the same outside systemd.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Mapping

__all__ = ["Notifier", "watchdog_interval"]


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of ``$WATCHDOG_USEC``), or None when off.

    The watchdog applies to us only when ``$WATCHDOG_PID`` is unset or equals our
    pid (systemd sets it to the main pid; a child that inherited it must not ping).
    """
    env = os.environ if env is None else env
    pid = os.getpid() if pid is None else pid
    usec = env.get("WATCHDOG_USEC", "")
    wpid = env.get("WATCHDOG_PID", "")
    try:
        if wpid and int(wpid) != pid:
            return None
        u = int(usec)
    except ValueError:
        return None
    return u / 2e6 if u > 0 else None


class Notifier:
    """Sends sd_notify messages; silent no-op when ``$NOTIFY_SOCKET`` is unset.

    Send errors (systemd gone, socket full) are swallowed after being counted in
    ``errors``: a notify failure must never take the daemon down.
    """

    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if path.startswith("@"):
            self.address = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self.address = path
        self.errors = 0
        self._sock: socket.socket | None = None
        self.watchdog_s = watchdog_interval(env)
        self._last_ping = 0.0

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines (keyword names are the keys). True if sent."""
        if self.address is None:
            return False
        msg = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(msg, self.address)
            return True
        except OSError:
            self.errors += 1
            return False

    def ready(self, status: str = "") -> bool:
        return self.send(READY=1, STATUS=status, MAINPID=os.getpid()) if status else self.send(READY=1)

    def status(self, text: str) -> bool:
        # STATUS is one line in systemctl status; newlines would split the message.
        return self.send(STATUS=text.replace("\n", " "))

    def stopping(self) -> bool:
        return self.send(STOPPING=1)

    def reloading(self) -> bool:
        # systemd >= 253 wants the monotonic time of the reload with RELOADING=1.
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(RELOADING=1, MONOTONIC_USEC=usec)

    def watchdog_due(self, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        return self.watchdog_s is not None and now - self._last_ping >= self.watchdog_s

    def next_ping_in(self, now: float | None = None) -> float | None:
        """Seconds until the next WATCHDOG=1 is due (None when the watchdog is off)."""
        if self.watchdog_s is None:
            return None
        now = time.monotonic() if now is None else now
        return max(0.0, self._last_ping + self.watchdog_s - now)

    def ping_watchdog(self, now: float | None = None) -> bool:
        """WATCHDOG=1 if the watchdog is on and half its interval has passed."""
        now = time.monotonic() if now is None else now
        if not self.watchdog_due(now):
            return False
        self._last_ping = now
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
