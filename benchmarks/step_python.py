"""How much of a fused decode step is Python: the step's time outside the one C call (h2k_decode_step).

    .venv/bin/python benchmarks/step_python.py [--prompt 512] [--gen 128] [--reps 3] [--batch 1,8] [--weights auto]

Per batch size, the default config (H2O off; --weights: the fast path's weights, by default the GGUF's
Q4_1 blocks) and the seed H2O config
(without its codec) decode --gen greedy tokens after --prompt tokens of Austen per sequence, in
interleaved rounds (round 0 a warm-up). Each step is timed whole and its C call alone; printed are
the medians over rounds of the mean per step: the step, the C call, and the rest (Python: filling the
call's slots, the layers' bookkeeping and evictions, the embedding rows, the argmax). Timing only: run
it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch
from rounds import interleaved  # this folder: the shared schedule

from h2okit.clikit import OneLineParser, comma_arg, setup_logging
from h2okit.config import WEIGHT_DTYPES, load_config
from h2okit.corpus import load_texts, token_stream
from h2okit.model import load_model, resolve_model_path
from h2okit.resources import find
from h2okit.runtime import Engine


class TimedLib:
    """The kernels library, with the fused step's C call timed (every other call passed through)."""

    def __init__(self, lib):
        self.lib, self.seconds = lib, 0.0

    def __getattr__(self, name):
        call = getattr(self.lib, name)
        if name != "h2k_decode_step":
            return call

        def timed(*args):
            started = time.perf_counter()
            try:
                return call(*args)
            finally:
                self.seconds += time.perf_counter() - started
        return timed


def main() -> int:
    setup_logging()
    ap = OneLineParser(prog="step_python", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--batch", default="1,8", type=comma_arg(int), help="comma list of batch sizes")
    ap.add_argument("--weights", default="auto", choices=WEIGHT_DTYPES,
                    help="the fast path's weights (llm_weight_dtype)")
    args = ap.parse_args()
    batches = args.batch
    if min(batches) < 1 or min(args.prompt, args.gen, args.reps) < 1:
        ap.error("--batch takes positive integers; --prompt, --gen and --reps at least 1")
    torch.set_num_threads(2)
    seed = load_config(find("configs", "smollm2-135m-seed"))
    loaded = load_model(resolve_model_path(seed), weight_dtype=args.weights)
    configs = {"H2O off": dataclasses.replace(seed.kv, lossless_enable=False, h2o_enable=False),
               "seed H2O": dataclasses.replace(seed.kv, lossless_enable=False)}
    engines = {name: Engine(loaded, kv, decode_path="fast") for name, kv in configs.items()}
    fast = next(iter(engines.values())).fast
    if fast is None:
        print("step_python: no fast decode path here (no C compiler?); nothing to time", file=sys.stderr)
        return 2
    timed = TimedLib(fast.lib)
    fast.lib = timed  # the engines share one decoder per model
    stream = token_stream(loaded.tokenizer, load_texts(), args.prompt * max(batches))

    def run(engine: Engine, batch: int):
        def once() -> tuple[float, float]:
            timed.seconds = 0.0
            prompts = [stream[i * args.prompt:(i + 1) * args.prompt] for i in range(batch)]
            result = engine.generate_batch(prompts, args.gen) if batch > 1 else engine.generate(prompts[0], args.gen)
            return result.decode_s / args.gen, timed.seconds / args.gen
        return once

    runs = {(name, batch): run(engine, batch) for batch in batches for name, engine in engines.items()}
    samples = interleaved(runs, args.reps)
    print(f"P={args.prompt}, {args.gen} steps, {fast.weights.description}; medians over {args.reps} rounds of "
          "the mean per step")
    print("| config | B | step ms | C call ms | rest (Python) ms |\n|---|---:|---:|---:|---:|")
    for (name, batch), rounds in samples.items():
        step = statistics.median(s for s, _ in rounds)
        c_call = statistics.median(c for _, c in rounds)
        rest = statistics.median(s - c for s, c in rounds)
        print(f"| {name} | {batch} | {step * 1e3:.2f} | {c_call * 1e3:.2f} | {rest * 1e3:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
