"""MNN-style `config.json`: model keys and `kv_*` keys side by side, validated strictly.

The original silently fell back to defaults on a wrong type and mapped any unknown
mode string to "adaptive". Here a wrong type, an unknown enum value or an unknown
`kv_*` key raises `ConfigError` (one line: the key, the value, what is allowed);
out-of-range numbers are clamped as SPEC §1 says and each clamp is reported once.
"""

from __future__ import annotations

import difflib
import json
import math
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from .policy import BUDGET_BASES, POLICIES

# KV storage dtypes (names as torch spells them); the runtime maps them to torch dtypes.
CACHE_DTYPES = ("float32", "float16", "bfloat16")
# Which layers the lossless codec covers (SPEC §5); `offline-lossless` also takes "all".
LOSSLESS_SCOPES = ("none", "front_n", "h2o_kept", "front_n_and_h2o_kept")


def scope_layers(scope: str, front_n: int, h2o_layers, num_layers: int) -> frozenset[int]:
    """front_n: layers [0, N); h2o_kept: the evicting layers; both; or all."""
    chosen: set[int] = set()
    if scope in ("front_n", "front_n_and_h2o_kept"):
        chosen |= set(range(min(front_n, num_layers)))
    if scope in ("h2o_kept", "front_n_and_h2o_kept"):
        chosen |= set(h2o_layers)
    if scope == "all":
        chosen = set(range(num_layers))
    return frozenset(chosen)


# The fast path's decode weights: the GGUF's own blocks where it stores Q4_1/Q8_0 (auto; else the
# precision's float type), all 4-bit-as-stored (q4_1), all Q8_0, or float copies (bf16, fp32).
WEIGHT_DTYPES = ("auto", "q4_1", "q8_0", "bf16", "fp32")

# The inputs of the fast path's quantized (Q4_1/Q8_0) GEMVs: float32 (exact against the dequantised
# weights) or int8 per block of 32 with integer dot products (llama.cpp's and MNN's low precision; faster
# where unpacking nibbles to floats is the bottleneck, e.g. on AVX2; not exact).
ACTIVATION_DTYPES = ("fp32", "q8")

# How decode steps run: C kernels where the model allows (auto), always (fast), or the transformers forward.
DECODE_PATHS = ("auto", "fast", "reference")


class ConfigError(ValueError):
    """A config the runtime must not guess about. Its message is one line."""


def _clamp(lo: float | None = None, hi: float | None = None) -> Callable[[Any], Any]:
    def apply(v):
        if lo is not None and v < lo:
            return type(v)(lo)
        if hi is not None and v > hi:
            return type(v)(hi)
        return v

    return apply


@dataclass(frozen=True)
class _Key:
    kind: type  # bool, int, float or str
    default: Any
    clamp: Callable[[Any], Any] | None = None
    choices: tuple[str, ...] | None = None
    doc: str = ""


# Model-side keys we use. Other non-kv keys of MNN configs are accepted and ignored
# (MNN has dozens: sampler, mmap, ...), with a note, so a real MNN config still loads.
MODEL_KEYS: dict[str, _Key] = {
    "base_dir": _Key(str, ""),
    "llm_model": _Key(str, ""),
    "llm_weight": _Key(str, ""),
    "tokenizer_file": _Key(str, ""),
    "backend_type": _Key(str, "cpu", choices=("cpu",)),
    "thread_num": _Key(int, 2, _clamp(1)),
    "precision": _Key(str, "high", choices=("normal", "high", "low")),
    "llm_weight_dtype": _Key(str, "auto", choices=WEIGHT_DTYPES),
    "llm_activation_dtype": _Key(str, "fp32", choices=ACTIVATION_DTYPES),
}
FILE_KEYS = ("llm_model", "llm_weight", "tokenizer_file")
INT_MIN, INT_MAX = -(2**31), 2**31 - 1


def _type_name(kind: type) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string"}[kind]


