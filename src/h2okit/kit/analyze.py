"""CSV of a sweep -> `summary.md`, `summary.json`, `pareto.png`.

Every figure says where it comes from:
- runtime: the h2o_* stats llm_bench reported (h2o_lossless is measured over the codec's
  in-scope layers only);
- seed total: h2o_lossy x h2o_lossless, the original's headline, which multiplies ratios of
  different layers and is NOT a whole-cache ratio (kept for comparison);
- true whole-cache: kv_true_ratio, logical KV bytes of all layers and tokens over the bytes
  physically held at the end of the request;
- offline: weighted_lossless_ratio from `h2okit offline-lossless` (--offline-lossless-json).
The Pareto set is the non-dominated set over compression (up), decode tok/s (up) and, when
quality columns exist, quality (perplexity increase down).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


class AnalyzeError(ValueError):
    """A CSV that cannot be analysed; one line."""


@dataclass
class Objective:
    column: str
    label: str
    sign: int  # +1: higher is better, -1: lower is better


def pareto_mask(values: np.ndarray) -> np.ndarray:
    """Rows not dominated by any other (all objectives to maximise). NaN rows are never on it."""
    n = len(values)
    ok = ~np.isnan(values).any(axis=1)
    mask = ok.copy()
    for i in range(n):
        if not ok[i]:
            continue
        others = values[ok]
        dominated = (others >= values[i]).all(axis=1) & (others > values[i]).any(axis=1)
        mask[i] = not dominated.any()
    return mask


def _label(df: pd.DataFrame) -> pd.Series:
    if "run_id" in df and df["run_id"].notna().all():
        return df["run_id"].astype(str)
    return df["log_file"].map(lambda p: Path(str(p)).stem) + df.groupby("log_file").cumcount().map(
        lambda k: "" if k == 0 else f"#{k + 1}")


def _fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def load(csv_path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(csv_path)
    except FileNotFoundError:
        raise AnalyzeError(f"CSV not found: {csv_path}") from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError) as exc:
        raise AnalyzeError(f"{csv_path} is not a readable CSV: {exc}") from None
    if df.empty:
        raise AnalyzeError(f"{csv_path} has no rows")
    if "decode_tps_mean" not in df:
        raise AnalyzeError(f"{csv_path} has no decode_tps_mean column; make it with `h2okit parse`")
    df["label"] = _label(df)
    return df


def analyze(csv_path: Path, out_md: Path, lossy_target: float = 3.0, lossless_target: float = 1.3,
            offline_json: Path | None = None, decode_baseline: str | None = None,
            max_decode_drop: float = 0.05) -> dict:
    df = load(csv_path)
    offline = None
    if offline_json is not None:
        try:
            offline = json.loads(Path(offline_json).read_text())
            offline_ratio = float(offline["weighted_lossless_ratio"])
        except (OSError, ValueError, KeyError, TypeError):
            raise AnalyzeError(f"{offline_json} has no weighted_lossless_ratio (make it with "
                               f"`h2okit offline-lossless --out-json`)") from None
    has = lambda c: c in df and df[c].notna().any()  # noqa: E731
    if has("h2o_lossy_mean") and has("h2o_lossless_mean"):
        df["seed_total"] = df["h2o_lossy_mean"] * df["h2o_lossless_mean"]
    if offline is not None and has("h2o_lossy_mean"):
        df["offline_total"] = df["h2o_lossy_mean"] * offline_ratio
    if has("kv_true_ratio_mean"):
        compression = Objective("kv_true_ratio_mean", "true whole-cache ratio", +1)
    elif has("seed_total"):
        compression = Objective("seed_total", "seed total (lossy x lossless; mixes layers)", +1)
    else:
        raise AnalyzeError("the CSV has neither kv_true_ratio nor h2o_lossy/h2o_lossless columns")
    objectives = [compression, Objective("decode_tps_mean", "decode tok/s", +1)]
    quality = None
    if has("ppl_delta_pct_mean"):
        quality = Objective("ppl_delta_pct_mean", "perplexity increase %", -1)
        objectives.append(quality)
    values = np.column_stack([df[o.column].astype(float).to_numpy() * o.sign for o in objectives])
    df["pareto"] = pareto_mask(values)

    def best(column: str, largest: bool = True) -> dict | None:
        if not has(column):
            return None
        row = df.loc[df[column].idxmax() if largest else df[column].idxmin()]
        return {"run": row["label"], "value": float(row[column])}

    baseline_decode = None
    if decode_baseline == "auto":
        full = df[df.get("kv_h2o_policy", pd.Series(dtype=str)) == "full"] if "kv_h2o_policy" in df else df.iloc[0:0]
        if full.empty:
            raise AnalyzeError("--decode-baseline auto needs a run with kv_h2o_policy full in the CSV")
        baseline_decode = float(full["decode_tps_mean"].median())
    elif decode_baseline is not None:
        try:
            baseline_decode = float(decode_baseline)
        except ValueError:
            raise AnalyzeError(f"--decode-baseline takes tok/s or 'auto', got '{decode_baseline}'") from None

    lossless_col = "h2o_lossless_mean"
    gate_rows = []
    criteria = []
    if has("h2o_lossy_mean"):
        criteria.append(("lossy", f"h2o_lossy >= {lossy_target:g} (runtime)", df["h2o_lossy_mean"] >= lossy_target,
                         "h2o_lossy_mean"))
    if offline is not None:
        criteria.append(("lossless", f"weighted lossless ratio >= {lossless_target:g} (offline)",
                         pd.Series(offline_ratio >= lossless_target, index=df.index), None))
    elif has(lossless_col):
        criteria.append(("lossless", f"h2o_lossless >= {lossless_target:g} (runtime, in-scope layers)",
                         df[lossless_col] >= lossless_target, lossless_col))
    if baseline_decode is not None:
        floor = baseline_decode * (1 - max_decode_drop)
        criteria.append(("decode", f"decode >= {floor:.2f} tok/s ({baseline_decode:.2f} - {max_decode_drop:.0%})",
                         df["decode_tps_mean"] >= floor, "decode_tps_mean"))
    passing_all = pd.Series(True, index=df.index)
    for name, text, ok, column in criteria:
        passing_all &= ok
        value = offline_ratio if column is None else float(df[column].max())
        gate_rows.append({"criterion": name, "rule": text, "result": "PASS" if ok.any() else "FAIL",
                          "best": value, "runs_passing": int(ok.sum())})
    overall = [str(x) for x in df.loc[passing_all, "label"]] if criteria else []

    summary = {
        "csv": str(csv_path), "runs": int(len(df)),
        "sources": {"runtime": "h2o_* stats reported by llm_bench",
                    "seed_total": "h2o_lossy x h2o_lossless (mixes deep-layer eviction with front-layer codec)",
                    "true_whole_cache": "kv_true_ratio: logical KV bytes / bytes physically held",
                    "offline": str(offline_json) if offline_json else None},
        "averages": {c: float(df[c].mean()) for c in df.columns
                     if c.endswith("_mean") and pd.api.types.is_numeric_dtype(df[c])},
        "best_lossy": best("h2o_lossy_mean"), "best_decode": best("decode_tps_mean"),
        "best_seed_total": best("seed_total"), "best_true_ratio": best("kv_true_ratio_mean"),
        "best_offline_total": best("offline_total"),
        "offline_weighted_lossless_ratio": offline_ratio if offline is not None else None,
        "objectives": [o.__dict__ for o in objectives],
        "pareto": df.loc[df["pareto"], _pareto_columns(df)].to_dict(orient="records"),
        "gate": {"criteria": gate_rows, "overall": "PASS" if overall else "FAIL", "passing_runs": overall,
                 "decode_baseline": baseline_decode},
    }
    out_md = Path(out_md)
    out_md.parent.mkdir(parents=True, exist_ok=True)
    out_md.write_text(_markdown(df, summary, compression, quality))
    out_md.with_name("summary.json").write_text(json.dumps(summary, indent=1, default=_jsonable))
    plot(df, compression, quality, out_md.with_name("pareto.png"))
    return summary


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return str(value)


def _pareto_columns(df: pd.DataFrame) -> list[str]:
    wanted = ["label", "kv_h2o_policy", "kv_h2o_target_mode", "kv_h2o_target_keep_ratio",
              "kv_h2o_target_lossy_ratio", "kv_h2o_block_tokens", "kv_true_ratio_mean", "seed_total",
              "h2o_lossy_mean", "h2o_lossless_mean", "decode_tps_mean", "ppl_delta_pct_mean", "ppl_delta_pct_std",
              "token_agreement_mean", "passkey_acc_mean"]
    return [c for c in wanted if c in df]


def _markdown(df: pd.DataFrame, s: dict, compression: Objective, quality: Objective | None) -> str:
    lines = ["# H2O sweep summary", "", f"{s['runs']} run(s) from `{s['csv']}`.", "",
             "Where numbers come from: **runtime** = the h2o_* stats of llm_bench; **seed total** = "
             "h2o_lossy x h2o_lossless, the original's headline, which multiplies ratios of different layers "
             "and is not a whole-cache ratio; **true whole-cache** = kv_true_ratio (logical KV bytes of all layers "
             "and tokens / bytes physically held); **offline** = real gear_delta frames on dumped K/V.", ""]
    lines += ["## Averages over runs", "", "| metric | mean |", "| --- | --- |"]
    for key in ("decode_tps_mean", "prefill_tps_mean", "h2o_keep_mean", "h2o_lossy_mean", "h2o_lossless_mean",
                "kv_true_ratio_mean", "ppl_delta_pct_mean", "token_agreement_mean", "passkey_acc_mean"):
        if key in s["averages"]:
            lines.append(f"| {key} | {_fmt(s['averages'][key], 4)} |")
    lines += ["", "## Best", "", "| what | run | value | source |", "| --- | --- | --- | --- |"]
    for key, what, source in (("best_lossy", "lossy ratio", "runtime"), ("best_decode", "decode tok/s", "runtime"),
                              ("best_true_ratio", "true whole-cache ratio", "true whole-cache"),
                              ("best_seed_total", "seed total (lossy x lossless)", "runtime, mixes layers"),
                              ("best_offline_total", "lossy x offline lossless", "runtime x offline")):
        if s.get(key):
            lines.append(f"| {what} | {s[key]['run']} | {_fmt(s[key]['value'])} | {source} |")
    objs = ", ".join(f"{o['label']} ({'up' if o['sign'] > 0 else 'down'})" for o in s["objectives"])
    lines += ["", "## Pareto set", "", f"Non-dominated runs over: {objs}.", ""]
    cols = _pareto_columns(df)
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    for _, row in df[df["pareto"]].sort_values(compression.column, ascending=False).iterrows():
        lines.append("| " + " | ".join(_fmt(row[c]) if isinstance(row[c], float) else str(row[c]) for c in cols) + " |")
    if quality is not None:
        lines += ["", "## Quality lost, per run", "",
                  "| run | policy | compression | decode tok/s | ppl increase % | token agreement | passkey |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for _, row in df.sort_values(compression.column, ascending=False).iterrows():
            lines.append(f"| {row['label']} | {row.get('kv_h2o_policy', 'n/a')} | {_fmt(row[compression.column])} | "
                         f"{_fmt(row['decode_tps_mean'], 2)} | {_fmt(row['ppl_delta_pct_mean'], 2)} ± "
                         f"{_fmt(row.get('ppl_delta_pct_std', float('nan')), 2)} | "
                         f"{_fmt(row.get('token_agreement_mean', float('nan')))} | "
                         f"{_fmt(row.get('passkey_acc_mean', float('nan')), 2)} |")
    lines += ["", "## Gate", "", "| criterion | rule | result | best value | runs passing |", "| --- | --- | --- | --- | --- |"]
    for g in s["gate"]["criteria"]:
        lines.append(f"| {g['criterion']} | {g['rule']} | {g['result']} | {_fmt(g['best'])} | {g['runs_passing']} |")
    passing = ", ".join(s["gate"]["passing_runs"]) or "none"
    lines += ["", f"**Overall: {s['gate']['overall']}** (runs passing every criterion: {passing})", ""]
    return "\n".join(lines)


def plot(df: pd.DataFrame, compression: Objective, quality: Objective | None, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    x, y = df[compression.column].astype(float), df["decode_tps_mean"].astype(float)
    if quality is not None:
        points = ax.scatter(x, y, c=df[quality.column].astype(float), cmap="viridis_r", s=40, zorder=3)
        fig.colorbar(points, ax=ax, label=f"{quality.label} (lower is better)")
    else:
        ax.scatter(x, y, color="0.6", s=30, zorder=3, label="runs")
    front = df[df["pareto"]].sort_values(compression.column)
    ax.plot(front[compression.column], front["decode_tps_mean"], "-o", color="tab:red", mfc="none", ms=10,
            zorder=4, label="Pareto set")
    for _, row in front.iterrows():
        ax.annotate(str(row["label"]), (row[compression.column], row["decode_tps_mean"]), fontsize=7,
                    xytext=(4, 4), textcoords="offset points")
    if "kv_h2o_policy" in df and (df["kv_h2o_policy"] == "full").any():
        full = df[df["kv_h2o_policy"] == "full"]
        ax.axhline(full["decode_tps_mean"].median(), ls="--", color="k", lw=1, label="full cache (decode)")
        ax.axvline(full[compression.column].median(), ls="--", color="k", lw=0.8)
    ax.set_xlabel(compression.label)
    ax.set_ylabel("decode tok/s")
    ax.set_title("compression vs decode speed" + (" (colour: quality)" if quality is not None else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
