"""A GGUF's quantized weight blocks, as stored, for the fast decode path (`llm_weight_dtype`).

The default model ships as a Q4_1 GGUF: 20 bytes per 32 weights (fp16 scale d, fp16 minimum m,
16 bytes of nibbles; w = d q + m), and its tied embedding / lm_head as Q8_0 (34 bytes per 32:
fp16 d, 32 int8; w = d q). The transformers model h2okit prefills with holds these weights
dequantised to float32, so it *is* the reference: dequantising a block gives the same float32
values bit for bit, and the fast path's kernels read the blocks themselves (3-6x fewer bytes
than fp32/bf16), regrouped by 16 rows (`QuantMatrix.kernel_layout`: the same bytes in the order
the kernels unpack them fastest). `QuantMatrix.dequantize` is that reference, used by the tests.

Llama GGUFs store attn_q and attn_k rows permuted for llama.cpp's interleaved RoPE; transformers
un-permutes them on load, and `_llama_rope_rows` applies the same row permutation here (whole
rows of blocks move, so it is exact). `load_llama_blocks` checks one layer's q rows against the
loaded model before anything uses them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import kernels

# GGML type name -> the kernels' dtype code; the block types the kernels read as stored
KERNEL_CODES = {"Q4_1": kernels.Q4_1, "Q8_0": kernels.Q8_0}
BLOCK = 32


class BlocksUnavailable(Exception):
    """Why the GGUF's blocks cannot be used as asked (one line)."""


@dataclass
class QuantMatrix:
    """One weight matrix [rows, cols] as GGML blocks: `blocks` is uint8 [rows, cols / 32 * block bytes]."""

    type_name: str  # "Q4_1" or "Q8_0"
    blocks: np.ndarray
    cols: int

    @property
    def code(self) -> int:
        return KERNEL_CODES[self.type_name]

    @property
    def nbytes(self) -> int:
        return self.blocks.nbytes

    def dequantize(self) -> np.ndarray:
        """The float32 weights these blocks stand for (gguf-py's dequantisation, the one transformers uses)."""
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        return dequantize(self.blocks, GGMLQuantizationType[self.type_name]).reshape(-1, self.cols)

    def kernel_layout(self) -> np.ndarray:
        """The blocks as the kernels read them (kernels/llama_decode.c, "regrouped"): uint8 [rows, row bytes]
        holding, per group of kernels.QGROUP rows (the last may be shorter), the group's fp16 scales
        [blocks][rows], for Q4_1 its fp16 minima [blocks][rows], then its quants [blocks][rows][bytes]."""
        rows, nb = self.blocks.shape[0], self.cols // BLOCK
        blocks = self.blocks.reshape(rows, nb, -1)
        starts = [0, 2, 4] if self.type_name == "Q4_1" else [0, 2]  # d, (m,) quants: where each field begins
        groups = []
        for start in range(0, rows, kernels.QGROUP):
            group = blocks[start:start + kernels.QGROUP].swapaxes(0, 1)  # [blocks][rows][block bytes]
            groups.extend(np.ascontiguousarray(field).reshape(-1) for field in np.split(group, starts[1:], axis=2))
        return np.concatenate(groups).reshape(self.blocks.shape)

    @classmethod
    def quantize(cls, weights: np.ndarray, type_name: str) -> QuantMatrix:
        """Blocks for float weights [rows, cols] (cols a multiple of 32), by gguf-py's quantiser."""
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize

        weights = np.ascontiguousarray(weights, dtype=np.float32)
        return cls(type_name, quantize(weights, GGMLQuantizationType[type_name]), weights.shape[1])

    @classmethod
    def stack(cls, parts: list[QuantMatrix]) -> QuantMatrix:
        """Rows of several matrices of one type and width, one after another (fused qkv, gate_up)."""
        kinds = {(p.type_name, p.cols) for p in parts}
        if len(kinds) != 1:
            raise BlocksUnavailable(f"cannot fuse matrices of different block types or widths: {sorted(kinds)}")
        return cls(parts[0].type_name, np.ascontiguousarray(np.concatenate([p.blocks for p in parts])), parts[0].cols)


@dataclass
class LlamaBlocks:
    """A Llama-style model's decode weights as blocks, in the fast path's fused layout."""

    qkv: list[QuantMatrix]  # per layer: [q; k; v] rows
    o: list[QuantMatrix]
    gate_up: list[QuantMatrix]  # per layer: [gate; up] rows
    down: list[QuantMatrix]
    head: QuantMatrix  # lm_head (the token embedding when tied)


