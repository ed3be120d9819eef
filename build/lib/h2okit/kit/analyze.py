"""CSV of a sweep -> `summary.md`, `summary.json`, `pareto.png`.

Every figure says where it comes from:
- runtime: the h2o_* stats llm_bench reported (h2o_lossless is measured over the codec's
  in-scope layers only);
- seed total: h2o_lossy x h2o_lossless, the original's headline, which multiplies ratios of
  different layers and is NOT a whole-cache ratio (kept for comparison);
- true whole-cache: kv_true_ratio, logical KV bytes of all layers and tokens over the bytes
  physically held at the end of the request;
- offline: weighted_lossless_ratio from `h2okit offline-lossless` (--offline-lossless-json).

Every comparison with the baseline (the full-cache run of the same prompt, generation and
threads) is paired: speed per round (the ratio of the two runs' tok/s in the same round of an
interleaved sweep, so both saw the same machine phase), quality per window (ppl_delta_pct is
already each window's increase over the full cache on the same targets). Each comes with a 95 %
CI (stats.py), and the gate answers PASS, FAIL or INCONCLUSIVE per criterion (see `gate`).
The Pareto set is the non-dominated set over compression (up), decode tok/s (up) and, when
quality columns exist, the perplexity increase (down); points dominated only within noise are
marked.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..stats import Interval, ci_from_summary, exact, mean_ci, paired_ci, verdict

MAX_DECODE_DROP = 0.05
MAX_PREFILL_DROP = 0.05
MAX_PPL_INCREASE = 10.0  # percent


class AnalyzeError(ValueError):
    """A CSV that cannot be analysed; one line."""


@dataclass
class Objective:
    column: str
    label: str
    sign: int  # +1: higher is better, -1: lower is better


@dataclass
class GateSettings:
    lossy_target: float = 3.0
    lossless_target: float = 1.3
    decode_baseline: str | None = None  # tok/s, "auto" (the full-cache run), or None (no speed criteria)
    max_decode_drop: float = MAX_DECODE_DROP
    max_prefill_drop: float = MAX_PREFILL_DROP
    max_ppl_increase: float = MAX_PPL_INCREASE
    offline_ratio: float | None = None


@dataclass
class Criterion:
    run: str
    name: str
    rule: str
    ci: Interval
    low: float = -math.inf
    high: float = math.inf
    source: str = ""
    unit: str = ""  # "rounds" or "windows": what more samples would mean
    result: dict = field(default_factory=dict)

    def judge(self) -> dict:
        v = verdict(self.ci, self.low, self.high)
        more = None if v.verdict != "INCONCLUSIVE" else (
            f"about {v.more_samples} more {self.unit}" if v.more_samples is not None else
            f"no number of {self.unit} is likely to decide (the mean sits on the limit)")
        self.result = {"run": self.run, "name": self.name, "rule": self.rule, "verdict": v.verdict,
                       "mean": self.ci.mean, "ci95": [self.ci.lo, self.ci.hi], "method": self.ci.method,
                       "n": self.ci.n, "source": self.source, "to_decide": more}
        return self.result


def pareto_mask(values: np.ndarray) -> np.ndarray:
    """Rows not dominated by any other (all objectives to maximise). NaN rows are never on it."""
    ok = ~np.isnan(values).any(axis=1)
    mask = ok.copy()
    for i in np.flatnonzero(ok):
        others = values[ok]
        dominated = (others >= values[i]).all(axis=1) & (others > values[i]).any(axis=1)
        mask[i] = not dominated.any()
    return mask


def clearly_dominated(values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Rows dominated by another row that is at least as good in every objective and better beyond
    noise in at least one (its CI lies entirely above this row's CI). All objectives maximised."""
    n = len(values)
    out = np.zeros(n, dtype=bool)
    for i in range(n):
        for j in range(n):
            if i != j and (values[j] >= values[i]).all() and (lo[j] > hi[i]).any():
                out[i] = True
                break
    return out


def _label(df: pd.DataFrame) -> pd.Series:
    if "run_id" in df and df["run_id"].notna().all():
        return df["run_id"].astype(str)
    return df["log_file"].map(lambda p: Path(str(p)).stem) + df.groupby("log_file").cumcount().map(
        lambda k: "" if k == 0 else f"#{k + 1}")


