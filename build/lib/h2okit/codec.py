"""`gear_delta`: a lossless codec for KV-cache tensors (numpy + zstandard; no torch).

Data are 16- or 32-bit float words laid out `[tokens, ...]` (for K/V: `[tokens, kv_heads,
head_dim]`); everything after the token axis is a channel. Each word is split into byte
planes (lo/hi for 16-bit words, four lanes for 32-bit), each a token-major `[tokens, channels]`
byte array. Per plane and per block of tokens a predictor along the sequence is chosen by
order-0 entropy (estimated on every 16th token row; a block leaves the plane's best predictor
only when another is clearly cheaper on it, see `_choose`):

- `raw`: the byte itself;
- `delta`: minus the same channel's byte one token earlier (mod 256);
- `xor`: xor with the same channel's byte one token earlier;
- `mode`: minus the channel's centre in this frame: its most frequent byte, or for the top
  byte the middle of its densest window of values (the exponent byte of a KV channel sits
  around a channel-specific value; this removes the offset, so that one Huffman table fits all
  channels). See CENTRE_WINDOWS.

A plane whose bytes are noise (the mantissa's low byte: ~8 bits of entropy) skips prediction.
Each plane's residual is one zstd frame with zstd's own XXH64 content checksum; zstd stores
incompressible blocks raw, so noise costs a few bytes of framing. `decode` is bit-exact (NaN
payloads, -0.0, denormals, inf) or raises `CodecError`; the header carries a CRC32.

Why this layout (measured on real K/V of the default model, benchmarks/codec.py): token-major
planes are made and undone with whole-array shifts, with no byte transposes or channel gathers
(those cost ~70 us per plane of 122 KB); grouping channels into several zstd streams by spread
gained 0.5 % at most, and a CRC32 of each stream cost more than zstd's checksum. Version 2
frames (channel-major, grouped streams, CRC32 each) are not read by this version.

`estimate` is the seed runtime's v2 ratio estimate (SPEC §5), kept for comparison.

Frame (little-endian):
    magic "GDKV" | version u8 | dtype u8 | ndim u8 | block_tokens u32 | shape u32*ndim
    | planes u8 | blocks u32 | predictor ids u8*(planes*blocks)
    | per plane: flags u8 (1 = has modes) | [modes u8*channels] | payload length u32
    | crc32 u32 of all the above | payloads: one zstd frame per plane, lo plane first
"""

from __future__ import annotations

import itertools
import struct
import threading
import zlib
from dataclasses import dataclass

import numpy as np
import zstandard

MAGIC = b"GDKV"
VERSION = 3
DTYPES = {"float16": (1, 2), "bfloat16": (2, 2), "float32": (3, 4)}  # name -> (id, word bytes)
DTYPE_NAMES = {code: name for name, (code, _) in DTYPES.items()}
WORD_VIEWS = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}
UINT_WORDS = {2: np.uint16, 4: np.uint32}
PREDICTORS = ("raw", "delta", "xor", "mode")
RAW, DELTA, XOR, MODE = range(4)
FLAG_MODES = 1
DEFAULT_BLOCK_TOKENS = 64
MIN_TOKENS_FOR_MODES = 128  # below this the per-channel side data costs more than it saves
NOISE_BITS = 7.9  # a plane whose sampled order-0 entropy is this high is stored as it is
COST_SAMPLE_ROWS = 16  # predictor costs are estimated on every 16th token row
LOW_ENTROPY_BITS = 4.0  # below this (bits per byte, sampled) a plane takes the smaller match table


def _zstd_params(level: int | None, low_entropy: bool = False) -> zstandard.ZstdCompressionParameters:
    """Measured on real K/V: matches shorter than 7 bytes only steal symbols from the Huffman-coded
    literals (the residuals are mostly noise around a few values), so they are not searched for.
    The match table depends on the plane. A low-entropy plane (bf16 exponents, ~2.7 bits/byte)
    takes a small one, 2^8 entries: 2.75 bits/byte at ~500 MB/s, against 2.69 at ~420 MB/s with
    2^10 and 2.79 at 264 MB/s for zstd level 1; zstd's time there goes into the matches, and
    encoding speed is what this codec was short of. A high-entropy plane (fp16 exponent + 2
    mantissa bits) takes 2^14: smallest (5.393 bits/byte vs 5.399 with 2^12), ~1 GB/s either way."""
    if level is not None:
        return zstandard.ZstdCompressionParameters.from_level(level, write_checksum=1)
    return zstandard.ZstdCompressionParameters(window_log=18, hash_log=8 if low_entropy else 14, chain_log=12,
                                               search_log=1, min_match=7, target_length=0,
                                               strategy=zstandard.STRATEGY_FAST, write_checksum=1)


