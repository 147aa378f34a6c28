"""`eplbd` command line: each subcommand lives in its own module, imported only when used.

A subcommand module exposes ``configure_parser(parser)`` and ``run_cli(args) -> int``.
Lazy imports keep ``eplbd run`` free of torch and matplotlib.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "run": ("eplbd.daemon", "run the per-node daemon (systemd service)"),
    "replay": ("eplbd.replay", "replay an expert-load trace [T, L, E] through a placement policy"),
    "demo": ("eplbd.demo", "run a live daemon and a small CPU cluster of MoE ranks"),
}


def build_parser(argv: list[str]) -> tuple[argparse.ArgumentParser, str | None]:
    parser = argparse.ArgumentParser(prog="eplbd", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    chosen = next((a for a in argv if a in SUBCOMMANDS), None)
    for name, (module, help_) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        if name == chosen:
            importlib.import_module(module).configure_parser(p)
    return parser, chosen


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser, chosen = build_parser(argv)
    args = parser.parse_args(argv)
    return int(importlib.import_module(SUBCOMMANDS[chosen or args.command][0]).run_cli(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
