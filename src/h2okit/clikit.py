"""What every h2okit command line shares: logging to stderr, the one-line error guard (exit 2 for
bad input, 130 for Ctrl-C, never a traceback for an expected error), and comma lists."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at the time (a test may have swapped it)."""

    def __init__(self):
        super().__init__(sys.stderr)

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value):
        pass


def setup_logging(verbose: bool = False) -> None:
    """Library modules log through `logging.getLogger(__name__)`; a command shows them on stderr as
    plain lines. Application-level only: library code never touches global logging or warnings."""
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("h2okit")
    if not root.handlers:
        root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False
    try:  # transformers' own notices (load reports, progress bars) are noise on a benchmark's stderr
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:
        pass


def guard(prog: str, fn: Callable[[], int], errors: tuple[type[BaseException], ...]) -> int:
    """Run a command body: an expected error is one line `PROG: error: ...` and exit 2."""
    try:
        return fn()
    except errors as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


class OneLineParser(argparse.ArgumentParser):
    """argparse whose errors are one line (`PROG: error: ...`, exit 2) instead of usage + error."""

    def error(self, message):
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(2)


def comma_list(text: str, kind: type, flag: str, error: type[Exception]) -> list:
    """`a,b,c` -> [kind(a), kind(b), kind(c)]; an empty list or a bad item is `error` naming the flag."""
    items = [item.strip() for item in str(text).split(",") if item.strip()]
    if not items:
        raise error(f"{flag} is empty; give a comma list")
    try:
        return [kind(item) for item in items]
    except ValueError:
        raise error(f"{flag} must be a comma list of {kind.__name__}s, got '{text}'") from None


def comma_arg(kind: type, choices: Sequence | None = None) -> Callable[[str], list]:
    """An argparse `type`: the value as a comma list of `kind` (comma_list), each item one of `choices`
    when given; a bad one is argparse's own error, which names the flag (one line with OneLineParser)."""

    def parse(text: str) -> list:
        items = comma_list(text, kind, "the value", argparse.ArgumentTypeError)
        if choices is not None and (unknown := [item for item in items if item not in choices]):
            raise argparse.ArgumentTypeError(f"unknown {', '.join(map(str, unknown))}; allowed: "
                                             f"{', '.join(map(str, choices))}")
        return items
    return parse
