"""`llm_bench`: MNN-compatible flags; one result per (threads, p, n), printed as MNN's markdown table
(the default), JSON or JSON lines (`-o`), in the manner of llama-bench's output modes.

    llm_bench -m CONFIG.json -a cpu -t 2 -qatten 0 -kv true -p 512 -n 128 -rep 3 -fp LOG [-o md|json|jsonl]

Each result runs rep+1 requests of exactly p prompt tokens of real text and n greedy decode
steps from an empty cache; the first request is a warm-up and dropped (SPEC §7). JSON carries
every repetition's samples, the quality evaluation's per-window samples, the decode path and
metadata (versions, git sha, CPU, kernel build); `-fp` always appends MNN's table, so the
original kit's parser reads every log.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, table
from .clikit import guard, setup_logging
from .config import DECODE_PATHS, ConfigError, emit_warnings, load_config
from .cpu import cpu_model
from .resources import find
from .corpus import DEFAULT_TOKENS, DEFAULT_WINDOWS, CorpusError
from .stats import mean_ci
from .threads import set_openmp_wait

log = logging.getLogger(__name__)

PRECISION_DTYPE = {"high": "float32", "normal": "float32", "low": "bfloat16"}
OUTPUTS = ("md", "json", "jsonl")
SCHEMA = "h2okit.llm_bench/1"


class BenchError(Exception):
    """Bad flags or inputs; the message is one line."""


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got '{text}'") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got '{text}'")
    return values


def _bool(text: str) -> bool:
    if text.lower() in ("true", "1", "yes"):
        return True
    if text.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got '{text}'")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2, like every other bad input
        raise BenchError(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="llm_bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--version", action="version", version=f"llm_bench (h2okit {__version__})")
    p.add_argument("-m", "--config", default=None, help="config.json (model keys and kv_* keys); required")
    p.add_argument("-a", "--backend", default="cpu", help="backend; only cpu")
    p.add_argument("-t", "--threads", type=_int_list, default=None, help="comma list of thread counts")
    p.add_argument("-qatten", "--quant-attention", type=int, default=0, help="MNN attention option; only 0")
    p.add_argument("-kv", "--kv-cache", type=_bool, default=True, help="decode with a KV cache; only true")
    p.add_argument("-p", "--n-prompt", type=_int_list, default=[512], help="comma list of prompt lengths")
    p.add_argument("-n", "--n-gen", type=_int_list, default=[128], help="comma list of decode lengths")
    p.add_argument("-rep", "--repeat", type=int, default=3, help="measured requests per row (+1 warm-up)")
    p.add_argument("-fp", "--file-print", default=None, help="append MNN's table to this file")
    p.add_argument("-o", "--output", choices=OUTPUTS, default="md",
                   help="what stdout gets: MNN's markdown table (default), one JSON document, or JSON lines")
    p.add_argument("--check-config", nargs="+", metavar="FILE", default=None,
                   help="validate these configs (printing their warnings) without loading a model; exit 2 if any "
                        "is invalid")
    p.add_argument("--corpus", default=None, help="text file or folder of .txt (default: the Austen novels)")
    p.add_argument("--decode-path", choices=DECODE_PATHS, default="auto",
                   help="h2okit extension: decode steps in C kernels (fast; auto = where the model "
                        "supports it) or through the transformers forward (reference)")
    p.add_argument("--batch", type=_int_list, default=[1],
                   help="h2okit extension: comma list of batch sizes; B sequences (consecutive P-token stretches "
                        "of the corpus, each with its own cache and policies) decoded together on the fast path, "
                        "the weights read once per step; tok/s are aggregate, K/V columns per sequence (mean)")
    p.add_argument("--beyond-context", action="store_true",
                   help="allow p + n beyond the model's trained context (RoPE extrapolates; quality unknown)")
    q = p.add_argument_group("quality (h2okit extension; columns after the standard ones)")
    q.add_argument("--quality", action="store_true", help="perplexity under eviction, agreement, passkey")
    q.add_argument("--quality-windows", type=int, default=DEFAULT_WINDOWS,
                   help="perplexity windows (default: enough for a ~1.5-point CI at the seed config)")
    q.add_argument("--quality-tokens", type=int, default=DEFAULT_TOKENS,
                   help="teacher-forced tokens per window (M); those after the first eviction are scored")
    q.add_argument("--passkey-depths", default="0.1,0.5,0.9", help="comma list of depths; empty to skip")
    return p


@dataclass
class RowSamples:
    prefill_tps: list[float] = field(default_factory=list)
    decode_tps: list[float] = field(default_factory=list)
    stats: dict[str, list[float]] = field(default_factory=dict)

    def add(self, prefill_tps: float, decode_tps: float, stats: table.RequestStats) -> None:
        self.prefill_tps.append(prefill_tps)
        self.decode_tps.append(decode_tps)
        for key, value in stats.as_dict().items():
            self.stats.setdefault(key, []).append(float(value))


@dataclass
class BenchResult:
    """One (threads, p, n) result: what every printer prints."""

    model: str
    model_size_bytes: int
    backend: str
    threads: int
    precision: str
    prompt: int
    gen: int
    decode_path: str
    samples: RowSamples
    quality: dict[str, list[float]] = field(default_factory=dict)
    batch: int = 1  # sequences decoded together (tok/s aggregate)

    def to_json(self) -> dict:
        def summary(values):
            mean, sd = table.mean_sd(values)
            return {"mean": mean, "sd": sd, "samples": values}

        return {"model": self.model, "model_size_bytes": self.model_size_bytes, "backend": self.backend,
                "threads": self.threads, "precision": self.precision, "prompt": self.prompt, "gen": self.gen,
                "decode_path": self.decode_path, "batch": self.batch, "repetitions": len(self.samples.decode_tps),
                "prefill_tps": summary(self.samples.prefill_tps), "decode_tps": summary(self.samples.decode_tps),
                "stats": {k: summary(v) for k, v in self.samples.stats.items()},
                "quality": {k: summary(v) for k, v in self.quality.items()}}


def format_row(model: str, model_mb: float, backend: str, threads: int, precision: str, p: int, n: int,
               samples: RowSamples, batch: int = 1) -> tuple[list[str], list[str]]:
    """(columns, cells) of one table row: the standard columns, then the extras."""
    demo = f"prompt={p}<br>decode={n}" + (f"<br>batch={batch}" if batch > 1 else "")
    cells = [model, table.size_cell(model_mb * table.MIB), backend.upper(), str(threads), precision.capitalize(),
             demo, table.speed_cell(samples.prefill_tps, samples.decode_tps)]
    cells += [table.cell(samples.stats[key], fmt) for key, fmt in table.STAT_FORMATS.items()]
    extras = table.extra_columns(samples.stats)
    cells += [table.cell(samples.stats[key], fmt) for key, fmt in extras]
    return list(table.STANDARD_COLUMNS) + [key for key, _ in extras], cells


def render_md(results: list[BenchResult]) -> str:
    columns, rows = None, []
    for r in results:
        stats = RowSamples(r.samples.prefill_tps, r.samples.decode_tps, {**r.samples.stats, **r.quality})
        columns, cells = format_row(r.model, r.model_size_bytes / table.MIB, r.backend, r.threads, r.precision,
                                    r.prompt, r.gen, stats, r.batch)
        rows.append(cells)
    return table.render(columns, rows)


def render(results: list[BenchResult], output: str, metadata: dict) -> str:
    if output == "md":
        return render_md(results)
    if output == "json":
        return json.dumps({"schema": SCHEMA, "metadata": metadata, "results": [r.to_json() for r in results]},
                          indent=1) + "\n"
    return "".join(json.dumps({"schema": SCHEMA, **r.to_json(), "metadata": metadata}) + "\n" for r in results)


def metadata(config_path: str, kv: dict, decode_types: dict | None = None) -> dict:
    """What produced a result: versions, source revision, machine, kernel build, config (its kv keys and
    the decode weights' and inputs' types)."""
    import torch
    import transformers

    from . import kernels

    return {"h2okit": __version__, "git_sha": _git_sha(), "python": platform.python_version(),
            "torch": torch.__version__, "transformers": transformers.__version__, "cpu": cpu_model(),
            "cores": os.cpu_count(), "kernel_build": kernels.build_id(), "kernel_isa": _kernel_isa(),
            "config": str(config_path), "kv": kv, **(decode_types or {}),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def _kernel_isa() -> str | None:
    """The fast path's vector kernels (AVX-512, AVX2, ...), or None when they cannot be built here."""
    from . import kernels

    try:
        return kernels.vector_isa()
    except kernels.KernelBuildError:
        return None


