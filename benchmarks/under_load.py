"""Decode speed with and without one competing busy process, per thread policy.

    .venv/bin/python benchmarks/under_load.py [--rounds 3] [--prompt 512] [--gen 64] [--config C]

Each setting is one `llm_bench -o json` process (a waiting policy must be in the environment
before libgomp starts): h2okit's default (fused steps on the faster of 2 threads and 1, measured
step by step, and idle OpenMP threads sleeping after threads.OPENMP_WAIT's spin count), the
same chooser with libgomp's own spin count (300,000), the configured 2 threads always
(H2OKIT_ADAPT_THREADS=0) with libgomp's spin count, the same with OMP_WAIT_POLICY=PASSIVE (sleep
at once), and `-t 1`. Every setting runs quiet and then next to a busy process (a pure-Python spin
loop: one core), settings interleaved, rounds repeated; the figures per setting are medians over
rounds of busy / quiet decode tok/s (paired within the round) and of quiet tok/s relative to the
fixed 2 threads' quiet. The machine's read bandwidth drifts within minutes, so only these
within-round ratios are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from h2okit.threads import OPENMP_WAIT

ROOT = Path(__file__).resolve().parents[1]
LIBGOMP_SPIN = {"GOMP_SPINCOUNT": "300000"}  # libgomp's own default
SETTINGS = {  # name -> (extra environment, threads)
    f"default: adaptive (2 threads or 1), GOMP_SPINCOUNT={OPENMP_WAIT['GOMP_SPINCOUNT']}": ({}, 2),
    "adaptive, libgomp's spin count (GOMP_SPINCOUNT=300000)": (LIBGOMP_SPIN, 2),
    "2 threads always (H2OKIT_ADAPT_THREADS=0), libgomp's spin count": ({"H2OKIT_ADAPT_THREADS": "0", **LIBGOMP_SPIN},
                                                                         2),
    "2 threads always, OMP_WAIT_POLICY=PASSIVE": ({"H2OKIT_ADAPT_THREADS": "0", "OMP_WAIT_POLICY": "PASSIVE"}, 2),
    "-t 1 (one thread)": ({}, 1),
}
BASE = "2 threads always (H2OKIT_ADAPT_THREADS=0), libgomp's spin count"  # the quiet speed the others are compared with


def decode_tps(config: str, env: dict, threads: int, prompt: int, gen: int) -> float:
    cmd = [sys.executable, "-m", "h2okit.bench", "-m", config, "-t", str(threads), "-p", str(prompt),
           "-n", str(gen), "-rep", "1", "-o", "json"]
    out = subprocess.run(cmd, env={**os.environ, **env}, capture_output=True, text=True, check=True).stdout
    return json.loads(out)["results"][0]["decode_tps"]["mean"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--gen", type=int, default=64)
    ap.add_argument("--config", default=str(ROOT / "configs" / "smollm2-135m.json"))
    args = ap.parse_args()
    quiet = {name: [] for name in SETTINGS}
    busy = {name: [] for name in SETTINGS}
    for rnd in range(args.rounds):
        for name, (env, threads) in SETTINGS.items():
            quiet[name].append(decode_tps(args.config, env, threads, args.prompt, args.gen))
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
            try:
                busy[name].append(decode_tps(args.config, env, threads, args.prompt, args.gen))
            finally:
                spinner.kill()
                spinner.wait()
            print(f"  round {rnd + 1}/{args.rounds} {name}: quiet {quiet[name][-1]:.1f}, busy {busy[name][-1]:.1f} "
                  f"tok/s", flush=True)
    base = BASE
    print(f"\nP={args.prompt} G={args.gen}, {args.rounds} interleaved rounds, medians of per-round ratios")
    print("| thread policy | quiet tok/s | busy tok/s | busy / own quiet | busy / fixed-2 quiet "
          "| quiet / fixed-2 quiet |")
    print("|---|---:|---:|---:|---:|---:|")
    for name in SETTINGS:
        q, b, d = quiet[name], busy[name], quiet[base]
        print(f"| {name} | {statistics.median(q):.1f} | {statistics.median(b):.1f} | "
              f"{statistics.median(x / y for x, y in zip(b, q)):.2f} | "
              f"{statistics.median(x / y for x, y in zip(b, d)):.2f} | "
              f"{statistics.median(x / y for x, y in zip(q, d)):.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
