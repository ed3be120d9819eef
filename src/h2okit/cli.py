"""`h2okit`: the kit's commands. Each subcommand lives in its own module; this only dispatches."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError
from .corpus import CorpusError


class CLIError(Exception):
    """Bad input to a subcommand; printed as one line, exit 2."""


def _prepare(args: argparse.Namespace) -> int:
    """Make the default model and corpus ready offline: convert the GGUF once, decode the novels."""
    from .corpus import ensure_austen
    from .model import DEFAULT_MODEL_FILE, DEFAULT_MODEL_PACKAGE, convert_gguf, package_dir

    gguf = package_dir(DEFAULT_MODEL_PACKAGE) / DEFAULT_MODEL_FILE
    print(f"model:  {convert_gguf(gguf)}")
    print(f"corpus: {ensure_austen()}")
    return 0


COMMANDS = {"prepare": (_prepare, "convert the default model and decode the Austen corpus (offline caches)")}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="h2okit", description="H2O KV-cache compression kit")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (func, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        configure = getattr(func, "configure", None)
        if configure is not None:
            configure(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CLIError, ConfigError, CorpusError) as exc:
        print(f"h2okit {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"h2okit {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
