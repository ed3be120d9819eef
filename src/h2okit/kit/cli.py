"""The kit's command lines, shared by `h2okit grid|sweep|parse|analyze` and the seed's
`exp/h2o_v2/*.py` scripts (which only call these)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..clikit import OneLineParser, guard, setup_logging
from ..resources import find, names
from .analyze import (MAX_DECODE_DROP, MAX_PPL_INCREASE, MAX_PREFILL_DROP, AnalyzeError, GateSettings,
                      analyze)
from .grid import AXES, Grid, GridError, load_preset, normalize_base_config, parse_list
from .parse import ParseError, collect, log_files_from, write_csv

# flag -> grid axis (the seed's names first; ours after)
AXIS_FLAGS = {"--" + axis.replace("_", "-"): axis for axis in AXES}  # the seed's flag names and ours
KIT_ERRORS = (GridError, ParseError, AnalyzeError)
DEFAULT_OUT_DIR = Path("exp/h2o_v2/out")  # the seed's defaults


def _common_run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--llm-bench", required=True, help="`llm_bench` (h2okit's own) or a path to MNN's llm_bench")
    p.add_argument("--base-config", required=True, help=f"MNN-style config.json (model keys + kv_* keys), or "
                   f"the name of a shipped one ({', '.join(names('configs'))})")
    p.add_argument("--out-dir", default=str(DEFAULT_OUT_DIR),
                   help="a new folder (or an earlier sweep's with --resume); default, as the seed's: %(default)s")
    p.add_argument("--backend", default="cpu")
    p.add_argument("--attention-option", type=int, default=0, help="passed to llm_bench as -qatten")
    p.add_argument("--dry-run", action="store_true", help="write configs and manifest, print commands, run nothing")
    p.add_argument("--resume", action="store_true", help="continue an interrupted sweep in --out-dir")
    p.add_argument("--executor", choices=("local", "ray"), default="local")
    p.add_argument("--ray-address", default=None, help="Ray cluster address (default: start a local one)")


def grid_parser(prog: str = "run_h2o_v2_bench.py") -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="Sweep a grid of H2O/codec settings through llm_bench. "
                                       "List flags take comma lists; the grid is their Cartesian product.")
    _common_run_args(p)
    p.add_argument("--repeat", type=int, default=3)
    for flag in AXIS_FLAGS:
        p.add_argument(flag, default=None, help=f"comma list ({AXES[AXIS_FLAGS[flag]][1].__name__})")
    p.add_argument("--h2o-log-stats", action="store_true")
    p.add_argument("--kv-lossless-enable", action="store_true")
    p.add_argument("--quality", action="store_true", help="add quality columns (h2okit's llm_bench only)")
    return p


def sweep_parser(prog: str = "sweep_h2o_v2.py") -> argparse.ArgumentParser:
    p = OneLineParser(prog=prog, description="Run a preset sweep (a JSON file of grid axes).")
    _common_run_args(p)
    p.add_argument("--preset", required=True, help=f"a preset file, or the name of a shipped one "
                   f"({', '.join(names('presets'))})")
    p.add_argument("--threads", default=None, help="comma list of thread counts, overriding the preset's (the "
                   "seed's sweep defaults to 4; here the preset's, else the base config's thread_num)")
    p.add_argument("--repeat", type=int, default=None, help="rounds, overriding the preset's repeat")
    return p


def _executor(args):
    if args.executor == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor(address=args.ray_address)
    return None


def _run_sweep(grid: Grid, args) -> int:
    from .sweep import sweep

    if grid.repeat < 1:
        raise GridError(f"--repeat must be >= 1, got {grid.repeat}")
    base = normalize_base_config(find("configs", args.base_config))
    result = sweep(grid, base, args.base_config, args.llm_bench, Path(args.out_dir), backend=args.backend,
                   attention_option=args.attention_option, resume=args.resume, dry_run=args.dry_run,
                   executor=_executor(args))
    state = "interrupted" if result.interrupted else ("dry run" if args.dry_run else "done")
    print(f"{state}: {result.total} run(s) in {result.out_dir} ({result.skipped} already complete, "
          f"{len(result.failed)} failed{': ' + ', '.join(result.failed) if result.failed else ''})",
          file=sys.stderr)
    return result.exit_code


def grid_main(argv=None, prog="run_h2o_v2_bench.py") -> int:
    args = grid_parser(prog).parse_args(argv)
    return _guard(prog, lambda: _grid(args))


def _grid(args) -> int:
    axes = {}
    for flag, axis in AXIS_FLAGS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            axes[axis] = parse_list(value, AXES[axis][1], flag)
    axes.setdefault("prompts", [512])
    axes.setdefault("gens", [128])
    grid = Grid(axes=axes, repeat=args.repeat, log_stats=args.h2o_log_stats,
                lossless_enable=args.kv_lossless_enable, quality=args.quality)
    return _run_sweep(grid, args)


def sweep_main(argv=None, prog="sweep_h2o_v2.py") -> int:
    args = sweep_parser(prog).parse_args(argv)

    def run():
        grid = load_preset(find("presets", args.preset))
        if args.threads is not None:
            grid.axes["threads"] = parse_list(args.threads, int, "--threads")
        if args.repeat is not None:
            grid.repeat = args.repeat
        return _run_sweep(grid, args)

    return _guard(prog, run)


def parse_main(argv=None, prog="parse_h2o_v2_log.py") -> int:
    p = OneLineParser(prog=prog, description="llm_bench logs (h2okit's or MNN's tables) -> CSV")
    p.add_argument("--log-dir", default=None)
    p.add_argument("--log-files", nargs="+", default=None, help="log files: a comma list (as the seed's parser "
                   "takes them) or separate arguments")
    p.add_argument("--out-csv", default=str(DEFAULT_OUT_DIR / "h2o_metrics.csv"))
    args = p.parse_args(argv)

    def run():
        names = [name for arg in args.log_files or [] for name in arg.split(",") if name.strip()]
        files = log_files_from(args.log_dir, names)
        records, warnings, params = collect(files)
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        if not records:
            raise ParseError(f"no llm_bench table rows in {len(files)} log file(s)")
        try:
            write_csv(records, Path(args.out_csv), params)
        except IsADirectoryError:
            raise ParseError(f"--out-csv {args.out_csv} is a folder; give a file path") from None
        except OSError as exc:
            raise ParseError(f"--out-csv {args.out_csv}: cannot write ({exc.strerror})") from None
        print(f"wrote {len(records)} row(s) from {len(files)} log file(s) to {args.out_csv}", file=sys.stderr)
        return 0

    return _guard(prog, run)


def analyze_main(argv=None, prog="analyze_h2o_v2.py") -> int:
    p = OneLineParser(prog=prog, description="CSV -> summary.md, summary.json, pareto.png. Comparisons with the "
                "full-cache run are paired (per round for speed, per window for quality) with 95 %% t-CIs; "
                "each gate criterion is PASS, FAIL or INCONCLUSIVE.")
    p.add_argument("--csv", default=str(DEFAULT_OUT_DIR / "h2o_metrics.csv"))
    p.add_argument("--out", default=str(DEFAULT_OUT_DIR / "summary.md"),
                   help="path of summary.md (summary.json and pareto.png go beside it)")
    p.add_argument("--offline-lossless-json", default=None)
    p.add_argument("--lossy-target", type=float, default=3.0)
    p.add_argument("--lossless-target", type=float, default=1.3)
    p.add_argument("--decode-baseline", default=None, help="tok/s, or 'auto' (the full-cache run, paired per round)")
    p.add_argument("--max-decode-drop", type=float, default=MAX_DECODE_DROP, help="0.05 = 5%%")
    p.add_argument("--max-prefill-drop", type=float, default=MAX_PREFILL_DROP, help="0.05 = 5%% (with auto)")
    p.add_argument("--max-ppl-increase", type=float, default=MAX_PPL_INCREASE,
                   help="percent, paired per window against the full cache (with quality columns)")
    args = p.parse_args(argv)

    def run():
        for flag in ("max_decode_drop", "max_prefill_drop"):
            value = getattr(args, flag)
            if not 0 <= value < 1:
                raise AnalyzeError(f"--{flag.replace('_', '-')} must be a fraction in [0, 1), got {value}")
        gate = GateSettings(args.lossy_target, args.lossless_target, args.decode_baseline, args.max_decode_drop,
                            args.max_prefill_drop, args.max_ppl_increase)
        summary = analyze(Path(args.csv), Path(args.out), gate,
                          Path(args.offline_lossless_json) if args.offline_lossless_json else None)
        out = Path(args.out)
        counts = {v: sum(1 for c in summary["gate"]["criteria"] if c["verdict"] == v)
                  for v in ("PASS", "FAIL", "INCONCLUSIVE")}
        print(f"summary: {out}\npareto:  {out.with_name('pareto.png')}\ngate:    {summary['gate']['overall']} "
              f"({counts['PASS']} pass, {counts['FAIL']} fail, {counts['INCONCLUSIVE']} inconclusive; 95 % t-CIs)")
        return 0

    return _guard(prog, run)


def _guard(prog: str, fn) -> int:
    setup_logging()
    return guard(prog, fn, KIT_ERRORS)
