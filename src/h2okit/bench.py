"""`llm_bench`: MNN-compatible flags, one markdown table row per (threads, p, n).

    llm_bench -m CONFIG.json -a cpu -t 2 -qatten 0 -kv true -p 512 -n 128 -rep 3 -fp LOG

Each row runs rep+1 requests of exactly p prompt tokens of real text and n greedy decode
steps from an empty cache; the first request is a warm-up and dropped (SPEC §7).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path

from . import __version__, table
from .config import ConfigError, emit_warnings, load_config
from .corpus import DEFAULT_TOKENS, DEFAULT_WINDOWS, CorpusError
from .stats import mean_ci

PRECISION_DTYPE = {"high": "float32", "normal": "float32", "low": "bfloat16"}


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
    p.add_argument("-m", "--config", required=True, help="config.json (model keys and kv_* keys)")
    p.add_argument("-a", "--backend", default="cpu", help="backend; only cpu")
    p.add_argument("-t", "--threads", type=_int_list, default=None, help="comma list of thread counts")
    p.add_argument("-qatten", "--quant-attention", type=int, default=0, help="MNN attention option; only 0")
    p.add_argument("-kv", "--kv-cache", type=_bool, default=True, help="decode with a KV cache; only true")
    p.add_argument("-p", "--n-prompt", type=_int_list, default=[512], help="comma list of prompt lengths")
    p.add_argument("-n", "--n-gen", type=_int_list, default=[128], help="comma list of decode lengths")
    p.add_argument("-rep", "--repeat", type=int, default=3, help="measured requests per row (+1 warm-up)")
    p.add_argument("-fp", "--file-print", default=None, help="append the table to this file")
    p.add_argument("--corpus", default=None, help="text file or folder of .txt (default: the Austen novels)")
    p.add_argument("--decode-path", choices=("auto", "fast", "reference"), default="auto",
                   help="h2okit extension: decode steps in C kernels (fast; auto = where the model "
                        "supports it) or through the transformers forward (reference)")
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

    def add(self, result) -> None:
        self.prefill_tps.append(result.prefill_tps)
        self.decode_tps.append(result.decode_tps)
        for key, value in result.stats.as_dict().items():
            self.stats.setdefault(key, []).append(float(value))


def format_row(model: str, model_mb: float, backend: str, threads: int, precision: str, p: int, n: int,
               samples: RowSamples) -> tuple[list[str], list[str]]:
    """(columns, cells) of one table row: the standard columns, then the extras."""
    cells = [model, f"{model_mb:.2f} MB", backend.upper(), str(threads), precision.capitalize(),
             f"prompt={p}<br>decode={n}", table.speed_cell(samples.prefill_tps, samples.decode_tps)]
    cells += [table.cell(samples.stats[key], fmt) for key, fmt in table.STAT_FORMATS.items()]
    extras = table.extra_columns(samples.stats)
    cells += [table.cell(samples.stats[key], fmt) for key, fmt in extras]
    return list(table.STANDARD_COLUMNS) + [key for key, _ in extras], cells


def run(args: argparse.Namespace) -> str:
    import torch

    from .corpus import load_texts, token_stream
    from .fastpath import FastPathUnavailable
    from .model import load_model, resolve_model_path
    from .runtime import Engine

    if args.backend.lower() != "cpu":
        raise BenchError(f"backend '{args.backend}' is not available; allowed: cpu")
    if not args.kv_cache:
        raise BenchError("-kv false is not supported; h2okit always decodes with a KV cache")
    if args.quant_attention != 0:
        raise BenchError(f"-qatten {args.quant_attention} is not supported; allowed: 0")
    if args.repeat < 1:
        raise BenchError(f"-rep must be >= 1, got {args.repeat}")
    config = load_config(args.config)
    emit_warnings(config)
    precision = config.model["precision"]
    loaded = load_model(resolve_model_path(config), dtype=PRECISION_DTYPE[precision],
                        log=lambda line: print(line, file=sys.stderr))
    texts = load_texts(args.corpus)
    try:
        engine = Engine(loaded, config.kv, decode_path=args.decode_path)
    except FastPathUnavailable as exc:
        raise BenchError(f"--decode-path fast: {exc}") from None
    print(f"[llm_bench] decode path: {engine.decode_path_used} ({engine.decode_path_note})",
          file=sys.stderr, flush=True)
    evaluator = None
    if args.quality:
        from .quality import QualityEvaluator, QualitySettings

        try:
            depths = tuple(float(d) for d in args.passkey_depths.split(",") if d.strip())
        except ValueError:
            raise BenchError(f"--passkey-depths takes a comma list of fractions, got '{args.passkey_depths}'") \
                from None
        if any(not 0 <= d <= 1 for d in depths) or args.quality_windows < 1 or args.quality_tokens < 2:
            raise BenchError("quality settings out of range (depths in [0,1], windows >= 1, tokens >= 2)")
        evaluator = QualityEvaluator(engine, texts, QualitySettings(
            windows=args.quality_windows, tokens=args.quality_tokens, passkey_depths=depths))
    threads_list = args.threads or [config.threads]
    columns, rows = None, []
    for threads in threads_list:
        torch.set_num_threads(threads)
        for p in args.n_prompt:
            prompt = token_stream(loaded.tokenizer, texts, p)
            for n in args.n_gen:
                samples = RowSamples()
                generated = []
                for rep in range(args.repeat + 1):
                    result = engine.generate(prompt, n)
                    tag = "warm-up" if rep == 0 else f"rep {rep}/{args.repeat}"
                    print(f"[llm_bench] t={threads} p={p} n={n} {tag}: prefill {result.prefill_tps:.1f} tok/s, "
                          f"decode {result.decode_tps:.2f} tok/s, keep {result.stats.h2o_keep:.4f}, "
                          f"true ratio {result.stats.kv_true_ratio:.3f}", file=sys.stderr, flush=True)
                    if rep > 0:
                        samples.add(result)
                        generated.append(result.tokens)
                if evaluator is not None:  # after the timed requests, so it cannot disturb them
                    quality = evaluator.evaluate(p, prompt, generated)
                    samples.stats.update(quality)
                    delta = mean_ci(quality["ppl_delta_pct"])
                    print(f"[llm_bench] quality p={p}: ppl {statistics.fmean(quality['ppl']):.3f}, "
                          f"{delta.text('%+.2f', ' %')} vs full cache (95% CI, t, {delta.n} windows) at attended "
                          f"fraction {statistics.fmean(quality['attended_fraction']):.3f}; "
                          f"agreement {quality['token_agreement'][0]:.3f}; {quality['quality_s'][0]:.0f} s",
                          file=sys.stderr, flush=True)
                columns, cells = format_row(loaded.name, loaded.size_bytes / table.MB, args.backend, threads,
                                            precision, p, n, samples)
                rows.append(cells)
    return table.render(columns, rows)


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        text = run(args)
    except (BenchError, ConfigError, CorpusError) as exc:
        print(f"llm_bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llm_bench: interrupted", file=sys.stderr)
        return 130
    sys.stdout.write(text)
    sys.stdout.flush()
    if args.file_print:
        path = Path(args.file_print)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:  # MNN appends; the parser copes with several tables
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
