"""Decode speed as a fraction of the memory-bandwidth roofline (issue 7).

    .venv/bin/python benchmarks/roofline.py [--prompts 512,2048] [--gen 128] [--reps 3]
    .venv/bin/python benchmarks/roofline.py --h2o-config configs/gemma3-270m-seed.json --weights q8_0
    (the H2O config names the model too: SmolLM2 by default, Gemma 3 270M with its seed config)

1. Measures the machine's read bandwidth right before and after every run (this VM switches
   between ~36 and ~65 GB/s within minutes): a streaming sum over 1 GiB with the kernels' threads
   and with torch's `sum`, medians of 3; the highest figure is that run's roofline bandwidth (the
   strictest choice), and each run's fraction of its roofline is computed before taking medians.
2. Decodes greedily on real text (P prompt tokens of Austen, G new tokens) with, for the GGUF's
   Q4_1 blocks (K/V float32; q4_1_a8: the same with int8 inputs, `llm_activation_dtype` q8),
   float32 and bfloat16 weights (K/V stored in the same dtype), or any `llm_weight_dtype` (q8_0,
   auto) beside the float32 model:
     generate   plain transformers `generate` (SDPA, DynamicCache), H2O off: the baseline (float rows)
     ref+h2o    h2okit's transformers path (reference), seed H2O config (float rows)
     fast       h2okit's fast path, H2O off
     fast+h2o   h2okit's fast path, seed H2O config
   Every configuration runs once per round, rounds interleaved (the first is a warm-up); medians.
3. Roofline tok/s = bandwidth / bytes one decode step must read: the weights (lm_head included,
   the embedding row aside) plus the K/V held at that step, averaged over the G steps (measured
   from the cache, so H2O's evictions count). The seed H2O config is used without its codec.

Prints one table per prompt length, then the issues' checks: fast >= 0.5 x roofline, fast >=
3 x generate, per prompt length fast+h2o against fast (tok/s paired per round, mean ratio with its
95 % t-CI: slower beyond noise only if the CI lies below 1), and at the longest prompt the H2O
speed-up against what the bytes predict (the speed-up paired per round, so both runs see the same
bandwidth phase, then the median).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from pathlib import Path

import torch
from decode_overhead import plain_generate_decode_tps  # this folder: the same baseline measurement

from h2okit.clikit import setup_logging
from h2okit import hugepages, kernels
from h2okit.config import load_config, parse_config
from h2okit.corpus import load_texts, token_stream
from h2okit.fastpath import FastDecoder
from h2okit.model import load_model, resolve_model_path
from h2okit.runtime import Engine, greedy
from h2okit.stats import paired_ci

ROOT = Path(__file__).resolve().parents[1]
GB = 1e9
# weights row -> (transformers model dtype, llm_weight_dtype, K/V dtype, llm_activation_dtype). q4_1 is the
# GGUF's own blocks (Q4_1 layers, Q8_0 lm_head) beside the float32 model it dequantises to; q8_0 and auto
# likewise; q4_1_a8 the same blocks with int8 inputs. The transformers baselines (generate, ref+h2o) run
# once per model dtype, with the first row of that dtype; "vs generate" compares with them.
WEIGHTS = {"q4_1": ("float32", "q4_1", "float32", "fp32"), "q4_1_a8": ("float32", "q4_1", "float32", "q8"),
           "q8_0": ("float32", "q8_0", "float32", "fp32"), "auto": ("float32", "auto", "float32", "fp32"),
           "fp32": ("float32", "fp32", "float32", "fp32"), "bf16": ("bfloat16", "bf16", "bfloat16", "fp32")}


_PROBE: torch.Tensor | None = None


def read_bandwidth(reps: int = 3) -> tuple[float, float]:
    """(kernel, torch) median GB/s of summing 1 GiB of float32 held in huge pages."""
    global _PROBE
    lib = kernels.load()
    if _PROBE is None:  # in huge pages, as the fast path's weights and K/V are (hugepages.py)
        _PROBE = hugepages.empty_bytes(1 << 30).view(torch.float32).fill_(1.0)
    data = _PROBE
    kernel, torch_sum = [], []
    for _ in range(reps):
        start = time.perf_counter()
        lib.h2k_read_sum(kernels.ptr(data), data.numel())
        kernel.append(data.numel() * 4 / (time.perf_counter() - start) / GB)
        start = time.perf_counter()
        data.sum()
        torch_sum.append(data.numel() * 4 / (time.perf_counter() - start) / GB)
    return statistics.median(kernel), statistics.median(torch_sum)


def float_weight_bytes(model) -> int:
    """Weight bytes the transformers forward reads per decode step: every Linear of the layers plus the lm_head."""
    linears = [m for m in model.model.layers.modules() if isinstance(m, torch.nn.Linear)] + [model.lm_head]
    return sum(m.weight.numel() * m.weight.element_size() for m in linears)


def plain_generate(model, prompt: list[int], gen: int, layer_bytes_per_token: int,
                   windows: list[int | None]) -> tuple[float, float]:
    """(decode tok/s, mean K/V bytes per step) of transformers' own generate: the cache grows by one
    token per step, a sliding-window layer holds at most its window."""
    def kv_bytes(tokens: int) -> int:
        return sum(min(tokens, w) if w else tokens for w in windows) * layer_bytes_per_token

    mean = statistics.fmean(kv_bytes(len(prompt) + step + 1) for step in range(gen))
    return plain_generate_decode_tps(model, prompt, gen), mean


def engine_decode(engine: Engine, prompt: list[int], gen: int) -> tuple[float, float]:
    """(decode tok/s, mean K/V bytes held per step) of one greedy request; the byte count is untimed. The
    loop is `Engine.generate`'s (and so llm_bench's): the argmax by `greedy` (numpy), not torch's, which
    took ~0.25 ms a step here against numpy's ~0.09."""
    cache = engine.new_cache()
    token = greedy(engine.forward(cache, prompt, 0)[-1])
    elapsed, kv_bytes = 0.0, 0
    for step in range(gen):
        kv_bytes += cache.physical_bytes  # what this step's attention reads (plus its own token)
        start = time.perf_counter()
        token = greedy(engine.forward(cache, [token], len(prompt) + step)[-1])
        elapsed += time.perf_counter() - start
    return gen / elapsed, kv_bytes / gen


