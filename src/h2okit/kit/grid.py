"""Sweep grids: axes (comma lists) -> runs (the Cartesian product, without duplicates).

An axis that has no effect in a combination is collapsed instead of run twice: the keep
ratio in adaptive mode, the lossy ratio in static mode, every H2O knob for the `full`
policy, and lossless knobs with the codec off. Each collapse is reported as a note.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..clikit import comma_list
from ..io import read_json
from ..config import FILE_KEYS

# axis name -> (kv config key or run field, value type). The order is the product order.
AXES: dict[str, tuple[str, type]] = {
    "threads": ("threads", int),
    "prompts": ("prompt", int),
    "gens": ("gen", int),
    "h2o_policies": ("kv_h2o_policy", str),
    "h2o_target_mode": ("kv_h2o_target_mode", str),
    "h2o_keep_ratios": ("kv_h2o_target_keep_ratio", float),
    "h2o_target_lossy_ratios": ("kv_h2o_target_lossy_ratio", float),
    "h2o_block_tokens": ("kv_h2o_block_tokens", int),
    "h2o_sink_tokens": ("kv_h2o_sink_tokens", int),
    "h2o_recent_tokens": ("kv_h2o_recent_tokens", int),
    "h2o_ema_alphas": ("kv_h2o_ema_alpha", float),
    "h2o_update_intervals": ("kv_h2o_update_interval", int),
    "h2o_trigger_min_tokens": ("kv_h2o_trigger_min_tokens", int),
    "h2o_layer_start": ("kv_h2o_layer_start", int),
    "h2o_layer_end": ("kv_h2o_layer_end", int),
    "h2o_budget_basis": ("kv_h2o_budget_basis", str),
    "h2o_budget_tokens": ("kv_h2o_budget_tokens", int),
    "h2o_per_head": ("kv_h2o_per_head", bool),
    "h2o_value_norm": ("kv_h2o_value_norm", bool),
    "h2o_score_prefill": ("kv_h2o_score_prefill", bool),
    "h2o_query_windows": ("kv_h2o_query_window", int),
    "h2o_query_horizons": ("kv_h2o_query_horizon", int),
    "h2o_layer_budget_slopes": ("kv_h2o_layer_budget_slope", float),
    "h2o_prefill_chunk_tokens": ("kv_h2o_prefill_chunk_tokens", int),
    "kv_lossless_scope": ("kv_lossless_scope", str),
    "kv_lossless_front_n": ("kv_lossless_front_n", int),
    "kv_lossless_codec": ("kv_lossless_codec", str),
    "kv_lossless_runtime_mode": ("kv_lossless_runtime_mode", str),
    "kv_cache_dtype": ("kv_cache_dtype", str),
}
RUN_AXES = ("threads", "prompts", "gens")  # the kit's own fields; kv_* values are llm_bench's to check
# Preset-file spellings that differ from the axis names (the seed's presets use both).
PRESET_ALIASES = {"h2o_target_lossy_ratio": "h2o_target_lossy_ratios", "h2o_policy": "h2o_policies",
                  "kv_lossless_runtime_modes": "kv_lossless_runtime_mode", "kv_cache_dtypes": "kv_cache_dtype"}
SCALAR_KEYS = {"repeat": int, "h2o_log_stats": bool, "kv_lossless_enable": bool, "quality": bool}
H2O_KNOBS = [key for key, _ in AXES.values() if key.startswith("kv_h2o_") and key != "kv_h2o_policy"]
LOSSLESS_KNOBS = ["kv_lossless_scope", "kv_lossless_front_n", "kv_lossless_codec", "kv_lossless_runtime_mode"]


class GridError(ValueError):
    """A grid or preset that cannot be run; one line."""


def boolean(text: str) -> bool:
    """A grid's bool value: true/false (also 1/0, yes/no)."""
    value = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(text.lower())
    if value is None:
        raise ValueError(text)
    return value


def parse_list(text: str, kind: type, flag: str) -> list:
    return comma_list(text, boolean if kind is bool else kind, flag, GridError)


