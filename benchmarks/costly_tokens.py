"""Where a policy's perplexity increase comes from: the target tokens that cost the most, per window.

    .venv/bin/python benchmarks/costly_tokens.py [--prompt 2048] [--windows 6] [--top 5]
                                                  [--policies streaming,random,h2o_vnorm]

The protocol and variants of policies.py (keep ratio calibrated to attended 1/3). Per window it
prints the steady targets' mean NLL increase over the full cache per policy, then each policy's
--top targets by NLL increase (the token, its NLL with the full cache and under the policy) and
what share of the window's summed increase those targets carry. A window where a few tokens carry
the loss for every policy (a name recalled from far back) cannot be told apart by which tokens a
policy keeps by attention; one where the loss is spread can.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np
import torch
from policies import VARIANTS, base_config, calibrated_keep, variant_names  # this folder: the same protocol

from h2okit.clikit import setup_logging
from h2okit.config import parse_config
from h2okit.corpus import load_texts
from h2okit.model import load_model, resolve_model_path
from h2okit.quality import QualityEvaluator, QualitySettings
from h2okit.runtime import Engine


def main() -> int:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompt", type=int, default=2048)
    ap.add_argument("--tokens", type=int, default=256, help="M: teacher-forced tokens per window")
    ap.add_argument("--windows", type=int, default=6)
    ap.add_argument("--top", type=int, default=5, help="targets listed per policy and window")
    ap.add_argument("--attended", type=float, default=1 / 3, help="the matched attended fraction")
    ap.add_argument("--policies", default="streaming,random,h2o_vnorm", help=f"comma list from: {', '.join(VARIANTS)}")
    args = ap.parse_args()
    names = variant_names(args.policies, "costly_tokens.py")
    if names is None:
        return 2
    if args.top < 1:
        print(f"costly_tokens.py: error: --top {args.top}; allowed: 1 or more", file=sys.stderr)
        return 2
    torch.set_num_threads(2)
    loaded = load_model(resolve_model_path(parse_config(base_config({}, 0.5))))
    texts, settings = load_texts(), QualitySettings(windows=args.windows, tokens=args.tokens, passkey_depths=())
    streams, windows = {}, None
    for name in names:
        keep, _ = calibrated_keep(VARIANTS[name], args.prompt, args.tokens, args.attended)
        engine = Engine(loaded, parse_config(base_config(VARIANTS[name], keep)).kv)
        evaluator = QualityEvaluator(engine, texts, settings)
        streams[name] = evaluator.streams(args.prompt)
        windows = windows or evaluator.windows(args.prompt)
    decode = loaded.tokenizer.decode
    print(f"P={args.prompt}, M={args.tokens}, attended {args.attended:.3f}; NLL in nats, increase over the full cache")
    for w, ids in enumerate(windows):
        targets = ids[args.prompt:]
        print(f"\nwindow {w + 1}: starts {decode(ids[:8])!r}")
        for name in names:
            ref, run = streams[name][w]
            increase = run.steady(run.nll - ref)
            first = len(targets) - len(increase)
            top = np.argsort(-increase)[:args.top]
            total = increase.sum()
            carried = f"{increase[top].sum() / total:.0%} of the increase" if total > 0 else "(no net increase)"
            listed = ", ".join(f"{decode([targets[first + i]])!r} {ref[first + i]:.2f}->{run.nll[first + i]:.2f}"
                               for i in top)
            print(f"  {name}: mean increase {increase.mean():+.3f} over {len(increase)} targets; top {args.top} "
                  f"{carried}: {listed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
