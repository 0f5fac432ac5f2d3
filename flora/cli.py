"""The `flora` command line."""
from __future__ import annotations

import argparse
import json
import sys


def _info(args) -> int:
    from .info import format_info, info

    print(json.dumps(info(), indent=2) if args.json else format_info())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="flora", description="Fused low-rank adapters for Llama")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("info", help="show what this build runs on which device")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_info)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
