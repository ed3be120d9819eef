"""The fast decode path: one token through a Llama-style or Gemma 3 model, in C kernels
(kernels/llama_decode.c; the family differences are described in arch.py).

A decode step reads every weight once, so its speed is memory bandwidth. The transformers
forward of one token reads weights at ~10-20 GB/s on this CPU (F.linear's single-row GEMM,
plus ~20 small torch ops per layer); these kernels read them at ~30+ GB/s, in one C call per
step (h2k_decode_step; three kernels per layer inside it). It is the same math as the reference
path:

    x = embed[token] (* embed_scale)
    per layer:  qkv = W_qkv · rmsnorm(x), [q/k norms], RoPE on q and k,
                k and v written into the cache layer's slot  (h2k_attention_input)
                a, mass = attention(q, K, V)                 one query per head, over the cache (a
                                                             sliding layer: its last `window` slots);
                                                             mass summed per KV head and H2O block
                                                             (h2k_attend)
                scores = decay * scores + gain * mass        the scorer's own step, in place (h2k_update_scores)
                x += [norm](W_o a);  h = rmsnorm(x);
                x += [norm](W_down (act(W_gate h) * W_up h)) (h2k_mlp_block)
    logits = W_head · rmsnorm(x)                             (h2k_norm_gemv)
    then, in Python, per layer: count the token, tick the policy clock, and plan and compact where
    an eviction is due (H2OCache.after_fused_step: the same code as the reference path's). Layers
    the fused step cannot serve (store mode, the `mean` scorer) take one call per kernel and layer.

The cache objects and the policy are shared with the reference path, so eviction decisions
come from the same code; only the floating-point summation order differs (logits agree to
~1e-5 in float32, see tests/test_e2e_fastpath.py). Prefill stays on the transformers forward
(it is compute-bound, where torch's GEMM is already good). The weights are re-laid once per
model and weight type (`FastDecoder.for_model`), however many engines use it.

Which weights a step reads is `llm_weight_dtype` (`decode_weights`). By default, a GGUF that
stores its matrices as Q4_1/Q8_0 blocks is read as stored (gguf_blocks.py; the same bytes,
regrouped by 16 rows for the kernels): the model h2okit prefills with holds exactly those weights
dequantised, so this is the same model in 3-6x fewer bytes than fp32/bf16 copies. Layers stored
in other types (Gemma 3's Q4_K_M file mixes four) are read as the model's floats, and its lm_head
still as stored when that is Q4_1/Q8_0. Activations
are float32 in every weight type; bf16 weights are widened as they are read, so a bf16 model on
this path is slightly *more* precise than transformers' bf16 forward.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from . import hugepages, kernels
from .arch import Architecture, ArchitectureUnsupported, architecture_of
from .cache import H2OCache
from .config import ConfigError
from .model import head_dim_of
from .threads import ThreadChooser

log = logging.getLogger(__name__)

_FLOAT_CODES = {torch.float32: kernels.F32, torch.bfloat16: kernels.BF16}
_FLOAT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_KV_CODES = {torch.float32: kernels.F32, torch.bfloat16: kernels.BF16, torch.float16: kernels.F16}


@dataclass(frozen=True)
class _SlotSource:
    """What a fused step's cache slot (`h2k_layer_cache`) was last filled from; its fields are set again
    only when these change (casting pointers was most of the per-step Python). Weak references: a
    finished request's cache must not be kept alive by its old slots."""

    layer: weakref.ref
    k: int
    v: int
    stride: int
    block: int
    scores: weakref.ref | None
    appends: bool  # H2OLayer.appends_in_place: later steps set only the slot's length and RoPE rows...
    buffer: weakref.ref  # ...while the layer keeps this buffer (KVBuffer)...
    moves: int  # ...which has not moved...
    capacity: int  # ...and has room for the step's token (and a scored layer's scores serve it as they are)


@dataclass(frozen=True)
class _RopeTable:
    """One RoPE table (float32 cos/sin rows [positions, head_dim]) and where its rows are, so that a row's
    pointer is address arithmetic (indexing the tensor cost a few us a row)."""

    cos: torch.Tensor
    sin: torch.Tensor
    cos_at: int
    sin_at: int
    row_bytes: int

    @classmethod
    def of(cls, cos: torch.Tensor, sin: torch.Tensor) -> _RopeTable:
        return cls(cos, sin, cos.data_ptr(), sin.data_ptr(), cos.stride(0) * cos.element_size())

    @property
    def positions(self) -> int:
        return self.cos.shape[0]

    def rows(self, position: int) -> tuple[object, object]:
        offset = position * self.row_bytes
        return kernels.address(self.cos_at + offset), kernels.address(self.sin_at + offset)


class FastPathUnavailable(Exception):
    """Why this model cannot take the fast path (one line); the reference path is used instead."""


