"""The llm_bench markdown table (SPEC §7): column names and cell formats, in one place."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field, fields
from typing import Sequence

MIB = 1024 * 1024  # every *_mb figure is in MiB
GIB = 1024 * MIB

# MNN's columns before the h2o_* stats (RequestStats names those, with their formats).
LEAD_COLUMNS = ("model", "modelSize", "backend", "threads", "precision", "llm_demo", "speed(tok/s)")


def _stat(fmt: str, standard: bool = False, default: float = 0.0):
    """A RequestStats field: its cell format, and whether it is one of SPEC §7's standard columns."""
    return field(default=default, metadata={"fmt": fmt, "standard": standard})


@dataclass
class RequestStats:
    """The llm_bench columns of one request (SPEC §6), plus whole-cache figures; each field carries its
    cell format. The standard ones come in SPEC §7's order, then the extras."""

    h2o_keep: float = _stat("%.4f", True, 1.0)
    h2o_lossy: float = _stat("%.3f", True, 1.0)
    h2o_lossless: float = _stat("%.3f", True, 1.0)
    h2o_target_keep_effective: float = _stat("%.4f", True, 1.0)
    h2o_floor_keep: float = _stat("%.4f", True, 1.0)
    h2o_quantized_keep: float = _stat("%.4f", True, 1.0)
    h2o_evict_us: float = _stat("%.2f", True)
    h2o_codec_us: float = _stat("%.2f", True)
    kv_true_ratio: float = _stat("%.3f", default=1.0)  # logical KV bytes of all layers and tokens / bytes held
    kv_phys_mb: float = _stat("%.2f")  # bytes of live tokens (raw) plus cold frames
    kv_logical_mb: float = _stat("%.2f")
    kv_alloc_mb: float = _stat("%.2f")  # what the buffers reserve (live tokens + free slots) plus cold frames
    kv_peak_mb: float = _stat("%.2f")  # the most K/V (raw + cold frames) held at any moment of the request
    kv_lossless_mb: float = _stat("%.3f")  # codec output of the in-scope layers (estimated in estimate mode)
    h2o_codec_decode_us: float = _stat("%.2f")
    h2o_evictions: float = _stat("%.1f")

    def as_dict(self) -> dict:
        return asdict(self)


STAT_FORMATS = {f.name: f.metadata["fmt"] for f in fields(RequestStats) if f.metadata["standard"]}
STANDARD_COLUMNS = (*LEAD_COLUMNS, *STAT_FORMATS)  # SPEC §7's table, in order
# Extra columns follow the standard ones: the other request stats, then quality (llm_bench --quality).
QUALITY_FORMATS = {
    "ppl": "%.3f", "ppl_full": "%.3f", "ppl_delta_pct": "%.2f", "attended_fraction": "%.4f",
    "quality_windows": "%.0f", "token_agreement": "%.4f",
    "first_divergence": "%.1f", "passkey_acc": "%.3f", "passkey_full_acc": "%.3f", "quality_s": "%.1f",
}
EXTRA_FORMATS = {**{f.name: f.metadata["fmt"] for f in fields(RequestStats) if not f.metadata["standard"]},
                 **QUALITY_FORMATS}


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
