"""Eviction policies compared at a matched attended fraction, with paired CIs over windows.

    .venv/bin/python benchmarks/policies.py [--prompt 512] [--windows 12] [--json OUT]

The protocol (SPEC §10, the policy issue): prefill P tokens of a window with the full cache, then
teacher-force M=256 tokens one decode step at a time; every layer evicts (trigger 64, every 16
steps) under budget basis `seen`; the steady targets (predicted after the first eviction) are
scored against the full cache on the same targets. Windows: corpus.window_plan (Emma, Pride and
Prejudice, Persuasion, Sense and Sensibility at 0.3, the other two novels at 0.3, then all six at
0.7). The keep ratio is set per variant so that the steady attended fraction (mean over steps and
layers of (cache length before the step + 1) / tokens seen) is --attended (1/3): it depends only
on the budget schedule, not on which tokens are kept, so it is found by simulating the schedule.

Per variant: the attended fraction, the ppl increase (mean and 95 % t-CI over windows), and the
paired per-window difference to streaming and to random (95 % t-CIs). Last, what the windows can
resolve: the difference to streaming of a policy that loses nothing in any window (the full cache).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from h2okit.clikit import setup_logging
from h2okit.config import parse_config
from h2okit.corpus import load_texts
from h2okit.model import load_model, resolve_model_path
from h2okit.policy import LayerPolicy, PlanParams
from h2okit.quality import QualityEvaluator, QualitySettings
from h2okit.runtime import Engine
from h2okit.stats import mean_ci, paired_ci

ROOT = Path(__file__).resolve().parents[1]
INTERVAL, TRIGGER = 16, 64
LAYERS = 30  # SmolLM2-135M
SMALL_FLOORS = {"kv_h2o_block_tokens": 1, "kv_h2o_sink_tokens": 4, "kv_h2o_recent_tokens": 16}
# variant -> config overrides on top of: all layers evict, static target, basis seen.
VARIANTS = {
    "streaming": {"kv_h2o_policy": "streaming", **SMALL_FLOORS},
    "random": {"kv_h2o_policy": "random", **SMALL_FLOORS},
    "h2o_seed_floors": {"kv_h2o_policy": "h2o", "kv_h2o_block_tokens": 32, "kv_h2o_sink_tokens": 16,
                        "kv_h2o_recent_tokens": 64},
    "h2o": {"kv_h2o_policy": "h2o", **SMALL_FLOORS},
    "h2o_a95": {"kv_h2o_policy": "h2o", "kv_h2o_ema_alpha": 0.95, **SMALL_FLOORS},
    "h2o_a98": {"kv_h2o_policy": "h2o", "kv_h2o_ema_alpha": 0.98, **SMALL_FLOORS},
    "h2o_a80": {"kv_h2o_policy": "h2o", "kv_h2o_ema_alpha": 0.8, **SMALL_FLOORS},
    "h2o_prefill": {"kv_h2o_policy": "h2o", "kv_h2o_score_prefill": True, **SMALL_FLOORS},
    "h2o_r32": {"kv_h2o_policy": "h2o", **SMALL_FLOORS, "kv_h2o_recent_tokens": 32},
    "h2o_r64": {"kv_h2o_policy": "h2o", **SMALL_FLOORS, "kv_h2o_recent_tokens": 64},
    "h2o_b4": {"kv_h2o_policy": "h2o", "kv_h2o_block_tokens": 4, "kv_h2o_sink_tokens": 4, "kv_h2o_recent_tokens": 16},
    "h2o_b8": {"kv_h2o_policy": "h2o", "kv_h2o_block_tokens": 8, "kv_h2o_sink_tokens": 8, "kv_h2o_recent_tokens": 16},
    "h2o_vnorm": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, **SMALL_FLOORS},
    "h2o_vnorm_snap32": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, "kv_h2o_score_prefill": True,
                         "kv_h2o_score_prefill_rows": 32, **SMALL_FLOORS},
    "h2o_vnorm_a80": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, "kv_h2o_ema_alpha": 0.8, **SMALL_FLOORS},
    "h2o_vnorm_a95": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, "kv_h2o_ema_alpha": 0.95, **SMALL_FLOORS},
    "h2o_vnorm_a98": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, "kv_h2o_ema_alpha": 0.98, **SMALL_FLOORS},
    "h2o_vnorm_pool3": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, "kv_h2o_score_pool": 3, **SMALL_FLOORS},
    "h2o_vnorm_pool7": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, "kv_h2o_score_pool": 7, **SMALL_FLOORS},
    "h2o_vnorm_snap32_pool7": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, "kv_h2o_score_prefill": True,
                               "kv_h2o_score_prefill_rows": 32, "kv_h2o_score_pool": 7, **SMALL_FLOORS},
    "h2o_vnorm_r64": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, **SMALL_FLOORS, "kv_h2o_recent_tokens": 64},
    "h2o_vnorm_r128": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, **SMALL_FLOORS, "kv_h2o_recent_tokens": 128},
    "h2o_vnorm_r256": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, **SMALL_FLOORS, "kv_h2o_recent_tokens": 256},
    "h2o_vnorm_prefill": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, "kv_h2o_score_prefill": True,
                          **SMALL_FLOORS},
    "h2o_vnorm_prefill_a98": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, "kv_h2o_score_prefill": True,
                              "kv_h2o_ema_alpha": 0.98, **SMALL_FLOORS},
    "mean_vnorm_prefill": {"kv_h2o_policy": "mean", "kv_h2o_value_norm": True, "kv_h2o_score_prefill": True,
                           **SMALL_FLOORS},
    "mean_vnorm_prefill_r64": {"kv_h2o_policy": "mean", "kv_h2o_value_norm": True, "kv_h2o_score_prefill": True,
                               **SMALL_FLOORS, "kv_h2o_recent_tokens": 64},
    "h2o_vnorm_prefill_r64": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, "kv_h2o_score_prefill": True,
                              **SMALL_FLOORS, "kv_h2o_recent_tokens": 64},
    "window_vnorm": {"kv_h2o_policy": "window", "kv_h2o_value_norm": True, **SMALL_FLOORS},
    "mean_vnorm": {"kv_h2o_policy": "mean", "kv_h2o_value_norm": True, **SMALL_FLOORS},
    "tova_vnorm": {"kv_h2o_policy": "tova", "kv_h2o_value_norm": True, **SMALL_FLOORS},
    "h2o_vnorm_head": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, "kv_h2o_per_head": True, **SMALL_FLOORS},
    "h2o_vnorm_l2": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, "kv_h2o_layer_start": 2,
                     **SMALL_FLOORS},  # layers 0-1 keep everything; the others a smaller budget, same total
    "h2o_pyramid": {"kv_h2o_policy": "h2o", "kv_h2o_layer_budget_slope": 0.5, **SMALL_FLOORS},
    "h2o_inv_pyramid": {"kv_h2o_policy": "h2o", "kv_h2o_layer_budget_slope": -0.5, **SMALL_FLOORS},
    "h2o_head": {"kv_h2o_policy": "h2o", "kv_h2o_per_head": True, **SMALL_FLOORS},
    "tova": {"kv_h2o_policy": "tova", **SMALL_FLOORS},
    "tova_head": {"kv_h2o_policy": "tova", "kv_h2o_per_head": True, **SMALL_FLOORS},
    "mean": {"kv_h2o_policy": "mean", **SMALL_FLOORS},
    "mean_prefill": {"kv_h2o_policy": "mean", "kv_h2o_score_prefill": True, **SMALL_FLOORS},
    "mean_head": {"kv_h2o_policy": "mean", "kv_h2o_per_head": True, **SMALL_FLOORS},
    "window": {"kv_h2o_policy": "window", **SMALL_FLOORS},
    "window_head": {"kv_h2o_policy": "window", "kv_h2o_per_head": True, **SMALL_FLOORS},
    "h2o_vnorm_pyramid": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, "kv_h2o_layer_budget_slope": 0.5,
                          **SMALL_FLOORS},
    "h2o_vnorm_inv_pyramid": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, "kv_h2o_layer_budget_slope": -0.5,
                              **SMALL_FLOORS},
    "h2o_vnorm_l1": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, "kv_h2o_layer_start": 1, **SMALL_FLOORS},
    "h2o_vnorm_sink16": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, **SMALL_FLOORS, "kv_h2o_sink_tokens": 16},
    "h2o_vnorm_sink8": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, **SMALL_FLOORS, "kv_h2o_sink_tokens": 8},
    "h2o_vnorm_sink32": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, **SMALL_FLOORS, "kv_h2o_sink_tokens": 32},
    "h2o_vnorm_prefill_sink16": {"kv_h2o_policy": "h2o", "kv_h2o_value_norm": True, "kv_h2o_score_prefill": True,
                                 **SMALL_FLOORS, "kv_h2o_sink_tokens": 16},
    "streaming_sink16": {"kv_h2o_policy": "streaming", **SMALL_FLOORS, "kv_h2o_sink_tokens": 16},
    "expected_vnorm": {"kv_h2o_policy": "expected", "kv_h2o_value_norm": True, **SMALL_FLOORS},
    "expected_vnorm_head": {"kv_h2o_policy": "expected", "kv_h2o_value_norm": True, "kv_h2o_per_head": True,
                            **SMALL_FLOORS},
    "expected_vnorm_head_q128": {"kv_h2o_policy": "expected", "kv_h2o_value_norm": True, "kv_h2o_per_head": True,
                                 "kv_h2o_query_window": 128, **SMALL_FLOORS},
    "expected_vnorm_head_r64": {"kv_h2o_policy": "expected", "kv_h2o_value_norm": True, "kv_h2o_per_head": True,
                                **SMALL_FLOORS, "kv_h2o_recent_tokens": 64},
    "expected_vnorm_head_h0": {"kv_h2o_policy": "expected", "kv_h2o_value_norm": True, "kv_h2o_per_head": True,
                               "kv_h2o_query_horizon": 0, **SMALL_FLOORS},
    "expected_vnorm_head_h64": {"kv_h2o_policy": "expected", "kv_h2o_value_norm": True, "kv_h2o_per_head": True,
                                "kv_h2o_query_horizon": 64, **SMALL_FLOORS},
    "expected_vnorm_h0": {"kv_h2o_policy": "expected", "kv_h2o_value_norm": True, "kv_h2o_query_horizon": 0,
                          **SMALL_FLOORS},
}
DEFAULT_VARIANTS = "streaming,random,h2o_seed_floors,h2o,tova,h2o_vnorm"


def base_config(overrides: dict, keep: float) -> dict:
    seed = json.loads((ROOT / "configs" / "smollm2-135m-seed.json").read_text())
    return {**seed, "kv_h2o_enable": True, "kv_h2o_layer_start": 0, "kv_h2o_layer_end": -1,
            "kv_h2o_target_mode": "static", "kv_h2o_target_keep_ratio": keep, "kv_h2o_budget_basis": "seen",
            "kv_h2o_update_interval": INTERVAL, "kv_h2o_trigger_min_tokens": TRIGGER,
            "kv_lossless_enable": False, **overrides}


def simulated_attended(kv_cfg, prompt: int, tokens: int) -> float:
    """The steady attended fraction of one evicting layer's budget schedule (policy-independent)."""
    params = PlanParams(kv_cfg.h2o_block_tokens, kv_cfg.h2o_sink_tokens, kv_cfg.h2o_recent_tokens,
                        kv_cfg.keep_ratio, budget_basis=kv_cfg.h2o_budget_basis,
                        budget_tokens=kv_cfg.h2o_budget_tokens)
    layer = LayerPolicy(0, params, 0.9, kv_cfg.h2o_update_interval, kv_cfg.h2o_trigger_min_tokens,
                        policy="streaming")
    kv, attended, steady_from, evicted = prompt, [], None, False
    for i in range(tokens - 1):
        if evicted and steady_from is None:
            steady_from = i + 1
        attended.append((kv + 1) / (prompt + i + 1))
        kv += 1
        layer.tick()
        event = layer.maybe_plan(kv, prompt + i + 1)
        if event is not None:
            kv = event.plan.kept_tokens
            layer.applied(event.plan)
            evicted = True
    return float(np.mean(attended[(steady_from or tokens) - 1:]))


