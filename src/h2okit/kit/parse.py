"""llm_bench logs -> CSV. Reads h2okit's table and MNN's (several tables per file, repeated
headers, `test | t/s` layouts, optional columns). A truncated row is skipped with a warning.

The CSV keeps every original string column (so the seed's own analyzer can still read it),
adds numeric `<col>_mean` / `<col>_std` columns, prefill/decode tok/s split, prompt/gen
lengths, `log_file`, and the run parameters joined from the sweep's manifest. The rounds of an
interleaved sweep (one table per round in a run's log) become one row with every round's
speed sample (`prefill_tps_samples`, `decode_tps_samples`, `rounds`).
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np

from ..table import STANDARD_COLUMNS, speed_cell

NUM = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?|nan|inf|-inf"
MEAN_SD = re.compile(rf"^\s*({NUM})\s*±\s*({NUM})\s*$", re.IGNORECASE)
SEPARATOR = re.compile(r"^:?-+:?$")
TEST = re.compile(r"^(pp|tg)(\d+)$")


class ParseError(ValueError):
    """No usable table; one line."""


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _numbers(record: dict[str, str]) -> dict[str, float]:
    out: dict[str, float] = {}
    for col, value in record.items():
        if col == "speed(tok/s)":
            parts = value.split("<br>")
            for name, part in zip(("prefill_tps", "decode_tps"), parts):
                m = MEAN_SD.match(part)
                if m:
                    out[f"{name}_mean"], out[f"{name}_std"] = float(m.group(1)), float(m.group(2))
        elif col == "llm_demo":
            for key, name in (("prompt", "prompt_len"), ("decode", "gen_len")):
                m = re.search(rf"{key}=(\d+)", value)
                if m:
                    out[name] = float(m.group(1))
        elif col == "t/s":
            continue  # folded into prefill/decode by _merge_tests
        else:
            m = MEAN_SD.match(value)
            if m:
                out[f"{col}_mean"], out[f"{col}_std"] = float(m.group(1)), float(m.group(2))
    return out


def _merge_tests(rows: list[dict[str, str]]) -> list[dict]:
    """MNN's `test | t/s` layout: one row per test (ppN prefill, tgN decode); one record per pp+tg pair."""
    merged: list[dict] = []
    for row in rows:
        m = TEST.match(row.get("test", ""))
        speed = MEAN_SD.match(row.get("t/s", ""))
        if not m or not speed:
            merged.append(dict(row))
            continue
        kind, length = m.group(1), float(m.group(2))
        fields = {"prompt_len": length, "prefill_tps_mean": float(speed.group(1)),
                  "prefill_tps_std": float(speed.group(2))} if kind == "pp" else {
            "gen_len": length, "decode_tps_mean": float(speed.group(1)), "decode_tps_std": float(speed.group(2))}
        key = {k: v for k, v in row.items() if k not in ("test", "t/s")}
        last = merged[-1] if merged else None
        if (kind == "tg" and last is not None and last.get("_pending_pp")
                and {k: v for k, v in last.items() if k in key} == key):
            last.update(fields)
            last["test"] = f"{last['test']}+{row['test']}"
            last.pop("_pending_pp")
        else:
            merged.append({**row, **fields, **({"_pending_pp": True} if kind == "pp" else {})})
    for record in merged:
        record.pop("_pending_pp", None)
    return merged


def _is_header(lines: list[str], i: int) -> bool:
    """Line i opens a table: the next line is a separator row."""
    if i + 1 >= len(lines):
        return False
    below = _cells(lines[i + 1])
    return bool(below) and bool(below[0]) and all(SEPARATOR.match(c) for c in below if c)


