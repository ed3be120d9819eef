#!/usr/bin/env python3
"""A stand-in for an external (MNN) llm_bench in tests: same flags, deterministic table.
Block size 13 makes it fail; FAKE_SLEEP=s makes each run take s seconds.
FAKE_PIDS=file appends each invocation's pid to that file.
FAKE_ORDER=file appends each invocation's run (policy:keep) to that file.
FAKE_PHASES=file makes decode speeds noisy the way this machine is: invocation k (counted in the
file) runs in machine phase k // FAKE_RUNS_PER_PHASE (a shared factor of 0.4-1.6, so the runs of a
round see the same phase), times 1 % noise of its own."""
import argparse
import json
import os
import sys
import time

p = argparse.ArgumentParser()
for flag in ("-m", "-a", "-t", "-qatten", "-kv", "-p", "-n", "-rep", "-fp"):
    p.add_argument(flag)
a = p.parse_args()
cfg = json.load(open(a.m))
if cfg.get("kv_h2o_block_tokens") == 13:
    print("fake llm_bench: cannot run block 13", file=sys.stderr)
    sys.exit(3)
if os.environ.get("FAKE_PIDS"):
    with open(os.environ["FAKE_PIDS"], "a") as f:
        f.write(f"{os.getpid()}\n")
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
ratio = cfg.get("kv_h2o_target_lossy_ratio", 3.0) if cfg.get("kv_h2o_target_mode") == "adaptive" \
    else 1 / cfg.get("kv_h2o_target_keep_ratio", 0.5)
keep = 1 / ratio
decode = 20.0 - 2.0 * keep * int(a.p) / 512
if cfg.get("kv_h2o_policy") == "full" or cfg.get("kv_h2o_trigger_min_tokens", 0) > int(a.p) + int(a.n):
    decode = 20.0  # nothing is evicted: the same work as the full cache
if os.environ.get("FAKE_ORDER"):
    with open(os.environ["FAKE_ORDER"], "a") as f:
        f.write(f"{cfg.get('kv_h2o_policy', 'h2o')}:{cfg.get('kv_h2o_target_keep_ratio')}\n")
if os.environ.get("FAKE_PHASES"):
    import random

    path = os.environ["FAKE_PHASES"]
    k = int(open(path).read() or 0) if os.path.exists(path) else 0
    open(path, "w").write(str(k + 1))
    phase = random.Random(k // int(os.environ.get("FAKE_RUNS_PER_PHASE", "1"))).uniform(0.4, 1.6)
    decode *= phase * random.Random(f"own{k}").gauss(1.0, 0.01)
cols = ("model | modelSize | backend | threads | precision | llm_demo | speed(tok/s) | h2o_keep | h2o_lossy | "
        "h2o_lossless | h2o_target_keep_effective | h2o_floor_keep | h2o_quantized_keep | h2o_evict_us | h2o_codec_us")
row = (f"fake | 1.00 MB | CPU | {a.t} | Normal | prompt={a.p}<br>decode={a.n} | 100.00 ± 1.00<br>{decode:.2f} ± 0.10 | "
       f"{keep:.4f} ± 0.0000 | {ratio:.3f} ± 0.000 | 1.200 ± 0.000 | {keep:.4f} ± 0.0000 | 0.2000 ± 0.0000 | "
       f"{keep:.4f} ± 0.0000 | 10.00 ± 0.00 | 5.00 ± 0.00")
table = f"| {cols} |\n|{'|'.join(' --- ' for _ in cols.split(' | '))}|\n| {row} |\n"
sys.stdout.write(table)
with open(a.fp, "a") as f:
    f.write(table)