_PER_THREAD = threading.local()  # zstd (de)compressor objects are reused, but not across threads


def _compressor(level: int | None, low_entropy: bool) -> zstandard.ZstdCompressor:
    cache = _PER_THREAD.__dict__.setdefault("compressors", {})
    key = (level, low_entropy and level is None)
    if key not in cache:
        cache[key] = zstandard.ZstdCompressor(compression_params=_zstd_params(*key))
    return cache[key]


def _decompressor() -> zstandard.ZstdDecompressor:
    if not hasattr(_PER_THREAD, "decompressor"):
        _PER_THREAD.decompressor = zstandard.ZstdDecompressor()
    return _PER_THREAD.decompressor


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


def _planes(array: np.ndarray, word: int) -> list[np.ndarray]:
    """Token-major `[tokens, channels]` uint8 planes, least significant byte first (by value, so
    independent of the machine's byte order)."""
    tokens, channels = array.shape[0], int(np.prod(array.shape[1:], dtype=np.int64))
    words = np.ascontiguousarray(array).view(UINT_WORDS[word]).reshape(tokens, channels)
    return [(words >> (8 * i) if i else words).astype(np.uint8) for i in range(word)]


_XLOGX = np.concatenate([[0.0], np.arange(1, 1 << 16) * np.log2(np.arange(1, 1 << 16))])


def _xlogx(counts: np.ndarray) -> np.ndarray:
    if counts.size and counts.max() < len(_XLOGX):
        return _XLOGX[counts]
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(counts > 0, counts * np.log2(np.maximum(counts, 1)), 0.0)


def _entropy_rows(counts: np.ndarray) -> np.ndarray:
    """Order-0 entropy in bits (total, not per symbol) of each row of a [rows, 256] count table:
    N log2 N - sum c log2 c."""
    return _xlogx(counts.sum(axis=1)) - _xlogx(counts).sum(axis=1)


# The `mode` predictor subtracts a per-channel centre: the middle of the channel's densest window
# of byte values. For the top byte of a float the window spans ~4 octaves of magnitude (fp16: 2
# mantissa bits, so 4 values an octave; bf16/fp32: 7 exponent bits, 2 octaves a value); other
# planes use the plain mode (window 1). Measured on real K/V (benchmarks/codec.py data): fp16
# 1.184 with the plain mode -> 1.201 with a 16-wide window; bf16 1.506 -> 1.511 with 3. A wide
# window is also robust to sampling, where the plain mode of a flat-topped histogram jumps between
# neighbours. (Pooling both signs into one magnitude histogram was tried: worse, 1.197 / 1.505.)
CENTRE_WINDOWS = {"float16": 16, "bfloat16": 3, "float32": 3}
# Token rows sampled for the centres: a 16-wide window needs more samples (fp16 1.2009 on every
# 4th row, 1.1992 on every 8th); bf16 loses nothing on every 8th (1.5101 vs 1.5114) and encodes faster.
CENTRE_SAMPLE_ROWS = {"float16": 4, "bfloat16": 8, "float32": 8}


def _channel_counts(plane: np.ndarray) -> np.ndarray:
    """[channels, 256] byte histograms of a [rows, channels] plane."""
    channels = plane.shape[1]
    # Keys channel-major, so that counting walks one channel's bins at a time (cache-friendly:
    # 2x faster than token-major keys scattered over all channels' bins).
    keys = np.add(plane.T, (np.arange(channels, dtype=np.int64) * 256)[:, None], order="C")
    return np.bincount(keys.ravel(), minlength=channels * 256).reshape(channels, 256)


