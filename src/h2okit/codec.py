"""`gear_delta`: a lossless codec for KV-cache tensors (numpy + zstandard; no torch).

Data are 16- or 32-bit float words laid out `[tokens, ...]` (for K/V: `[tokens, kv_heads,
head_dim]`); everything after the token axis is a channel. Each word is split into byte
planes (lo/hi for 16-bit words, four lanes for 32-bit). Per plane and per block of tokens a
predictor along the sequence is chosen by order-0 entropy: `raw`, `delta` (byte minus the
same channel's byte one token earlier, mod 256) or `xor` (same, by xor). The residual
planes are entropy-coded with zstd, each as one stream (or stored raw when zstd would not
gain). The frame is self-describing and checked; `decode` is bit-exact (NaN payloads,
-0.0, denormals, inf) or raises `CodecError`.

`estimate` is the seed runtime's v2 ratio estimate (SPEC §5), kept for comparison.

Frame layout (little-endian):
    magic "GDKV" | version u8 | dtype u8 | ndim u8 | block_tokens u32 | shape u32*ndim
    | planes u8 | blocks u32 | predictor ids u8*(planes*blocks)
    | per plane: storage u8 (0 raw, 1 zstd), length u32, crc32 u32 of its residuals
    | header crc32 u32 | plane payloads
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import zstandard

MAGIC = b"GDKV"
VERSION = 1
DTYPES = {"float16": (1, 2), "bfloat16": (2, 2), "float32": (3, 4)}  # name -> (id, word bytes)
DTYPE_NAMES = {code: name for name, (code, _) in DTYPES.items()}
PREDICTORS = ("raw", "delta", "xor")
RAW, DELTA, XOR = 0, 1, 2
STORE_RAW, STORE_ZSTD = 0, 1
DEFAULT_BLOCK_TOKENS = 64
ZSTD_LEVEL = 3


class CodecError(ValueError):
    """A frame that is not a valid gear_delta frame (truncated, corrupted, foreign)."""


@dataclass
class Decoded:
    array: np.ndarray  # float16 / float32, or uint16 words for bfloat16
    dtype: str


def dtype_of(array: np.ndarray, dtype: str | None) -> str:
    if dtype is not None:
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; allowed: {', '.join(DTYPES)}")
        if array.dtype.itemsize != DTYPES[dtype][1]:
            raise ValueError(f"{dtype} needs {DTYPES[dtype][1]}-byte words, got {array.dtype}")
        return dtype
    if array.dtype == np.float16:
        return "float16"
    if array.dtype == np.float32:
        return "float32"
    raise ValueError(f"cannot infer the float type of {array.dtype} words; pass dtype= (bfloat16 as uint16)")


def _planes(array: np.ndarray, word: int) -> np.ndarray:
    """[planes, tokens, channels] uint8, plane 0 the least significant byte."""
    tokens = array.shape[0]
    channels = int(np.prod(array.shape[1:], dtype=np.int64))
    as_bytes = np.ascontiguousarray(array).view(np.uint8).reshape(tokens, channels, word)
    order = range(word) if np.little_endian else range(word - 1, -1, -1)
    return np.stack([as_bytes[:, :, i] for i in order])


def _shift_down(plane: np.ndarray) -> np.ndarray:
    previous = np.zeros_like(plane)
    previous[1:] = plane[:-1]
    return previous


def _entropy_bits(counts: np.ndarray) -> float:
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log2(p)).sum() * total)


def _block_entropies(residual: np.ndarray, block_tokens: int) -> np.ndarray:
    """Order-0 entropy (bits) of each token block of a residual plane."""
    tokens = residual.shape[0]
    starts = range(0, tokens, block_tokens)
    return np.array([_entropy_bits(np.bincount(residual[s:s + block_tokens].ravel(), minlength=256))
                     for s in starts])


def encode(array: np.ndarray, dtype: str | None = None, block_tokens: int = DEFAULT_BLOCK_TOKENS,
           level: int = ZSTD_LEVEL) -> bytes:
    """Compress `array` ([tokens, ...] of 16/32-bit words) into a self-describing frame."""
    dtype = dtype_of(array, dtype)
    code, word = DTYPES[dtype]
    shape = array.shape if array.ndim else (1,)
    if block_tokens < 1:
        raise ValueError("block_tokens must be >= 1")
    planes = _planes(array.reshape(shape), word)
    tokens = shape[0]
    blocks = -(-tokens // block_tokens)
    choices = np.zeros((word, blocks), dtype=np.uint8)
    residuals = []
    for i, plane in enumerate(planes):
        previous = _shift_down(plane)
        candidates = (plane, plane - previous, plane ^ previous)  # uint8 arithmetic wraps mod 256
        costs = np.stack([_block_entropies(c, block_tokens) for c in candidates]) if tokens else np.zeros((3, 0))
        best = np.argmin(costs, axis=0).astype(np.uint8)  # ties: raw, then delta
        choices[i] = best
        residual = np.empty_like(plane)
        for b, choice in enumerate(best):
            rows = slice(b * block_tokens, (b + 1) * block_tokens)
            residual[rows] = candidates[choice][rows]
        residuals.append(residual)
    compressor = zstandard.ZstdCompressor(level=level)
    table, payloads = [], []
    for residual in residuals:
        raw = residual.tobytes()
        packed = compressor.compress(raw)
        storage, payload = (STORE_ZSTD, packed) if len(packed) < len(raw) else (STORE_RAW, raw)
        table.append(struct.pack("<BII", storage, len(payload), zlib.crc32(raw)))
        payloads.append(payload)
    header = (MAGIC + struct.pack("<BBBI", VERSION, code, len(shape), block_tokens)
              + struct.pack(f"<{len(shape)}I", *shape) + struct.pack("<BI", word, blocks)
              + choices.tobytes() + b"".join(table))
    return header + struct.pack("<I", zlib.crc32(header)) + b"".join(payloads)


class _Cursor:
    def __init__(self, frame: bytes):
        self.frame, self.pos = frame, 0

    def take(self, fmt: str):
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.frame):
            raise CodecError("truncated gear_delta frame (header)")
        values = struct.unpack_from(fmt, self.frame, self.pos)
        self.pos += size
        return values

    def bytes(self, n: int) -> bytes:
        if self.pos + n > len(self.frame):
            raise CodecError("truncated gear_delta frame (payload)")
        chunk = self.frame[self.pos:self.pos + n]
        self.pos += n
        return chunk


def decode(frame: bytes) -> Decoded:
    """Inverse of `encode`; bit-exact, or CodecError for any frame it cannot vouch for."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise CodecError(f"a gear_delta frame is bytes, got {type(frame).__name__}")
    frame = bytes(frame)
    cur = _Cursor(frame)
    if cur.bytes(4) != MAGIC:
        raise CodecError("not a gear_delta frame (bad magic)")
    version, code, ndim, block_tokens = cur.take("<BBBI")
    if version != VERSION:
        raise CodecError(f"gear_delta frame version {version}; this build reads version {VERSION}")
    if code not in DTYPE_NAMES or ndim == 0 or block_tokens == 0:
        raise CodecError("corrupted gear_delta frame header")
    shape = cur.take(f"<{ndim}I")
    word, blocks = cur.take("<BI")
    dtype = DTYPE_NAMES[code]
    tokens = shape[0]
    channels = int(np.prod(shape[1:], dtype=np.int64)) if ndim > 1 else 1
    if word != DTYPES[dtype][1] or blocks != -(-tokens // block_tokens):
        raise CodecError("corrupted gear_delta frame header")
    choices = np.frombuffer(cur.bytes(word * blocks), dtype=np.uint8).reshape(word, blocks)
    table = [cur.take("<BII") for _ in range(word)]
    header_end = cur.pos
    (header_crc,) = cur.take("<I")
    if zlib.crc32(frame[:header_end]) != header_crc:
        raise CodecError("corrupted gear_delta frame (header checksum mismatch)")
    if (choices > XOR).any():
        raise CodecError("corrupted gear_delta frame (unknown predictor id)")
    plane_size = tokens * channels
    out = np.empty((tokens, channels, word), dtype=np.uint8)
    decompressor = zstandard.ZstdDecompressor()
    for i, (storage, length, crc) in enumerate(table):
        payload = cur.bytes(length)
        if storage == STORE_ZSTD:
            try:
                raw = decompressor.decompress(payload, max_output_size=plane_size)
            except zstandard.ZstdError as exc:
                raise CodecError(f"corrupted gear_delta frame (plane {i}: {exc})") from None
        elif storage == STORE_RAW:
            raw = payload
        else:
            raise CodecError("corrupted gear_delta frame (unknown storage mode)")
        if len(raw) != plane_size or zlib.crc32(raw) != crc:
            raise CodecError(f"corrupted gear_delta frame (plane {i} checksum mismatch)")
        residual = np.frombuffer(raw, dtype=np.uint8).reshape(tokens, channels)
        out[:, :, i if np.little_endian else word - 1 - i] = _unpredict(residual, choices[i], block_tokens)
    if cur.pos != len(frame):
        raise CodecError(f"gear_delta frame has {len(frame) - cur.pos} trailing bytes")
    words = out.reshape(-1).view({2: np.uint16, 4: np.uint32}[word])
    array = words.view({"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}[dtype])
    return Decoded(array.reshape(shape), dtype)


def _unpredict(residual: np.ndarray, choices: np.ndarray, block_tokens: int) -> np.ndarray:
    plane = np.empty_like(residual)
    previous = np.zeros(residual.shape[1], dtype=np.uint8)
    for b, choice in enumerate(choices):
        rows = slice(b * block_tokens, (b + 1) * block_tokens)
        block = residual[rows]
        if choice == RAW:
            plane[rows] = block
        elif choice == DELTA:  # x[t] = x[t-1] + r[t], running sums wrap mod 256
            plane[rows] = np.cumsum(np.vstack([previous, block]), axis=0, dtype=np.uint8)[1:]
        else:
            plane[rows] = np.bitwise_xor.accumulate(np.vstack([previous, block]), axis=0)[1:]
        if len(block):
            previous = plane[rows][-1]
    return plane


def ratio(raw_bytes: int, frame: bytes) -> float:
    return raw_bytes / len(frame) if frame else 1.0


# --- the seed runtime's v2 estimate (SPEC §5) -------------------------------------------------

def _order0_bits(data: np.ndarray) -> float:
    return _entropy_bits(np.bincount(data.ravel(), minlength=256))


def estimate_bytes(array: np.ndarray, dtype: str | None = None) -> tuple[int, float]:
    """(raw bytes, estimated bytes) of one call: byte lanes of the flattened words; the top
    lane delta-coded against the previous word's top lane; order-0 entropy; +64 bytes."""
    dtype = dtype_of(array, dtype)
    word = DTYPES[dtype][1]
    lanes = np.ascontiguousarray(array).reshape(-1).view(np.uint8).reshape(-1, word)
    if not np.little_endian:
        lanes = lanes[:, ::-1]
    top = lanes[:, word - 1]
    delta_top = top - np.concatenate([[np.uint8(0)], top[:-1]]).astype(np.uint8)
    bits = sum(_order0_bits(lanes[:, i]) for i in range(word - 1)) + _order0_bits(delta_top)
    return lanes.size, bits / 8 + 64


def estimate(array: np.ndarray, dtype: str | None = None) -> float:
    """The v2 ratio estimate of one array, clamped >= 1."""
    raw, est = estimate_bytes(array, dtype)
    return max(1.0, raw / est) if raw else 1.0
