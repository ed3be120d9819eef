"""gear_delta against general-purpose codecs on real K/V of the default model, in one run.

    .venv/bin/python benchmarks/codec.py [--dump-dir D] [--passes 5]

Without --dump-dir, K/V are dumped once (SmolLM2-135M, 512 tokens of Pride and Prejudice
+ 128 greedy decode steps, no eviction) into the user cache and reused. Every layer's final
K and V is measured as float16 and as bfloat16 (rounded from the float32 cache as torch
does). Throughput is the median over --passes passes after a warm-up pass, over all tensors;
"2 threads" runs the tensors through a 2-worker thread pool (zstd and most numpy kernels
release the GIL). Bounds: order-0 entropy of the 16-bit words, the per-channel bound
(order-0 of the low byte + order-0 of the high byte given its channel), and zstd -19.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import zstandard

from h2okit.clikit import setup_logging
from h2okit import codec
from h2okit.paths import cache_root

ROOT = Path(__file__).resolve().parents[1]


def ensure_dump(dump_dir: Path | None) -> Path:
    if dump_dir is not None:
        return dump_dir
    target = cache_root() / "dumps" / "smollm2-p512-n128-full"
    if not (target / "manifest.json").is_file():
        from h2okit.offline import dump_kv

        print(f"dumping real K/V to {target} (once)", file=sys.stderr)
        dump_kv(str(ROOT / "configs" / "smollm2-135m.json"), target, 512, 128, None)
    return target


def load_tensors(dump: Path, dtype: str) -> list[np.ndarray]:
    manifest = json.loads((dump / "manifest.json").read_text())
    out = []
    for _, name in sorted(manifest["files"]["final"].items()):
        words = np.load(dump / name)
        out.append(words.astype(np.float16) if dtype == "float16" else codec.float32_to_bfloat16_words(words))
    return out


def _entropy(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def bounds(tensors: list[np.ndarray]) -> dict[str, float]:
    words = np.concatenate([t.view(np.uint16).ravel() for t in tensors])
    h_word = _entropy(np.bincount(words, minlength=65536))
    lo_bits = _entropy(np.bincount((words & 0xFF).astype(np.uint8), minlength=256))
    hi_given_channel, n = 0.0, 0
    for t in tensors:
        hi = (t.view(np.uint16).reshape(t.shape[0], -1) >> 8).astype(np.uint8)
        for c in range(hi.shape[1]):
            hi_given_channel += _entropy(np.bincount(hi[:, c], minlength=256)) * hi.shape[0]
            n += hi.shape[0]
    raw = b"".join(t.tobytes() for t in tensors)
    z19 = len(zstandard.ZstdCompressor(level=19).compress(raw))
    return {"order0_word_bits": h_word, "per_channel_bits": lo_bits + hi_given_channel / n,
            "zstd19_bits": 8 * z19 / (len(raw) / 2)}


class Codec:
    def __init__(self, name, enc, dec, threads=1):
        self.name, self.enc, self.dec, self.threads = name, enc, dec, threads


def codecs(dtype: str) -> list[Codec]:
    out = []
    gd_dtype = dtype
    out.append(Codec("gear_delta", lambda a: codec.encode(a, gd_dtype), lambda f: codec.decode(f).array))
    out.append(Codec("gear_delta, 2 threads", lambda a: codec.encode(a, gd_dtype), lambda f: codec.decode(f).array,
                     threads=2))
    z3c, z3d = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
    out.append(Codec("zstd-3 (raw bytes)", lambda a: z3c.compress(a.tobytes()), lambda f: z3d.decompress(f)))
    try:
        import blosc2

        out.append(Codec("blosc2 shuffle+zstd-3", lambda a: blosc2.compress2(
            a.tobytes(), typesize=2, clevel=3, codec=blosc2.Codec.ZSTD, filters=[blosc2.Filter.SHUFFLE],
            nthreads=1), lambda f: blosc2.decompress2(f)))
    except ImportError:
        print("blosc2 not installed: skipping (pip install '.[bench]')", file=sys.stderr)
    try:
        from numcodecs import Blosc

        nc = Blosc(cname="zstd", clevel=3, shuffle=Blosc.SHUFFLE)
        out.append(Codec("numcodecs Blosc shuffle+zstd-3", lambda a: nc.encode(a), lambda f: nc.decode(f)))
    except ImportError:
        print("numcodecs not installed: skipping", file=sys.stderr)
    return out


def _run(fn, items, threads):
    if threads == 1:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(fn, items))


def measure(c: Codec, tensors: list[np.ndarray], passes: int) -> dict:
    raw = sum(t.nbytes for t in tensors)
    frames = _run(c.enc, tensors, c.threads)  # warm-up, and the frames to check
    for t, f in zip(tensors, frames):
        back = c.dec(f)
        if np.asarray(back).tobytes() != t.tobytes() and bytes(back) != t.tobytes():
            raise SystemExit(f"{c.name}: round trip is not bit-exact")
    enc_s, dec_s = [], []
    for _ in range(passes):
        started = time.perf_counter()
        _run(c.enc, tensors, c.threads)
        enc_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        _run(c.dec, frames, c.threads)
        dec_s.append(time.perf_counter() - started)
    packed = sum(len(f) for f in frames)
    return {"ratio": raw / packed, "bits_per_value": 8 * packed / (raw / 2),
            "encode_mb_s": raw / 1e6 / statistics.median(enc_s), "decode_mb_s": raw / 1e6 / statistics.median(dec_s)}


def main() -> None:
    setup_logging()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dump-dir", type=Path, default=None)
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    dump = ensure_dump(args.dump_dir)
    report = {}
    for dtype in ("float16", "bfloat16"):
        tensors = load_tensors(dump, dtype)
        mb = sum(t.nbytes for t in tensors) / 1e6
        b = bounds(tensors)
        print(f"\n{dtype}: {len(tensors)} tensors (30 layers x K,V), {mb:.1f} MB; bounds: order-0 word entropy "
              f"{b['order0_word_bits']:.3f} bits/value (ratio {16 / b['order0_word_bits']:.3f}), per-channel "
              f"{b['per_channel_bits']:.3f} ({16 / b['per_channel_bits']:.3f}), zstd-19 {b['zstd19_bits']:.3f} "
              f"({16 / b['zstd19_bits']:.3f})")
        print("| codec | ratio | bits/value | encode MB/s | decode MB/s |")
        print("| --- | --- | --- | --- | --- |")
        rows = {}
        for c in codecs(dtype):
            r = measure(c, tensors, args.passes)
            rows[c.name] = r
            print(f"| {c.name} | {r['ratio']:.3f} | {r['bits_per_value']:.2f} | {r['encode_mb_s']:.0f} | "
                  f"{r['decode_mb_s']:.0f} |", flush=True)
        report[dtype] = {"bounds": b, "codecs": rows}
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
