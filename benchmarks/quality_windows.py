"""How many perplexity windows does a configuration need for a given CI half-width?

    .venv/bin/python benchmarks/quality_windows.py [--config configs/smollm2-135m-seed.json] [--prompt 512]
                                                   [--windows 54] [--half-width 1.5]

Runs the quality protocol (quality.py: prefill P, teacher-force M=256, steady targets) on the first
--windows windows of corpus.window_plan and prints the per-window ppl increases, their sd, the 95 %
t-CI half-width at every count, and the smallest count whose half-width is <= --half-width (from
this sample's sd: an estimate, as any power calculation). The kit's default (corpus.DEFAULT_WINDOWS)
comes from this run on the seed configuration.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from h2okit.clikit import setup_logging
from h2okit.config import load_config
from h2okit.corpus import DEFAULT_TOKENS, load_texts
from h2okit.model import load_model, resolve_model_path
from h2okit.quality import QualityEvaluator, QualitySettings
from h2okit.runtime import Engine
from h2okit.stats import mean_ci, t_quantile

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2-135m-seed.json"))
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    ap.add_argument("--windows", type=int, default=54)
    ap.add_argument("--half-width", type=float, default=1.5)
    args = ap.parse_args()
    setup_logging()
    torch.set_num_threads(2)
    config = load_config(args.config)
    loaded = load_model(resolve_model_path(config))
    engine = Engine(loaded, config.kv)
    started = time.perf_counter()
    q = QualityEvaluator(engine, load_texts(), QualitySettings(windows=args.windows, tokens=args.tokens,
                                                               passkey_depths=())).perplexity(args.prompt)
    deltas = np.asarray(q["ppl_delta_pct"])
    print(f"{args.config}: P={args.prompt}, M={args.tokens}, {len(deltas)} windows in "
          f"{time.perf_counter() - started:.0f} s; attended fraction {np.mean(q['attended_fraction']):.3f}")
    print("per-window ppl increase %:", " ".join(f"{d:+.2f}" for d in deltas))
    ci = mean_ci(deltas)
    print(f"mean {ci.text('%+.2f', ' %')} (95% t-CI over {ci.n} windows), sd {ci.sd:.2f}")
    needed = None
    for n in range(2, 10 * len(deltas)):
        half = t_quantile(n) * ci.sd / math.sqrt(n)
        if n <= len(deltas) and n in (3, 6, 12, 24, 36, 48, len(deltas)):
            measured = mean_ci(deltas[:n])
            print(f"  n={n:3d}: half-width from this sd {half:.2f}; measured on the first {n}: "
                  f"{measured.half_width:.2f}")
        if needed is None and half <= args.half_width:
            needed = n
    print(f"windows for a 95% half-width <= {args.half_width}: {needed} (from sd {ci.sd:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