def _fmt(value, digits=3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _ci_text(ci: Interval | dict, digits: int = 2) -> str:
    lo, hi = (ci.lo, ci.hi) if isinstance(ci, Interval) else ci["ci95"]
    mean = ci.mean if isinstance(ci, Interval) else ci["mean"]
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return f"{mean:.{digits}f} (no CI)"
    if lo == hi:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} [{lo:.{digits}f}, {hi:.{digits}f}]"


def load(csv_path: Path) -> pd.DataFrame:
    try:
        df = pd.read_csv(csv_path)
    except FileNotFoundError:
        raise AnalyzeError(f"CSV not found: {csv_path}") from None
    except IsADirectoryError:
        raise AnalyzeError(f"--csv {csv_path} is a folder; give the CSV file `h2okit parse` wrote") from None
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as exc:
        raise AnalyzeError(f"{csv_path} is not a readable CSV: {str(exc).splitlines()[0]}") from None
    if df.empty:
        raise AnalyzeError(f"{csv_path} has no rows")
    if "decode_tps_mean" not in df and "speed(tok/s)" in df:
        _split_speed_cells(df)  # a CSV from the original kit's parser: speeds only as "P ± sd<br>D ± sd"
    if "decode_tps_mean" not in df:
        raise AnalyzeError(f"{csv_path} has neither decode_tps_mean nor speed(tok/s); make it with `h2okit parse`")
    df["label"] = _label(df)
    return df


def _split_speed_cells(df: pd.DataFrame) -> None:
    from .parse import MEAN_SD

    for i, cell in enumerate(df["speed(tok/s)"].astype(str)):
        for name, part in zip(("prefill_tps", "decode_tps"), cell.split("<br>")):
            m = MEAN_SD.match(part)
            if m:
                df.loc[df.index[i], [f"{name}_mean", f"{name}_std"]] = [float(m.group(1)), float(m.group(2))]
    for column in df.columns:
        if column.startswith("h2o_") and f"{column}_mean" not in df and not pd.api.types.is_numeric_dtype(df[column]):
            parsed = df[column].astype(str).str.extract(r"^\s*([-+\d.eE]+)\s*±\s*([-+\d.eE]+)")
            if parsed.notna().all().all():
                df[f"{column}_mean"], df[f"{column}_std"] = parsed[0].astype(float), parsed[1].astype(float)


def _samples(row: pd.Series, name: str) -> list[float]:
    """A run's per-round speed samples (interleaved sweep), else its mean as one sample."""
    raw = row.get(f"{name}_samples")
    if isinstance(raw, str) and raw.startswith("["):
        return [float(v) for v in json.loads(raw)]
    mean = row.get(f"{name}_mean")
    return [float(mean)] if mean is not None and not pd.isna(mean) else []


def _is_baseline(row: pd.Series) -> bool:
    return str(row.get("kv_h2o_policy", "")) == "full"


def _baseline_for(df: pd.DataFrame, row: pd.Series) -> pd.Series | None:
    """The full-cache run with the same prompt, generation and threads."""
    if "kv_h2o_policy" not in df:
        return None
    same = df["kv_h2o_policy"].astype(str) == "full"
    for key in ("prompt_len", "gen_len", "threads"):
        if key in df and not pd.isna(row.get(key)):
            same &= df[key] == row[key]
    return df[same].iloc[0] if same.any() else None


def speed_ci(run: pd.Series, baseline: pd.Series | None, fixed: float | None, name: str) -> Interval | None:
    """Run / baseline tok/s: paired per round against the baseline run, else against a fixed figure."""
    samples = _samples(run, name)
    if not samples:
        return None
    if baseline is not None:
        base = _samples(baseline, name)
        n = min(len(samples), len(base))
        return paired_ci(samples[:n], base[:n], kind="ratio") if n else None
    if fixed:
        return mean_ci([s / fixed for s in samples])
    return None


def quality_ci(run: pd.Series) -> Interval | None:
    """The ppl increase over the full cache: per window already a paired difference (same targets).
    From the per-window samples when the CSV has them, else from mean, sd and the window count."""
    raw = run.get("ppl_delta_pct_samples")
    if isinstance(raw, str) and raw.startswith("["):
        return mean_ci(json.loads(raw))
    mean = run.get("ppl_delta_pct_mean")
    if mean is None or pd.isna(mean):
        return None
    n = int(run["quality_windows_mean"]) if not pd.isna(run.get("quality_windows_mean", np.nan)) else 0
    return ci_from_summary(float(mean), float(run.get("ppl_delta_pct_std", 0.0)), n)


