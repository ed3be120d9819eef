"""Is the attention kernel bound by memory or by its instructions? Its phases with K/V in memory, in L3
and hot, against a plain read of the same bytes.

    .venv/bin/python benchmarks/attend_levels.py [--tokens 2048] [--cache-dtype bfloat16] [--rounds 3]

`h2k_attend` from the profiled build of the kernels (`kernels.load_profiled`: timers around OpenMP
thread 0's and thread 1's logits, softmax and values) over --layers layers of synthetic K/V with
SmolLM2's attention shapes (3 KV heads, 9 query heads, head_dim 64; values uniform in +-0.01, in huge
pages as the caches are), 2 threads, the tokens in 2 parts, no H2O mass. Three ways, interleaved per
round (round 0 a warm-up):
  memory  the layers in turn, 256 MiB read between calls (more than the L3)
  L3      the layers in turn, nothing read between calls (the layers' K/V fit the L3 at 2048 tokens)
  hot     one layer, call after call
Per way: us per call of each phase (thread 0 / thread 1) and of the whole call, ns per dot (logits) and
per token and query head (values) on one thread, and us to read the same bytes (K, then V) with the
kernels' read probe (`h2k_read_sum`, the same threads). If a phase takes about as long hot as from
memory, its instructions bound it, not memory. Medians over rounds. Timing only: run it alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from rounds import interleaved  # this folder: the shared schedule

from h2okit import hugepages, kernels
from h2okit.clikit import OneLineParser, setup_logging

Q_HEADS, KV_HEADS, HEAD_DIM, THREADS = 9, 3, 64, 2
KV_DTYPES = {"float32": (torch.float32, kernels.F32), "bfloat16": (torch.bfloat16, kernels.BF16),
             "float16": (torch.float16, kernels.F16)}
PHASES = ("logits", "softmax", "values")
FLUSH_FLOATS = 1 << 26  # 256 MiB


def main() -> int:
    setup_logging()
    ap = OneLineParser(prog="attend_levels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2048)
    ap.add_argument("--cache-dtype", default="bfloat16", choices=tuple(KV_DTYPES))
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--calls", type=int, default=90, help="calls per way and round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    if min(args.tokens, args.layers, args.calls, args.rounds) < 1:
        ap.error("--tokens, --layers, --calls and --rounds take positive integers")
    lib, timers = kernels.load_profiled()
    dtype, code = KV_DTYPES[args.cache_dtype]
    tokens, layer_elements = args.tokens, KV_HEADS * args.tokens * HEAD_DIM

    def kv() -> torch.Tensor:  # one layer's K or V: [KV_HEADS, tokens, HEAD_DIM], in huge pages
        data = hugepages.empty_bytes(layer_elements * dtype.itemsize).view(dtype)
        return data.copy_(torch.empty(layer_elements).uniform_(-0.01, 0.01)).view(KV_HEADS, tokens, HEAD_DIM)

    keys, values = [kv() for _ in range(args.layers)], [kv() for _ in range(args.layers)]
    flush = torch.ones(FLUSH_FLOATS)
    q = torch.randn(Q_HEADS * HEAD_DIM)
    probs, out = torch.empty(Q_HEADS * tokens), torch.empty(Q_HEADS * HEAD_DIM)
    partial = torch.empty(THREADS * Q_HEADS * HEAD_DIM)
    dims = kernels.ffi.new("h2k_dims *", {"q_heads": Q_HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM,
                                          "scale": HEAD_DIM ** -0.5, "threads": THREADS})
    torch.set_num_threads(THREADS)
    timers.take()

    def way(layers: int, flushed: bool):
        def run() -> dict[str, float]:
            attend = read = 0.0
            for call in range(args.calls):
                layer = call % layers
                k, v = keys[layer], values[layer]
                if flushed:
                    lib.h2k_read_sum(kernels.ptr(flush), FLUSH_FLOATS)
                started = time.perf_counter()
                lib.h2k_attend(dims, kernels.ptr(q), kernels.ptr(k), kernels.ptr(v), tokens * HEAD_DIM, code, tokens,
                               kernels.ptr(probs), kernels.ptr(out), kernels.NULL, 1, kernels.ptr(partial), THREADS)
                attend += time.perf_counter() - started
                if flushed:  # the same bytes, from memory again
                    lib.h2k_read_sum(kernels.ptr(flush), FLUSH_FLOATS)
                started = time.perf_counter()  # K then V as float32 words: the bytes, not their values
                lib.h2k_read_sum(kernels.ptr(k), k.numel() * dtype.itemsize // 4)
                lib.h2k_read_sum(kernels.ptr(v), v.numel() * dtype.itemsize // 4)
                read += time.perf_counter() - started
            phases = timers.take()
            per_call = {name: phases[name] / args.calls for name in phases}
            return {**per_call, "call": attend / args.calls, "read": read / args.calls}
        return run

    runs = {"memory": way(args.layers, True), "L3": way(args.layers, False), "hot": way(1, False)}
    samples = interleaved(runs, args.rounds)
    mb = 2 * layer_elements * dtype.itemsize / 1e6
    print(f"h2k_attend, {tokens} tokens of {args.cache_dtype} K/V ({mb:.1f} MB a layer), {KV_HEADS} KV heads, "
          f"{Q_HEADS} query heads, head_dim {HEAD_DIM}, {THREADS} threads; us per call, medians of {args.rounds} "
          f"rounds of {args.calls} calls (thread 0 / thread 1)")
    print("| K/V in | logits | softmax | values | whole call | read K, then V | ns a dot (logits) | "
          "ns a token and head (values) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    per_thread = -(-tokens // THREADS) * Q_HEADS  # dots (or token-head products) per thread
    for name, rounds in samples.items():
        med = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
        cells = [f"{med[p] * 1e6:.1f} / {med[p + '_thread1'] * 1e6:.1f}" for p in PHASES]
        print(f"| {name} | {' | '.join(cells)} | {med['call'] * 1e6:.1f} | {med['read'] * 1e6:.1f} | "
              f"{med['logits'] / per_thread * 1e9:.2f} | {med['values'] / per_thread * 1e9:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