def _check_type(key: str, value: Any, spec: _Key) -> Any:
    kind = spec.kind
    ok = (
        isinstance(value, bool) if kind is bool
        else isinstance(value, int) and not isinstance(value, bool) if kind is int
        else isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
        else isinstance(value, str)
    )
    if not ok:
        raise ConfigError(f"config key '{key}' must be {_type_name(kind)}, got {json.dumps(value)}")
    if kind is float and not math.isfinite(value):
        raise ConfigError(f"config key '{key}' must be a finite number, got {value}")
    if kind is int and not INT_MIN <= value <= INT_MAX:
        raise ConfigError(f"config key '{key}' = {value} does not fit a 32-bit integer; allowed: "
                          f"{INT_MIN}..{INT_MAX}")
    if spec.choices is not None and value not in spec.choices:
        allowed = ", ".join(spec.choices)
        raise ConfigError(f"config key '{key}' has value {json.dumps(value)}; allowed: {allowed}")
    return float(value) if kind is float else value


def _kv(default: Any, clamp: Callable[[Any], Any] | None = None, choices: tuple[str, ...] | None = None,
        doc: str = ""):
    """A KVConfig field; its metadata makes the key's entry in KV_KEYS (one source per fact)."""
    return field(default=default, metadata={"clamp": clamp, "choices": choices, "doc": doc})