@dataclass
class Grid:
    axes: dict[str, list]  # axis name -> values
    repeat: int = 3
    log_stats: bool = False
    lossless_enable: bool = False
    quality: bool = False
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"axes": self.axes, "repeat": self.repeat, "h2o_log_stats": self.log_stats,
                "kv_lossless_enable": self.lossless_enable, "quality": self.quality}


@dataclass
class Run:
    idx: int
    run_id: str
    threads: int
    prompt: int
    gen: int
    kv: dict[str, Any]  # kv_* keys this run sets on top of the base config

    def params(self) -> dict:
        return {"threads": self.threads, "prompt": self.prompt, "gen": self.gen, **self.kv}


def _fmt(value: float) -> str:
    return f"{value:g}"


def run_id(idx: int, prompt: int, gen: int, keep: float, block: int, lossy: float) -> str:
    """The seed's run id: run_{idx:04d}_p{P}_g{G}_k{keep}_b{block}_lr{lossy}."""
    return f"run_{idx:04d}_p{prompt}_g{gen}_k{_fmt(keep)}_b{block}_lr{_fmt(lossy)}"


def _effective(kv: dict[str, Any]) -> dict[str, Any]:
    """The kv settings with every knob that cannot matter replaced by a marker (for dedupe)."""
    eff = dict(kv)
    if eff.get("kv_h2o_policy") == "full":
        for key in H2O_KNOBS:
            eff[key] = None
    elif eff.get("kv_h2o_budget_basis") == "tokens":  # a fixed count: neither ratio matters
        eff["kv_h2o_target_keep_ratio"] = eff["kv_h2o_target_lossy_ratio"] = None
    elif eff.get("kv_h2o_target_mode") == "adaptive":
        eff["kv_h2o_target_keep_ratio"] = None
    elif eff.get("kv_h2o_target_mode") == "static":
        eff["kv_h2o_target_lossy_ratio"] = None
    if eff.get("kv_h2o_budget_basis", "current") != "tokens":
        eff["kv_h2o_budget_tokens"] = None
    if not eff.get("kv_lossless_enable") or eff.get("kv_lossless_codec") == "none":
        for key in LOSSLESS_KNOBS:
            eff[key] = None
    return eff


def expand(grid: Grid, base_kv: dict[str, Any], default_threads: int = 2) -> list[Run]:
    """All runs of the grid, in product order, duplicates of ineffective axes dropped (noted)."""
    for name, values in grid.axes.items():
        if name not in AXES:
            raise GridError(f"unknown grid axis '{name}'")
        if not values:
            raise GridError(f"grid axis '{name}' is empty")
        if name in RUN_AXES and any(v < 1 for v in values):
            raise GridError(f"{name} must be positive integers, got {', '.join(map(str, values))}")
    names = [n for n in AXES if n in grid.axes]
    runs, seen, collapsed, idle_axes = [], set(), 0, {}
    for combo in itertools.product(*(grid.axes[n] for n in names)):
        values = dict(zip(names, combo))
        kv = {key: values[name] for name, (key, _) in AXES.items() if name in values and key.startswith("kv_")}
        kv["kv_h2o_enable"] = True
        kv["kv_h2o_log_stats"] = grid.log_stats
        kv["kv_lossless_enable"] = grid.lossless_enable
        merged = {**base_kv, **kv}
        threads = values.get("threads", default_threads)
        prompt, gen = values.get("prompts", 512), values.get("gens", 128)
        effective = _effective(merged)
        key = json.dumps([threads, prompt, gen, effective], sort_keys=True)
        if key in seen:
            collapsed += 1
            for name in names:  # which multi-valued axes did nothing here
                if len(grid.axes[name]) > 1 and effective.get(AXES[name][0], 0) is None:
                    idle_axes.setdefault(name, set()).add(_idle_reason(AXES[name][0], merged))
            continue
        seen.add(key)
        idx = len(runs)
        rid = run_id(idx, prompt, gen, merged.get("kv_h2o_target_keep_ratio", 0.5),
                     merged.get("kv_h2o_block_tokens", 64), merged.get("kv_h2o_target_lossy_ratio", 3.0))
        policy = merged.get("kv_h2o_policy", "h2o")
        if policy != "h2o":  # the seed's id, plus the baseline's name so runs stay readable
            rid += f"_{policy}"
        runs.append(Run(idx, rid, threads, prompt, gen, kv))
    if collapsed:
        detail = "; ".join(f"{name} has no effect with {', '.join(sorted(why))}" for name, why in idle_axes.items())
        grid.notes.append(f"{collapsed} combination(s) collapsed, not run twice ({detail})")
    return runs


