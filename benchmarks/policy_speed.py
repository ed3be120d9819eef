"""What a policy's plans cost in decode speed: policies.py's variants, stepped in turns on the same caches.

    .venv/bin/python benchmarks/policy_speed.py [--policies h2o_vnorm,expected_vnorm_head] [--prompt 512]
                                                [--batch 1] [--steps 256]

Every variant runs policies.py's setting (every layer evicts at keep 1/3 of the tokens seen, trigger 64,
every 16 steps) on the fast path with the default model's weights; the prompts are prefilled once per
variant, then the variants' decode steps take turns (rounds.interleaved: the same machine phases for
all). A step that evicts counts with its plans, so the medians hide them; the means and the paired ratio
of means per 16-step cycle do not. Prints per variant the mean step, the plan time per step (from the
eviction events), and the ratio of each variant's step to the first one's (paired per cycle, 95 % t-CI).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np
import torch
from policies import INTERVAL, VARIANTS, base_config, variant_names  # this folder
from rounds import interleaved

from h2okit.clikit import setup_logging
from h2okit.config import parse_config
from h2okit.corpus import load_texts, token_stream
from h2okit.model import load_model, resolve_model_path
from h2okit.runtime import Engine
from h2okit.stats import paired_ci


def main() -> int:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policies", default="h2o_vnorm,expected_vnorm_head", help="comma list of policies.py variants")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=256, help="decode steps per variant (a multiple of 16)")
    args = ap.parse_args()
    names = variant_names(args.policies, "policy_speed.py")
    if names is None:
        return 2
    if args.steps < INTERVAL or args.steps % INTERVAL:
        print(f"policy_speed.py: error: --steps must be a positive multiple of {INTERVAL}, got {args.steps}",
              file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    loaded = load_model(resolve_model_path(parse_config(base_config({}, 0.5))))
    stream = token_stream(loaded.tokenizer, load_texts(), args.prompt * args.batch)
    prompts = [stream[i * args.prompt:(i + 1) * args.prompt] for i in range(args.batch)]
    runs = {}
    for name in names:
        engine = Engine(loaded, parse_config(base_config(VARIANTS[name], 1 / 3)).kv, decode_path="fast")
        engine.fast.adapt_threads = False
        caches = [engine.new_cache() for _ in prompts]
        feed = [int(engine.forward(cache, prompt, 0)[-1].argmax()) for cache, prompt in zip(caches, prompts)]
        runs[name] = {"engine": engine, "caches": caches, "feed": feed, "position": args.prompt}

    def step(run) -> tuple[float, float]:
        """(seconds, plan seconds) of one decode step of every sequence."""
        caches = run["caches"]
        before = [len(c.events.evictions) for c in caches]
        started = time.perf_counter()
        logits = run["engine"].fast.step_batch(caches, run["feed"], [run["position"]] * len(caches))
        seconds = time.perf_counter() - started
        run["feed"][:] = logits.argmax(-1).tolist()
        run["position"] += 1
        return seconds, sum(e.plan_us for c, b in zip(caches, before) for e in c.events.evictions[b:]) / 1e6

    samples = interleaved({name: (lambda r=run: step(r)) for name, run in runs.items()}, args.steps,
                          f"P={args.prompt} B={args.batch} ")
    cycles = {name: np.add.reduceat(np.array([s for s, _ in rows]), np.arange(0, len(rows), INTERVAL))
              for name, rows in samples.items()}
    print(f"\nP={args.prompt}, B={args.batch}, {args.steps} steps per variant in turns (first round a warm-up); "
          f"every layer evicts every {INTERVAL} steps at keep 1/3 of the tokens seen")
    print("| variant | mean step ms | median step ms | plans ms per step | step / first [95 % CI] |")
    print("|---|---:|---:|---:|---|")
    first = names[0]
    for name in names:
        rows = samples[name]
        ratio = paired_ci(cycles[name], cycles[first], kind="ratio") if name != first else None
        print(f"| {name} | {1e3 * statistics.fmean(s for s, _ in rows):.2f} | "
              f"{1e3 * statistics.median(s for s, _ in rows):.2f} | {1e3 * statistics.fmean(p for _, p in rows):.2f} | "
              f"{ratio.text('%.3f') if ratio else '1'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
