"""Decode speed with and without one competing busy process, per OpenMP thread-waiting policy.

    .venv/bin/python benchmarks/under_load.py [--rounds 3] [--prompt 512] [--gen 64] [--config C]

Each setting is one `llm_bench -o json` process (the waiting policy must be in the environment
before libgomp starts): the default (libgomp spins ~300k iterations before sleeping),
OMP_WAIT_POLICY=PASSIVE (sleep at once), GOMP_SPINCOUNT=1000, and one thread. Every setting runs
quiet and then next to a busy process (a pure-Python spin loop: one core), settings interleaved,
rounds repeated; the figure per setting is the median over rounds of busy / quiet decode tok/s
(paired within the round) and the median quiet tok/s relative to the default's. The machine's
read bandwidth drifts within minutes, so only these within-round ratios are compared.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # name -> (extra environment, threads)
    "default (active spin)": ({}, 2),
    "OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, 2),
    "GOMP_SPINCOUNT=1000": ({"GOMP_SPINCOUNT": "1000"}, 2),
    "1 thread": ({}, 1),
}


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
    base = "default (active spin)"
    print(f"\nP={args.prompt} G={args.gen}, {args.rounds} interleaved rounds, medians of per-round ratios")
    print("| waiting policy | quiet tok/s | busy tok/s | busy / own quiet | busy / default quiet "
          "| quiet / default quiet |")
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