def _idle_reason(key: str, kv: dict[str, Any]) -> str:
    """Why setting `key` cannot matter in this run (mirrors _effective)."""
    if key in LOSSLESS_KNOBS:
        return "the codec off"
    if kv.get("kv_h2o_policy") == "full":
        return "the full policy"
    if key == "kv_h2o_budget_tokens":
        return f"budget basis {kv.get('kv_h2o_budget_basis', 'current')}"
    if kv.get("kv_h2o_budget_basis") == "tokens":
        return "budget basis tokens"
    return f"{kv.get('kv_h2o_target_mode')} mode"


def _read_json(path: Path, what: str) -> Any:
    return read_json(path, what, GridError)


def load_preset(path: str | Path) -> Grid:
    path = Path(path)
    raw = _read_json(path, "preset")
    if not isinstance(raw, dict):
        raise GridError(f"preset {path} must be a JSON object")
    axes, scalars = {}, {}
    for key, value in raw.items():
        name = PRESET_ALIASES.get(key, key)
        if name in AXES:
            kind = AXES[name][1]
            values = value if isinstance(value, list) else [value]
            if not values:
                raise GridError(f"preset key '{key}' is an empty list")
            axes[name] = [_coerce(key, v, kind) for v in values]
        elif key in SCALAR_KEYS:
            if not isinstance(value, SCALAR_KEYS[key]) or isinstance(value, bool) != (SCALAR_KEYS[key] is bool):
                raise GridError(f"preset key '{key}' must be a {SCALAR_KEYS[key].__name__}, got {value!r}")
            scalars[key] = value
        elif key.startswith("_") or key == "description":
            continue
        else:
            known = ", ".join(sorted([*AXES, *SCALAR_KEYS]))
            raise GridError(f"unknown preset key '{key}' in {path}; known: {known}")
    return Grid(axes=axes, repeat=scalars.get("repeat", 3), log_stats=scalars.get("h2o_log_stats", False),
                lossless_enable=scalars.get("kv_lossless_enable", False), quality=scalars.get("quality", False))


def _coerce(key: str, value: Any, kind: type) -> Any:
    ok = (isinstance(value, str) if kind is str
          else isinstance(value, bool) if kind is bool
          else isinstance(value, int) and not isinstance(value, bool) if kind is int
          else isinstance(value, (int, float)) and not isinstance(value, bool))
    if not ok:
        raise GridError(f"preset key '{key}' must hold {kind.__name__} values, got {value!r}")
    return kind(value)


PKG_MARK = "pkg:"  # h2okit's llm_bench reads base_dir "pkg:NAME" as an installed package's folder


def normalize_base_config(path: str | Path) -> dict[str, Any]:
    """The base config with base_dir made an absolute folder and model file keys relative to it (the
    seed's runner does the same). The kit does not validate kv_* keys itself: llm_bench does
    (`--check-config` when it is h2okit's; a foreign binary gets them as they are)."""
    path = Path(path).resolve()
    raw = _read_json(path, "base config")
    if not isinstance(raw, dict):
        raise GridError(f"base config {path} must be a JSON object")
    base_dir = raw.get("base_dir") or ""
    if not isinstance(base_dir, str):
        raise GridError(f"base config {path}: base_dir must be a string, got {json.dumps(base_dir)}")
    out = dict(raw)
    if PKG_MARK in base_dir:
        return out  # resolved by h2okit's llm_bench wherever it runs
    base = Path(base_dir) if Path(base_dir).is_absolute() else (path.parent / base_dir)
    base = base.resolve()
    out["base_dir"] = str(base)
    for key in FILE_KEYS:
        value = raw.get(key)
        if not value:
            continue
        file_path = Path(value) if Path(value).is_absolute() else base / value
        try:
            out[key] = str(file_path.resolve().relative_to(base))
        except ValueError:
            out[key] = str(file_path.resolve())  # outside base_dir: keep it absolute
    return out
