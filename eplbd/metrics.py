"""Optional Prometheus metrics, served on a loopback port.

``prometheus_client`` is imported only when metrics are turned on
(``metrics_port`` > 0), so the daemon runs without it. Every metric carries a
``domain`` label; a released domain's series are removed so a long-lived daemon
does not accumulate dead series.
"""

from __future__ import annotations

import contextlib
import ipaddress
from typing import Any

from eplbd.placement import MoveCounts

__all__ = ["NullMetrics", "PrometheusMetrics", "make_metrics"]


class NullMetrics:
    """Metrics turned off: every call is a no-op."""

    port = 0

    def domains(self, n: int) -> None:
        pass

    def windows(self, domain: str, n: int) -> None:
        pass

    def decision(
        self,
        domain: str,
        decision: str,
        beta_now: float,
        beta_pred: float,
        moves: MoveCounts | None,
        compute_ms: float,
    ) -> None:
        pass

    def error(self, domain: str) -> None:
        pass

    def remove(self, domain: str) -> None:
        pass

    def close(self) -> None:
        pass


class PrometheusMetrics(NullMetrics):
    """Per-domain counters and gauges on ``http://addr:port/metrics`` (loopback only)."""

    def __init__(self, port: int, addr: str = "127.0.0.1") -> None:
        if not ipaddress.ip_address(addr).is_loopback:
            raise ValueError(f"metrics_addr must be a loopback address, got {addr}")
        import prometheus_client as pc

        self._registry = reg = pc.CollectorRegistry()
        d = ["domain"]
        self._domains = pc.Gauge("eplbd_domains", "domains being served", registry=reg)
        self._windows = pc.Counter("eplbd_windows", "windows read from the ring", d, registry=reg)
        self._decisions = pc.Counter(
            "eplbd_decisions", "planning decisions by outcome", [*d, "decision"], registry=reg
        )
        self._plans = pc.Counter("eplbd_plans_published", "plans published", d, registry=reg)
        self._errors = pc.Counter("eplbd_errors", "errors while serving the domain", d, registry=reg)
        self._beta_now = pc.Gauge(
            "eplbd_beta_now", "beta of the forecast under the placement in force", d, registry=reg
        )
        self._beta_pred = pc.Gauge(
            "eplbd_beta_predicted", "beta of the forecast under the last plan", d, registry=reg
        )
        self._moves = pc.Gauge("eplbd_plan_moves", "slots moved by the last plan", [*d, "kind"], registry=reg)
        self._plan_ms = pc.Gauge(
            "eplbd_plan_compute_ms", "compute time of the last decision (ms)", d, registry=reg
        )
        self._seen_decisions: set[str] = set()
        self._server: Any
        self._server, _ = pc.start_http_server(port, addr=addr, registry=reg)
        # port=0 binds an ephemeral port; report the real one.
        self.port = int(self._server.server_port)

    def domains(self, n: int) -> None:
        self._domains.set(n)

    def windows(self, domain: str, n: int) -> None:
        self._windows.labels(domain).inc(n)

    def decision(
        self,
        domain: str,
        decision: str,
        beta_now: float,
        beta_pred: float,
        moves: MoveCounts | None,
        compute_ms: float,
    ) -> None:
        self._seen_decisions.add(decision)
        self._decisions.labels(domain, decision).inc()
        self._beta_now.labels(domain).set(beta_now)
        self._beta_pred.labels(domain).set(beta_pred)
        self._plan_ms.labels(domain).set(compute_ms)
        if decision == "publish" and moves is not None:
            self._plans.labels(domain).inc()
            for kind in ("remote", "cross_node", "local"):
                self._moves.labels(domain, kind).set(getattr(moves, kind))

    def error(self, domain: str) -> None:
        self._errors.labels(domain).inc()

    def remove(self, domain: str) -> None:
        for metric in (
            self._windows,
            self._plans,
            self._errors,
            self._beta_now,
            self._beta_pred,
            self._plan_ms,
        ):
            with contextlib.suppress(KeyError):
                metric.remove(domain)
        for metric, extra in (
            (self._decisions, self._seen_decisions),
            (self._moves, {"remote", "cross_node", "local"}),
        ):
            for e in extra:
                with contextlib.suppress(KeyError):
                    metric.remove(domain, e)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def make_metrics(port: int, addr: str) -> NullMetrics:
    """A metrics server on ``addr:port`` for ``port`` > 0; port 0 means metrics off."""
    return PrometheusMetrics(port, addr) if port > 0 else NullMetrics()
