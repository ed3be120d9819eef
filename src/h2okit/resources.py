"""The configs and presets h2okit ships as package data (read through importlib.resources, so a
non-editable install finds them). The checkout's `configs/` and `exp/h2o_v2/configs/` are links to
these files, so the seed's paths keep working."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

DEFAULT_CONFIG_NAME = "smollm2-135m"


def _folder(kind: str) -> Path:
    return Path(str(resources.files("h2okit") / kind))


def packaged(kind: str, name: str) -> Path | None:
    """A shipped file by name (`target_ratio` or `target_ratio.json`) of kind configs|presets, or None."""
    stem = name[:-5] if name.endswith(".json") else name
    path = _folder(kind) / f"{stem}.json"
    return path if path.is_file() else None


def names(kind: str) -> list[str]:
    return sorted(p.stem for p in _folder(kind).glob("*.json"))


def default_config() -> Path:
    path = packaged("configs", DEFAULT_CONFIG_NAME)
    assert path is not None, "the default config is package data"
    return path


def find(kind: str, value: str) -> Path:
    """`value` as a path if it exists, else a shipped file of that name; else the path (callers report it)."""
    path = Path(value)
    if path.exists() or "/" in value:
        return path
    return packaged(kind, value) or path
