"""`gear_delta`: a lossless codec for KV-cache tensors (numpy + zstandard; no torch).

Data are 16- or 32-bit float words laid out `[tokens, ...]` (for K/V: `[tokens, kv_heads,
head_dim]`); everything after the token axis is a channel. Each word is split into byte
planes (lo/hi for 16-bit words, four lanes for 32-bit). Per plane and per block of tokens a
predictor along the sequence is chosen by order-0 entropy:

- `raw`: the byte itself;
- `delta`: minus the same channel's byte one token earlier (mod 256);
- `xor`: xor with the same channel's byte one token earlier;
- `mode`: minus the channel's most frequent byte in this frame (the exponent byte of a KV
  channel sits around a channel-specific value; this removes the offset).

The residual plane is laid out channel-major and its channels are split into groups of
similar spread (per-channel entropy), each group one zstd stream, so every group gets its
own Huffman table: an approximation of coding each channel with its own statistics. A
stream that zstd cannot shrink is stored raw. `decode` is bit-exact (NaN payloads, -0.0,
denormals, inf) or raises `CodecError`; every stream and the header carry a CRC32.

`estimate` is the seed runtime's v2 ratio estimate (SPEC §5), kept for comparison.

Frame (little-endian):
    magic "GDKV" | version u8 | dtype u8 | ndim u8 | block_tokens u32 | shape u32*ndim
    | planes u8 | blocks u32 | predictor ids u8*(planes*blocks)
    | per plane: flags u8 (1 = has modes) | groups u8 | [modes u8*C] | [group ids u8*C if groups > 1]
                 | per group: storage u8 (0 raw, 1 zstd) | length u32 | crc32 u32 of its bytes
    | crc32 u32 of all the above | payloads, plane by plane, group by group
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import zstandard

MAGIC = b"GDKV"
VERSION = 2
DTYPES = {"float16": (1, 2), "bfloat16": (2, 2), "float32": (3, 4)}  # name -> (id, word bytes)
DTYPE_NAMES = {code: name for name, (code, _) in DTYPES.items()}
WORD_VIEWS = {"float16": np.float16, "bfloat16": np.uint16, "float32": np.float32}
PREDICTORS = ("raw", "delta", "xor", "mode")
RAW, DELTA, XOR, MODE = range(4)
STORE_RAW, STORE_ZSTD = 0, 1
FLAG_MODES, FLAG_VERBATIM = 1, 2
DEFAULT_BLOCK_TOKENS = 64
DEFAULT_GROUPS = 4
MIN_TOKENS_FOR_MODES = 128  # below this the per-channel side data costs more than it saves


def _zstd_params() -> zstandard.ZstdCompressionParameters:
    """Measured on real K/V: matches shorter than 7 bytes only steal symbols from the Huffman-coded
    literals (the residuals are mostly noise around a few values), so they are not searched for;
    smaller and faster than level 1 (bf16 exponent streams: 2.68 vs 2.79 bits/byte, 333 vs 264 MB/s)."""
    return zstandard.ZstdCompressionParameters(window_log=18, hash_log=12, chain_log=12, search_log=1,
                                               min_match=7, target_length=0, strategy=zstandard.STRATEGY_FAST)


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


def _row_counts(values: np.ndarray, row_of: np.ndarray, rows: int) -> np.ndarray:
    return np.bincount((row_of * 256 + values).ravel(), minlength=rows * 256).reshape(rows, 256)


def _channel_modes(plane: np.ndarray) -> np.ndarray:
    tokens, channels = plane.shape
    col = np.broadcast_to(np.arange(channels), plane.shape)
    return _row_counts(plane, col, channels).argmax(axis=1).astype(np.uint8)


def _shift_down(plane: np.ndarray) -> np.ndarray:
    previous = np.zeros_like(plane)
    previous[1:] = plane[:-1]
    return previous


NOISE_BITS = 7.9  # a plane whose sampled order-0 entropy is this high is stored as it is
COST_SAMPLE_ROWS = 8  # predictor costs are estimated on every 8th token row


@dataclass
class _PlanePlan:
    choices: np.ndarray  # u8 per token block
    modes: np.ndarray | None  # u8 per channel
    groups: np.ndarray  # u8 per channel (group id)
    streams: list[memoryview]  # residual bytes per group, channel-major (or the whole plane, token-major)
    verbatim: bool = False  # noise plane stored token-major with no predictor


def _sampled(plane: np.ndarray, block_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Every COST_SAMPLE_ROWS-th token row, and the block each sampled row belongs to."""
    rows = np.arange(0, plane.shape[0], min(COST_SAMPLE_ROWS, block_tokens))
    return rows, rows // block_tokens