def run_criteria(df: pd.DataFrame, row: pd.Series, gate: GateSettings, fixed: float | None) -> list[Criterion]:
    label = row["label"]
    out: list[Criterion] = []
    if not pd.isna(row.get("h2o_lossy_mean", np.nan)):
        out.append(Criterion(label, "lossy ratio", f"h2o_lossy >= {gate.lossy_target:g}",
                             exact(float(row["h2o_lossy_mean"])), low=gate.lossy_target, source="runtime"))
    if gate.offline_ratio is not None:
        out.append(Criterion(label, "lossless ratio", f"weighted lossless ratio >= {gate.lossless_target:g}",
                             exact(gate.offline_ratio), low=gate.lossless_target, source="offline"))
    elif not pd.isna(row.get("h2o_lossless_mean", np.nan)):
        out.append(Criterion(label, "lossless ratio", f"h2o_lossless >= {gate.lossless_target:g}",
                             exact(float(row["h2o_lossless_mean"])), low=gate.lossless_target,
                             source="runtime, in-scope layers"))
    if gate.decode_baseline is not None:
        baseline = _baseline_for(df, row) if gate.decode_baseline == "auto" else None
        for name, what, drop in (("decode_tps", "decode", gate.max_decode_drop),
                                 ("prefill_tps", "prefill", gate.max_prefill_drop)):
            if what == "prefill" and baseline is None:
                continue  # a fixed baseline figure is a decode speed
            ci = speed_ci(row, baseline, fixed, name)
            if ci is not None:
                versus = "the full-cache run, paired per round" if baseline is not None else f"{fixed:g} tok/s"
                out.append(Criterion(label, f"{what} speed ratio", f"{what} tok/s / baseline >= {1 - drop:g}",
                                     ci, low=1 - drop, source=f"vs {versus}", unit="rounds"))
    ci = quality_ci(row)
    if ci is not None:
        out.append(Criterion(label, "ppl increase %", f"ppl increase <= {gate.max_ppl_increase:g} %", ci,
                             high=gate.max_ppl_increase, source="vs the full cache, paired per window",
                             unit="windows"))
    return out


def judge(df: pd.DataFrame, gate: GateSettings) -> dict:
    """Per run: every criterion's verdict; a run is FAIL if any criterion fails, PASS if all pass,
    else INCONCLUSIVE. Overall: PASS if some run passes, FAIL if every run fails, else INCONCLUSIVE
    (so the overall verdict is FAIL only when some criterion FAILs)."""
    fixed = None
    if gate.decode_baseline not in (None, "auto"):
        try:
            fixed = float(gate.decode_baseline)
        except ValueError:
            raise AnalyzeError(f"--decode-baseline takes tok/s or 'auto', got '{gate.decode_baseline}'") from None
        if not math.isfinite(fixed) or fixed <= 0:
            raise AnalyzeError(f"--decode-baseline must be a positive tok/s or 'auto', got '{gate.decode_baseline}'")
    if gate.decode_baseline == "auto" and not ("kv_h2o_policy" in df and (df["kv_h2o_policy"] == "full").any()):
        raise AnalyzeError("--decode-baseline auto needs a run with kv_h2o_policy full in the CSV")
    judged = [row for _, row in df.iterrows() if not _is_baseline(row)] or [row for _, row in df.iterrows()]
    criteria, runs = [], {}
    for row in judged:
        results = [c.judge() for c in run_criteria(df, row, gate, fixed)]
        criteria += results
        verdicts = {r["verdict"] for r in results}
        runs[row["label"]] = ("FAIL" if "FAIL" in verdicts else "PASS" if verdicts == {"PASS"} else
                              "INCONCLUSIVE") if results else "INCONCLUSIVE"
    values = set(runs.values())
    overall = "PASS" if "PASS" in values else ("FAIL" if values == {"FAIL"} else "INCONCLUSIVE")
    return {"criteria": criteria, "runs": runs, "overall": overall,
            "passing_runs": [r for r, v in runs.items() if v == "PASS"],
            "rules": "a criterion PASSes when its 95 % CI lies inside the allowed region, FAILs when it lies "
                     "entirely outside, else INCONCLUSIVE; a run passes when all its criteria pass; overall PASS "
                     "if some run passes, FAIL if every run fails",
            "decode_baseline": gate.decode_baseline}


