"""Prefill speed per model dtype, interleaved (issue 15: bf16 prefill at least llama.cpp's).

    .venv/bin/python benchmarks/prefill.py [--prompt 512] [--reps 5] [--config smollm2-135m]

Loads the config's model in float32 and in bfloat16, and times `Engine.forward` over the same P
tokens of Austen from an empty cache (H2O off), the two models alternating, one warm-up each, then
--reps rounds; prints tok/s medians and the per-round bf16 / float32 ratio. A bf16 model prefills
through its float32 twin (runtime.Engine.prefill_model); `--bf16-native` also times transformers'
own bf16 forward, for comparison. Timing only: run it alone.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import torch
from rounds import interleaved  # this folder: the shared schedule

from h2okit.clikit import setup_logging
from h2okit.config import load_config, parse_config
from h2okit.corpus import load_texts, token_stream
from h2okit.model import load_model, resolve_model_path
from h2okit.resources import find
from h2okit.runtime import Engine


def prefill_tps(engine: Engine, prompt: list[int], model=None) -> float:
    """Tokens per second of one prefill from an empty cache (`model`: another forward, e.g. bf16 native)."""
    if model is not None:
        engine.prefill_model = model
    cache = engine.new_cache()
    start = time.perf_counter()
    engine.forward(cache, prompt, 0)
    return len(prompt) / (time.perf_counter() - start)


def main() -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", default="smollm2-135m")
    ap.add_argument("--bf16-native", action="store_true", help="also time transformers' bf16 forward")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    path = resolve_model_path(load_config(find("configs", args.config)))
    kv = parse_config({}).kv
    engines = {"fp32": Engine(load_model(path, dtype="float32"), kv, decode_path="reference"),
               "bf16 (float32 compute)": Engine(load_model(path, dtype="bfloat16"), kv, decode_path="reference")}
    runs = {name: (lambda eng: lambda p: prefill_tps(eng, p))(e) for name, e in engines.items()}
    if args.bf16_native:
        native = Engine(engines["bf16 (float32 compute)"].loaded, kv, decode_path="reference")
        runs["bf16 (transformers bf16)"] = lambda p: prefill_tps(native, p, native.model)
    prompt = token_stream(engines["fp32"].loaded.tokenizer, load_texts(), args.prompt)
    samples = interleaved({name: functools.partial(run, prompt) for name, run in runs.items()}, args.reps)
    print(f"\nprefill P={args.prompt}, {args.threads} threads, medians of {args.reps} interleaved rounds")
    print("| model | tok/s | per-round ratio to fp32 (median) |\n|---|---:|---:|")
    for name, values in samples.items():
        ratio = statistics.median(v / f for v, f in zip(values, samples["fp32"]))
        print(f"| {name} | {statistics.median(values):.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
