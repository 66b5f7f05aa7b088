"""The ``noah-ray`` command.  Every subcommand has ``--help``; errors are one clear line."""

from __future__ import annotations

import argparse
import sys
from typing import Callable

from noah_ray.space import ConfigError

Command = Callable[[argparse.Namespace], int]


def _add_import_noah(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("import-noah", help="read original NOAH subnet YAML files, print parameter counts")
    p.add_argument("files", nargs="+", help="NOAH subnet files (the RETRAIN block is used)")
    p.add_argument("--out", help="directory to write the converted subnet configs (YAML)")
    p.add_argument("--num-classes", type=int, default=None, help="head size for the count (default: from the dataset name)")

    def run(args: argparse.Namespace) -> int:
        from noah_ray.interop import import_noah_command

        return import_noah_command(args)

    p.set_defaults(func=run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="noah-ray", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _add_import_noah(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as e:
        print(f"noah-ray: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