@dataclass(frozen=True)
class KVConfig:
    """The validated `kv_*` settings. Field names are the keys without the `kv_` prefix; the order is
    the order of `h2okit config --defaults` and of the docs."""

    h2o_enable: bool = _kv(False, doc="master switch")
    h2o_layer_start: int = _kv(2, _clamp(0), doc="first H2O layer (0-based); also capped at L-1")
    h2o_layer_end: int = _kv(-1, doc="last H2O layer, inclusive; negative = last layer")
    h2o_block_tokens: int = _kv(64, _clamp(1), doc="unit of scoring and eviction")
    h2o_sink_tokens: int = _kv(32, _clamp(0), doc="leading tokens always kept")
    h2o_recent_tokens: int = _kv(256, _clamp(0), doc="trailing tokens always kept")
    h2o_target_keep_ratio: float = _kv(0.5, _clamp(0.0, 1.0), doc="kept fraction (static mode)")
    h2o_target_mode: str = _kv("adaptive", choices=("static", "adaptive"))
    h2o_target_lossy_ratio: float = _kv(3.0, _clamp(1.0), doc="adaptive mode: keep 1/this")
    h2o_ema_alpha: float = _kv(0.9, _clamp(0.0, 1.0), doc="score = a*score + (1-a)*current")
    h2o_update_interval: int = _kv(16, _clamp(1), doc="decode steps between evictions of a layer")
    h2o_trigger_min_tokens: int = _kv(512, _clamp(1), doc="evict only when the layer holds this many")
    h2o_log_stats: bool = _kv(False, doc="print one [H2O] line per eviction")
    # Beyond the seed (the README's config table documents each).
    h2o_policy: str = _kv("h2o", choices=POLICIES, doc="which blocks to keep under the same floors and budget")
    h2o_budget_basis: str = _kv("current", choices=BUDGET_BASES,
                                doc="ratio x current length (seed), x tokens seen, or a fixed token count")
    h2o_budget_tokens: int = _kv(0, _clamp(0), doc="basis 'tokens': kept tokens per layer")
    h2o_per_head: bool = _kv(False, doc="each KV head keeps its own tokens (same count per head)")
    h2o_value_norm: bool = _kv(False, doc="weigh scores by the values' L2 norm")
    h2o_score_pool: int = _kv(1, _clamp(1), doc="at plan time each block scores the max over this many blocks "
                                                "centred on it (SnapKV's pooling: neighbours of a heavy hitter "
                                                "stay with it); 1: off")
    h2o_layer_budget_slope: float = _kv(0.0, _clamp(-1.0, 1.0),
                                        doc="budget x (1 + slope) at the first evicting layer .. (1 - slope) at the "
                                            "last; same total")
    h2o_seed: int = _kv(0, doc="seed of the `random` policy")
    h2o_prefill_chunk_tokens: int = _kv(0, _clamp(0), doc="feed the prompt in chunks of this many tokens, evicting "
                                                          "between them (0: the whole prompt at once)")
    h2o_score_prefill: bool = _kv(False, doc="also score the prompt's attention (H2O paper); SPEC: decode only")
    h2o_score_prefill_rows: int = _kv(0, _clamp(0), doc="with score_prefill: only the prompt's last N query rows "
                                                         "(SnapKV's observation window); 0: all rows")
    h2o_query_window: int = _kv(32, _clamp(1), doc="policy `expected`: the recent queries whose mean and covariance "
                                                    "model the next ones")
    h2o_query_horizon: int = _kv(32, _clamp(0), doc="policy `expected`: the recent queries are moved (RoPE) to the "
                                                     "next N positions, averaged, as kvpress's n_future_positions; "
                                                     "0: kept where they were asked")
    lossless_enable: bool = _kv(False, doc="lossless codec on")
    lossless_scope: str = _kv("front_n", choices=LOSSLESS_SCOPES)
    lossless_front_n: int = _kv(2, _clamp(0), doc="front_n scope: layers [0, N)")
    lossless_codec: str = _kv("none", choices=("none", "gear_delta"))
    lossless_runtime_mode: str = _kv("full", choices=("estimate", "full", "store"))
    cache_dtype: str = _kv("float32", choices=tuple(CACHE_DTYPES))

    @property
    def keep_ratio(self) -> float:
        """The target kept fraction: static uses keep_ratio, adaptive 1/lossy_ratio."""
        if self.h2o_target_mode == "static":
            return self.h2o_target_keep_ratio
        return 1.0 / self.h2o_target_lossy_ratio

    @property
    def evicting(self) -> bool:
        return self.h2o_enable and self.h2o_policy != "full"

    @property
    def codec_on(self) -> bool:
        return self.lossless_enable and self.lossless_codec != "none" and self.lossless_scope != "none"

    def layer_warnings(self, num_layers: int) -> list[str]:
        """Settings the model's depth clamps (known only once the model is loaded), one line each."""
        out = []
        last = num_layers - 1
        if self.h2o_enable and self.h2o_layer_start > last:
            out.append(f"kv_h2o_layer_start {self.h2o_layer_start} is beyond the model's {num_layers} layers; "
                       f"using {last}")
        if self.h2o_enable and self.h2o_layer_end > last:
            out.append(f"kv_h2o_layer_end {self.h2o_layer_end} is beyond the model's {num_layers} layers; "
                       f"using {last}")
        if self.codec_on and self.lossless_scope in ("front_n", "front_n_and_h2o_kept") and \
                self.lossless_front_n > num_layers:
            out.append(f"kv_lossless_front_n {self.lossless_front_n} is more than the model's {num_layers} layers; "
                       f"the codec covers all {num_layers}")
        return out

    def h2o_layers(self, num_layers: int) -> range:
        """Layer range [start, end] after SPEC §1's clamps; empty if end < start or H2O is off."""
        if not self.h2o_enable or num_layers <= 0:
            return range(0)
        start = min(max(0, self.h2o_layer_start), num_layers - 1)
        end = num_layers - 1 if self.h2o_layer_end < 0 else min(self.h2o_layer_end, num_layers - 1)
        return range(start, end + 1) if end >= start else range(0)

    def lossless_layers(self, num_layers: int) -> frozenset[int]:
        """Layers whose K/V the codec covers (front_n: [0, N); h2o_kept: the H2O layers)."""
        if not self.codec_on:
            return frozenset()
        return scope_layers(self.lossless_scope, self.lossless_front_n, self.h2o_layers(num_layers), num_layers)

    def to_keys(self) -> dict[str, Any]:
        return {"kv_" + f.name: getattr(self, f.name) for f in fields(self)}


_KINDS = {"bool": bool, "int": int, "float": float, "str": str}
KV_KEYS: dict[str, _Key] = {
    "kv_" + f.name: _Key(_KINDS[f.type], f.default, f.metadata["clamp"], f.metadata["choices"], f.metadata["doc"])
    for f in fields(KVConfig)}


@dataclass
class Config:
    """A whole config file: the model keys, the `kv_*` keys, and what validation noticed."""

    kv: KVConfig
    model: dict[str, Any]
    path: Path | None = None
    warnings: list[str] = field(default_factory=list)

    @property
    def threads(self) -> int:
        return int(self.model.get("thread_num", 2))