def _llama_rope_rows(rows: int, heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's q/k permutation (as transformers' GGUF loader does):
    within each head, rows (pair i, half j) go back to (half j, pair i)."""
    half = rows // heads // 2
    return np.arange(rows).reshape(heads, half, 2).swapaxes(1, 2).reshape(-1)


@dataclass(frozen=True)
class _TensorInfo:
    type_name: str
    cols: int  # GGUF lists the fastest-varying dimension first
    offset: int  # bytes from the start of the file
    n_bytes: int


def tensor_table_path(path: Path) -> Path:
    """Where the GGUF's tensor table is cached: beside its converted model, keyed by the same fingerprint."""
    from .model import converted_dir

    folder = converted_dir(path)
    return folder.with_name(folder.name + ".tensors.json")


def tensor_table(path: Path) -> dict[str, _TensorInfo]:
    """Name -> where a tensor's bytes are, for every tensor of the GGUF. gguf-py's reader parses all
    metadata (49k tokenizer strings: ~3 s) to get there, so the table is kept in the user cache,
    keyed by the file's fingerprint, and later loads only map the file."""
    from .io import read_json, write_json_atomic

    cached = tensor_table_path(path)
    if cached.is_file():
        try:
            return {name: _TensorInfo(**info) for name, info in read_json(cached, "tensor table", ValueError).items()}
        except (ValueError, TypeError, AttributeError):
            pass  # unreadable or from another version: rebuild it
    from gguf import GGUFReader

    try:
        tensors = GGUFReader(path).tensors
    except (OSError, ValueError) as exc:
        raise BlocksUnavailable(f"cannot read GGUF tensors of {path.name}: {exc}") from None
    table = {t.name: _TensorInfo(t.tensor_type.name, int(t.shape[0]), int(t.data_offset), int(t.n_bytes))
             for t in tensors}
    cached.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cached, {name: vars(info) for name, info in table.items()})
    return table


def _block_bytes(type_name: str) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    return GGML_QUANT_SIZES[GGMLQuantizationType[type_name]][1]


def _stored(path: Path, table: dict[str, _TensorInfo]) -> Callable[[str], QuantMatrix]:
    """A getter of the file's tensors as QuantMatrix views of the mapped file (kernel block types only)."""
    data = np.memmap(path, dtype=np.uint8, mode="r")

    def get(name: str) -> QuantMatrix:
        if name not in table:
            raise BlocksUnavailable(f"{path.name} has no tensor {name} (not a Llama-layout GGUF?)")
        info = table[name]
        if info.type_name not in KERNEL_CODES:
            raise BlocksUnavailable(f"{path.name}: tensor {name} is stored as {info.type_name}; the fast path reads "
                                    f"{' and '.join(KERNEL_CODES)} blocks as stored")
        row_bytes = info.cols // BLOCK * _block_bytes(info.type_name)
        raw = data[info.offset:info.offset + info.n_bytes]
        return QuantMatrix(info.type_name, np.asarray(raw).reshape(-1, row_bytes), info.cols)

    return get


def load_head_blocks(path: Path) -> QuantMatrix:
    """The lm_head as stored (the token embedding when the model ties them)."""
    table = tensor_table(path)
    return _stored(path, table)("output.weight" if "output.weight" in table else "token_embd.weight")


def load_llama_blocks(path: Path, num_layers: int, q_heads: int, kv_heads: int,
                      qk_permuted: bool = True) -> LlamaBlocks:
    """The GGUF's own blocks for every decode matrix of a Llama-style model (no dequantisation;
    the matrices are views of the mapped file until they are fused). `qk_permuted`: the converter
    permuted attn_q / attn_k rows (llama.cpp does for Llama, not for Gemma)."""
    table = tensor_table(path)
    get = _stored(path, table)
    qkv, o, gate_up, down = [], [], [], []
    for i in range(num_layers):
        q, k = get(f"blk.{i}.attn_q.weight"), get(f"blk.{i}.attn_k.weight")
        if qk_permuted:
            q.blocks = q.blocks[_llama_rope_rows(q.blocks.shape[0], q_heads)]
            k.blocks = k.blocks[_llama_rope_rows(k.blocks.shape[0], kv_heads)]
        qkv.append(QuantMatrix.stack([q, k, get(f"blk.{i}.attn_v.weight")]))
        o.append(get(f"blk.{i}.attn_output.weight"))
        gate_up.append(QuantMatrix.stack([get(f"blk.{i}.ffn_gate.weight"), get(f"blk.{i}.ffn_up.weight")]))
        down.append(get(f"blk.{i}.ffn_down.weight"))
    return LlamaBlocks(qkv, o, gate_up, down, load_head_blocks(path))


def check_against(blocks: QuantMatrix, weights: np.ndarray, what: str) -> None:
    """Raise BlocksUnavailable unless the blocks dequantise exactly to `weights` (the loaded model's)."""
    if not np.array_equal(blocks.dequantize(), weights):
        raise BlocksUnavailable(f"the GGUF's {what} blocks do not dequantise to the loaded model's weights "
                                f"(an unknown row layout?)")