def analyze(csv_path: Path, out_md: Path, gate: GateSettings | None = None,
            offline_json: Path | None = None) -> dict:
    gate = gate or GateSettings()
    df = load(csv_path)
    offline = _offline_report(offline_json) if offline_json is not None else None
    if offline is not None:
        gate.offline_ratio = float(offline["weighted_lossless_ratio"])
    compression, quality = _objectives(df, gate)
    objectives = [compression, Objective("decode_tps_mean", "decode tok/s", +1)] + ([quality] if quality else [])
    _mark_pareto(df, objectives)

    def best(column: str, largest: bool = True) -> dict | None:
        if column not in df or not df[column].notna().any():
            return None
        row = df.loc[df[column].idxmax() if largest else df[column].idxmin()]
        return {"run": row["label"], "value": float(row[column])}

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
        "offline_weighted_lossless_ratio": gate.offline_ratio,
        "objectives": [o.__dict__ for o in objectives],
        "pareto": df.loc[df["pareto"], _pareto_columns(df)].to_dict(orient="records"),
        "pareto_within_noise": df.loc[df["pareto_noise"], "label"].tolist(),
        "comparisons": _comparisons(df, gate),
        "gate": judge(df, gate),
    }
    summary["seed"] = seed_fields(df, summary, gate, offline)
    summary.update({k: v for k, v in summary["seed"].items() if k != "pareto_top5"})  # top level, as the seed
    out_md = Path(out_md)
    _write_outputs(df, summary, compression, quality, out_md)
    return summary


def seed_fields(df: pd.DataFrame, summary: dict, gate: GateSettings, offline: dict | None) -> dict:
    """The fields the original kit's summary had (scripts read them), computed our way: the gate's
    verdicts (CIs, three answers), the real Pareto set (top 5 by compression, then decode speed)."""
    criteria = summary["gate"]["criteria"]
    lossy = [c for c in criteria if c["name"] == "lossy ratio"]
    lossless = [c for c in criteria if c["name"] == "lossless ratio"]
    lossy_best = float(df["h2o_lossy_mean"].max()) if "h2o_lossy_mean" in df and df["h2o_lossy_mean"].notna().any() \
        else float("nan")
    if gate.offline_ratio is not None:
        source, lossless_value = "offline", gate.offline_ratio
    else:
        source = "runtime"
        lossless_value = float(df["h2o_lossless_mean"].max()) if "h2o_lossless_mean" in df and \
            df["h2o_lossless_mean"].notna().any() else float("nan")
    compression = summary["objectives"][0]["column"]
    front = df[df["pareto"]].sort_values([compression, "decode_tps_mean"], ascending=False).head(5)
    out = {"quality_status": summary["gate"]["overall"], "lossy_target": gate.lossy_target,
           "lossy_best": lossy_best, "lossy_pass": any(c["verdict"] == "PASS" for c in lossy),
           "lossless_target": gate.lossless_target, "lossless_source": source, "lossless_value": lossless_value,
           "lossless_pass": any(c["verdict"] == "PASS" for c in lossless),
           "overall_pass": summary["gate"]["overall"] == "PASS",
           "pareto_top5": [{"run": r["label"], "total": float(r[compression]), "decode": float(r["decode_tps_mean"]),
                            "lossy": float(r.get("h2o_lossy_mean", np.nan)),
                            "lossless": float(r.get("h2o_lossless_mean", np.nan)), "log": str(r.get("log_file", ""))}
                           for _, r in front.iterrows()]}
    if offline:
        out["offline_selected_entries"] = int(offline.get("selected_entries", 0))
        out["offline_selected_layers"] = list(offline.get("selected_layers", offline.get("layers", [])))
    return out


