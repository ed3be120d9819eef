"""The lossless codec inside the runtime (SPEC §5): cadence, the three modes, and their figures.

- `estimate`: the seed's v2 entropy estimate per KV head; nothing is encoded.
- `full`: really encode the layer's K/V, decode, verify bit-exactness; report real sizes.
  Memory is not saved (the raw cache stays as it is); the figure is what `store` would save.
- `store`: the cold part of the layer (all but the recent window, block-aligned) is held as
  gear_delta frames and decoded when attention needs it; the saving is real and counted in
  the physical KV size.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from . import codec


def to_numpy_words(tensor: torch.Tensor) -> tuple[np.ndarray, str]:
    """[1, kv_heads, T, D] cache tensor -> ([T, kv_heads, D] words, codec dtype name)."""
    t = tensor[0].transpose(0, 1).contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), "bfloat16"
    return t.numpy(), {torch.float16: "float16", torch.float32: "float32"}[t.dtype]


def from_numpy_words(words: np.ndarray, dtype: str) -> torch.Tensor:
    """Inverse of to_numpy_words."""
    t = torch.from_numpy(np.ascontiguousarray(words))
    if dtype == "bfloat16":
        t = t.view(torch.int16).view(torch.bfloat16)
    return t.transpose(0, 1).unsqueeze(0).contiguous()


@dataclass
class ColdFrame:
    """tokens [begin, begin+tokens) of one layer, K and V each as a gear_delta frame."""

    tokens: int
    key: bytes
    value: bytes
    raw_bytes: int

    @property
    def compressed_bytes(self) -> int:
        return len(self.key) + len(self.value)


@dataclass
class LayerCodec:
    """One in-scope layer's codec state: cadence clock and latest measurement."""

    mode: str
    update_interval: int
    trigger_min_tokens: int
    raw_window_tokens: int  # store mode: tokens that stay raw at the end (the recent window)
    align_tokens: int
    steps_since_run: int = 0
    raw_bytes: int = 0
    compressed_bytes: float = 0.0
    encode_us: float = 0.0
    decode_us: float = 0.0
    measurements: int = 0  # codec runs so far (estimate, full or store)
    cold: list[ColdFrame] = field(default_factory=list)

    def reset(self) -> None:
        self.steps_since_run = self.measurements = self.raw_bytes = 0
        self.compressed_bytes = self.encode_us = self.decode_us = 0.0
        self.cold = []

    @property
    def cold_tokens(self) -> int:
        return sum(f.tokens for f in self.cold)

    @property
    def cold_compressed_bytes(self) -> int:
        return sum(f.compressed_bytes for f in self.cold)

    def due(self, kv: int) -> bool:
        self.steps_since_run += 1
        if self.measurements == 0:
            return True  # while it has never produced a ratio
        return kv >= self.trigger_min_tokens and self.steps_since_run >= self.update_interval

    def measure(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """estimate / full modes: measure the layer's whole current K/V."""
        started = time.perf_counter()
        raw, packed = 0, 0.0
        if self.mode == "estimate":
            for tensor in (keys, values):
                words, dtype = to_numpy_words(tensor)
                for head in range(words.shape[1]):  # one v2 "call" per KV head
                    r, est = codec.estimate_bytes(words[:, head], dtype)
                    raw += r
                    packed += min(est, r)
            self.encode_us = (time.perf_counter() - started) * 1e6
        else:
            frames = []
            for tensor in (keys, values):
                words, dtype = to_numpy_words(tensor)
                frames.append((words, codec.encode(words, dtype)))
            self.encode_us = (time.perf_counter() - started) * 1e6
            started = time.perf_counter()
            for words, frame in frames:
                if codec.decode(frame).array.tobytes() != words.tobytes():
                    raise RuntimeError("gear_delta round trip failed verification")  # must never happen
                raw += words.nbytes
                packed += len(frame)
            self.decode_us = (time.perf_counter() - started) * 1e6
        self.raw_bytes, self.compressed_bytes = raw, packed
        self.steps_since_run = 0
        self.measurements += 1

    def store_cold(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """store mode: move hot tokens that left the raw window into a new cold frame.
        `keys`/`values` are the hot (raw) part; returns the new hot part."""
        hot = keys.shape[2]
        total = self.cold_tokens + hot
        cold_end = max(0, total - self.raw_window_tokens) // self.align_tokens * self.align_tokens
        move = cold_end - self.cold_tokens
        started = time.perf_counter()
        if move > 0:
            kw, dtype = to_numpy_words(keys[:, :, :move])
            vw, _ = to_numpy_words(values[:, :, :move])
            self.cold.append(ColdFrame(move, codec.encode(kw, dtype), codec.encode(vw, dtype),
                                       kw.nbytes + vw.nbytes))
            keys, values = keys[:, :, move:].clone(), values[:, :, move:].clone()
        self.encode_us = (time.perf_counter() - started) * 1e6
        self.raw_bytes = sum(f.raw_bytes for f in self.cold)
        self.compressed_bytes = self.cold_compressed_bytes
        self.steps_since_run = 0
        self.measurements += 1
        return keys, values

    def load_cold(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """store mode: the cold tokens decoded, or None if there are none."""
        if not self.cold:
            return None
        started = time.perf_counter()
        keys = torch.cat([from_numpy_words(*_decoded(f.key)) for f in self.cold], dim=2)
        values = torch.cat([from_numpy_words(*_decoded(f.value)) for f in self.cold], dim=2)
        self.decode_us = (time.perf_counter() - started) * 1e6
        return keys, values


def _decoded(frame: bytes) -> tuple[np.ndarray, str]:
    out = codec.decode(frame)
    return out.array, out.dtype