def unsupported_reason(model) -> str | None:
    """None if the fast path can run `model`, else why not."""
    try:
        architecture_of(model)
    except ArchitectureUnsupported as exc:
        return str(exc)
    if model.lm_head.weight.dtype not in _FLOAT_CODES:
        return f"weights in {model.lm_head.weight.dtype} (fast path: float32 or bfloat16 models)"
    return None


_ptr = kernels.ptr


@dataclass
class Matrix:
    """One decode weight matrix as the kernels read it: `data` is float32 [rows, cols], bf16 [rows, cols]
    in tiles (kernels.bf16_tiles) or uint8 GGML blocks [rows, block bytes per row] regrouped for the
    kernels (gguf_blocks.QuantMatrix.kernel_layout);
    `code` the kernels' dtype (kept alive here: the kernels get pointers)."""

    data: torch.Tensor
    code: int

    @property
    def nbytes(self) -> int:
        return self.data.numel() * self.data.element_size()


@dataclass
class DecodeWeights:
    """Every matrix a decode step reads, in the kernels' fused layout, and what they are."""

    qkv: list[Matrix]  # per layer: [q; k; v] rows, one GEMV instead of three
    o: list[Matrix]
    gate_up: list[Matrix]  # per layer: [gate; up] rows
    down: list[Matrix]
    head: Matrix
    description: str  # e.g. "Q4_1 blocks as stored in the GGUF, lm_head Q8_0"

    @property
    def layer_code(self) -> int:
        """The one weight type of every layer matrix (h2k_dims carries one; `_block_weights` ensures it)."""
        return self.qkv[0].code

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for group in (self.qkv, self.o, self.gate_up, self.down) for m in group) \
            + self.head.nbytes

    @property
    def quantized(self) -> list[str]:
        """Which matrices are Q4_1/Q8_0 blocks (those `llm_activation_dtype` q8 applies to)."""
        blocks = (kernels.Q4_1, kernels.Q8_0)
        return [name for name, code in (("layers", self.layer_code), ("lm_head", self.head.code)) if code in blocks]


def _from_modules(model, mat, description: str, head: Matrix | None = None) -> DecodeWeights:
    """Every decode matrix made by `mat(*linears)` from the model's own Linear modules, in the fused
    layout (`head`: a given lm_head instead, e.g. its stored blocks)."""
    blocks = model.model.layers
    return DecodeWeights(
        qkv=[mat(b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj) for b in blocks],
        o=[mat(b.self_attn.o_proj) for b in blocks],
        gate_up=[mat(b.mlp.gate_proj, b.mlp.up_proj) for b in blocks],
        down=[mat(b.mlp.down_proj) for b in blocks],
        head=head if head is not None else mat(model.lm_head), description=description)


def _float_weights(model, dtype: torch.dtype, description: str, head: Matrix | None = None) -> DecodeWeights:
    """Float copies of every decode matrix."""
    code = _FLOAT_CODES[dtype]

    def mat(*parts) -> Matrix:
        data = torch.cat([p.weight.detach().to(dtype) for p in parts]).contiguous()
        return Matrix(kernels.bf16_tiles(data) if code == kernels.BF16 else data, code)

    return _from_modules(model, mat, description, head)


def _block_matrix(q) -> Matrix:
    """A QuantMatrix as the kernels read it (its blocks regrouped: a copy, not the file's pages)."""
    return Matrix(torch.from_numpy(q.kernel_layout()), q.code)


HEAD_CHECK_ROWS = 256  # rows of a stored lm_head checked against the model (all 262k of Gemma's take ~2 s)


def _stored_head(loaded) -> tuple[Matrix, str] | None:
    """The GGUF's own lm_head blocks when it stores them in a kernel type and they dequantise exactly to
    the loaded model's first rows (a float32 model), with their type name; else None."""
    from .gguf_blocks import BlocksUnavailable, check_against, load_head_blocks

    if loaded.source is None or not loaded.source.is_file() or loaded.model.lm_head.weight.dtype != torch.float32:
        return None
    try:
        head = load_head_blocks(loaded.source)
        rows = min(HEAD_CHECK_ROWS, head.blocks.shape[0])
        part = type(head)(head.type_name, head.blocks[:rows], head.cols)
        check_against(part, loaded.model.lm_head.weight[:rows].detach().numpy(), "lm_head")
    except BlocksUnavailable:
        return None
    return _block_matrix(head), head.type_name