def parse_log_text(text: str, source: str = "") -> tuple[list[dict], list[str]]:
    """All table rows of one log as records (strings plus parsed numbers), and warnings."""
    lines = text.splitlines()
    records: list[dict] = []
    warnings: list[str] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if (line.lstrip().startswith("|") and i + 1 < len(lines)
                and all(SEPARATOR.match(c) for c in _cells(lines[i + 1]) if c) and _cells(lines[i + 1])[0]):
            header = _cells(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].lstrip().startswith("|"):
                cells = _cells(lines[i])
                if cells == header or all(SEPARATOR.match(c) for c in cells if c):
                    i += 1
                    continue  # a repeated header
                if cells != header and _is_header(lines, i):
                    break  # another table with other columns starts right here (e.g. a round without quality)
                if len(cells) != len(header) or not lines[i].rstrip().endswith("|"):
                    warnings.append(f"{source}:{i + 1}: truncated table row ({len(cells)} of {len(header)} "
                                    f"cells); skipped")
                    i += 1
                    continue
                rows.append(dict(zip(header, cells)))
                i += 1
            for record in _merge_tests(rows):
                strings = {k: v for k, v in record.items() if isinstance(v, str)}
                numbers = {k: v for k, v in record.items() if not isinstance(v, str)}
                records.append({**strings, **_numbers(strings), **numbers})
            continue
        i += 1
    return records, warnings