def calibrated_keep(overrides: dict, prompt: int, tokens: int, target: float) -> tuple[float, float]:
    """The keep ratio whose simulated steady attended fraction is closest to `target` (bisection). Layers
    outside the evicting range attend to everything (fraction 1), so the evicting ones get less."""
    full = overrides.get("kv_h2o_layer_start", 0)
    target = (LAYERS * target - full) / (LAYERS - full)
    lo, hi = 0.01, 0.99
    for _ in range(40):
        mid = (lo + hi) / 2
        if simulated_attended(parse_config(base_config(overrides, mid)).kv, prompt, tokens) < target:
            lo = mid
        else:
            hi = mid
    keep = (lo + hi) / 2
    evicting = simulated_attended(parse_config(base_config(overrides, keep)).kv, prompt, tokens)
    return keep, (full + (LAYERS - full) * evicting) / LAYERS


def variant_names(text: str, program: str) -> list[str] | None:
    """The variants named in a comma list, or None after one error line when any is unknown or none is named."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        wrong = f"unknown variant(s) {', '.join(unknown)}" if unknown else "no variant named"
        print(f"{program}: error: --policies: {wrong}; allowed: {', '.join(VARIANTS)}", file=sys.stderr)
        return None
    return names


def main() -> int:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=256, help="M: teacher-forced tokens per window")
    ap.add_argument("--windows", type=int, default=12)
    ap.add_argument("--attended", type=float, default=1 / 3, help="the matched attended fraction")
    ap.add_argument("--policies", default=DEFAULT_VARIANTS, help=f"comma list from: {', '.join(VARIANTS)}")
    ap.add_argument("--decode-path", default="auto", choices=("auto", "fast", "reference"))
    ap.add_argument("--json", type=Path, default=None, help="write the results here (merged with its content)")
    args = ap.parse_args()
    names = variant_names(args.policies, "policies.py")
    if names is None:
        return 2
    for needed in ("streaming", "random"):
        if needed not in names:
            names.insert(0, needed)
    torch.set_num_threads(2)
    seed_cfg = parse_config(base_config({}, 0.5))
    loaded = load_model(resolve_model_path(seed_cfg))
    texts = load_texts()
    settings = QualitySettings(windows=args.windows, tokens=args.tokens, passkey_depths=())
    print(f"P={args.prompt}, M={args.tokens}, {args.windows} windows, all layers evict (trigger {TRIGGER}, every "
          f"{INTERVAL} steps, basis seen), keep ratio calibrated to attended {args.attended:.3f}", flush=True)
    results: dict[str, dict] = {}
    deltas: dict[str, np.ndarray] = {}
    for name in names:
        keep, simulated = calibrated_keep(VARIANTS[name], args.prompt, args.tokens, args.attended)
        kv = parse_config(base_config(VARIANTS[name], keep)).kv
        engine = Engine(loaded, kv, decode_path=args.decode_path)
        started = time.perf_counter()
        q = QualityEvaluator(engine, texts, settings).perplexity(args.prompt)
        deltas[name] = np.asarray(q["ppl_delta_pct"])
        ci = mean_ci(deltas[name])
        results[name] = {"keep": keep, "attended": float(np.mean(q["attended_fraction"])),
                         "attended_simulated": simulated, "delta_pct": ci.mean, "ci95": [ci.lo, ci.hi],
                         "per_window": deltas[name].tolist(), "ppl_full": float(np.mean(q["ppl_full"])),
                         "seconds": time.perf_counter() - started, "config": VARIANTS[name]}
        print(f"  {name}: attended {results[name]['attended']:.4f} (keep {keep:.4f}), ppl {ci.text('%+.2f', ' %')} "
              f"({results[name]['seconds']:.0f} s)", flush=True)
    for name, row in results.items():
        for base in ("streaming", "random"):
            d = paired_ci(deltas[name], deltas[base])
            row[f"vs_{base}"] = {"mean": d.mean, "ci95": [d.lo, d.hi], "method": "t"}
    print("\n| policy | attended | ppl increase % [95% CI] | vs streaming [95% CI] | vs random [95% CI] |")
    print("| --- | ---: | --- | --- | --- |")
    for name, row in sorted(results.items(), key=lambda kv: kv[1]["delta_pct"]):
        fmt = lambda d: f"{d['mean']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}]"  # noqa: E731
        print(f"| {name} | {row['attended']:.3f} | {row['delta_pct']:+.2f} [{row['ci95'][0]:+.2f}, "
              f"{row['ci95'][1]:+.2f}] | {fmt(row['vs_streaming'])} | {fmt(row['vs_random'])} |")
    # what these windows can resolve: a policy that lost nothing in any window (the full cache itself)
    lossless = paired_ci(np.zeros_like(deltas["streaming"]), deltas["streaming"])
    print(f"\nfull-cache ppl over the steady targets: {np.mean([r['ppl_full'] for r in results.values()]):.2f}; "
          f"CIs: Student t over {args.windows} windows (paired per window for the differences)")
    print(f"a policy losing nothing in any window (the full cache) would be {lossless.mean:+.2f} "
          f"[{lossless.lo:+.2f}, {lossless.hi:+.2f}] vs streaming on these windows")
    if args.json:
        merged = json.loads(args.json.read_text()) if args.json.is_file() else {}
        merged.setdefault(str(args.prompt), {}).update(results)
        args.json.write_text(json.dumps(merged, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
