"""What a decode step that evicts costs, and where it goes: plans, compaction, the rest.

    .venv/bin/python benchmarks/eviction_steps.py [--prompts 512,2048] [--gen 128] [--reps 3]

The seed H2O config without its codec (its evicting layers share one trigger clock, so all of them plan
at the same step, every kv_h2o_update_interval steps once due) decodes --gen greedy tokens after P
tokens of Austen on the fast path, the GGUF's Q4_1 blocks, 2 threads; one request per round and prompt
length, rounds interleaved (round 0 a warm-up). Every step is timed whole; a step is an eviction step
when the cache recorded evictions during it. Their plans are timed by the policy itself
(`EvictionEvent.plan_us`) and their compaction by timing `KVBuffer.keep_runs`. Prints per P the medians
over rounds of: the median plain step, the eviction steps (how many, median and worst), and an eviction
step's parts in total over its layers ("rest": mostly the step's C call, which attends over the cache
before it is evicted). Timing only: run it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time

import torch
from rounds import interleaved  # this folder: the shared schedule

from h2okit import cache as cache_module
from h2okit.clikit import OneLineParser, comma_arg, setup_logging
from h2okit.config import load_config
from h2okit.corpus import load_texts, token_stream
from h2okit.model import load_model, resolve_model_path
from h2okit.resources import find
from h2okit.runtime import Engine, greedy


class CompactionTimer:
    """`KVBuffer.keep_runs`, timed (the seconds since the last reset)."""

    def __init__(self):
        self.seconds = 0.0
        self.keep_runs = cache_module.KVBuffer.keep_runs
        timer = self

        def timed(buffer, runs):
            started = time.perf_counter()
            try:
                return timer.keep_runs(buffer, runs)
            finally:
                timer.seconds += time.perf_counter() - started
        cache_module.KVBuffer.keep_runs = timed


def main() -> int:
    setup_logging()
    ap = OneLineParser(prog="eviction_steps", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default=[512, 2048], type=comma_arg(int), help="comma list of prompt lengths")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    if min(args.prompts) < 1 or min(args.gen, args.reps) < 1:
        ap.error("--prompts takes positive integers; --gen and --reps at least 1")
    torch.set_num_threads(2)
    seed = load_config(find("configs", "smollm2-135m-seed"))
    loaded = load_model(resolve_model_path(seed))
    engine = Engine(loaded, dataclasses.replace(seed.kv, lossless_enable=False), decode_path="fast")
    if engine.fast is None:
        print("eviction_steps: no fast decode path here (no C compiler?); nothing to time", file=sys.stderr)
        return 2
    compaction = CompactionTimer()
    stream = token_stream(loaded.tokenizer, load_texts(), max(args.prompts))

    def run(prompt: list[int]):
        def once() -> dict[str, float]:
            cache = engine.new_cache()
            token = greedy(engine.forward(cache, prompt, 0)[-1])
            plain, evicting, plans, compacting = [], [], [], []
            for step in range(args.gen):
                before = len(cache.events.evictions)
                compaction.seconds = 0.0
                started = time.perf_counter()
                token = greedy(engine.forward(cache, [token], len(prompt) + step)[-1])
                elapsed = time.perf_counter() - started
                events = cache.events.evictions[before:]
                if not events:
                    plain.append(elapsed)
                    continue
                evicting.append(elapsed)
                plans.append(sum(event.plan_us for event in events) * 1e-6)
                compacting.append(compaction.seconds)
            if not evicting:
                return {"plain": statistics.median(plain), "count": 0.0}
            return {"plain": statistics.median(plain), "count": float(len(evicting)),
                    "median": statistics.median(evicting), "worst": max(evicting),
                    "plans": statistics.median(plans), "compaction": statistics.median(compacting)}
        return once

    runs = {p: run(stream[:p]) for p in args.prompts}
    samples = interleaved(runs, args.reps)
    print(f"seed H2O without its codec, {engine.fast.weights.description}; {args.gen} steps; medians over "
          f"{args.reps} rounds")
    print("| P | plain step ms | eviction steps | their median ms | worst ms | plans ms | compaction ms | rest ms |\n"
          "|---:|---:|---:|---:|---:|---:|---:|---:|")
    for p, rounds in samples.items():
        evicted = [r for r in rounds if r["count"]]
        if not evicted:
            print(f"| {p} | {statistics.median(r['plain'] for r in rounds) * 1e3:.2f} | 0 | | | | | |")
            continue
        med = {key: statistics.median(r[key] for r in evicted)
               for key in ("plain", "count", "median", "worst", "plans", "compaction")}
        rest = med["median"] - med["plain"] - med["plans"] - med["compaction"]
        print(f"| {p} | {med['plain'] * 1e3:.2f} | {med['count']:.0f} | {med['median'] * 1e3:.2f} | "
              f"{med['worst'] * 1e3:.2f} | {med['plans'] * 1e3:.2f} | {med['compaction'] * 1e3:.2f} | "
              f"{rest * 1e3:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