def _suggest(key: str, known: list[str]) -> str:
    close = difflib.get_close_matches(key, known, n=1)
    return f"; did you mean '{close[0]}'?" if close else f"; known kv_* keys: {', '.join(known)}"


def parse_config(raw: dict[str, Any], path: Path | None = None) -> Config:
    """Validate a config dict (see module doc). Raises ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config must be a JSON object, got {type(raw).__name__}")
    kv_values: dict[str, Any] = {}
    model: dict[str, Any] = {}
    warnings: list[str] = []
    for key, value in raw.items():
        if key.startswith("kv_"):
            spec = KV_KEYS.get(key)
            if spec is None:
                raise ConfigError(f"unknown config key '{key}'{_suggest(key, list(KV_KEYS))}")
            value = _check_type(key, value, spec)
            if spec.clamp is not None:
                clamped = spec.clamp(value)
                if clamped != value:
                    warnings.append(f"config key '{key}' = {value} is out of range; using {clamped}")
                    value = clamped
            kv_values[key[3:]] = value
        elif key in MODEL_KEYS:
            spec = MODEL_KEYS[key]
            value = _check_type(key, value, spec)
            if spec.clamp is not None and spec.clamp(value) != value:
                warnings.append(f"config key '{key}' = {value} is out of range; using {spec.clamp(value)}")
                value = spec.clamp(value)
            model[key] = value
        else:
            model[key] = value
            warnings.append(f"config key '{key}' is not used by h2okit; ignored")
    for key, spec in MODEL_KEYS.items():
        model.setdefault(key, spec.default)
    kv = KVConfig(**kv_values)
    _check_budget(kv, warnings)
    return Config(kv=kv, model=model, path=path, warnings=warnings)


def _check_budget(kv: KVConfig, warnings: list[str]) -> None:
    """Cross-key checks of the eviction budget: a `tokens` basis needs a count, and floors that
    exceed the budget where eviction starts are worth a warning naming both numbers."""
    if kv.h2o_budget_basis == "tokens" and kv.h2o_budget_tokens < 1:
        raise ConfigError("config key 'kv_h2o_budget_tokens' must be >= 1 with kv_h2o_budget_basis 'tokens' "
                          f"(got {kv.h2o_budget_tokens})")
    if kv.h2o_score_pool % 2 == 0:
        raise ConfigError(f"config key 'kv_h2o_score_pool' must be odd (a window centred on each block; 1: off), "
                          f"got {kv.h2o_score_pool}")
    if kv.h2o_enable and kv.h2o_layer_end >= 0 and kv.h2o_layer_end < kv.h2o_layer_start:
        warnings.append(f"kv_h2o_layer_end {kv.h2o_layer_end} < kv_h2o_layer_start {kv.h2o_layer_start}: H2O is on "
                        f"but evicts in no layer")
    if not kv.evicting:
        return
    b = kv.h2o_block_tokens
    floors = (-(-kv.h2o_sink_tokens // b) + -(-kv.h2o_recent_tokens // b)) * b
    at = kv.h2o_trigger_min_tokens
    budget = kv.h2o_budget_tokens if kv.h2o_budget_basis == "tokens" else math.ceil(kv.keep_ratio * at)
    if floors > budget:
        then = ("no eviction while they do (SPEC §3)" if kv.h2o_budget_basis == "current"
                else "the floors are cut to fit the budget")
        warnings.append(f"sink + recent floors hold {floors} tokens (whole blocks of {b}), more than the "
                        f"{budget}-token budget at the trigger ({at} tokens, basis {kv.h2o_budget_basis}); {then}")


def load_config(path: str | Path) -> Config:
    """Read and validate a config file; model file keys stay as written (see resolve_model_path)."""
    from .io import read_json

    return parse_config(read_json(Path(path), "config file", ConfigError), Path(path))


def emit_warnings(config: Config, stream=sys.stderr) -> None:
    for line in config.warnings:
        print(f"warning: {line}", file=stream)


def default_kv_keys() -> dict[str, Any]:
    return {key: spec.default for key, spec in KV_KEYS.items()}