def _seed_md(s: dict) -> list[str]:
    """The original summary's sections and `- key: value` lines, so its readers keep working."""
    f = s["seed"]
    best = s.get("best_true_ratio") or s.get("best_seed_total")
    lines = ["", "## Best Total Ratio", ""]
    if best:
        lines += [f"- total ratio: {best['value']:.4f} ({s['objectives'][0]['label']})", f"- run: {best['run']}"]
    lines += ["", "## Pareto Top-5 (by total ratio then decode)", "",
              "The real non-dominated set (not a sort), its five with the most compression:", ""]
    for i, r in enumerate(f["pareto_top5"], 1):
        lines.append(f"{i}. total={r['total']:.4f}, decode={r['decode']:.2f}, lossy={r['lossy']:.4f}, "
                     f"lossless={r['lossless']:.4f}, log=`{r['log']}`")
    bools = lambda v: "true" if v else "false"  # noqa: E731
    lines += ["", "## Quality Gate", "", f"- quality_status: {f['quality_status']}",
              f"- lossy_target: {f['lossy_target']:.4f}", f"- lossy_best: {f['lossy_best']:.4f}",
              f"- lossy_pass: {bools(f['lossy_pass'])}", f"- lossless_target: {f['lossless_target']:.4f}",
              f"- lossless_source: {f['lossless_source']}", f"- lossless_value: {f['lossless_value']:.4f}",
              f"- lossless_pass: {bools(f['lossless_pass'])}", f"- overall_pass: {bools(f['overall_pass'])}"]
    if "offline_selected_entries" in f:
        lines += [f"- offline_selected_entries: {f['offline_selected_entries']}",
                  f"- offline_selected_layers: {f['offline_selected_layers']}"]
    return lines + [""]


def _offline_report(offline_json: Path) -> dict:
    try:
        text = Path(offline_json).read_text(errors="replace")
    except OSError as exc:
        raise AnalyzeError(f"--offline-lossless-json {offline_json}: cannot read ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnalyzeError(f"--offline-lossless-json {offline_json} is not JSON ({exc}); make it with "
                           f"`h2okit offline-lossless --out-json`") from None
    try:
        float(data["weighted_lossless_ratio"])
    except (KeyError, TypeError, ValueError):
        raise AnalyzeError(f"{offline_json} has no weighted_lossless_ratio (make it with "
                           f"`h2okit offline-lossless --out-json`)") from None
    return data


def _objectives(df: pd.DataFrame, gate: GateSettings) -> tuple[Objective, Objective | None]:
    has = lambda c: c in df and df[c].notna().any()  # noqa: E731
    if has("h2o_lossy_mean") and has("h2o_lossless_mean"):
        df["seed_total"] = df["h2o_lossy_mean"] * df["h2o_lossless_mean"]
    if gate.offline_ratio is not None and has("h2o_lossy_mean"):
        df["offline_total"] = df["h2o_lossy_mean"] * gate.offline_ratio
    if has("kv_true_ratio_mean"):
        compression = Objective("kv_true_ratio_mean", "true whole-cache ratio", +1)
    elif has("seed_total"):
        compression = Objective("seed_total", "seed total (lossy x lossless; mixes layers)", +1)
    else:
        raise AnalyzeError("the CSV has neither kv_true_ratio nor h2o_lossy/h2o_lossless columns")
    quality = Objective("ppl_delta_pct_mean", "perplexity increase %", -1) if has("ppl_delta_pct_mean") else None
    return compression, quality


def _objective_ci(df: pd.DataFrame, objective: Objective) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the 95 % CI of an objective (compression is exact; speed over rounds; quality over windows)."""
    values = df[objective.column].astype(float).to_numpy()
    lo, hi = values.copy(), values.copy()
    for i, (_, row) in enumerate(df.iterrows()):
        ci = None
        if objective.column == "decode_tps_mean":
            ci = mean_ci(_samples(row, "decode_tps"))
        elif objective.column == "ppl_delta_pct_mean":
            ci = quality_ci(row)
        if ci is not None and ci.n >= 2:
            lo[i], hi[i] = ci.lo, ci.hi
    return lo, hi


def _mark_pareto(df: pd.DataFrame, objectives: list[Objective]) -> None:
    values = np.column_stack([df[o.column].astype(float).to_numpy() * o.sign for o in objectives])
    df["pareto"] = pareto_mask(values)
    bounds = [_objective_ci(df, o) for o in objectives]
    lo = np.column_stack([b[0] if o.sign > 0 else -b[1] for o, b in zip(objectives, bounds)])
    hi = np.column_stack([b[1] if o.sign > 0 else -b[0] for o, b in zip(objectives, bounds)])
    df["pareto_noise"] = ~df["pareto"] & ~clearly_dominated(np.nan_to_num(values, nan=-np.inf), lo, hi)


def _comparisons(df: pd.DataFrame, gate: GateSettings) -> list[dict]:
    """Each run against its full-cache baseline: paired speed ratios and the paired quality difference."""
    out = []
    for _, row in df.iterrows():
        baseline = _baseline_for(df, row)
        entry = {"run": row["label"], "baseline": None if baseline is None else baseline["label"]}
        for name in ("decode_tps", "prefill_tps"):
            entry[f"{name}"] = mean_ci(_samples(row, name)).as_dict()
            if baseline is not None and not _is_baseline(row):
                ci = speed_ci(row, baseline, None, name)
                entry[f"{name}_ratio"] = None if ci is None else ci.as_dict()
        ci = quality_ci(row)
        entry["ppl_delta_pct"] = None if ci is None else ci.as_dict()
        out.append(entry)
    return out


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return None if math.isnan(value) else (float(value) if math.isfinite(value) else str(value))
    if isinstance(value, np.bool_):
        return bool(value)
    return str(value)


def _clean(obj):
    """JSON has no NaN or Infinity: NaN becomes null, infinities "inf"/"-inf" strings."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else (obj if math.isfinite(obj) else ("inf" if obj > 0 else "-inf"))
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _write_outputs(df: pd.DataFrame, summary: dict, compression: Objective, quality: Objective | None,
                   out_md: Path) -> None:
    from ..io import write_text_atomic

    try:
        out_md.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out_md, _markdown(df, summary, compression, quality))
        write_text_atomic(out_md.with_name("summary.json"),
                          json.dumps(_clean(summary), indent=1, default=_jsonable, allow_nan=False))
        plot(df, compression, quality, out_md.with_name("pareto.png"))
    except OSError as exc:
        raise AnalyzeError(f"cannot write the summary next to {out_md}: {exc.strerror or exc}") from None


