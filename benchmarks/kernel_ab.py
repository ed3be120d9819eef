"""This checkout's decode kernels against another revision's, step by step on the same caches.

    .venv/bin/python benchmarks/kernel_ab.py --against REV [--weights fp32,bf16,q4_1] [--batch 1,8]
                                             [--prompt 512] [--steps 64] [--inputs fp32|q8]
                                             [--config smollm2-135m-seed]

Both kernel sources (`llama_decode.c` here and at git revision REV) are built with the kernels' own
flags and loaded side by side; the C interface (the header) must be the same. Per weight type and
batch size, B prompts of Austen are prefilled once, then fused decode steps alternate between the two
builds on the same caches (so both see the same cache lengths and the same phases of the machine),
the first pair a warm-up. Printed: median step time of each build and the ratio of the medians, with
the 95 % t-CI of the per-pair ratio (REV's step time / this checkout's: above 1 means this checkout
is faster). The default config (H2O off) unless --config names another (a shipped config's name or
a path; its codec is switched off, as in roofline.py, so that every step is fused), threads fixed
(no adaptive choice), 2 threads. Timing only: run it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from rounds import alternating_steps  # this folder: the shared schedule

from h2okit import kernels
from h2okit.clikit import OneLineParser, comma_arg, setup_logging
from h2okit.config import ACTIVATION_DTYPES, WEIGHT_DTYPES, ConfigError, load_config
from h2okit.corpus import load_texts, token_stream
from h2okit.model import load_model, resolve_model_path
from h2okit.resources import find
from h2okit.runtime import Engine
from h2okit.stats import paired_ci

ROOT = Path(__file__).resolve().parents[1]


def revision_text(rev: str, path: Path) -> str:
    relative = path.resolve().relative_to(ROOT)
    proc = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{relative}"], capture_output=True, text=True)
    if proc.returncode != 0:
        reason = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "git failed"
        print(f"kernel_ab: error: cannot read {relative} at revision '{rev}': {reason}", file=sys.stderr)
        raise SystemExit(2)
    return proc.stdout


def build(source: str, folder: Path, name: str):
    """The kernels compiled from `source` (with the current header beside it), loaded with cffi."""
    (folder / name).mkdir()
    (folder / name / kernels.SOURCE.name).write_text(source)
    (folder / name / kernels.HEADER.name).write_text(kernels.HEADER.read_text())
    library = folder / name / "llama_decode.so"
    subprocess.run([kernels._compiler(), *kernels.FLAGS, str(folder / name / kernels.SOURCE.name), "-o",
                    str(library), "-lm"], check=True)
    return kernels.ffi.dlopen(str(library))


def alternate(engine: Engine, libs: dict, prompts: list[list[int]], steps: int, label: str) -> dict[str, list]:
    """Per build, the seconds of its fused decode steps on the same caches (rounds.alternating_steps)."""
    fast = engine.fast
    fast.adapt_threads = False

    def stepper(lib):
        def step(caches, tokens, positions):
            fast.lib = lib
            return fast.step_batch(caches, tokens, positions)
        return step

    return alternating_steps(engine, prompts, {name: stepper(lib) for name, lib in libs.items()}, steps, label)


def main() -> int:
    setup_logging()
    ap = OneLineParser(prog="kernel_ab", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--against", required=True, help="a git revision whose kernels to compare with")
    ap.add_argument("--weights", default="fp32", type=comma_arg(str, WEIGHT_DTYPES),
                    help=f"comma list from: {', '.join(WEIGHT_DTYPES)}")
    ap.add_argument("--batch", default="1,8", type=comma_arg(int), help="comma list of batch sizes")
    ap.add_argument("--inputs", default="fp32", choices=ACTIVATION_DTYPES,
                    help="llm_activation_dtype: the quantized matrices' inputs")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64, help="measured steps per build")
    ap.add_argument("--config", default="smollm2-135m",
                    help="config (shipped name or path) whose model and KV settings to decode with; codec off")
    args = ap.parse_args()
    weights, batches = args.weights, args.batch
    if min(batches) < 1 or args.steps < 2 or args.prompt < 1:
        ap.error("--batch takes positive integers, --steps at least 2, --prompt at least 1")
    if revision_text(args.against, kernels.HEADER) != kernels.HEADER.read_text():
        ap.error(f"the kernel header at '{args.against}' differs from this checkout's; the A/B needs the same "
                 "C interface")
    try:
        config = load_config(find("configs", args.config))
    except ConfigError as err:
        ap.error(str(err))
    config = dataclasses.replace(config, kv=dataclasses.replace(config.kv, lossless_enable=False))
    torch.set_num_threads(2)
    texts = load_texts()
    with tempfile.TemporaryDirectory(prefix="h2okit-kernel-ab-") as tmp:
        libs = {"this checkout": build(kernels.SOURCE.read_text(), Path(tmp), "here"),
                args.against: build(revision_text(args.against, kernels.SOURCE), Path(tmp), "against")}
        print(f"| weights | P | B | this checkout ms | {args.against} ms | ratio of medians "
              "| per-pair ratio [95 % CI] |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for weight_dtype in weights:
            loaded = load_model(resolve_model_path(config), weight_dtype=weight_dtype, activation_dtype=args.inputs)
            engine = Engine(loaded, config.kv, decode_path="fast")
            stream = token_stream(loaded.tokenizer, texts, args.prompt * max(batches) + 1000)
            for batch in batches:
                prompts = [stream[i * args.prompt:(i + 1) * args.prompt] for i in range(batch)]
                samples = alternate(engine, libs, prompts, args.steps, f"{weight_dtype} B={batch} ")
                here, there = samples["this checkout"], samples[args.against]
                ratio = paired_ci(there, here, kind="ratio")
                mine, theirs = statistics.median(here), statistics.median(there)
                print(f"| {weight_dtype} | {args.prompt} | {batch} | {mine * 1e3:.2f} | {theirs * 1e3:.2f} | "
                      f"{theirs / mine:.3f} | {ratio.text('%.3f')} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