def _git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def check_configs(paths: list[str]) -> None:
    """--check-config: each file validated as `-m` would be (the model is resolved, not loaded)."""
    from .model import resolve_model_path

    bad = []
    for path in paths:
        try:
            config = load_config(path)
            resolve_model_path(config)
        except ConfigError as exc:
            bad.append(f"{path}: {exc}")
            if len(paths) > 1:
                print(f"llm_bench: invalid: {bad[-1]}", file=sys.stderr)
            continue
        for line in config.warnings:
            print(f"llm_bench: warning: {path}: {line}", file=sys.stderr)
    if len(bad) == 1 and len(paths) == 1:
        raise BenchError(bad[0])
    if bad:
        raise BenchError(f"{len(bad)} of {len(paths)} configs invalid; the first: {bad[0]}")
    print(f"llm_bench: {len(paths)} config(s) valid", file=sys.stderr)


def _check_flags(args: argparse.Namespace) -> None:
    if args.backend.lower() != "cpu":
        raise BenchError(f"backend '{args.backend}' is not available; allowed: cpu")
    if not args.kv_cache:
        raise BenchError("-kv false is not supported; h2okit always decodes with a KV cache")
    if args.quant_attention != 0:
        raise BenchError(f"-qatten {args.quant_attention} is not supported; allowed: 0")
    if args.repeat < 1:
        raise BenchError(f"-rep must be >= 1, got {args.repeat}")
    if min(args.batch) < 1:
        raise BenchError(f"--batch must be >= 1, got {min(args.batch)}")
    if args.file_print:
        _check_writable(Path(args.file_print))


