"""Where a fused decode step's time goes, phase by phase, against what memory allows.

    .venv/bin/python benchmarks/step_phases.py [--weights bf16] [--prompt 512] [--batch 1] [--steps 64]
                                               [--cache-dtype float32|float16|bfloat16] [--inputs fp32|q8]
                                               [--config smollm2-135m]

The kernels are built once more with -DH2K_PROFILE (`kernels.load_profiled`): timers around each
phase of the fused step (`h2k_decode_step`; the shipped build has none, its machine code the same). B
prompts of Austen are prefilled, a few steps warm up, then --steps fused steps are timed: per phase,
milliseconds a step, its share of the step, the megabytes it reads a step (its matrices' weights; for
the attention the K/V its caches hold) and the GB/s that makes, also as a fraction of `roofline.py`'s
read probe (the higher of before and after). The attention's logits, softmax and values are OpenMP
thread 0's own time (with B at least the threads, its own sequences), then thread 1's: the
attention's wall time beyond each thread's phases is its waits at barriers, joins and partial sums.
Python is the step's wall time outside the C call, split by wrappers (time.perf_counter, ~1 us each)
around the decoder's slot refresh, embedding and logits buffer and each cache's bookkeeping (scores,
trigger clock, evictions). The last lines set the step against its roofline (all bytes at the
probe's speed) and say how much of the gap each part takes.
The default config decodes with H2O off; --config names another (its codec off, so every step is
fused). Timing only: run it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time

import torch
from roofline import read_bandwidth  # this folder: the one read probe

from h2okit import kernels
from h2okit.clikit import OneLineParser, setup_logging
from h2okit.config import ACTIVATION_DTYPES, CACHE_DTYPES, WEIGHT_DTYPES, ConfigError, load_config
from h2okit.corpus import load_texts, token_stream
from h2okit.model import load_model, resolve_model_path
from h2okit.resources import find
from h2okit.runtime import Engine

# How to print each of the kernels' phases (kernels.PhaseTimers.names; llama_decode.c, H2K_PROFILE says what
# each covers). A phase named after a DecodeWeights field reads that field's matrices.
LABELS = {"qkv": "norm + qkv GEMV", "rope": "q/k norms, RoPE, K/V stores", "attention": "attention",
          "logits": "  attention: logits (thread 0)", "softmax": "  attention: softmax + mass (thread 0)",
          "values": "  attention: values (thread 0)", "logits_thread1": "  attention: logits (thread 1)",
          "softmax_thread1": "  attention: softmax + mass (thread 1)",
          "values_thread1": "  attention: values (thread 1)", "o": "o GEMV (+ norm, residual)",
          "gate_up": "norm + gate/up GEMV", "act": "activation", "down": "down GEMV (+ norm, residual)",
          "head": "final norm + lm_head GEMV"}
GEMVS = ("qkv", "o", "gate_up", "down", "head")
THREAD0 = ("logits", "softmax", "values")
THREAD1 = tuple(f"{name}_thread1" for name in THREAD0)  # (zero with one thread)
# the Python parts of a step timed by wrapping: label -> the decoder's method
PYTHON_PARTS = {"slots (_fill_layer_caches)": "_fill_layer_caches", "embedding (_embed)": "_embed",
                "logits buffer (_new_logits)": "_new_logits"}
BOOKKEEPING = "bookkeeping: scores, clock, evictions (after_fused_step)"


def timed(owner, method: str, totals: dict[str, float], label: str) -> None:
    """owner.method replaced, on the instance, by a wrapper that adds its wall time to totals[label]."""
    inner = getattr(owner, method)

    def wrapper(*args, **kwargs):
        started = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            totals[label] += time.perf_counter() - started
    setattr(owner, method, wrapper)


def main() -> int:
    setup_logging()
    ap = OneLineParser(prog="step_phases", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--weights", default="bf16", choices=WEIGHT_DTYPES)
    ap.add_argument("--inputs", default="fp32", choices=ACTIVATION_DTYPES,
                    help="llm_activation_dtype: the quantized matrices' inputs")
    ap.add_argument("--cache-dtype", choices=CACHE_DTYPES, help="kv_cache_dtype (default: the config's)")
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=64, help="timed steps (after 8 warm-up steps)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--config", default="smollm2-135m",
                    help="config (shipped name or path) whose model and KV settings to decode with; codec off")
    args = ap.parse_args()
    if args.batch < 1 or args.steps < 1 or args.prompt < 1 or args.threads < 1:
        ap.error("--batch, --steps, --prompt and --threads take positive integers")
    try:
        config = load_config(find("configs", args.config))
    except ConfigError as err:
        ap.error(str(err))
    kv = dataclasses.replace(config.kv, lossless_enable=False)
    if args.cache_dtype:
        kv = dataclasses.replace(kv, cache_dtype=args.cache_dtype)
    torch.set_num_threads(args.threads)
    loaded = load_model(resolve_model_path(config), weight_dtype=args.weights, activation_dtype=args.inputs)
    engine = Engine(loaded, kv, decode_path="fast")
    fast = engine.fast
    fast.adapt_threads = False
    stream = token_stream(loaded.tokenizer, load_texts(), args.prompt * args.batch + 1000)
    prompts = [stream[i * args.prompt:(i + 1) * args.prompt] for i in range(args.batch)]

    fast.lib, timers = kernels.load_profiled()
    caches = [engine.new_cache() for _ in prompts]
    feed = [int(engine.forward(cache, prompt, 0)[-1].argmax()) for cache, prompt in zip(caches, prompts)]
    python = dict.fromkeys([*PYTHON_PARTS, BOOKKEEPING], 0.0)
    for label, method in PYTHON_PARTS.items():
        timed(fast, method, python, label)
    for cache in caches:
        timed(cache, "after_fused_step", python, BOOKKEEPING)
    fused_steps = 0
    fused_step = fast._fused_step

    def counted_fused_step(*args):
        nonlocal fused_steps
        fused = fused_step(*args)
        fused_steps += fused
        return fused
    fast._fused_step = counted_fused_step
    position = args.prompt
    wall, kv_bytes = 0.0, 0
    bandwidth_before = max(read_bandwidth())
    for step in range(8 + args.steps):
        if step == 8:  # the warm-up's timers dropped
            timers.take()
            wall, kv_bytes = 0.0, 0
            for label in python:
                python[label] = 0.0
        kv_bytes += sum(cache.physical_bytes for cache in caches)
        started = time.perf_counter()
        logits = fast.step_batch(caches, feed, [position] * len(caches))
        wall += time.perf_counter() - started
        feed = logits.argmax(-1).tolist()
        position += 1
        if step % 16 == 15:
            print(f"  step {step + 1}/{8 + args.steps}", file=sys.stderr, flush=True)
    seconds = timers.take()
    if fused_steps < 8 + args.steps:
        ap.error(f"{8 + args.steps - fused_steps} of {8 + args.steps} steps ran one call per layer, not the fused "
                 f"step (the config's store mode or scorer needs it), and their phases are not timed; use a config "
                 f"whose every layer takes the fused step")
    bandwidth = max(bandwidth_before, *read_bandwidth())
    names = timers.names

    per_step = {name: total / args.steps for name, total in seconds.items()}
    step_s = wall / args.steps
    weights = fast.weights
    weight_mb = {name: sum(m.nbytes for m in getattr(weights, name)) / 1e6 for name in GEMVS if name != "head"}
    weight_mb["head"] = weights.head.nbytes / 1e6  # one matrix; the others, one per layer
    kv_mb = kv_bytes / args.steps / 1e6
    read_mb = {**weight_mb, "attention": kv_mb}
    total_mb = sum(read_mb.values())

    top = [n for n in names if n != "step" and n not in THREAD0 + THREAD1]
    rows = []
    for name in names:
        if name == "step":
            continue
        rows.append((LABELS.get(name, name), per_step[name], read_mb.get(name)))
        if name == THREAD0[-1]:
            inside = sum(per_step[n] for n in THREAD0)
            rows.append(("  attention: barriers, joins, partial sums", per_step["attention"] - inside, None))
        if name == THREAD1[-1] and any(per_step[n] for n in THREAD1):
            inside = sum(per_step[n] for n in THREAD1)
            rows.append(("  attention: thread 1 outside its phases", per_step["attention"] - inside, None))
    rows.append(("C between the phases (per-layer setup)", per_step["step"] - sum(per_step[n] for n in top), None))
    python_s = step_s - per_step["step"]
    rows.append(("Python", python_s, None))
    for label, total in python.items():
        rows.append(("  Python: " + label, total / args.steps, None))
    rows.append(("  Python: the rest (step_batch, thread choice, buffers)",
                 python_s - sum(python.values()) / args.steps, None))

    print(f"{args.weights} weights ({weights.description}; {fast.inputs_note}), K/V "
          f"{kv.cache_dtype}, P={args.prompt}, B={args.batch}, {args.steps} steps, {args.threads} threads; "
          f"probe {bandwidth:.1f} GB/s ({bandwidth_before:.1f} before)")
    print("| phase | ms / step | share | MB read / step | GB/s | of the probe |")
    print("|---|---:|---:|---:|---:|---:|")
    for label, s, mb in rows:
        gbs = f"{mb / 1e3 / s:.1f} | {mb / 1e3 / s / bandwidth:.2f}" if mb and s > 0 else " | "
        print(f"| {label} | {s * 1e3:.3f} | {s / step_s:.1%} | {f'{mb:.1f}' if mb else ''} | {gbs} |")
    print(f"| **step** | **{step_s * 1e3:.3f}** | 100% | {total_mb:.1f} | "
          f"{total_mb / 1e3 / step_s:.1f} | {total_mb / 1e3 / step_s / bandwidth:.2f} |")

    roofline_s = total_mb / 1e3 / bandwidth
    gemv_s = sum(per_step[n] for n in GEMVS)
    gemv_floor = sum(weight_mb.values()) / 1e3 / bandwidth
    gaps = {"GEMVs beyond their bytes at the probe's speed": gemv_s - gemv_floor,
            "attention beyond its K/V at the probe's speed": per_step["attention"] - kv_mb / 1e3 / bandwidth,
            "the rest of the C call": per_step["step"] - gemv_s - per_step["attention"],
            "Python": python_s}
    print(f"\nroofline {roofline_s * 1e3:.3f} ms a step (all {total_mb:.1f} MB at {bandwidth:.1f} "
          f"GB/s): the step is {roofline_s / step_s:.2f} of it; the {(step_s - roofline_s) * 1e3:.3f} ms beyond:")
    for label, s in gaps.items():
        print(f"  {label}: {s * 1e3:.3f} ms ({s / (step_s - roofline_s):.0%})" if step_s > roofline_s else
              f"  {label}: {s * 1e3:.3f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
