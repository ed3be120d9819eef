"""Decode speed of (a) plain transformers `generate`, (b) h2okit with H2O off, (c) the seed config.

    .venv/bin/python benchmarks/decode_overhead.py [--prompts 512,2048] [--gen 128] [--reps 3]
                                                   [--decode-path reference|fast]

h2okit's engines decode through the transformers forward by default here (what this benchmark
measured first: the cache's own overhead); `--decode-path fast` times the C decode path instead
(benchmarks/roofline.py compares the two against the bandwidth roofline).

All variants run interleaved in one process on the same prompt (real text), so machine noise
hits them alike; medians are printed with the ratios (b)/(a) and (c)/(b).
Targets (issue 2): (b)/(a) >= 0.97; (c)/(b) >= 0.95 at P=512 and >= 1.10 at P=2048.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from h2okit.clikit import setup_logging
from h2okit.config import load_config, parse_config
from h2okit.corpus import load_texts, token_stream
from h2okit.model import load_model, resolve_model_path
from h2okit.runtime import Engine

ROOT = Path(__file__).resolve().parents[1]


class _StepClock(LogitsProcessor):
    """Timestamps each generation step; the first call comes right after prefill."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def plain_generate_decode_tps(model, prompt: list[int], gen: int) -> float:
    clock = _StepClock()
    model.set_attn_implementation("sdpa")
    try:
        with torch.inference_mode():
            model.generate(torch.tensor([prompt]), max_new_tokens=gen + 1, min_new_tokens=gen + 1,
                           do_sample=False, logits_processor=LogitsProcessorList([clock]))
    finally:
        model.set_attn_implementation("h2o")
    return gen / (clock.times[-1] - clock.times[0])  # gen decode forwards between first and last call


def main() -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="512,2048")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--decode-path", choices=("reference", "fast"), default="reference")
    ap.add_argument("--seed-config", default=str(ROOT / "configs" / "smollm2-135m-seed.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    seed = load_config(args.seed_config)
    loaded = load_model(resolve_model_path(seed))
    texts = load_texts()
    variants = {
        "a_plain_generate": None,
        "b_h2okit_off": Engine(loaded, parse_config({}).kv, decode_path=args.decode_path),
        "c_seed_config": Engine(loaded, seed.kv, decode_path=args.decode_path),
    }
    results = {}
    for p in [int(x) for x in args.prompts.split(",")]:
        prompt = token_stream(loaded.tokenizer, texts, p)
        samples = {name: [] for name in variants}
        for _ in range(args.reps + 1):  # first round is a warm-up
            for name, engine in variants.items():
                tps = (plain_generate_decode_tps(loaded.model, prompt, args.gen) if engine is None
                       else engine.generate(prompt, args.gen).decode_tps)
                samples[name].append(tps)
        med = {name: statistics.median(v[1:]) for name, v in samples.items()}
        results[p] = {**med, "b_over_a": med["b_h2okit_off"] / med["a_plain_generate"],
                      "c_over_b": med["c_seed_config"] / med["b_h2okit_off"]}
        print(f"P={p} G={args.gen} median decode tok/s over {args.reps} reps (interleaved):")
        for name in variants:
            print(f"  {name:18s} {med[name]:7.2f}   samples {['%.2f' % s for s in samples[name][1:]]}")
        print(f"  (b)/(a) = {results[p]['b_over_a']:.3f}   (c)/(b) = {results[p]['c_over_b']:.3f}", flush=True)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
