"""Daemon configuration: a TOML file, overridden key by key by ``EPLBD_<KEY>`` variables.

Every key has a default, so an empty (or missing, when not asked for explicitly)
file is a valid configuration. Unknown keys and bad values raise
:class:`ConfigError` naming the key; ``eplbd run`` turns that into exit status 2.

The keys and their meaning are documented once, in :data:`KEY_DOCS` (which
``systemd/eplbd.toml`` mirrors); the daemon module docstring explains how
``num_iterations`` becomes a plan interval in windows.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import tomllib
from collections.abc import Mapping
from typing import Any

__all__ = [
    "Config",
    "ConfigError",
    "DEFAULT_CONFIG_PATH",
    "KEY_DOCS",
    "load_config",
    "parse_config",
    "unknown_env",
]

DEFAULT_CONFIG_PATH = "/etc/eplbd/eplbd.toml"
ENV_PREFIX = "EPLBD_"

FORECAST_METHODS = ("sum", "ema", "share_ema", "trend", "auto")  # = eplbd.forecast.METHODS (tested)
POLICIES = ("moveaware", "greedy")
LOG_LEVELS = ("debug", "info", "warning", "error")


class ConfigError(ValueError):
    """A configuration key is unknown or has a bad value; ``key`` names it."""

    def __init__(self, key: str, message: str, source: str = "") -> None:
        where = f" ({source})" if source else ""
        head = f"config key {key!r}{where}" if key else f"config{where}"
        super().__init__(f"{head}: {message}")
        self.key = key
        self.detail = message


@dataclasses.dataclass(frozen=True)
class Config:
    """Validated daemon settings (see :data:`KEY_DOCS` for each key)."""

    shm_prefix: str = "eplbd."
    num_iterations: int = 3000
    history_windows: int = 16
    forecast: str = "auto"  # = eplbd.policy.pipeline.DEFAULT_FORECAST (tested)
    forecast_alpha: float = 0.3
    policy: str = "moveaware"
    min_gain: float = 0.0  # = eplbd.policy.pipeline.DEFAULT_MIN_GAIN (tested)
    max_moves_per_plan: int = 0
    poll_interval_s: float = 0.1
    discovery_interval_s: float = 0.5
    heartbeat_interval_s: float = 1.0
    plan_timeout_s: float = 120.0
    owner_grace_s: float = 30.0
    metrics_port: int = 0
    metrics_addr: str = "127.0.0.1"
    log_level: str = "info"

    def __post_init__(self) -> None:
        _check(self)


KEY_DOCS: dict[str, str] = {
    "shm_prefix": "serve every shm domain whose name starts with this prefix (names have no leading '/')",
    "num_iterations": "decode/prefill steps between plans; turned into windows with each domain's "
    "sync interval K (= step_end - step_begin of its windows): n = ceil(num_iterations / K), "
    "and window w triggers a plan when w % n == n - 1",
    "history_windows": "windows (newest first, up to the triggering one) the forecast reads",
    "forecast": f"forecast method, one of {', '.join(FORECAST_METHODS)}; 'auto' picks each layer's "
    "smoothing from how well it predicted the history windows themselves",
    "forecast_alpha": "weight of the newest window in the 'ema', 'share_ema' and 'trend' "
    "forecasts, in (0, 1]",
    "policy": f"placement policy, one of {', '.join(POLICIES)}",
    "min_gain": "publish only when predicted beta after the plan minus beta now (both on the "
    "forecast load) is at least this; in [0, 1]",
    "max_moves_per_plan": "most slots a plan may change (remote + local); 0 = no limit. A plan "
    "over the limit is skipped and logged",
    "poll_interval_s": "longest sleep on a domain's doorbell before housekeeping runs",
    "discovery_interval_s": "how often new domains are looked for (at most 1.0 s)",
    "heartbeat_interval_s": "how often DaemonInfo.heartbeat_ns is refreshed in every domain",
    "plan_timeout_s": "a published plan whose status is not final for this long no longer blocks "
    "the next one",
    "owner_grace_s": "a domain whose owner process is dead is closed at once and its segment "
    "unlinked after this many seconds",
    "metrics_port": "Prometheus metrics port; 0 = metrics off",
    "metrics_addr": "address the metrics server binds; loopback addresses only",
    "log_level": f"lowest level logged to stderr, one of {', '.join(LOG_LEVELS)}",
}

_FIELDS: dict[str, dataclasses.Field[Any]] = {f.name: f for f in dataclasses.fields(Config)}


def _check(c: Config) -> None:
    """Range checks; each names the key it rejects."""
    for key in _FIELDS:
        v = getattr(c, key)
        t = _FIELDS[key].type
        if t == "int" and (isinstance(v, bool) or not isinstance(v, int)):
            raise ConfigError(key, f"must be an integer, got {v!r}")
        if t == "float" and (isinstance(v, bool) or not isinstance(v, int | float)):
            raise ConfigError(key, f"must be a number, got {v!r}")
        if t == "float" and not math.isfinite(v):
            raise ConfigError(key, f"must be finite, got {v!r}")
        if t == "str" and not isinstance(v, str):
            raise ConfigError(key, f"must be a string, got {v!r}")
    if not c.shm_prefix or "/" in c.shm_prefix or "\0" in c.shm_prefix:
        raise ConfigError("shm_prefix", f"must be non-empty without '/' or NUL, got {c.shm_prefix!r}")
    if c.num_iterations < 1:
        raise ConfigError("num_iterations", f"must be >= 1, got {c.num_iterations}")
    if c.history_windows < 1:
        raise ConfigError("history_windows", f"must be >= 1, got {c.history_windows}")
    if c.forecast not in FORECAST_METHODS:
        raise ConfigError("forecast", f"must be one of {FORECAST_METHODS}, got {c.forecast!r}")
    if not 0.0 < c.forecast_alpha <= 1.0:
        raise ConfigError("forecast_alpha", f"must be in (0, 1], got {c.forecast_alpha}")
    if c.policy not in POLICIES:
        raise ConfigError("policy", f"must be one of {POLICIES}, got {c.policy!r}")
    if not 0.0 <= c.min_gain <= 1.0:
        raise ConfigError("min_gain", f"must be in [0, 1], got {c.min_gain}")
    if c.max_moves_per_plan < 0:
        raise ConfigError("max_moves_per_plan", f"must be >= 0 (0 = no limit), got {c.max_moves_per_plan}")
    for key in ("poll_interval_s", "heartbeat_interval_s", "plan_timeout_s"):
        if not 0.001 <= getattr(c, key) <= 3600:
            raise ConfigError(key, f"must be in [0.001, 3600] seconds, got {getattr(c, key)}")
    if not 0.01 <= c.discovery_interval_s <= 1.0:
        raise ConfigError(
            "discovery_interval_s", f"must be in [0.01, 1.0] seconds, got {c.discovery_interval_s}"
        )
    if not 0.0 <= c.owner_grace_s <= 86400:
        raise ConfigError("owner_grace_s", f"must be in [0, 86400] seconds, got {c.owner_grace_s}")
    if not 0 <= c.metrics_port <= 65535:
        raise ConfigError("metrics_port", f"must be in [0, 65535], got {c.metrics_port}")
    try:
        addr = ipaddress.ip_address(c.metrics_addr)
    except ValueError:
        raise ConfigError("metrics_addr", f"must be an IP address, got {c.metrics_addr!r}") from None
    if not addr.is_loopback:
        raise ConfigError("metrics_addr", f"must be a loopback address (metrics are local), got {addr}")
    if c.log_level not in LOG_LEVELS:
        raise ConfigError("log_level", f"must be one of {LOG_LEVELS}, got {c.log_level!r}")


def _parse_env(key: str, text: str) -> Any:
    """Typed parsing of one ``EPLBD_<KEY>`` value."""
    t = _FIELDS[key].type
    name = ENV_PREFIX + key.upper()
    if t == "int":
        try:
            return int(text.strip(), 10)
        except ValueError:
            raise ConfigError(key, f"must be an integer, got {text!r}", name) from None
    if t == "float":
        try:
            return float(text.strip())
        except ValueError:
            raise ConfigError(key, f"must be a number, got {text!r}", name) from None
    return text


def parse_config(
    data: Mapping[str, Any], env: Mapping[str, str] | None = None, source: str = "config"
) -> Config:
    """Build a :class:`Config` from a TOML table and ``EPLBD_*`` overrides.

    ``env`` defaults to ``os.environ``; pass ``{}`` to ignore the environment.
    Environment variables that start with ``EPLBD_`` but name no key are not
    errors (client-side tools may define their own); :func:`unknown_env` lists
    them so the daemon can warn about likely typos.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    for key, v in data.items():
        if key not in _FIELDS:
            raise ConfigError(key, f"unknown key (known: {', '.join(_FIELDS)})", source)
        if isinstance(v, dict | list):
            raise ConfigError(key, f"must be a scalar, got a {type(v).__name__}", source)
        if _FIELDS[key].type == "float" and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        values[key] = v
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX):
            continue
        key = name[len(ENV_PREFIX) :].lower()
        if key not in _FIELDS:
            continue
        values[key] = _parse_env(key, text)
    try:
        return Config(**values)
    except ConfigError as e:
        src = ENV_PREFIX + e.key.upper() if (ENV_PREFIX + e.key.upper()) in env else source
        raise ConfigError(e.key, e.detail, src) from None