def _block_weights(loaded, mode: str) -> DecodeWeights:
    """The GGUF's own blocks (q4_1: as stored, Q4_1 layers and a Q8_0 head; q8_0: stored Q8_0 as is,
    any other matrix re-quantized to Q8_0 from the model's float weights, which is *not* exact)."""
    from .gguf_blocks import BlocksUnavailable, QuantMatrix, check_against, load_llama_blocks

    model = loaded.model
    if loaded.source is None or not loaded.source.is_file():
        raise ConfigError(f"llm_weight_dtype '{mode}' reads a GGUF's blocks; the model {loaded.source} is not a "
                          f"GGUF file (use bf16 or fp32)")
    try:
        blocks = load_llama_blocks(loaded.source, loaded.num_layers, loaded.q_heads, loaded.kv_heads,
                                   architecture_of(model).gguf_qk_permuted)
        attn = model.model.layers[0].self_attn
        if model.lm_head.weight.dtype == torch.float32:  # a bf16 model holds rounded weights: nothing to match
            check_against(blocks.qkv[0], torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])
                          .detach().numpy(), "layer 0 q/k/v")
    except BlocksUnavailable as exc:
        if mode == "q8_0" and model.lm_head.weight.dtype == torch.float32:
            return _q8_0_from_floats(loaded, str(exc).split(": ", 1)[-1])
        raise ConfigError(f"llm_weight_dtype '{mode}': {exc}") from None
    layer_blocks = [*blocks.qkv, *blocks.o, *blocks.gate_up, *blocks.down]
    kinds = sorted({q.type_name for q in layer_blocks})
    requantize = mode == "q8_0" and kinds != ["Q8_0"]
    if len(kinds) > 1 and not requantize:  # h2k_dims carries one weight type for all layer matrices
        raise ConfigError(f"llm_weight_dtype '{mode}': the GGUF's layer matrices mix {' and '.join(kinds)} blocks "
                          f"(the fast path reads one type per model; use q8_0, bf16 or fp32)")

    def mat(q: QuantMatrix) -> Matrix:
        if mode == "q8_0" and q.type_name != "Q8_0":
            q = QuantMatrix.quantize(q.dequantize(), "Q8_0")
        return _block_matrix(q)

    description = (f"Q8_0 blocks (re-quantized from {'/'.join(kinds)}: not bit-exact to the model)" if requantize
                   else f"{'/'.join(kinds)} blocks as stored in the GGUF, lm_head {blocks.head.type_name}")
    return DecodeWeights([mat(q) for q in blocks.qkv], [mat(q) for q in blocks.o], [mat(q) for q in blocks.gate_up],
                         [mat(q) for q in blocks.down], mat(blocks.head), description)


def _q8_0_from_floats(loaded, reason: str) -> DecodeWeights:
    """`q8_0` for a GGUF whose layers are stored in types the kernels do not read (Gemma 3's Q5_0, Q4_K,
    Q6_K): every layer matrix quantised to Q8_0 from the model's float32 weights (close, *not* exact),
    the lm_head as stored when that is Q8_0 (exact), else quantised too."""
    from .gguf_blocks import QuantMatrix

    model = loaded.model

    def mat(*parts) -> Matrix:
        weights = torch.cat([p.weight.detach().float() for p in parts]).numpy()
        return _block_matrix(QuantMatrix.quantize(weights, "Q8_0"))

    stored = _stored_head(loaded)
    head_as_stored = stored is not None and stored[1] == "Q8_0"
    head = "Q8_0 blocks as stored" if head_as_stored else "re-quantized to Q8_0"
    return _from_modules(model, mat, f"Q8_0 layers re-quantized from the model's floats ({reason}; not bit-exact "
                                     f"to the model), lm_head {head}", head=stored[0] if head_as_stored else None)


def _slot_args(slot: tuple[int, int, int] | None) -> tuple[object, object, int]:
    """(K address, V address, head stride) of a cache slot for the kernels; NULLs when there is none."""
    if slot is None:
        return kernels.NULL, kernels.NULL, 0
    return kernels.address(slot[0]), kernels.address(slot[1]), slot[2]


def decode_weights(loaded) -> DecodeWeights:
    """The weights the fast path reads for `loaded.weight_dtype` (config.WEIGHT_DTYPES), packed into one
    buffer of huge pages (hugepages.py: a decode step streams all of them); the description says how
    much of it the kernel actually backed with huge pages."""
    weights = _chosen_weights(loaded)
    layers = len(weights.qkv)
    matrices = [*weights.qkv, *weights.o, *weights.gate_up, *weights.down, weights.head]
    packed = [Matrix(data, m.code) for data, m in zip(hugepages.pack([m.data for m in matrices]), matrices)]
    huge = hugepages.huge_bytes([m.data for m in packed])
    per_kind = [packed[i * layers:(i + 1) * layers] for i in range(4)]
    total = sum(m.nbytes for m in packed)
    return DecodeWeights(*per_kind, packed[-1], f"{weights.description}; {min(huge, total) / 2**20:.0f} of "
                                                f"{total / 2**20:.0f} MB in huge pages")


