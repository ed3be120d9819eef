"""Quality of h2o against the baselines at the same kept budget, on the default model.

    .venv/bin/python benchmarks/quality.py [--prompt 512] [--tokens 128] [--windows 6]

Seed configuration (block 32, sink 16, recent 64, adaptive 3.0, interval 16, trigger 384,
layers 2..29); only kv_h2o_policy changes (h2o_prefill: h2o that also scores the prompt's attention,
an opt-in beyond the SPEC): h2o / streaming (sink + recent, the budget extends
the recent window) / random (seeded) / full. Per policy: perplexity increase over the full
cache on one window per text (mean ± sample std over windows), greedy agreement with the
full cache over 64 generated tokens, passkey accuracy at 3 depths, and the wall time of
the quality evaluation.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from h2okit.clikit import setup_logging
from h2okit.config import load_config, parse_config
from h2okit.corpus import load_texts, token_stream
from h2okit.model import load_model, resolve_model_path
from h2okit.quality import QualityEvaluator, QualitySettings
from h2okit.runtime import Engine

ROOT = Path(__file__).resolve().parents[1]
# variant name -> config overrides on top of the seed configuration
VARIANTS = {
    "h2o": {"kv_h2o_policy": "h2o"},
    "h2o_prefill": {"kv_h2o_policy": "h2o", "kv_h2o_score_prefill": True},  # H2O paper: score the prompt too
    "h2o_a99": {"kv_h2o_policy": "h2o", "kv_h2o_ema_alpha": 0.99},
    "h2o_prefill_a99": {"kv_h2o_policy": "h2o", "kv_h2o_score_prefill": True, "kv_h2o_ema_alpha": 0.99},
    "streaming": {"kv_h2o_policy": "streaming"},
    "random": {"kv_h2o_policy": "random"},
    "full": {"kv_h2o_policy": "full"},
}


def main() -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--policies", default="h2o,streaming,random,full", help=f"from {', '.join(VARIANTS)}")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(2)
    seed_raw = json.loads((ROOT / "configs" / "smollm2-135m-seed.json").read_text())
    loaded = load_model(resolve_model_path(load_config(ROOT / "configs" / "smollm2-135m-seed.json")))
    texts = load_texts()
    prompt = token_stream(loaded.tokenizer, texts, args.prompt)
    settings = QualitySettings(windows=args.windows, tokens=args.tokens)
    results = {}
    print(f"P={args.prompt}, M={args.tokens} scored tokens x {args.windows} windows, greedy {args.gen} tokens")
    print("| policy | kept budget | ppl increase % (mean ± sd over windows) | token agreement | first divergence "
          "| passkey (full cache) | quality eval s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for policy in args.policies.split(","):
        kv = parse_config({**seed_raw, **VARIANTS[policy]}).kv
        engine = Engine(loaded, kv)
        started = time.perf_counter()
        result = engine.generate(prompt, args.gen)
        q = QualityEvaluator(engine, texts, settings).evaluate(args.prompt, prompt, [result.tokens])
        seconds = time.perf_counter() - started
        deltas = q["ppl_delta_pct"]
        row = {"keep": result.stats.h2o_keep, "ppl_delta_pct_mean": statistics.fmean(deltas),
               "ppl_delta_pct_sd": statistics.stdev(deltas) if len(deltas) > 1 else 0.0, "ppl_delta_pct": deltas,
               "token_agreement": q["token_agreement"][0], "first_divergence": q["first_divergence"][0],
               "passkey_acc": statistics.fmean(q["passkey_acc"]),
               "passkey_full_acc": statistics.fmean(q["passkey_full_acc"]),
               "seconds": seconds}
        results[policy] = row
        print(f"| {policy} | {row['keep']:.4f} | {row['ppl_delta_pct_mean']:+.2f} ± {row['ppl_delta_pct_sd']:.2f} | "
              f"{row['token_agreement']:.3f} | {row['first_divergence']:.0f} | {row['passkey_acc']:.2f} "
              f"({row['passkey_full_acc']:.2f}) | {seconds:.0f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
