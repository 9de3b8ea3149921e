"""`robodit collect | info | convert | serve | run` — everything that is not training or evaluation.

Each sub-command lives in the module that owns its job; this file only parses arguments and dispatches,
so `robodit --help` stays fast (no torch / simulator import until a command runs).
"""

from __future__ import annotations

import argparse
import sys


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2, no traceback."""


def _cmd_collect(args: argparse.Namespace) -> None:
    from robodit.datasets.collect import collect_command

    collect_command(args)


def _cmd_info(args: argparse.Namespace) -> None:
    from robodit.datasets.info import info_command

    info_command(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="robodit", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("collect", help="run a simulator's scripted expert and store successful demos")
    p.add_argument("source", help="SIMULATOR/TASK, e.g. metaworld/reach-v3")
    p.add_argument("--episodes", type=int, required=True, help="successful episodes to keep")
    p.add_argument("--out", required=True, help="path of the Zarr store (created, or appended to)")
    p.add_argument("--image-size", type=int, default=0, help="render cameras at this size (0: no images)")
    p.add_argument("--cameras", default="corner2", help="comma-separated camera names (with --image-size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-steps", type=int, default=None, help="episode step limit (simulator default)")
    p.add_argument("--max-attempts", type=int, default=None, help="give up after this many rollouts")
    p.set_defaults(func=_cmd_collect)

    p = sub.add_parser("info", help="summarise a demonstration store")
    p.add_argument("path")
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from robodit.datasets.store import StoreError

    try:
        args.func(args)
    except (CLIError, StoreError, FileNotFoundError, ValueError) as exc:
        print(f"robodit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    # `python -m robodit.cli`: dispatch through the importable module so CLIError is one class everywhere.
    from robodit.cli import main as _main

    sys.exit(_main())
