"""`h2okit`: the kit's commands. Each subcommand lives in its own module; this only dispatches."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import __version__
from .clikit import OneLineParser, guard, setup_logging
from .config import ConfigError
from .corpus import CorpusError
from .offline import OfflineError
from .resources import default_config
from .threads import set_openmp_wait


DEFAULT_CONFIG = default_config()


class CLIError(Exception):
    """Bad input to a subcommand; printed as one line, exit 2."""


def _prepare(args: argparse.Namespace) -> int:
    """Make the shipped configs' models and the corpus ready offline: assemble a model shipped in
    parts, convert each GGUF once, index its blocks, decode the novels, build the decode kernels."""
    from . import kernels
    from .config import load_config
    from .corpus import ensure_austen
    from .gguf_blocks import tensor_table
    from .model import convert_gguf, resolve_model_path
    from .resources import names, packaged

    models = {}
    for name in names("configs"):  # configs sharing a model prepare it once
        config = load_config(packaged("configs", name))
        models.setdefault(resolve_model_path(config), name)
    for gguf, name in models.items():
        print(f"model:   {convert_gguf(gguf)} ({name})")
        print(f"blocks:  {len(tensor_table(gguf))} tensors of {gguf.name} indexed")
    print(f"corpus:  {ensure_austen()}")
    try:
        kernels.load()
        print(f"kernels: {kernels.loaded_path}")
    except kernels.KernelBuildError as exc:  # not fatal: decoding falls back to the transformers path
        print(f"kernels: not built ({exc}); decode will use the transformers forward")
    return 0


def _dump_kv(args: argparse.Namespace) -> int:
    from .offline import dump_kv

    out = dump_kv(args.config, Path(args.out_dir), args.prompt, args.gen, args.corpus, args.threads)
    print(f"wrote {out}")
    return 0


def _dump_kv_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-m", default=str(DEFAULT_CONFIG), help="config.json (default: the default model)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--prompt", "-p", type=int, default=512)
    p.add_argument("--gen", "-n", type=int, default=128)
    p.add_argument("--threads", "-t", type=int, default=None)
    p.add_argument("--corpus", default=None, help="text file or folder (default: the Austen novels)")


_dump_kv.configure = _dump_kv_args


def _offline_lossless(args: argparse.Namespace) -> int:
    from .offline import offline_lossless, to_markdown

    report = offline_lossless(Path(args.dump_dir), args.scope, args.front_n, args.stage, args.dtype)
    if args.out_json:
        Path(args.out_json).write_text(json.dumps(report, indent=1))
    if args.out_md:
        Path(args.out_md).write_text(to_markdown(report))
    print(f"weighted_lossless_ratio {report['weighted_lossless_ratio']:.4f} "
          f"({report['dtype']}, scope {args.scope}, {len(report['layers'])} layers, round trips verified)")
    return 0


def _offline_lossless_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dump-dir", required=True)
    p.add_argument("--scope", default="front_n", help="front_n, h2o_kept, front_n_and_h2o_kept or all")
    p.add_argument("--front-n", type=int, default=2)
    p.add_argument("--stage", default="final", help="prefill or final")
    p.add_argument("--dtype", default="stored", help="stored, float32, float16 or bfloat16")
    p.add_argument("--out-json", default=None)
    p.add_argument("--out-md", default=None)


_offline_lossless.configure = _offline_lossless_args

COMMANDS = {
    "prepare": (_prepare, "assemble and convert the shipped configs' models, decode the Austen corpus, build "
                          "the decode kernels"),
    "dump-kv": (_dump_kv, "write real K/V of one request (per layer, after prefill and at the end)"),
    "offline-lossless": (_offline_lossless, "measure gear_delta on a K/V dump, verifying every round trip"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="h2okit", description="H2O KV-cache compression kit")
    parser.add_argument("--version", action="version", version=f"h2okit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_text in (("grid", "sweep a grid given as comma-list flags (the seed's run_h2o_v2_bench.py)"),
                            ("sweep", "run a preset sweep (the seed's sweep_h2o_v2.py)"),
                            ("parse", "llm_bench logs -> CSV (the seed's parse_h2o_v2_log.py)"),
                            ("analyze", "CSV -> summary.md, summary.json, pareto.png (analyze_h2o_v2.py)")):
        sub.add_parser(name, help=help_text, add_help=False)
    for name, (func, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        configure = getattr(func, "configure", None)
        if configure is not None:
            configure(p)
    return parser


KIT_COMMANDS = {"grid": "grid_main", "sweep": "sweep_main", "parse": "parse_main", "analyze": "analyze_main"}


def main(argv: list[str] | None = None) -> int:
    set_openmp_wait()  # before torch loads libgomp
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in KIT_COMMANDS:  # the kit parses its own flags (shared with exp/h2o_v2/*.py)
        from .kit import cli as kit_cli

        return getattr(kit_cli, KIT_COMMANDS[argv[0]])(argv[1:], prog=f"h2okit {argv[0]}")
    args = build_parser().parse_args(argv)
    setup_logging()
    return guard(f"h2okit {args.command}", lambda: args.func(args), (CLIError, ConfigError, CorpusError, OfflineError))


if __name__ == "__main__":
    sys.exit(main())
