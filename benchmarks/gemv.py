"""Read bandwidth of the fast path's GEMV kernels on the default model's own matrices, per weight type.

    .venv/bin/python benchmarks/gemv.py [--reps 5] [--threads 2]

For each weight type (the GGUF's Q4_1 blocks with the Q8_0 lm_head, with float32 inputs and with
inputs rounded to int8 per block, `llm_activation_dtype` q8; float32 and bf16 copies), times
`h2k_norm_gemv` over all 30 layers' fused gate/up matrices (the largest per layer) and over the
lm_head, and prints GB/s of weight bytes read (best of --reps passes; 128 MiB are read between
passes, so each pass reads its matrices from memory, not the L3). Then layer 0's gate/up alone, from
cache (20 calls in a row after a warm-up, no flush): a kernel that reads its matrices from memory at
about its from-cache speed is bound by its arithmetic, not by memory (the float-input Q4_1 kernel
on AVX2); one that is much faster from cache waits on memory. The last line is the read bandwidth
of `roofline.py`'s read probe on the same threads. Timing only: run it alone.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from roofline import read_bandwidth  # this folder: the one read probe

from h2okit import kernels
from h2okit.clikit import setup_logging
from h2okit.config import load_config
from h2okit.fastpath import FastDecoder
from h2okit.model import load_model, resolve_model_path
from h2okit.resources import find


_FLUSH = torch.ones(1 << 25)  # 128 MiB: more than the L3 (32-48 MB on the machines here), read before every pass


def best_seconds(call, reps: int, flush: bool = True) -> float:
    best = float("inf")
    for _ in range(reps):
        if flush:
            kernels.load().h2k_read_sum(kernels.ptr(_FLUSH), _FLUSH.numel())  # the weights leave the caches
        start = time.perf_counter()
        call()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    loaded = load_model(resolve_model_path(load_config(find("configs", "smollm2-135m"))))
    x = torch.randn(loaded.model.config.hidden_size)
    print("| weights | inputs | matrices | MB | GB/s |\n|---|---|---|---:|---:|")
    for weight_dtype, activation_dtype in (("q4_1", "fp32"), ("q4_1", "q8"), ("fp32", "fp32"), ("bf16", "fp32")):
        decoder = FastDecoder.for_model(dataclasses.replace(loaded, weight_dtype=weight_dtype,
                                                            activation_dtype=activation_dtype))
        for name, call, nbytes, from_memory in passes(decoder, x):
            if not from_memory:
                call()  # the warm-up that brings the matrix into cache
            seconds = best_seconds(call, args.reps, flush=from_memory)
            print(f"| {weight_dtype} | {activation_dtype} | {name} | {nbytes / 1e6:.1f} | "
                  f"{nbytes / seconds / 1e9:.1f} |")
    kernel_sum, torch_sum = read_bandwidth()
    print(f"\nroofline.py's read probe ({args.threads} threads, 1 GiB in huge pages, medians of 3): "
          f"{kernel_sum:.1f} GB/s (the kernels' sum), {torch_sum:.1f} (torch's)")


def passes(decoder: FastDecoder, x: torch.Tensor):
    """(name, one timed pass, weight bytes it reads, from memory?) for the gate/up matrices and the lm_head
    from memory, and layer 0's gate/up 20 times from cache."""
    lib, ptr, null = kernels.load(), kernels.ptr, kernels.NULL
    w, norm, h = decoder.weights, torch.ones_like(x), torch.empty_like(x)
    rows = w.gate_up[0].data.shape[0]
    y = torch.empty(max(rows, decoder.vocab))

    def gate_up():
        for m in w.gate_up:
            lib.h2k_norm_gemv(decoder.dims, ptr(x), ptr(norm), ptr(m.data), rows, ptr(h), ptr(y), 0, null, null)

    def head():
        lib.h2k_norm_gemv(decoder.head_dims, ptr(x), ptr(norm), ptr(w.head.data), decoder.vocab, ptr(h), ptr(y),
                          0, null, null)

    def gate_up_cached():
        first = w.gate_up[0]
        for _ in range(20):
            lib.h2k_norm_gemv(decoder.dims, ptr(x), ptr(norm), ptr(first.data), rows, ptr(h), ptr(y), 0, null, null)

    return [("30 x gate/up", gate_up, sum(m.nbytes for m in w.gate_up), True),
            ("lm_head", head, w.head.nbytes, True),
            ("layer 0's gate/up x 20, from cache", gate_up_cached, 20 * w.gate_up[0].nbytes, False)]


if __name__ == "__main__":
    main()