def _plan_plane(plane: np.ndarray, block_tokens: int, groups: int) -> _PlanePlan:
    tokens, channels = plane.shape
    blocks = -(-tokens // block_tokens)
    rows, block_of_row = _sampled(plane, block_tokens)
    sample = plane[rows]
    bits = _entropy_rows(np.bincount(sample.ravel(), minlength=256)[None, :])[0] / max(sample.size, 1)
    if tokens == 0 or bits >= NOISE_BITS:  # mantissa bytes: nothing to gain, keep them as they are
        return _PlanePlan(np.zeros(blocks, np.uint8), None, np.zeros(channels, np.uint8),
                          [_flat(plane)], verbatim=True)
    # Predictor costs on the sampled rows only; the full residual is built for the chosen ones.
    before = plane[np.maximum(rows - 1, 0)]
    before[rows == 0] = 0
    candidates = [sample, sample - before, sample ^ before]  # uint8 arithmetic wraps mod 256
    modes = None
    if tokens >= MIN_TOKENS_FOR_MODES:
        modes = _channel_modes(sample)
        candidates.append(sample - modes[None, :])
    block_of = np.broadcast_to(block_of_row[:, None], sample.shape)
    # With modes, `raw` does not compete: `mode` is `raw` re-centred per channel, and letting raw
    # blocks in would make each channel's stream bimodal, which costs far more than it seems.
    costs = np.stack([np.full(blocks, np.inf) if (i == RAW and modes is not None)
                      else _entropy_rows(_row_counts(c, block_of, blocks)) for i, c in enumerate(candidates)])
    choices = np.argmin(costs, axis=0).astype(np.uint8)  # ties: the earlier predictor
    residual = _residual(plane, choices, modes, block_tokens)
    if modes is not None and not (choices == MODE).any():
        modes = None
    n_groups = max(1, min(groups, channels)) if modes is not None else 1
    if n_groups == 1:
        by_channel = np.ascontiguousarray(residual.T)  # [channels, tokens]
        return _PlanePlan(choices, modes, np.zeros(channels, np.uint8), [_flat(by_channel)])
    # Spread of each channel's residual (all centred at 0): mean |r| as a signed byte, on the sample.
    spread = np.abs(residual[rows].view(np.int8).astype(np.int16)).mean(axis=0)
    rank = np.empty(channels, dtype=np.int64)
    rank[np.argsort(spread, kind="stable")] = np.arange(channels)
    group_of = (rank * n_groups // channels).astype(np.uint8)
    order = np.argsort(group_of, kind="stable")
    grouped = _flat(residual.T[order])  # channel-major, grouped: one gather pass
    bounds = np.searchsorted(group_of[order], np.arange(n_groups + 1)) * tokens
    return _PlanePlan(choices, modes, group_of, [grouped[bounds[g]:bounds[g + 1]] for g in range(n_groups)])


def _flat(array: np.ndarray) -> memoryview:
    """The bytes of a uint8 array as a flat buffer (no copy when it is contiguous)."""
    return memoryview(np.ascontiguousarray(array).reshape(-1))


def _residual(plane: np.ndarray, choices: np.ndarray, modes: np.ndarray | None, block_tokens: int) -> np.ndarray:
    """The chosen predictor's residual, block by block (only what was chosen is computed)."""
    residual = np.empty_like(plane)
    previous = _shift_down(plane) if ((choices == DELTA) | (choices == XOR)).any() else None
    for b, choice in enumerate(choices):
        span = slice(b * block_tokens, (b + 1) * block_tokens)
        if choice == RAW:
            residual[span] = plane[span]
        elif choice == MODE:
            np.subtract(plane[span], modes[None, :], out=residual[span])
        elif choice == DELTA:
            np.subtract(plane[span], previous[span], out=residual[span])
        else:
            np.bitwise_xor(plane[span], previous[span], out=residual[span])
    return residual


def encode(array: np.ndarray, dtype: str | None = None, block_tokens: int = DEFAULT_BLOCK_TOKENS,
           level: int | None = None, groups: int = DEFAULT_GROUPS) -> bytes:
    """Compress `array` ([tokens, ...] of 16/32-bit words) into a self-describing frame."""
    dtype = dtype_of(array, dtype)
    code, word = DTYPES[dtype]
    if array.ndim == 0:
        array = array.reshape(1)
    if block_tokens < 1 or not 1 <= groups <= 255:
        raise ValueError("block_tokens must be >= 1 and groups in 1..255")
    shape = array.shape
    tokens = shape[0]
    blocks = -(-tokens // block_tokens)
    plans = [_plan_plane(plane, block_tokens, groups) for plane in _planes(array, word)]
    compressor = (zstandard.ZstdCompressor(level=level) if level is not None
                  else zstandard.ZstdCompressor(compression_params=_zstd_params()))
    header = [MAGIC, struct.pack("<BBBI", VERSION, code, len(shape), block_tokens),
              struct.pack(f"<{len(shape)}I", *shape), struct.pack("<BI", word, blocks)]
    header += [plan.choices.tobytes() for plan in plans]
    payloads = []
    for plan in plans:
        n_groups = len(plan.streams)
        flags = (FLAG_MODES if plan.modes is not None else 0) | (FLAG_VERBATIM if plan.verbatim else 0)
        header.append(struct.pack("<BB", flags, n_groups))
        if plan.modes is not None:
            header.append(plan.modes.tobytes())
        if n_groups > 1:
            header.append(plan.groups.tobytes())
        for raw in plan.streams:
            packed = compressor.compress(raw) if raw and not plan.verbatim else raw
            storage, payload = (STORE_ZSTD, packed) if len(packed) < len(raw) else (STORE_RAW, raw)
            header.append(struct.pack("<BII", storage, len(payload), zlib.crc32(raw)))
            payloads.append(payload)
    head = b"".join(header)
    return head + struct.pack("<I", zlib.crc32(head)) + b"".join(payloads)


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
    groups: np.ndarray  # group id per channel
    table: list[tuple[int, int, int]]  # per group: storage, payload length, crc32
    verbatim: bool = False  # the plane as it is, token-major


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
        flags, n_groups = cur.take("<BB")
        verbatim = bool(flags & FLAG_VERBATIM)
        if flags > 3 or n_groups == 0 or (verbatim and (n_groups > 1 or flags & FLAG_MODES)):
            raise CodecError("corrupted gear_delta frame header")
        modes = np.frombuffer(cur.bytes(channels), dtype=np.uint8) if flags & FLAG_MODES else None
        groups = (np.frombuffer(cur.bytes(channels), dtype=np.uint8) if n_groups > 1
                  else np.zeros(channels, dtype=np.uint8))
        planes.append(PlaneHeader(modes, groups, [cur.take("<BII") for _ in range(n_groups)], verbatim))
    header_end = cur.pos
    (header_crc,) = cur.take("<I")
    if zlib.crc32(cur.frame[:header_end]) != header_crc:
        raise CodecError("corrupted gear_delta frame (header checksum mismatch)")
    if (choices > MODE).any():
        raise CodecError("corrupted gear_delta frame (unknown predictor id)")
    for plane, row in zip(planes, choices):
        if plane.verbatim and row.any():
            raise CodecError("corrupted gear_delta frame (verbatim plane with a predictor)")
        if (row == MODE).any() and plane.modes is None:
            raise CodecError("corrupted gear_delta frame (mode predictor without modes)")
        if (plane.groups >= len(plane.table)).any():
            raise CodecError("corrupted gear_delta frame (bad channel group)")
    return FrameHeader(dtype, tuple(shape), block_tokens, choices, planes, cur.pos)


def decode(frame: bytes) -> Decoded:
    """Inverse of `encode`; bit-exact, or CodecError for any frame it cannot vouch for."""
    header = read_header(frame)
    cur = _Cursor(frame if isinstance(frame, bytes) else bytes(frame))
    cur.pos = header.payload_offset
    word = DTYPES[header.dtype][1]
    tokens, channels = header.shape[0], header.channels
    out = np.empty((tokens, channels, word), dtype=np.uint8)
    decompressor = zstandard.ZstdDecompressor()
    for i, plane in enumerate(header.planes):
        lane = i if np.little_endian else word - 1 - i
        if plane.verbatim:
            raw = _stream(cur, decompressor, plane.table[0], tokens * channels, i, 0)
            out[:, :, lane] = np.frombuffer(raw, dtype=np.uint8).reshape(tokens, channels)
            continue
        order = np.argsort(plane.groups, kind="stable")
        counts = np.bincount(plane.groups, minlength=len(plane.table))
        grouped = b"".join(_stream(cur, decompressor, entry, int(counts[g]) * tokens, i, g)
                           for g, entry in enumerate(plane.table))
        by_channel = np.empty((channels, tokens), dtype=np.uint8)
        by_channel[order] = np.frombuffer(grouped, dtype=np.uint8).reshape(channels, tokens)
        out[:, :, lane] = _unpredict(by_channel.T, header.choices[i], plane.modes, header.block_tokens)
    if cur.pos != len(cur.frame):
        raise CodecError(f"gear_delta frame has {len(cur.frame) - cur.pos} trailing bytes")
    words = out.reshape(-1).view({2: np.uint16, 4: np.uint32}[word])
    return Decoded(words.view(WORD_VIEWS[header.dtype]).reshape(header.shape), header.dtype)


def _stream(cur: _Cursor, decompressor, entry: tuple[int, int, int], size: int, plane: int, group: int) -> bytes:
    storage, length, crc = entry
    payload = cur.bytes(length, "payload")
    if storage == STORE_ZSTD:
        try:
            raw = decompressor.decompress(payload, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise CodecError(f"corrupted gear_delta frame (plane {plane}, group {group}: {exc})") from None
    elif storage == STORE_RAW:
        raw = payload
    else:
        raise CodecError("corrupted gear_delta frame (unknown storage mode)")
    if len(raw) != size or zlib.crc32(raw) != crc:
        raise CodecError(f"corrupted gear_delta frame (plane {plane}, group {group} checksum mismatch)")
    return raw


def _unpredict(residual: np.ndarray, choices: np.ndarray, modes: np.ndarray | None,
               block_tokens: int) -> np.ndarray:
    tokens = residual.shape[0]
    plane = np.array(residual, dtype=np.uint8, order="C")  # raw rows are done
    if modes is not None:
        if (choices == MODE).all():
            plane += modes[None, :]
        else:
            for b in np.flatnonzero(choices == MODE):  # slices are views: in place, no gather
                plane[b * block_tokens:(b + 1) * block_tokens] += modes[None, :]
    # delta/xor rows depend on the row before them: blocks in order (raw/mode rows are final now)
    for b in np.flatnonzero((choices == DELTA) | (choices == XOR)):
        rows = slice(b * block_tokens, min(tokens, (b + 1) * block_tokens))
        previous = plane[rows.start - 1] if rows.start else np.zeros(plane.shape[1], np.uint8)
        stacked = np.vstack([previous, residual[rows]])
        if choices[b] == DELTA:  # x[t] = x[t-1] + r[t]; running sums wrap mod 256
            plane[rows] = np.cumsum(stacked, axis=0, dtype=np.uint8)[1:]
        else:
            plane[rows] = np.bitwise_xor.accumulate(stacked, axis=0)[1:]
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