def _check_writable(path: Path) -> None:
    """-fp is opened for appending before anything runs (MNN creates it too), so a long benchmark is
    never lost at the end for want of a writable log."""
    if path.is_dir():
        raise BenchError(f"-fp {path} is a folder; give a file to append the table to")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a"):
            pass
    except OSError as exc:
        raise BenchError(f"-fp {path}: cannot append to it ({exc.strerror or exc})") from None


def _quality_settings(args):
    """The quality flags, checked before anything loads."""
    if not args.quality:
        return None
    from .corpus import BOOKS, WINDOW_FRACTIONS
    from .quality import QualitySettings

    try:
        depths = tuple(float(d) for d in args.passkey_depths.split(",") if d.strip())
    except ValueError:
        raise BenchError(f"--passkey-depths takes a comma list of fractions in [0, 1], got "
                         f"'{args.passkey_depths}'") from None
    if any(not 0 <= d <= 1 for d in depths):
        raise BenchError(f"--passkey-depths takes fractions in [0, 1], got '{args.passkey_depths}'")
    most = len(BOOKS) * len(WINDOW_FRACTIONS) if args.corpus is None else None
    if args.quality_windows < 1 or (most is not None and args.quality_windows > most):
        raise BenchError(f"--quality-windows must be in 1..{most or 'texts x fractions'}, got {args.quality_windows}")
    if args.quality_tokens < 2:
        raise BenchError(f"--quality-tokens must be >= 2, got {args.quality_tokens}")
    return QualitySettings(windows=args.quality_windows, tokens=args.quality_tokens, passkey_depths=depths)


def _check_context(args, loaded) -> None:
    """p + n beyond the model's trained context is refused before anything runs, unless asked for."""
    context = loaded.context_length
    longest = max(args.n_prompt) + max(args.n_gen)
    if context and longest > context and not args.beyond_context:
        raise BenchError(f"-p {max(args.n_prompt)} + -n {max(args.n_gen)} = {longest} tokens exceeds the model's "
                         f"context of {context}; shorten them, or pass --beyond-context to run past it anyway")


def _mean_stats(results: list[table.RequestStats]) -> table.RequestStats:
    """Per-sequence stats of a batch, each field the mean over its sequences."""
    return table.RequestStats(**{key: statistics.fmean(getattr(r, key) for r in results)
                                 for key in results[0].as_dict()})


def _measure(engine, loaded, texts, evaluator, threads: int, p: int, n: int, repeat: int,
             precision: str, batch: int = 1) -> BenchResult:
    from .corpus import token_stream

    stream = token_stream(loaded.tokenizer, texts, p * batch)
    prompt = stream[:p]
    prompts = [stream[i * p:(i + 1) * p] for i in range(batch)]
    samples, generated = RowSamples(), []
    for rep in range(repeat + 1):
        if batch == 1:
            result = engine.generate(prompt, n)
            stats, tokens = result.stats, result.tokens
        else:
            result = engine.generate_batch(prompts, n)
            stats, tokens = _mean_stats(result.stats), result.tokens[0]
        tag = "warm-up" if rep == 0 else f"rep {rep}/{repeat}"
        where = f"t={threads} p={p} n={n}" + (f" batch={batch}" if batch > 1 else "")
        print(f"[llm_bench] {where} {tag}: prefill {result.prefill_tps:.1f} tok/s, "
              f"decode {result.decode_tps:.2f} tok/s, keep {stats.h2o_keep:.4f}, "
              f"true ratio {stats.kv_true_ratio:.3f}", file=sys.stderr, flush=True)
        if rep > 0:
            samples.add(result.prefill_tps, result.decode_tps, stats)
            generated.append(tokens)
    quality = {}
    if evaluator is not None:  # after the timed requests, so it cannot disturb them
        quality = evaluator.evaluate(p, prompt, generated)
        delta = mean_ci(quality["ppl_delta_pct"])
        print(f"[llm_bench] quality p={p}: ppl {statistics.fmean(quality['ppl']):.3f}, "
              f"{delta.text('%+.2f', ' %')} vs full cache (95% CI, t, {delta.n} windows) at attended "
              f"fraction {statistics.fmean(quality['attended_fraction']):.3f}; "
              f"agreement {quality['token_agreement'][0]:.3f}; {quality['quality_s'][0]:.0f} s",
              file=sys.stderr, flush=True)
    return BenchResult(loaded.name, loaded.size_bytes, "cpu", threads, precision, p, n, engine.decode_path_used,
                       samples, quality, batch)


