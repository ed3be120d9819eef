#!/usr/bin/env python3
"""Seed-compatible entry point; the logic lives in h2okit.kit (also: `h2okit analyze`)."""

import sys

from _bootstrap import ensure_h2okit

ensure_h2okit()

from h2okit.kit.cli import analyze_main  # noqa: E402

if __name__ == "__main__":
    sys.exit(analyze_main(prog="analyze_h2o_v2.py"))