def _chosen_weights(loaded) -> DecodeWeights:
    """The weights for `loaded.weight_dtype`: auto = the GGUF's blocks when it stores the decode matrices
    as Q4_1/Q8_0 (exact, fewest bytes), else the model's own float type for the layers, with the lm_head
    as stored if that is exact."""
    mode, model = loaded.weight_dtype, loaded.model
    if mode in _FLOAT_DTYPES:
        return _float_weights(model, _FLOAT_DTYPES[mode], f"{mode} copies of the model's weights")
    if mode == "auto":
        try:
            return _block_weights(loaded, "q4_1")
        except ConfigError as exc:
            dtype = model.lm_head.weight.dtype
            name = "fp32" if dtype == torch.float32 else "bf16"
            reason = str(exc).split(": ", 1)[-1]
            stored = _stored_head(loaded)
            if stored is None:
                return _float_weights(model, dtype, f"{name}, the model's own ({reason})")
            head, kind = stored
            return _float_weights(model, dtype, f"{name} layers, the model's own ({reason}); lm_head {kind} "
                                                f"blocks as stored", head=head)
    return _block_weights(loaded, mode)


def adapt_threads_setting() -> bool:
    """Whether fused steps run on the faster of the configured threads and one (threads.py): yes unless
    the environment says H2OKIT_ADAPT_THREADS=0 (benchmarks/under_load.py compares the two)."""
    value = os.environ.get("H2OKIT_ADAPT_THREADS", "1")
    if value not in ("0", "1"):
        raise ConfigError(f"H2OKIT_ADAPT_THREADS={value!r} is not allowed; allowed: 0 (off) or 1 (on, the default)")
    return value == "1"