def _pareto_columns(df: pd.DataFrame) -> list[str]:
    wanted = ["label", "kv_h2o_policy", "kv_h2o_target_mode", "kv_h2o_target_keep_ratio",
              "kv_h2o_target_lossy_ratio", "kv_h2o_block_tokens", "kv_true_ratio_mean", "seed_total",
              "h2o_lossy_mean", "h2o_lossless_mean", "decode_tps_mean", "ppl_delta_pct_mean", "ppl_delta_pct_std",
              "attended_fraction_mean", "token_agreement_mean", "passkey_acc_mean"]
    return [c for c in wanted if c in df]


def _markdown(df: pd.DataFrame, s: dict, compression: Objective, quality: Objective | None) -> str:
    lines = ["# H2O sweep summary", "", f"{s['runs']} run(s) from `{s['csv']}`.", "",
             "Where numbers come from: **runtime** = the h2o_* stats of llm_bench; **seed total** = "
             "h2o_lossy x h2o_lossless, the original's headline, which multiplies ratios of different layers "
             "and is not a whole-cache ratio; **true whole-cache** = kv_true_ratio (logical KV bytes of all layers "
             "and tokens / bytes physically held); **offline** = real gear_delta frames on dumped K/V. "
             "Intervals are 95 % CIs (Student t): speed over the rounds of the sweep, paired per round against "
             "the full-cache run; quality over the windows, each window paired with the full cache.", ""]
    lines += _averages_md(s)
    lines += _comparisons_md(s)
    lines += ["", "## Best", "", "| what | run | value | source |", "| --- | --- | --- | --- |"]
    for key, what, source in (("best_lossy", "lossy ratio", "runtime"), ("best_decode", "decode tok/s", "runtime"),
                              ("best_true_ratio", "true whole-cache ratio", "true whole-cache"),
                              ("best_seed_total", "seed total (lossy x lossless)", "runtime, mixes layers"),
                              ("best_offline_total", "lossy x offline lossless", "runtime x offline")):
        if s.get(key):
            lines.append(f"| {what} | {s[key]['run']} | {_fmt(s[key]['value'])} | {source} |")
    lines += _pareto_md(df, s, compression)
    lines += _gate_md(s)
    lines += _seed_md(s)
    return "\n".join(lines)


def _averages_md(s: dict) -> list[str]:
    lines = ["## Averages over runs", "", "| metric | mean |", "| --- | --- |"]
    for key in ("decode_tps_mean", "prefill_tps_mean", "h2o_keep_mean", "h2o_lossy_mean", "h2o_lossless_mean",
                "kv_true_ratio_mean", "ppl_delta_pct_mean", "attended_fraction_mean", "token_agreement_mean",
                "passkey_acc_mean"):
        if key in s["averages"]:
            lines.append(f"| {key} | {_fmt(s['averages'][key], 4)} |")
    return lines