def main() -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", default="512,2048")
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--weights", default="q4_1,fp32,bf16", help=f"comma list from: {', '.join(WEIGHTS)}")
    ap.add_argument("--h2o-config", default=str(ROOT / "configs" / "smollm2-135m-seed.json"),
                    help="the H2O settings and the model (its base_dir / llm_model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    seed = load_config(args.h2o_config)
    h2o_kv = dataclasses.replace(seed.kv, lossless_enable=False)
    texts = load_texts()
    setups = {}  # (weights, variant) -> run(prompt) -> (tok/s, kv bytes)
    weight_bytes, transformers_bytes = {}, {}  # per weights row: what the fast path / transformers read per step
    models = {}
    baseline_row = {}  # model dtype -> the weights row its transformers baselines run with
    for weights in args.weights.split(","):
        model_dtype, weight_dtype, kv_dtype, activation_dtype = WEIGHTS[weights]
        if model_dtype not in models:
            models[model_dtype] = load_model(resolve_model_path(seed), dtype=model_dtype)
        loaded = dataclasses.replace(models[model_dtype], weight_dtype=weight_dtype,
                                     activation_dtype=activation_dtype)
        weight_bytes[weights] = FastDecoder.for_model(loaded).weight_bytes
        transformers_bytes[weights] = float_weight_bytes(loaded.model)
        off = dataclasses.replace(parse_config({}).kv, cache_dtype=kv_dtype)
        on = dataclasses.replace(h2o_kv, cache_dtype=kv_dtype)
        bits = torch.finfo(getattr(torch, kv_dtype)).bits
        layer_bpt = 2 * loaded.kv_heads * loaded.head_dim * bits // 8
        windows = loaded.sliding_windows or [None] * loaded.num_layers
        engines = {"fast": Engine(loaded, off, decode_path="fast"), "fast+h2o": Engine(loaded, on, decode_path="fast")}
        if model_dtype not in baseline_row:  # transformers' own runs depend on the model dtype only
            baseline_row[model_dtype] = weights
            engines["ref+h2o"] = Engine(loaded, on, decode_path="reference")
            setups[(weights, "generate")] = (lambda m, b, w: lambda prompt: plain_generate(m, prompt, args.gen, b, w))(
                loaded.model, layer_bpt, windows)
        for name, engine in engines.items():
            setups[(weights, name)] = (lambda e: lambda prompt: engine_decode(e, prompt, args.gen))(engine)
        tokenizer = loaded.tokenizer

    variants = ("generate", "ref+h2o", "fast", "fast+h2o")
    summary, paired = {}, {}
    for p in [int(x) for x in args.prompts.split(",")]:
        prompt = token_stream(tokenizer, texts, p)
        samples = {key: [] for key in setups}  # per round: (tok/s, mean K/V bytes, bandwidth GB/s)
        for rnd in range(args.reps + 1):  # round 0 is a warm-up
            bandwidth_before = max(read_bandwidth())
            for key, run in setups.items():
                tps, kv_bytes = run(prompt)
                bandwidth_after = max(read_bandwidth())
                if rnd > 0:  # the VM can change phase during a run: the higher probe, the stricter roofline
                    samples[key].append((tps, kv_bytes, max(bandwidth_before, bandwidth_after)))
                bandwidth_before = bandwidth_after
            print(f"  P={p} round {rnd}/{args.reps} done", flush=True)
        for (precision, variant), values in samples.items():
            paired[(p, precision, variant)] = values
        print(f"\nP={p} G={args.gen}: medians of {args.reps} interleaved rounds; each run's roofline uses the "
              f"bandwidth probed right before and after it (the higher)")
        print("| weights | path | tok/s | weights MB | mean K/V MB | bandwidth GB/s | fraction of roofline "
              "| vs generate |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        for precision, fast_bytes in weight_bytes.items():
            for variant in variants:
                if (precision, variant) not in samples:
                    continue
                w = fast_bytes if variant.startswith("fast") else transformers_bytes[precision]
                runs = samples[(precision, variant)]
                tps = statistics.median(r[0] for r in runs)
                kv = statistics.median(r[1] for r in runs)
                bw = statistics.median(r[2] for r in runs)
                fraction = statistics.median(r[0] * (w + r[1]) / (r[2] * GB) for r in runs)
                baseline = samples.get((baseline_row[WEIGHTS[precision][0]], "generate"))
                vs_generate = statistics.median(r[0] / g[0] for r, g in zip(runs, baseline)) if baseline else None
                summary[(p, precision, variant)] = (tps, fraction, vs_generate)
                print(f"| {precision} | {variant} | {tps:.1f} | {w / 1e6:.0f} | {kv / 1e6:.1f} | {bw:.1f} | "
                      f"{fraction:.2f} | {'-' if vs_generate is None else f'{vs_generate:.2f}x'} |")
        print(flush=True)

    print("checks (issue 7):")
    for (p, precision, variant), (_, fraction, vs_generate) in summary.items():
        if variant == "fast":
            versus = "no generate run" if vs_generate is None else \
                f"{vs_generate:.2f} x generate (>= 3: {vs_generate >= 3})"
            print(f"  P={p} {precision}: fast {fraction:.2f} x roofline (>= 0.5: {fraction >= 0.5}), {versus}")
    for (p, precision, variant), runs in paired.items():
        reference = paired.get((p, baseline_row[WEIGHTS[precision][0]], "ref+h2o"))
        if variant == "fast+h2o" and reference:  # paired per round, as below
            ratios = [on[0] / ref[0] for on, ref in zip(runs, reference)]
            print(f"  P={p} {precision}: fast+h2o {statistics.median(ratios):.2f} x the reference path with the "
                  f"same H2O config (per-round pairs {', '.join(f'{r:.2f}' for r in ratios)})")
    for q in sorted({q for q, _, _ in summary}):  # issue 15: fast+h2o never slower than fast beyond noise
        for precision in weight_bytes:
            on_off = paired_ci([on[0] for on in paired[(q, precision, "fast+h2o")]],
                               [off[0] for off in paired[(q, precision, "fast")]], kind="ratio")
            verdict = "slower beyond noise" if on_off.hi < 1 else "not slower beyond noise"
            print(f"  P={q} {precision}: fast+h2o / fast tok/s, paired per round {on_off.text('%.3f')} "
                  f"(95 % t-CI): {verdict}")
    p = max(q for q, _, _ in summary)
    for precision in weight_bytes:
        off_kv = statistics.median(r[1] for r in paired[(p, precision, "fast")])
        on_kv = statistics.median(r[1] for r in paired[(p, precision, "fast+h2o")])
        w = weight_bytes[precision]
        predicted = (w + off_kv) / (w + on_kv)
        # Paired per round (the two runs are adjacent, so they share the VM's bandwidth phase), median.
        ratios = [on[0] / off[0] for off, on in zip(paired[(p, precision, "fast")], paired[(p, precision, "fast+h2o")])]
        measured = statistics.median(ratios)
        share = (measured - 1) / (predicted - 1) if predicted > 1 else float("nan")
        print(f"  P={p} {precision}: H2O speed-up {measured:.3f} (median of per-round pairs "
              f"{', '.join(f'{r:.3f}' for r in ratios)}), bytes predict {predicted:.3f} "
              f"(measured/predicted {measured / predicted:.3f}; share of the predicted gain {share:.2f})")


if __name__ == "__main__":
    main()
