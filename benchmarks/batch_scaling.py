"""Aggregate decode speed of a batch against one sequence, step by step in one interleaved run.

    .venv/bin/python benchmarks/batch_scaling.py [--weights fp32] [--batch 8] [--prompt 512] [--steps 64]

`llm_bench --batch 1,8,1,8` times each batch size's repetitions one after the other, so a change of
the machine's bandwidth phase between them (common here) moves the ratio by 20 % or more. This
benchmark prefills one sequence and, per batch size B, B others (P tokens of Austen each, every
sequence its own cache), then takes fused decode steps (`FastDecoder.step_batch`; the greedy argmax
that feeds the next step is not timed) in turns: a B=1 step, then a step of each batch, and again;
the first round is a warm-up.
Per round, the aggregate speed-up is B x (the B=1 step's time) / (the batch step's time); printed
are the median step times and the mean speed-up with its 95 % t-CI over rounds. The default config
(H2O off), 2 threads fixed (no adaptive choice). Steps only: `llm_bench`'s decode figure also
carries its loop's bookkeeping. Timing only: run it alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from rounds import interleaved, prefilled  # this folder: the shared schedule

from h2okit.clikit import OneLineParser, comma_arg, setup_logging
from h2okit.config import WEIGHT_DTYPES, load_config
from h2okit.corpus import load_texts, token_stream
from h2okit.model import load_model, resolve_model_path
from h2okit.resources import find
from h2okit.runtime import Engine
from h2okit.stats import paired_ci


def main() -> int:
    setup_logging()
    ap = OneLineParser(prog="batch_scaling", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="fp32", type=comma_arg(str, WEIGHT_DTYPES),
                    help=f"comma list from: {', '.join(WEIGHT_DTYPES)}")
    ap.add_argument("--batch", default="8", type=comma_arg(int),
                    help="comma list of batch sizes above 1 (each against B=1)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--steps", type=int, default=64, help="measured steps per batch size")
    args = ap.parse_args()
    weights, batches = args.weights, args.batch
    if min(batches) < 2 or args.steps < 2 or args.prompt < 1:
        ap.error("--batch takes integers of at least 2, --steps at least 2, --prompt at least 1")
    torch.set_num_threads(2)
    config = load_config(find("configs", "smollm2-135m"))
    texts = load_texts()
    print("| weights | P | B | step ms | decode tok/s | aggregate vs B=1, per round [95 % CI] |")
    print("|---|---:|---:|---:|---:|---|")
    for weight_dtype in weights:
        loaded = load_model(resolve_model_path(config), weight_dtype=weight_dtype)
        engine = Engine(loaded, config.kv, decode_path="fast")
        if engine.fast is None:
            print("batch_scaling: no fast decode path here (no C compiler?); nothing to time", file=sys.stderr)
            return 2
        engine.fast.adapt_threads = False
        stream = token_stream(loaded.tokenizer, texts, args.prompt * (1 + sum(batches)))
        prompts = [stream[i * args.prompt:(i + 1) * args.prompt] for i in range(1 + sum(batches))]
        steps, first = {1: prefilled(engine, prompts[:1])}, 1
        for batch in batches:
            steps[batch] = prefilled(engine, prompts[first:first + batch])
            first += batch
        runs = {batch: (lambda step=step, fast=engine.fast: step(fast.step_batch)) for batch, step in steps.items()}
        samples = interleaved(runs, args.steps, f"{weight_dtype} ")
        single = samples[1]
        print(f"| {weight_dtype} | {args.prompt} | 1 | {statistics.median(single) * 1e3:.2f} | "
              f"{1 / statistics.median(single):.1f} | |")
        for batch in batches:
            times = samples[batch]
            speedup = paired_ci([batch * s for s in single], times, kind="ratio")
            print(f"| {weight_dtype} | {args.prompt} | {batch} | {statistics.median(times) * 1e3:.2f} | "
                  f"{batch / statistics.median(times):.1f} | {speedup.text('%.2f')} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
