"""The llm_bench markdown table (SPEC §7): column names and cell formats, in one place."""

from __future__ import annotations

import statistics
from typing import Sequence

MIB = 1024 * 1024  # every *_mb figure is in MiB
GIB = 1024 * MIB

STANDARD_COLUMNS = (
    "model", "modelSize", "backend", "threads", "precision", "llm_demo", "speed(tok/s)",
    "h2o_keep", "h2o_lossy", "h2o_lossless", "h2o_target_keep_effective", "h2o_floor_keep",
    "h2o_quantized_keep", "h2o_evict_us", "h2o_codec_us",
)
# Cell format of each numeric stat column; extra columns follow the standard ones.
STAT_FORMATS = {
    "h2o_keep": "%.4f", "h2o_lossy": "%.3f", "h2o_lossless": "%.3f",
    "h2o_target_keep_effective": "%.4f", "h2o_floor_keep": "%.4f", "h2o_quantized_keep": "%.4f",
    "h2o_evict_us": "%.2f", "h2o_codec_us": "%.2f",
}
EXTRA_FORMATS = {
    "kv_true_ratio": "%.3f", "kv_phys_mb": "%.2f", "kv_logical_mb": "%.2f", "kv_alloc_mb": "%.2f",
    "kv_lossless_mb": "%.3f",
    "h2o_codec_decode_us": "%.2f", "h2o_evictions": "%.1f",
    # quality (llm_bench --quality)
    "ppl": "%.3f", "ppl_full": "%.3f", "ppl_delta_pct": "%.2f", "attended_fraction": "%.4f",
    "quality_windows": "%.0f", "token_agreement": "%.4f",
    "first_divergence": "%.1f", "passkey_acc": "%.3f", "passkey_full_acc": "%.3f", "quality_s": "%.1f",
}


def size_cell(size_bytes: float) -> str:
    """The modelSize cell in MNN's (and llama-bench's) units: MiB below 1 GiB, else GiB."""
    return f"{size_bytes / GIB:.2f} GiB" if size_bytes >= GIB else f"{size_bytes / MIB:.2f} MiB"


def extra_columns(keys) -> list[tuple[str, str]]:
    """(column, format) of the extra columns present, known ones first, in a fixed order."""
    keys = list(keys)
    known = [(k, f) for k, f in EXTRA_FORMATS.items() if k in keys]
    rest = [(k, "%.3f") for k in keys if k not in EXTRA_FORMATS and k not in STAT_FORMATS]
    return known + rest


def mean_sd(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for one sample), as MNN's llm_bench prints them."""
    values = list(values)
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def _num(fmt: str, value: float) -> str:
    text = fmt % value
    return text[1:] if text.startswith("-") and not text.strip("-0.") else text  # no "-0.00"


def cell(values: Sequence[float], fmt: str) -> str:
    mean, sd = mean_sd(values)
    return f"{_num(fmt, mean)} ± {_num(fmt, sd)}"


def speed_cell(prefill: Sequence[float], decode: Sequence[float]) -> str:
    return f"{cell(prefill, '%.2f')}<br>{cell(decode, '%.2f')}"


def render(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