def _channel_modes(plane: np.ndarray, window: int = 1) -> np.ndarray:
    counts = _channel_counts(plane)
    if window == 1:
        return counts.argmax(axis=1).astype(np.uint8)
    return ((_window_sums(counts, window).argmax(axis=1) + window // 2) % 256).astype(np.uint8)


def _window_sums(counts: np.ndarray, window: int) -> np.ndarray:
    """sums[c, v] = counts[c, v] + ... + counts[c, (v + window - 1) % 256], by doubling the width
    (a cumsum is a scalar loop) in two reused narrow buffers (fresh temporaries per step cost more
    than the additions: page faults, measured ~4x)."""
    channels = counts.shape[0]
    dtype = np.uint16 if int(counts.sum(axis=1).max()) * window < (1 << 16) else np.uint32
    a = np.empty((channels, 256 + window - 1), dtype)
    a[:, :256] = counts
    a[:, 256:] = counts[:, :window - 1]
    b = np.empty_like(a)
    width, valid = 1, a.shape[1]  # a[:, :valid] holds sums of `width` values
    while 2 * width <= window:
        valid -= width
        np.add(a[:, :valid], a[:, width:width + valid], out=b[:, :valid])
        a, b = b, a
        width *= 2
    sums = a[:, :256]
    for extra in range(width, window):  # the rest of a window that is not a power of two
        sums += np.roll(counts, -extra, axis=1).astype(dtype)
    return sums


@dataclass
class _PlanePlan:
    choices: np.ndarray  # u8 per token block
    modes: np.ndarray | None  # u8 per channel
    residual: np.ndarray  # [tokens, channels] u8, what is entropy-coded
    bits: float = 8.0  # sampled order-0 entropy of the plane, bits per byte


def _plan_plane(plane: np.ndarray, block_tokens: int, centre_window: int = 1, centre_rows: int = 8) -> _PlanePlan:
    tokens, channels = plane.shape
    blocks = -(-tokens // block_tokens)
    rows = np.arange(0, tokens, min(COST_SAMPLE_ROWS, block_tokens))
    sample = plane[rows]
    bits = _entropy_rows(np.bincount(sample.ravel(), minlength=256)[None, :])[0] / max(sample.size, 1)
    if tokens == 0 or bits >= NOISE_BITS:  # mantissa bytes: nothing to gain, keep them as they are
        return _PlanePlan(np.zeros(blocks, np.uint8), None, plane, bits)
    # Predictor costs on the sampled rows only; the full residual is built for the chosen ones.
    before = plane[np.maximum(rows - 1, 0)]
    before[rows == 0] = 0
    candidates = [sample, sample - before, sample ^ before]  # uint8 arithmetic wraps mod 256
    modes = None
    if tokens >= MIN_TOKENS_FOR_MODES:
        modes = _channel_modes(plane[::centre_rows], centre_window)
        candidates.append(sample - modes[None, :])
    # One histogram for all candidates: row (candidate, block), column byte value.
    block_key = (rows // block_tokens * 256)[:, None]
    keys = np.stack([c + (block_key + i * blocks * 256) for i, c in enumerate(candidates)])
    counts = np.bincount(keys.ravel(), minlength=len(candidates) * blocks * 256)
    costs = _entropy_rows(counts.reshape(len(candidates) * blocks, 256)).reshape(len(candidates), blocks)
    if modes is not None:  # `mode` is `raw` re-centred per channel; mixing raw blocks in would make
        costs[RAW] = np.inf  # each channel's distribution bimodal, which costs far more than it seems
    choices = _choose(costs)
    if modes is not None and not (choices == MODE).any():
        modes = None
    return _PlanePlan(choices, modes, _residual(plane, choices, modes, block_tokens), bits)


SWITCH_MARGIN = 0.10


def _choose(costs: np.ndarray) -> np.ndarray:
    """Per block predictor ids from a [predictors, blocks] cost table: the plane's best predictor
    overall, except where another one is at least SWITCH_MARGIN cheaper on a block. A block's own
    entropy ignores that all blocks share one zstd stream (one Huffman table): a block whose
    residual has another shape costs more in that stream than alone. Measured on real K/V, switching
    at any gain lost ratio (fp16 1.1812 vs 1.1846) and decode speed (delta is a cumulative sum)."""
    dominant = int(np.argmin(costs.sum(axis=1)))
    best = np.argmin(costs, axis=0)  # ties: the earlier predictor
    blocks = np.arange(costs.shape[1])
    switch = costs[best, blocks] < (1.0 - SWITCH_MARGIN) * costs[dominant]
    return np.where(switch, best, dominant).astype(np.uint8)


def _residual(plane: np.ndarray, choices: np.ndarray, modes: np.ndarray | None, block_tokens: int) -> np.ndarray:
    """The chosen predictor's residual, block by block (only what was chosen is computed)."""
    if (choices == MODE).all():
        return plane - modes[None, :]
    if (choices == RAW).all():
        return plane
    previous = None  # row t-1 for each row t (row -1 is 0), if a block predicts along the sequence
    if ((choices == DELTA) | (choices == XOR)).any():
        previous = np.zeros_like(plane)
        previous[1:] = plane[:-1]
    residual = np.empty_like(plane)
    for b, choice in enumerate(choices):
        span = slice(b * block_tokens, (b + 1) * block_tokens)
        if choice == RAW:
            residual[span] = plane[span]
        elif choice == MODE:
            np.subtract(plane[span], modes[None, :], out=residual[span])
        else:
            op = np.subtract if choice == DELTA else np.bitwise_xor
            op(plane[span], previous[span], out=residual[span])
    return residual


def encode(array: np.ndarray, dtype: str | None = None, block_tokens: int = DEFAULT_BLOCK_TOKENS,
           level: int | None = None) -> bytes:
    """Compress `array` ([tokens, ...] of 16/32-bit words) into a self-describing frame.
    `level` picks a standard zstd level instead of the tuned fast settings."""
    dtype = dtype_of(array, dtype)
    code, word = DTYPES[dtype]
    if array.ndim == 0:
        array = array.reshape(1)
    if block_tokens < 1:
        raise ValueError("block_tokens must be >= 1")
    shape = array.shape
    blocks = -(-shape[0] // block_tokens)
    planes = _planes(array, word)
    plans = [_plan_plane(plane, block_tokens, CENTRE_WINDOWS[dtype] if i == word - 1 else 1,
                         CENTRE_SAMPLE_ROWS[dtype]) for i, plane in enumerate(planes)]
    payloads = [_compressor(level, plan.bits < LOW_ENTROPY_BITS).compress(plan.residual) for plan in plans]
    header = [MAGIC, struct.pack("<BBBI", VERSION, code, len(shape), block_tokens),
              struct.pack(f"<{len(shape)}I", *shape), struct.pack("<BI", word, blocks)]
    header += [plan.choices.tobytes() for plan in plans]
    for plan, payload in zip(plans, payloads):
        header.append(struct.pack("<B", FLAG_MODES if plan.modes is not None else 0))
        if plan.modes is not None:
            header.append(plan.modes.tobytes())
        header.append(struct.pack("<I", len(payload)))
    head = b"".join(header)
    return b"".join([head, struct.pack("<I", zlib.crc32(head)), *payloads])


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

    def bytes(self, n: int, what: str = "header") -> bytes:
        if self.pos + n > len(self.frame):
            raise CodecError(f"truncated gear_delta frame ({what})")
        chunk = self.frame[self.pos:self.pos + n]
        self.pos += n
        return chunk


@dataclass
class PlaneHeader:
    modes: np.ndarray | None
    length: int  # bytes of the plane's zstd frame


@dataclass
class FrameHeader:
    dtype: str
    shape: tuple[int, ...]
    block_tokens: int
    choices: np.ndarray  # [planes, blocks] predictor ids
    planes: list[PlaneHeader]
    payload_offset: int

    @property
    def channels(self) -> int:
        return int(np.prod(self.shape[1:], dtype=np.int64)) if len(self.shape) > 1 else 1

    def predictor_counts(self) -> dict[str, dict[str, int]]:
        names = ["lo", "hi"] if len(self.choices) == 2 else [f"lane{i}" for i in range(len(self.choices))]
        return {plane: {p: int((row == i).sum()) for i, p in enumerate(PREDICTORS)}
                for plane, row in zip(names, self.choices)}


def read_header(frame: bytes) -> FrameHeader:
    """Parse and check a frame's header (not its payloads)."""
    if not isinstance(frame, (bytes, bytearray, memoryview)):
        raise CodecError(f"a gear_delta frame is bytes, got {type(frame).__name__}")
    cur = _Cursor(frame if isinstance(frame, bytes) else bytes(frame))
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
    if word != DTYPES[dtype][1] or blocks != -(-shape[0] // block_tokens):
        raise CodecError("corrupted gear_delta frame header")
    channels = int(np.prod(shape[1:], dtype=np.int64)) if ndim > 1 else 1
    choices = np.frombuffer(cur.bytes(word * blocks), dtype=np.uint8).reshape(word, blocks)
    planes = []
    for _ in range(word):
        (flags,) = cur.take("<B")
        if flags > FLAG_MODES:
            raise CodecError("corrupted gear_delta frame header")
        modes = np.frombuffer(cur.bytes(channels), dtype=np.uint8) if flags & FLAG_MODES else None
        planes.append(PlaneHeader(modes, cur.take("<I")[0]))
    header_end = cur.pos
    (header_crc,) = cur.take("<I")
    if zlib.crc32(memoryview(cur.frame)[:header_end]) != header_crc:
        raise CodecError("corrupted gear_delta frame (header checksum mismatch)")
    if (choices > MODE).any():
        raise CodecError("corrupted gear_delta frame (unknown predictor id)")
    for plane, row in zip(planes, choices):
        if (row == MODE).any() and plane.modes is None:
            raise CodecError("corrupted gear_delta frame (mode predictor without modes)")
    return FrameHeader(dtype, tuple(shape), block_tokens, choices, planes, cur.pos)


def decode(frame: bytes) -> Decoded:
    """Inverse of `encode`; bit-exact, or CodecError for any frame it cannot vouch for."""
    header = read_header(frame)
    cur = _Cursor(frame if isinstance(frame, bytes) else bytes(frame))
    cur.pos = header.payload_offset
    word = DTYPES[header.dtype][1]
    tokens, channels = header.shape[0], header.channels
    uint = UINT_WORDS[word]
    words = np.empty((tokens, channels), dtype=uint)
    shifted = np.empty_like(words) if word > 1 else None
    decompressor = _decompressor()
    for i, plane in enumerate(header.planes):
        payload = cur.bytes(plane.length, "payload")
        expected = tokens * channels
        try:
            # zstd allocates a frame's declared content size before it checks anything, so a flipped bit
            # there would ask for gigabytes: the size must be what the (checksummed) header says.
            declared = zstandard.frame_content_size(payload)
            if declared not in (expected, zstandard.CONTENTSIZE_UNKNOWN):
                raise CodecError(f"corrupted gear_delta frame (plane {i} declares {declared} bytes, "
                                 f"the header {expected})")
            raw = decompressor.decompress(payload, max_output_size=expected)
        except zstandard.ZstdError as exc:  # includes zstd's content checksum mismatch
            raise CodecError(f"corrupted gear_delta frame (plane {i}: {exc})") from None
        if len(raw) != tokens * channels:
            raise CodecError(f"corrupted gear_delta frame (plane {i} holds {len(raw)} bytes)")
        values = _unpredict(np.frombuffer(raw, dtype=np.uint8).reshape(tokens, channels), header.choices[i],
                            plane.modes, header.block_tokens)
        if i:  # words |= lane << 8i, without a temporary per lane
            np.left_shift(values, 8 * i, out=shifted, dtype=uint)
            words |= shifted
        else:
            np.copyto(words, values)
    if cur.pos != len(cur.frame):
        raise CodecError(f"gear_delta frame has {len(cur.frame) - cur.pos} trailing bytes")
    return Decoded(words.view(WORD_VIEWS[header.dtype]).reshape(header.shape), header.dtype)


def _prefix(values: np.ndarray, op) -> np.ndarray:
    """Inclusive prefix sums (op = add, wrapping mod 256) or prefix xors along axis 0, in log2(n)
    whole-array steps: numpy's own cumsum along axis 0 walks one column at a time (~8x slower here)."""
    out = values.copy()
    step = 1
    while step < len(out):
        out[step:] = op(out[step:], out[:-step])  # the right side is computed before it is stored
        step *= 2
    return out


def _unpredict(residual: np.ndarray, choices: np.ndarray, modes: np.ndarray | None,
               block_tokens: int) -> np.ndarray:
    """Undo the predictors of a token-major residual plane (read-only input; returns a new array)."""
    if (choices == RAW).all():
        return residual
    if (choices == MODE).all():
        return residual + modes[None, :]
    tokens = residual.shape[0]
    plane = residual.copy()  # raw rows are done
    for b in np.flatnonzero(choices == MODE):  # slices are views: in place, no gather
        plane[b * block_tokens:(b + 1) * block_tokens] += modes[None, :]
    # delta/xor rows depend on the row before them: runs of such blocks in order, each as one prefix
    # sum (xor) seeded with the row before the run (raw/mode rows are final by now)
    first = 0
    for choice, run in itertools.groupby(choices.tolist()):
        count = len(list(run))
        rows = slice(first * block_tokens, min(tokens, (first + count) * block_tokens))
        first += count
        if choice in (DELTA, XOR):
            op = np.add if choice == DELTA else np.bitwise_xor
            prefix = _prefix(residual[rows], op)
            plane[rows] = op(prefix, plane[rows.start - 1]) if rows.start else prefix
    return plane


def float32_to_bfloat16_words(array: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 (nearest-even), as torch does, returned as uint16 words."""
    bits = np.ascontiguousarray(array, dtype=np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
    return rounded.astype(np.uint16)


# --- the seed runtime's v2 estimate (SPEC §5) -------------------------------------------------

def _order0_bits(data: np.ndarray) -> float:
    return float(_entropy_rows(np.bincount(data.ravel(), minlength=256)[None, :])[0])


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