class FastDecoder:
    """Decode steps for one loaded model of a supported family (arch.py); `step` matches
    `Engine.forward` of one token."""

    _by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
    fuse_steps = True  # one C call per step where the cache allows it; False: always one call per kernel and
    # layer (the same arithmetic in the same order: tests and benchmarks compare the two)

    @property
    def inputs_note(self) -> str:
        """What the quantized matrices take as input, for the decode-path line."""
        if self.activation_dtype == "q8" and self.weights.quantized:
            return (f"{' and '.join(self.weights.quantized)} take int8 inputs per block of 32 "
                    f"(llm_activation_dtype q8, not exact)")
        return "float32 inputs"

    @classmethod
    def for_model(cls, loaded) -> FastDecoder:
        """The model's decoder for `loaded.weight_dtype`, built once: engines share it (its weight
        copies are up to 2/3 of the model). Raises FastPathUnavailable with the reason when the model
        or the machine cannot take it, ConfigError when the asked weight type cannot be had."""
        model = loaded.model
        reason = unsupported_reason(model)
        if reason is not None:
            raise FastPathUnavailable(reason)
        decoders = cls._by_model.setdefault(model, {})
        key = (loaded.weight_dtype, loaded.activation_dtype)
        if key not in decoders:
            try:
                lib = kernels.load()
            except kernels.KernelBuildError as exc:
                raise FastPathUnavailable(str(exc)) from None
            # decoders of one weight type (activations differ) share its weights
            weights = next((d.weights for (w, _), d in decoders.items() if w == loaded.weight_dtype), None)
            decoders[key] = cls(model, lib, weights or decode_weights(loaded), architecture_of(model),
                                activation_dtype=loaded.activation_dtype)
        decoder = decoders[key]
        decoder.adapt_threads = adapt_threads_setting()
        return decoder

    def __init__(self, model, lib, weights: DecodeWeights, arch: Architecture, activation_dtype: str = "fp32"):
        """Use `for_model`: it checks the model and builds the kernels first."""
        self.lib = lib
        self.weights = weights
        self.activation_dtype = activation_dtype
        if activation_dtype == "q8" and not weights.quantized:
            log.warning("warning: llm_activation_dtype q8 has no effect: no decode matrix is Q4_1/Q8_0 (%s); "
                        "inputs stay float32", weights.description)
        self.arch = arch
        cfg = model.config.get_text_config()
        inner = model.model
        self.hidden = cfg.hidden_size
        self.q_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = head_dim_of(cfg)
        self.inter = cfg.intermediate_size
        self.eps = float(cfg.rms_norm_eps)
        self.scaling = float(inner.layers[0].self_attn.scaling)
        self.embed = inner.embed_tokens.weight
        # float32 embedding rows as numpy too (_embed)
        self._embed_rows = self.embed.detach().numpy() if self.embed.dtype == torch.float32 else None
        # the layer dimensions, once, as the C struct every kernel takes (kernels/h2okit_kernels.h);
        # the lm_head has its own (its weight type may differ: Q8_0 beside Q4_1 layers)
        dims = {"hidden": self.hidden, "q_heads": self.q_heads, "kv_heads": self.kv_heads,
                "head_dim": self.head_dim, "inter": self.inter, "eps": self.eps, "scale": self.scaling,
                "act": arch.activation, "act_q8": int(activation_dtype == "q8")}
        self.dims = kernels.ffi.new("h2k_dims *", {**dims, "wtype": weights.layer_code})
        self.head_dims = kernels.ffi.new("h2k_dims *", {**dims, "wtype": weights.head.code})

        def opt(t):  # an optional norm: NULL for the kernels when the family has none
            return _ptr(t) if t is not None else kernels.NULL

        self._ptrs = [(_ptr(n.attn_in), _ptr(qkv.data), opt(n.q), opt(n.k), _ptr(o.data), opt(n.attn_out),
                       _ptr(n.mlp_in), _ptr(gu.data), _ptr(down.data), opt(n.mlp_out), kind)
                      for n, qkv, o, gu, down, kind
                      in zip(arch.norms, weights.qkv, weights.o, weights.gate_up, weights.down, arch.rope_kinds)]
        # the same pointers as one C array for the fused step (h2k_decode_step), and its per-layer cache
        # slots, filled before every step (_fill_layer_caches)
        self._layer_weights = kernels.ffi.new("h2k_layer_weights[]", [
            {"attn_in_norm": p[0], "qkv": p[1], "q_norm": p[2], "k_norm": p[3], "o": p[4], "attn_out_norm": p[5],
             "mlp_in_norm": p[6], "gate_up": p[7], "down": p[8], "mlp_out_norm": p[9]} for p in self._ptrs])
        self._new_slots(len(self._ptrs))
        q_dim, kv_dim = self.q_heads * self.head_dim, self.kv_heads * self.head_dim
        self.q_dim, self.kv_dim = q_dim, kv_dim
        self.vocab = model.lm_head.weight.shape[0]
        self.x = torch.empty(self.hidden)
        self.h = torch.empty(self.hidden)
        self.qkv = torch.empty(q_dim + 2 * kv_dim)
        self.attn = torch.empty(q_dim)
        self.gate_up = torch.empty(2 * self.inter)
        # cffi pointers of the fixed buffers and weights, made once (a cast per call costs ~0.3 us)
        self._buffers = tuple(_ptr(t) for t in (self.x, self.h, self.qkv, self.attn, self.gate_up))
        self._x_rows = self.x.view(1, self.hidden)  # the single step's x as a batch of one (_embed)
        self._final_norm_ptr, self._head_ptr = _ptr(arch.final_norm), _ptr(weights.head.data)
        self._probs = self._head_mass = self._partial = torch.empty(0)
        self._batch_rows: dict[int, tuple[tuple[torch.Tensor, ...], tuple[object, ...]]] = {}
        self._scratch_tokens = self._scratch_copies = 0
        self._choosers: dict[tuple[int, int], ThreadChooser] = {}  # per (configured threads, batch size)
        self.adapt_threads = adapt_threads_setting()
        self._rope: dict[str | None, _RopeTable] = {}
        self._rope_kinds = sorted(set(arch.rope_kinds), key=str)

    def _new_slots(self, count: int) -> None:
        """`count` empty `h2k_layer_cache` slots for the fused step, each slot's cdata made once (indexing
        the array makes a new one), and no record yet of whose fields they hold."""
        self._layer_caches = kernels.ffi.new("h2k_layer_cache[]", count)
        self._slots = list(self._layer_caches)
        self._slot_sources: list[_SlotSource | None] = [None] * count

    @property
    def weight_bytes(self) -> int:
        """Weight bytes one decode step reads (the embedding row aside)."""
        return self.weights.nbytes

    def _rope_at(self, position: int, kind: str | None) -> tuple[object, object]:
        """Pointers to the float32 cos/sin rows of `position` in RoPE table `kind`, from the model's own
        rotary module (the table grown to cover it first)."""
        table = self._rope.get(kind)
        if table is None or position >= table.positions:
            n = max(2 * (table.positions if table else 0), position + 1, 1024)
            cos, sin = self.arch.rotary(torch.arange(n).unsqueeze(0), kind)
            table = self._rope[kind] = _RopeTable.of(cos[0].float().contiguous(), sin[0].float().contiguous())
        return table.rows(position)

    def _rope_rows(self, positions: list[int]) -> list[dict[str | None, tuple[object, object]]]:
        """Per position, per RoPE table: its cos/sin row pointers (the tables grown first to the furthest
        position, so that no pointer outlives a table it points into; each position once)."""
        for kind in self._rope_kinds:
            self._rope_at(max(positions), kind)
        rows = {p: {kind: self._rope_at(p, kind) for kind in self._rope_kinds} for p in set(positions)}
        return [rows[p] for p in positions]

    def _batch_buffers(self, batch: int) -> tuple[tuple[torch.Tensor, ...], tuple[object, ...]]:
        """A batch step's working rows (x, h, qkv, attn, gate_up: [batch, width] each) and their pointers,
        kept per batch size (fresh tensors every step were a visible share of a batch step's Python)."""
        if batch not in self._batch_rows:
            rows = tuple(torch.empty(batch, width) for width in (self.hidden, self.hidden,
                                                                  self.q_dim + 2 * self.kv_dim, self.q_dim,
                                                                  2 * self.inter))
            self._batch_rows[batch] = rows, tuple(_ptr(t) for t in rows)
        return self._batch_rows[batch]

    def _scratch(self, tokens: int, block: int, copies: int = 1) -> tuple[object, torch.Tensor]:
        """The attention's probability rows (pointer) and a [kv_heads, blocks] per-head block-mass
        tensor (blocks of `block` tokens), grown as the cache grows; `copies` of each, `_scratch_tokens`
        tokens apart (the fused step gives each thread its own copy). Returns copy 0."""
        if self._scratch_tokens < tokens or self._scratch_copies < copies:
            self._scratch_tokens = max(tokens, 2 * self._scratch_tokens, 1024)
            self._scratch_copies = max(copies, self._scratch_copies)
            self._probs = torch.empty(self._scratch_copies * self.q_heads * self._scratch_tokens)
            self._head_mass = torch.empty(self._scratch_copies * self.kv_heads * self._scratch_tokens)
        blocks = -(-tokens // max(block, 1))
        return _ptr(self._probs), self._head_mass[:self.kv_heads * blocks].view(self.kv_heads, blocks)

    def _use_threads(self, threads: int) -> None:
        """The thread count of the kernels' parallel loops from now on."""
        self.dims.threads = self.head_dims.threads = threads

    def _threads(self) -> int:
        """The threads the attention kernel may use, which is also how many parts it splits the tokens
        into; its partial sums grown to match (a set of `threads` parts per thread, for the fused step)."""
        threads = torch.get_num_threads()
        if self._partial.numel() < threads * threads * self.q_dim:
            self._partial = torch.empty(threads * threads * self.q_dim)
        return threads

    def _attend(self, layer, slot, qkv_row: torch.Tensor, attn_out, threads: int) -> None:
        """One sequence's attention in one layer after its attention input: the token's k and v into the
        cache (written by the kernel into `slot`, or appended in store mode), attention over what the
        layer attends to (into `attn_out`), then the layer's scoring and eviction."""
        if layer.needs_queries:
            layer.record_queries(qkv_row[:self.q_dim].view(self.q_heads, 1, self.head_dim), self.scaling)
        if slot is not None:
            keys, values = layer.commit_slot()
        else:
            kv = qkv_row[self.q_dim:].view(2, 1, self.kv_heads, 1, self.head_dim)
            keys, values = layer.append(kv[0], kv[1])
        # K/V come back as [1, kv_heads, T, head_dim] with contiguous rows (buffer views or a concat)
        if layer.is_sliding:  # a local layer attends to its window (the last slots)
            keys, values = layer.visible(keys, values)
        block = layer.mass_block  # 0: this layer needs no attention mass
        probs, block_mass = self._scratch(keys.shape[2], block)
        self.lib.h2k_attend(self.dims, _ptr(qkv_row), _ptr(keys), _ptr(values), keys.stride(1),
                            _KV_CODES[keys.dtype], keys.shape[2], probs, attn_out,
                            _ptr(block_mass) if block else kernels.NULL, max(block, 1), _ptr(self._partial), threads)
        layer.after_decode_blocks(block_mass.numpy() if block else None)

    def _fill_layer_caches(self, caches: list[H2OCache], positions: list[int],
                           copies: int) -> list[list[bool]] | None:
        """The fused step's slots (`h2k_layer_cache`, [layers][batch]) for this step, and per sequence and
        layer whether the step updates its scores; None when some layer needs the per-layer path (store
        mode, a scorer whose step is not decay * scores + gain * mass, or a layer that has cached nothing)."""
        batch = len(caches)
        if len(self._layer_caches) < len(self._ptrs) * batch:
            self._new_slots(len(self._ptrs) * batch)
        ropes, slots = self._rope_rows(positions), self._slots
        scored: list[list[bool]] = [[] for _ in caches]
        longest = 0
        recording = []  # (slot, layer) of the layers that keep their recent queries
        for index, kind in enumerate(self.arch.rope_kinds):
            for s, cache in enumerate(caches):
                i = index * batch + s
                layer, slot = cache.layers[index], slots[i]
                known = self._slot_sources[i]
                if known is not None and known.appends and known.layer() is layer:
                    buffer = layer.buffer  # only appended to since the slot was filled: length and RoPE rows
                    if (known.buffer() is buffer and buffer.moves == known.moves and buffer.length < known.capacity
                            and (not known.block or layer.policy.still_in_place(known.scores(), buffer.length + 1))):
                        slot.length = buffer.length
                        slot.cos, slot.sin = ropes[s][kind]
                        longest = max(longest, buffer.length + 1)
                        scored[s].append(known.block > 0)
                        continue
                layout = layer.decode_layout()
                if layout is None:
                    return None
                k, v, stride, length, slot.first_visible = layout
                slot.length = length
                slot.cos, slot.sin = ropes[s][kind]
                longest = max(longest, length + 1)
                block, scores = layer.mass_block, None
                if block:
                    update = layer.policy.in_place_update(self.kv_heads, length + 1)
                    if update is None:
                        return None
                    scores, slot.decay, slot.gain = update
                # the fields below change only when the layer's buffers or scores are reallocated (or the
                # slot serves another layer): set again only then (casting pointers is most of the cost).
                # Weak references: a finished request's cache must not be kept alive by its old slots.
                if (known is None or known.layer() is not layer or known.k != k or known.v != v
                        or known.stride != stride or known.block != block
                        or (known.scores and known.scores()) is not scores or known.moves != layer.buffer.moves):
                    slot.K, slot.V, slot.head_stride = kernels.address(k), kernels.address(v), stride
                    slot.kvtype = _KV_CODES[layer.store_dtype]
                    slot.block = block
                    if scores is None:
                        slot.scores = kernels.NULL
                    else:
                        slot.scores = kernels.ffi.cast("double *", scores.ctypes.data)
                        slot.score_rows, slot.score_stride = scores.shape
                    self._slot_sources[i] = _SlotSource(weakref.ref(layer), k, v, stride, block,
                                                        None if scores is None else weakref.ref(scores),
                                                        layer.appends_in_place, weakref.ref(layer.buffer),
                                                        layer.buffer.moves, layer.buffer.capacity)
                    slot.query_out = kernels.NULL
                if layer.needs_queries:
                    recording.append((slot, layer))
                scored[s].append(bool(block))
        for slot, layer in recording:  # (only once the step is sure to run fused) its row of the query ring
            slot.query_out = kernels.ffi.cast("float *", layer.query_slot(self.q_heads, self.head_dim,
                                                                           self.scaling).ctypes.data)
        self._scratch(longest, 1, copies)  # a copy of the attention's scratch per thread
        return scored

    def _fused_step(self, caches: list[H2OCache], positions: list[int], x, h, qkv, attn, gate_up, logits) -> bool:
        """The whole step in one C call (h2k_decode_step) when every layer of every cache allows it (False:
        nothing ran), then each layer's bookkeeping and any eviction that came due, in Python. x holds
        the embeddings; the other arguments are the step's buffers (pointers), as in `step_batch`."""
        most = self._threads()  # (before taking the scratch's pointers: it may grow them)
        scored = self._fill_layer_caches(caches, positions, most) if self.fuse_steps else None
        if scored is None:
            return False
        chooser = self._choosers.setdefault((most, len(caches)), ThreadChooser(most))
        threads = chooser.next() if self.adapt_threads else most
        self._use_threads(threads)
        started = time.perf_counter()  # (attention splits its tokens into `most` parts whatever the threads)
        self.lib.h2k_decode_step(self.dims, self.head_dims, self._layer_weights, self._layer_caches, len(self._ptrs),
                                 len(caches), x, h, qkv, attn, gate_up, _ptr(self._probs), _ptr(self._head_mass),
                                 _ptr(self._partial), most, self._scratch_tokens, self._final_norm_ptr,
                                 self._head_ptr, self.vocab, logits)
        chooser.record(threads, time.perf_counter() - started)
        for cache, layers_scored in zip(caches, scored):
            cache.after_fused_step(layers_scored)
        return True

    @torch.inference_mode()
    def step(self, cache: H2OCache, token: int, position: int) -> torch.Tensor:
        """Feed one token at absolute `position`; returns its logits [vocab] (float32, a new tensor).
        One C call for the whole step (h2k_decode_step) when every layer allows it; the layers' scoring
        bookkeeping and any eviction that came due follow in Python. Else one call per kernel per layer."""
        lib, dims, null = self.lib, self.dims, kernels.NULL
        self._embed([token], self._x_rows)
        x, h, qkv, attn, gate_up = self._buffers
        logits, logits_ptr = self._new_logits(1)
        if self._fused_step([cache], [position], x, h, qkv, attn, gate_up, logits_ptr):
            return logits[0]
        ropes = self._rope_rows([position])[0]
        threads = self._threads()
        self._use_threads(threads)
        for layer, (in_norm, w_qkv, q_norm, k_norm, w_o, attn_out_norm, mlp_norm, w_gu, w_down, mlp_out_norm,
                    kind) in zip(cache.layers, self._ptrs):
            cos, sin = ropes[kind]
            slot = layer.decode_slot()  # None in store mode: the layer's own append stores k and v
            k_slot, v_slot, stride = _slot_args(slot)
            lib.h2k_attention_input(dims, x, in_norm, w_qkv, h, qkv, q_norm, k_norm, cos, sin, k_slot, v_slot,
                                    stride, _KV_CODES[layer.store_dtype])
            self._attend(layer, slot, self.qkv, attn, threads)
            lib.h2k_mlp_block(dims, x, attn, w_o, attn_out_norm, mlp_norm, w_gu, w_down, mlp_out_norm, h, gate_up)
        lib.h2k_norm_gemv(self.head_dims, x, self._final_norm_ptr, self._head_ptr, self.vocab, h,
                          logits_ptr, 0, null, null)
        return logits[0]

    def _embed(self, tokens: list[int], x: torch.Tensor) -> None:
        """x [len(tokens), hidden] = the tokens' embedding rows (times the family's scale). Float32 rows are
        copied by numpy: a decode step's Python runs on caches the step's weights just flushed, and numpy
        touches far less memory than torch's indexing."""
        if self._embed_rows is not None:
            np.take(self._embed_rows, tokens, axis=0, out=x.numpy())
        else:
            x.copy_(self.embed[torch.tensor(tokens)])
        if self.arch.embed_scale is not None:
            x.mul_(self.arch.embed_scale)

    def _new_logits(self, rows: int) -> tuple[torch.Tensor, object]:
        """A new [rows, vocab] logits tensor for the step to return, and its pointer: the lm_head writes
        straight into it (no copy, and no torch op between steps: torch fills a vocabulary's worth on its
        OpenMP threads, which woke an idle thread, threads.py)."""
        logits = np.empty((rows, self.vocab), dtype=np.float32)
        return torch.from_numpy(logits), kernels.ffi.cast("float *", logits.ctypes.data)

    @torch.inference_mode()
    def step_batch(self, caches: list[H2OCache], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One decode step for B sequences, each with its own cache (and so its own policies): the weights
        are read once for all of them (the *_batch kernels), attention and scoring run per sequence.
        Returns logits [B, vocab]; row i is what `step(caches[i], tokens[i], positions[i])` returns."""
        lib, dims, ffi = self.lib, self.dims, kernels.ffi
        batch = len(caches)
        (x, h, qkv, attn, gate_up), pointers = self._batch_buffers(batch)
        self._embed(tokens, x)
        logits, logits_ptr = self._new_logits(batch)
        if self._fused_step(caches, positions, *pointers, logits_ptr):
            return logits
        rows = self._rope_rows(positions)
        rope_ptrs = {kind: (ffi.new("float *[]", [row[kind][0] for row in rows]),
                            ffi.new("float *[]", [row[kind][1] for row in rows])) for kind in self._rope_kinds}
        k_slots, v_slots, strides = ffi.new("void *[]", batch), ffi.new("void *[]", batch), ffi.new("long []", batch)
        threads = self._threads()
        self._use_threads(threads)
        qkv_rows = [qkv[i] for i in range(batch)]
        for index, (in_norm, w_qkv, q_norm, k_norm, w_o, attn_out_norm, mlp_norm, w_gu, w_down, mlp_out_norm,
                    kind) in enumerate(self._ptrs):
            layers = [cache.layers[index] for cache in caches]
            kv_code = _KV_CODES[layers[0].store_dtype]
            cache_slots = [layer.decode_slot() for layer in layers]
            for i, slot in enumerate(cache_slots):
                k_slots[i], v_slots[i], strides[i] = _slot_args(slot)
            cos, sin = rope_ptrs[kind]
            lib.h2k_attention_input_batch(dims, batch, _ptr(x), in_norm, w_qkv, _ptr(h), _ptr(qkv), q_norm, k_norm,
                                          cos, sin, k_slots, v_slots, strides, kv_code)
            for i, (layer, slot) in enumerate(zip(layers, cache_slots)):
                self._attend(layer, slot, qkv_rows[i], _ptr(attn[i]), threads)
            lib.h2k_mlp_block_batch(dims, batch, _ptr(x), _ptr(attn), w_o, attn_out_norm, mlp_norm, w_gu, w_down,
                                    mlp_out_norm, _ptr(h), _ptr(gate_up))
        lib.h2k_norm_gemv_batch(self.head_dims, batch, _ptr(x), self._final_norm_ptr, self._head_ptr, self.vocab,
                                _ptr(h), _ptr(logits))
        return logits
