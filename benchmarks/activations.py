"""What int8 inputs to the quantized GEMVs (`llm_activation_dtype: q8`) cost in quality and buy in speed.

    .venv/bin/python benchmarks/activations.py [--windows 12] [--prompt 512] [--tokens 256]
                                               [--speed-prompts 512,2048] [--batch 1,8] [--steps 96]

The default model's GGUF blocks (Q4_1 layers, Q8_0 lm_head), full cache, two decoders that differ only
in their inputs: float32 (exact against the dequantised weights) and int8 per block of 32 (q8).
1. Quality: the quality protocol's windows (P prompt tokens, then M tokens teacher-forced one decode step
   at a time); per window the perplexity over all M targets with each decoder; printed: both mean
   perplexities and the per-window increase of q8 over float32 inputs, mean and 95 % t-CI over windows.
2. Speed: per prompt length and batch size, B prompts prefilled once, then fused decode steps taking
   turns between the two decoders on the same caches (the first pair a warm-up); printed: median step
   time of each and the per-pair speed-up of q8 with its 95 % t-CI. Threads fixed at 2 (no adaptive
   choice). Timing: run it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys

import numpy as np
import torch
from rounds import alternating_steps  # this folder: the shared schedule

from h2okit.clikit import setup_logging
from h2okit.config import load_config
from h2okit.corpus import load_texts, token_stream
from h2okit.metrics import perplexity
from h2okit.model import load_model, resolve_model_path
from h2okit.quality import QualityEvaluator, QualitySettings, stream_nll_many
from h2okit.resources import find
from h2okit.runtime import Engine
from h2okit.stats import mean_ci, paired_ci

INPUTS = ("fp32", "q8")


def quality(engines: dict[str, Engine], texts, windows: int, prompt: int, tokens: int) -> None:
    settings = QualitySettings(windows=windows, tokens=tokens, passkey_depths=())
    spans = QualityEvaluator(engines["fp32"], texts, settings).windows(prompt)
    pairs = [(ids[:prompt], ids[prompt:]) for ids in spans]
    ppl = {name: [perplexity(run.nll) for run in stream_nll_many(engine, pairs)] for name, engine in engines.items()}
    increase = [100.0 * (q / f - 1.0) for q, f in zip(ppl["q8"], ppl["fp32"])]
    ci = mean_ci(increase)
    print(f"Quality, P={prompt}, M={tokens}, {len(pairs)} windows, full cache: ppl with float32 inputs "
          f"{np.mean(ppl['fp32']):.3f}, with int8 inputs {np.mean(ppl['q8']):.3f}; increase "
          f"{ci.text('%+.3f', ' %')} (per window: "
          f"{', '.join(f'{v:+.2f}' for v in increase)})", flush=True)


def speed(engines: dict[str, Engine], stream: list[int], prompt: int, batch: int, steps: int) -> None:
    decoders = {name: engines[name].fast for name in INPUTS}
    for decoder in decoders.values():
        decoder.adapt_threads = False
    prompts = [stream[i * prompt:(i + 1) * prompt] for i in range(batch)]
    # prefill is the same for both (the transformers forward); only the decode steps differ
    samples = alternating_steps(engines["fp32"], prompts, {name: d.step_batch for name, d in decoders.items()}, steps,
                                f"P={prompt} B={batch} ")
    ratio = paired_ci(samples["fp32"], samples["q8"], kind="ratio")
    print(f"| {prompt} | {batch} | {statistics.median(samples['fp32']) * 1e3:.2f} | "
          f"{statistics.median(samples['q8']) * 1e3:.2f} | {ratio.text('%.3f')} |", flush=True)


def main() -> int:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--windows", type=int, default=12, help="quality windows (0: skip the quality part)")
    ap.add_argument("--prompt", type=int, default=512, help="quality: P")
    ap.add_argument("--tokens", type=int, default=256, help="quality: M, teacher-forced tokens per window")
    ap.add_argument("--speed-prompts", default="512,2048", help="speed: comma list of prompt lengths ('' to skip)")
    ap.add_argument("--batch", default="1,8", help="speed: comma list of batch sizes")
    ap.add_argument("--steps", type=int, default=96, help="speed: measured steps per decoder")
    args = ap.parse_args()
    try:
        prompts = [int(v) for v in args.speed_prompts.split(",") if v.strip()]
        batches = [int(v) for v in args.batch.split(",") if v.strip()]
    except ValueError:
        prompts = batches = [0]
    if min(prompts + batches, default=1) < 1 or not batches or args.windows < 0 or args.steps < 2 \
            or args.prompt < 1 or args.tokens < 2:
        print("activations.py: error: --speed-prompts and --batch take comma lists of positive integers, --steps at "
              "least 2, --windows 0 or more, --prompt at least 1, --tokens at least 2", file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    config = load_config(find("configs", "smollm2-135m"))
    loaded = load_model(resolve_model_path(config), weight_dtype="q4_1")
    engines = {name: Engine(dataclasses.replace(loaded, activation_dtype=name), config.kv, decode_path="fast")
               for name in INPUTS}
    print(f"decode path: {engines['q8'].decode_path_note}", file=sys.stderr)
    texts = load_texts()
    if args.windows:
        quality(engines, texts, args.windows, args.prompt, args.tokens)
    if prompts:
        print("\n| P | B | float32 inputs ms/step | int8 inputs ms/step | speed-up [95 % CI] |\n"
              "|---:|---:|---:|---:|---|")
        stream = token_stream(loaded.tokenizer, texts, max(prompts) * max(batches) + 1000)
        for prompt in prompts:
            for batch in batches:
                speed(engines, stream, prompt, batch, args.steps)
    return 0


if __name__ == "__main__":
    sys.exit(main())