def _comparisons_md(s: dict) -> list[str]:
    lines = ["", "## Each run against the full cache", "",
             "| run | decode tok/s | decode vs full (ratio) | prefill vs full (ratio) | ppl increase % | rounds |",
             "| --- | --- | --- | --- | --- | --- |"]
    for c in s["comparisons"]:
        ratio = lambda key: _ci_text(c[key], 3) if c.get(key) else ("baseline" if c["baseline"] == c["run"]  # noqa
                                                                     else "n/a")
        ppl = _ci_text(c["ppl_delta_pct"]) if c["ppl_delta_pct"] else "n/a"
        lines.append(f"| {c['run']} | {_ci_text(c['decode_tps'])} | {ratio('decode_tps_ratio')} | "
                     f"{ratio('prefill_tps_ratio')} | {ppl} | {c['decode_tps']['n']} |")
    return lines


def _pareto_md(df: pd.DataFrame, s: dict, compression: Objective) -> list[str]:
    objs = ", ".join(f"{o['label']} ({'up' if o['sign'] > 0 else 'down'})" for o in s["objectives"])
    lines = ["", "## Pareto set", "", f"Non-dominated runs over: {objs}. Runs marked ≈ are dominated, but only "
             "within noise (no run beats them beyond its 95 % CI in any objective).", ""]
    cols = _pareto_columns(df)
    lines += ["| " + " | ".join(cols) + " |", "|" + "|".join(" --- " for _ in cols) + "|"]
    shown = df[df["pareto"] | df["pareto_noise"]].sort_values(compression.column, ascending=False)
    for _, row in shown.iterrows():
        cells = [_fmt(row[c]) if isinstance(row[c], float) else str(row[c]) for c in cols]
        if row["pareto_noise"]:
            cells[0] = f"≈ {cells[0]}"
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _gate_md(s: dict) -> list[str]:
    gate = s["gate"]
    lines = ["", "## Gate", "", f"Rules: {gate['rules']}.", "",
             "| run | criterion | rule | mean [95% CI] | verdict | to decide | source |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for g in gate["criteria"]:
        lines.append(f"| {g['run']} | {g['name']} | {g['rule']} | {_ci_text(g, 3)} ({g['method']}, n={g['n']}) | "
                     f"**{g['verdict']}** | {g['to_decide'] or ''} | {g['source']} |")
    runs = ", ".join(f"{r}: {v}" for r, v in gate["runs"].items()) or "none judged"
    lines += ["", f"**Overall: {gate['overall']}** ({runs})", ""]
    return lines


def plot(df: pd.DataFrame, compression: Objective, quality: Objective | None, out_png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    x, y = df[compression.column].astype(float), df["decode_tps_mean"].astype(float)
    lo, hi = _objective_ci(df, Objective("decode_tps_mean", "", +1))
    ax.errorbar(x, y, yerr=[y - lo, hi - y], fmt="none", ecolor="0.5", elinewidth=1, capsize=3, zorder=2,
                label="95 % CI over rounds")
    if quality is not None:
        points = ax.scatter(x, y, c=df[quality.column].astype(float), cmap="viridis_r", s=40, zorder=3)
        fig.colorbar(points, ax=ax, label=f"{quality.label} (lower is better)")
    else:
        ax.scatter(x, y, color="0.6", s=30, zorder=3, label="runs")
    front = df[df["pareto"]].sort_values(compression.column)
    ax.plot(front[compression.column], front["decode_tps_mean"], "-o", color="tab:red", mfc="none", ms=10,
            zorder=4, label="Pareto set")
    for _, row in df[df["pareto"] | df["pareto_noise"]].iterrows():
        ax.annotate(("≈ " if row["pareto_noise"] else "") + str(row["label"]),
                    (row[compression.column], row["decode_tps_mean"]), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")
    if "kv_h2o_policy" in df and (df["kv_h2o_policy"] == "full").any():
        full = df[df["kv_h2o_policy"] == "full"]
        ax.axhline(full["decode_tps_mean"].median(), ls="--", color="k", lw=1, label="full cache (decode)")
        ax.axvline(full[compression.column].median(), ls="--", color="k", lw=0.8)
    ax.set_ylim(bottom=0, top=max(1.0, float(np.nanmax(hi)) * 1.1))
    ax.set_xlabel(compression.label)
    ax.set_ylabel("decode tok/s (axis starts at 0)")
    ax.set_title("compression vs decode speed" + (" (colour: quality)" if quality is not None else ""))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