# Variables of the rank client and the vLLM plugin, which may share the daemon's environment.
CLIENT_ENV = ("EPLBD_CLIENT_", "EPLBD_VLLM_", "EPLBD_ENABLE", "EPLBD_JOB", "EPLBD_DOMAIN")


def unknown_env(env: Mapping[str, str] | None = None) -> list[str]:
    """``EPLBD_*`` variable names that match no daemon key nor a client variable (sorted)."""
    env = os.environ if env is None else env
    return sorted(
        n
        for n in env
        if n.startswith(ENV_PREFIX)
        and n[len(ENV_PREFIX) :].lower() not in _FIELDS
        and not n.startswith(CLIENT_ENV)
    )


def load_config(path: str | None, env: Mapping[str, str] | None = None) -> Config:
    """Read ``path`` (TOML) and apply ``EPLBD_*`` overrides.

    ``path=None`` means the default path, which may be missing (defaults then
    apply); an explicitly named file must exist and be readable.
    """
    if path is None:
        path = DEFAULT_CONFIG_PATH
        if not os.path.exists(path):
            return parse_config({}, env, source="defaults")
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as e:
        raise ConfigError("", f"cannot read {path}: {e.strerror or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("", f"{path} is not valid TOML: {e}") from None
    return parse_config(data, env, source=path)
