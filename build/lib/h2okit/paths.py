"""Where h2okit keeps converted weights and decoded texts between runs."""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """$H2OKIT_CACHE, else $XDG_CACHE_HOME/h2okit, else ~/.cache/h2okit."""
    if os.environ.get("H2OKIT_CACHE"):
        return Path(os.environ["H2OKIT_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "h2okit"