def run(args: argparse.Namespace) -> tuple[str, list[BenchResult]]:
    """Measure every (threads, p, n); returns the stdout text and the results."""
    if args.check_config:
        check_configs(args.check_config)
        return "", []
    if args.config is None:
        raise BenchError("-m CONFIG.json is required")
    _check_flags(args)
    settings = _quality_settings(args)
    config = load_config(find("configs", args.config))
    emit_warnings(config)
    import torch

    from .corpus import load_texts
    from .fastpath import FastPathUnavailable
    from .model import load_model, resolve_model_path
    from .quality import QualityEvaluator
    from .runtime import Engine

    precision = config.model["precision"]
    model_path = resolve_model_path(config)
    texts = load_texts(args.corpus)
    loaded = load_model(model_path, dtype=PRECISION_DTYPE[precision], weight_dtype=config.model["llm_weight_dtype"],
                        activation_dtype=config.model["llm_activation_dtype"])
    _check_context(args, loaded)
    _warn_if_busy()
    try:
        engine = Engine(loaded, config.kv, decode_path=args.decode_path)
    except FastPathUnavailable as exc:
        raise BenchError(f"--decode-path fast: {exc}") from None
    print(f"[llm_bench] decode path: {engine.decode_path_used} ({engine.decode_path_note})",
          file=sys.stderr, flush=True)
    if max(args.batch) > 1 and engine.fast is None:
        raise BenchError(f"--batch {max(args.batch)} decodes on the fast path, which this run does not have "
                         f"({engine.decode_path_note})")
    evaluator = QualityEvaluator(engine, texts, settings) if settings is not None else None
    results = []
    for threads in args.threads or [config.threads]:
        torch.set_num_threads(threads)
        for p in args.n_prompt:
            for n in args.n_gen:
                for batch in args.batch:
                    results.append(_measure(engine, loaded, texts, evaluator if batch == args.batch[0] else None,
                                            threads, p, n, args.repeat, precision, batch))
    decode_types = {key: config.model[key] for key in ("llm_weight_dtype", "llm_activation_dtype")}
    return render(results, args.output, metadata(args.config, config.kv.to_keys(), decode_types)), results


def runnable_tasks(samples: int = 5, gap_s: float = 0.02, loadavg: Path = Path("/proc/loadavg")) -> int | None:
    """Tasks running or ready to run machine-wide (/proc/loadavg's 4th field), the least of a few
    samples so that a passing blip does not count; None where /proc is missing or unreadable."""
    counts = []
    for i in range(samples):
        try:
            counts.append(int(loadavg.read_text().split()[3].split("/")[0]))
        except (OSError, IndexError, ValueError):
            return None
        if i + 1 < samples:
            time.sleep(gap_s)
    return min(counts)


def _warn_if_busy() -> None:
    """Timing next to another busy process is not comparable (OpenMP threads spin-wait for a core:
    benchmarks/under_load.py measured decode at 0.27x with one busy process on 2 cores), so say so."""
    running = runnable_tasks()
    if running is not None and running > 1:  # this process is one of them
        log.warning("warning: %d other runnable task(s) on %d cores right now; decode can run several times "
                    "slower next to a busy process, so this run's timings are not comparable", running - 1,
                    os.cpu_count() or 0)


def main(argv: list[str] | None = None) -> int:
    set_openmp_wait()  # before torch loads libgomp
    setup_logging()

    def body() -> int:
        args = build_parser().parse_args(argv)
        text, results = run(args)
        if args.file_print and results:
            path = Path(args.file_print)
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a") as f:  # MNN appends; the parser copes with several tables
                f.write(render_md(results))
        sys.stdout.write(text)
        sys.stdout.flush()
        return 0

    return guard("llm_bench", body, (BenchError, ConfigError, CorpusError))


if __name__ == "__main__":
    sys.exit(main())