def _manifest_record(log_path: Path) -> dict | None:
    """The manifest record of the sweep run that wrote this log, if any. h2okit's manifest is an
    object with `runs`; the original kit's is a list of run records: both are read."""
    manifest = log_path.resolve().parent.parent / "manifest.json"
    if not manifest.is_file():
        return None
    try:
        data = json.loads(manifest.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        return None
    runs = data.get("runs", []) if isinstance(data, dict) else data if isinstance(data, list) else []
    for run in runs:
        if not isinstance(run, dict):
            continue
        log = run.get("log") or run.get("log_file") or run.get("log_path") or ""
        if Path(str(log)).name == log_path.name:
            return run
    return None


def _manifest_params(record: dict | None) -> dict:
    if record is None:
        return {}
    params = record.get("params")
    if not isinstance(params, dict):  # the original kit: parameters at the top level of the record
        params = {k: v for k, v in record.items() if isinstance(v, (int, float, str, bool)) and k not in (
            "log", "log_file", "log_path", "config", "config_path", "cmd", "returncode")}
    run_id = record.get("run_id") or record.get("id") or ""
    return {"run_id": run_id, "run_status": record.get("status", ""), **params}


def _json_results(log_path: Path, record: dict | None) -> list[dict]:
    """h2okit's `-o jsonl` results beside the log (one line per round), if the sweep kept them."""
    name = (record or {}).get("results")
    path = log_path.resolve().parent.parent / name if name else None
    if path is None or not path.is_file():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # a torn last line; the markdown log still has the round
        if isinstance(row, dict) and str(row.get("schema", "")).startswith("h2okit.llm_bench/"):
            out.append(row)
    return out


def samples_from_json(results: list[dict]) -> dict:
    """Every repetition's speeds over all rounds, and the per-window quality samples, as JSON lists."""
    out: dict = {}
    for name in SPEED_SAMPLES:
        values = [v for r in results for v in r.get(name, {}).get("samples", [])]
        if values:
            out[SPEED_SAMPLES[name]] = json.dumps(values)
            out[f"{name}_mean"], out[f"{name}_std"] = float(np.mean(values)), (
                float(np.std(values, ddof=1)) if len(values) > 1 else 0.0)
    for r in results:
        for column, summary in r.get("quality", {}).items():
            out[f"{column}_samples"] = json.dumps(summary.get("samples", []))
    if results:
        out["decode_path"] = results[0].get("decode_path", "")
    return out


SPEED_SAMPLES = {"prefill_tps": "prefill_tps_samples", "decode_tps": "decode_tps_samples"}
ROUND_KEY = ("log_file", "model", "threads", "precision", "prompt_len", "gen_len")


def merge_rounds(records: list[dict]) -> list[dict]:
    """Rows of one log with the same (model, threads, precision, p, n) are repetitions of one run (an
    interleaved sweep appends one table per round): one record each, with every round's prefill and
    decode tok/s kept as `*_samples` (a JSON list), their mean and sample sd, and `rounds`. Other
    numbers are averaged over the rows that have them (quality is measured in round 1 only)."""
    groups: dict[tuple, list[dict]] = {}
    for record in records:
        groups.setdefault(tuple(str(record.get(k, "")) for k in ROUND_KEY), []).append(record)
    merged = []
    for rows in groups.values():
        out = dict(rows[0])
        out["rounds"] = float(len(rows))
        for name, column in SPEED_SAMPLES.items():
            samples = [r[f"{name}_mean"] for r in rows if isinstance(r.get(f"{name}_mean"), float)]
            out[column] = json.dumps([round(v, 4) for v in samples])
            if len(samples) > 1:
                out[f"{name}_mean"], out[f"{name}_std"] = float(np.mean(samples)), float(np.std(samples, ddof=1))
        numeric = {k for r in rows for k, v in r.items() if isinstance(v, float)}
        for key in numeric - {f"{n}_{s}" for n in SPEED_SAMPLES for s in ("mean", "std")} - {"rounds"}:
            values = [r[key] for r in rows if isinstance(r.get(key), float)]
            out[key] = float(np.mean(values))
        if len(rows) > 1 and "speed(tok/s)" in out:
            out["speed(tok/s)"] = speed_cell(json.loads(out["prefill_tps_samples"]),
                                             json.loads(out["decode_tps_samples"]))
        merged.append(out)
    return merged


def collect(log_files: list[Path]) -> tuple[list[dict], list[str], list[str]]:
    """(records, warnings, names of the manifest parameter columns)."""
    records, warnings, param_columns = [], [], {}
    for path in log_files:
        try:
            text = path.read_text(errors="replace")
        except OSError as exc:
            warnings.append(f"{path}: cannot read ({exc.strerror}); skipped")
            continue
        rows, warns = parse_log_text(text, str(path))
        warnings += warns
        record = _manifest_record(path)
        params = _manifest_params(record)
        param_columns.update(dict.fromkeys(params))
        merged = merge_rounds([{**row, "log_file": str(path)} for row in rows])
        results = _json_results(path, record)
        for row in merged:
            if results and len(merged) == 1:  # the JSON lines hold the same rounds, at full precision
                row.update(samples_from_json(results))
            # a run parameter never overwrites a table column of the same name (e.g. threads)
            records.append({**{k: v for k, v in params.items() if k not in row}, **row})
    return records, warnings, list(param_columns)


def write_csv(records: list[dict], out_csv: Path, param_columns: list[str] = ()) -> list[str]:
    """Known string columns first, then other table columns, numbers, log_file, then run parameters."""
    seen: dict[str, None] = {}
    for record in records:
        for key in record:
            seen.setdefault(key, None)
    params = [c for c in param_columns if c in seen and c not in STANDARD_COLUMNS]
    strings = [c for c in STANDARD_COLUMNS if c in seen]
    rest = [c for c in seen if c not in strings and c not in params and c != "log_file"]
    numeric = [c for c in rest if any(isinstance(r.get(c), float) for r in records)]
    extras = [c for c in rest if c not in numeric]
    columns = strings + extras + numeric + ["log_file"] + params
    out_csv.parent.mkdir(parents=True, exist_ok=True)
    with out_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
    return columns


def log_files_from(log_dir: str | None, log_files: list[str] | None) -> list[Path]:
    files: list[Path] = []
    if log_dir:
        folder = Path(log_dir)
        if not folder.is_dir():
            raise ParseError(f"log dir not found: {folder}")
        files += sorted(folder.glob("*.log"))
    for name in log_files or []:
        path = Path(name)
        if not path.is_file():
            raise ParseError(f"log file not found: {path}")
        files.append(path)
    if not files:
        raise ParseError("no log files (give --log-dir with *.log files or --log-files)")
    return files
