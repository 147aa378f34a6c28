"""Daemon config: defaults, TOML, EPLBD_* overrides, errors naming the key, the example file."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from eplbd.config import KEY_DOCS, Config, ConfigError, load_config, parse_config, unknown_env

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "systemd" / "eplbd.toml"


def test_defaults_are_valid_and_documented() -> None:
    c = parse_config({}, {})
    assert c == Config()
    assert set(KEY_DOCS) == {f.name for f in dataclasses.fields(Config)}


def test_example_config_lists_every_key_with_its_default() -> None:
    data = tomllib.loads(EXAMPLE.read_text())
    assert set(data) == {f.name for f in dataclasses.fields(Config)}
    assert parse_config(data, {}) == Config()
    text = EXAMPLE.read_text()
    for key in data:  # every key has a comment right above it
        idx = text.index(f"\n{key} = ")
        assert text[:idx].rstrip().splitlines()[-1].startswith("#"), key


def test_env_overrides_are_typed(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text('num_iterations = 10\nmin_gain = 0\npolicy = "greedy"\n')
    env = {"EPLBD_NUM_ITERATIONS": "64", "EPLBD_MIN_GAIN": "0.25", "EPLBD_LOG_LEVEL": "debug"}
    c = load_config(str(p), env)
    assert (c.num_iterations, c.min_gain, c.policy, c.log_level) == (64, 0.25, "greedy", "debug")
    assert isinstance(c.min_gain, float)
    assert unknown_env({"EPLBD_NUM_ITERATIONS": "1", "EPLBD_TYPO": "x", "OTHER": "y"}) == ["EPLBD_TYPO"]
    client_vars = {"EPLBD_CLIENT_SYNC_INTERVAL": "8", "EPLBD_ENABLE": "1", "EPLBD_VLLM_ALLOW_UNTESTED": "1"}
    assert unknown_env(client_vars) == []


@pytest.mark.parametrize(
    ("data", "env", "key"),
    [
        ({"bogus": 1}, {}, "bogus"),
        ({"num_iterations": 0}, {}, "num_iterations"),
        ({"num_iterations": "ten"}, {}, "num_iterations"),
        ({"num_iterations": True}, {}, "num_iterations"),
        ({"min_gain": 2.0}, {}, "min_gain"),
        ({"policy": "random"}, {}, "policy"),
        ({"forecast": "arima"}, {}, "forecast"),
        ({"metrics_addr": "0.0.0.0"}, {}, "metrics_addr"),
        ({"metrics_addr": "example.com"}, {}, "metrics_addr"),
        ({"metrics_port": 70000}, {}, "metrics_port"),
        ({"shm_prefix": "a/b"}, {}, "shm_prefix"),
        ({"discovery_interval_s": 5.0}, {}, "discovery_interval_s"),
        ({"history_windows": [1]}, {}, "history_windows"),
        ({}, {"EPLBD_MAX_MOVES_PER_PLAN": "many"}, "max_moves_per_plan"),
        ({}, {"EPLBD_POLL_INTERVAL_S": "nan"}, "poll_interval_s"),
    ],
)
def test_bad_values_name_the_key(data: dict, env: dict, key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(data, env)
    assert ei.value.key == key
    assert repr(key) in str(ei.value)
    if env:
        assert next(iter(env)) in str(ei.value)  # the variable is named as the source


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.toml"), {})
    bad = tmp_path / "bad.toml"
    bad.write_text("num_iterations = = 3\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(str(bad), {})


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith("EPLBD_")}
    e.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "eplbd.cli", "run", *args], capture_output=True, text=True, env=e, timeout=60
    )


def test_cli_exit_status_2_names_the_key(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("min_gain = -1\n")
    r = _run("--config", str(p))
    assert r.returncode == 2 and "'min_gain'" in r.stderr, r.stderr
    p.write_text("colour = 'blue'\n")
    r = _run("--config", str(p))
    assert r.returncode == 2 and "'colour'" in r.stderr and "unknown key" in r.stderr, r.stderr
    r = _run("--config", str(tmp_path / "nope.toml"))
    assert r.returncode == 2 and "cannot read" in r.stderr, r.stderr
    r = _run("--config", str(tmp_path))  # a directory: unreadable as a file, even for root
    assert r.returncode == 2 and "cannot read" in r.stderr, r.stderr
    p.write_text("")
    r = _run("--config", str(p), env={"EPLBD_METRICS_ADDR": "10.0.0.1"})
    assert r.returncode == 2 and "EPLBD_METRICS_ADDR" in r.stderr and "loopback" in r.stderr, r.stderr


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any file regardless of its mode")
def test_cli_unreadable_config(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("")
    p.chmod(0)
    r = _run("--config", str(p))
    assert r.returncode == 2 and "Permission denied" in r.stderr, r.stderr


def test_cli_check_prints_effective_config(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text("num_iterations = 7\n")
    r = _run("--config", str(p), "--check", env={"EPLBD_MIN_GAIN": "0.5"})
    assert r.returncode == 0, r.stderr
    assert "num_iterations = 7" in r.stdout and "min_gain = 0.5" in r.stdout
