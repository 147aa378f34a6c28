import subprocess
import sys

import pytest

from eplbd.cli import SUBCOMMANDS


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "eplbd.cli", *args], capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("command", sorted(SUBCOMMANDS))
def test_every_subcommand_has_help(command):
    r = run(command, "--help")
    assert r.returncode == 0, r.stderr
    assert f"eplbd {command}" in r.stdout


def test_top_level_help_lists_subcommands():
    r = run("--help")
    assert r.returncode == 0
    for command in SUBCOMMANDS:
        assert command in r.stdout


@pytest.mark.parametrize("argv", [[], ["frobnicate"]])
def test_missing_or_unknown_subcommand_is_a_usage_error(argv):
    r = run(*argv)
    assert r.returncode == 2
    assert "usage: eplbd" in r.stderr


def test_daemon_side_imports_no_torch():
    code = (
        "import sys, eplbd.cli, eplbd.daemon, eplbd.ctl, eplbd.replay, eplbd.demo, eplbd.shm;"
        "assert 'torch' not in sys.modules, 'torch imported'"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
