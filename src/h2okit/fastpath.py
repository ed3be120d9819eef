"""The fast decode path: one token through a Llama-style model, in C kernels (kernels/llama_decode.c).

A decode step reads every weight once, so its speed is memory bandwidth. The transformers
forward of one token reads weights at ~10-20 GB/s on this CPU (F.linear's single-row GEMM,
plus ~20 small torch ops per layer); these kernels read them at ~30+ GB/s, three calls per
layer. It is the same math as the reference path:

    x = embed[token]
    per layer:  qkv = W_qkv · rmsnorm(x), RoPE on q and k,
                k and v written into the H2OLayer's slot     (h2k_attention_input)
                a, mass = attention(q, K, V)                 one query per head (h2k_attend)
                layer.after_decode_step(mass)                the same H2O scoring, plans, compaction
                x += W_o a;  x += W_down (silu(W_gate h) * W_up h), h = rmsnorm(x)   (h2k_mlp_block)
    logits = W_head · rmsnorm(x)                             (h2k_norm_gemv)

The cache objects and the policy are shared with the reference path, so eviction decisions
come from the same code; only the floating-point summation order differs (logits agree to
~1e-5 in float32, see tests/test_e2e_fastpath.py). Prefill stays on the transformers forward
(it is compute-bound, where torch's GEMM is already good). The weights are re-laid once per
model (`FastDecoder.for_model`), however many engines use it.

Activations are float32 in both precisions; bfloat16 weights are widened as they are read,
so a bf16 model on this path is slightly *more* precise than transformers' bf16 forward.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from . import kernels
from .cache import H2OCache
from .model import head_dim_of

_WEIGHT_CODES = {torch.float32: kernels.F32, torch.bfloat16: kernels.BF16}
_KV_CODES = {torch.float32: kernels.F32, torch.bfloat16: kernels.BF16, torch.float16: kernels.F16}


class FastPathUnavailable(Exception):
    """Why this model cannot take the fast path (one line); the reference path is used instead."""


def unsupported_reason(model) -> str | None:
    """None if the fast path can run `model`, else why not."""
    cfg = model.config.get_text_config()
    if cfg.model_type != "llama":
        return f"model_type '{cfg.model_type}' (the fast path covers Llama-style models)"
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        return "the model has linear biases"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation '{cfg.hidden_act}' (only silu)"
    head_dim = head_dim_of(cfg)
    if head_dim > 256:
        return f"head_dim {head_dim} > 256"
    dtype = model.lm_head.weight.dtype
    if dtype not in _WEIGHT_CODES:
        return f"weights in {dtype} (fast path: float32 or bfloat16)"
    return None


_ptr = kernels.ptr


@dataclass
class _Layer:
    """One decoder layer's weights, held in kernel layout (kept alive here: the kernels get pointers)."""

    input_norm: torch.Tensor
    qkv: torch.Tensor  # [q + k + v rows, hidden]: one GEMV instead of three
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor  # [2 * inter, hidden]
    down: torch.Tensor


class FastDecoder:
    """Decode steps for one loaded Llama-style model; `step` matches `Engine.forward` of one token."""

    _by_model: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    def for_model(cls, model) -> FastDecoder:
        """The model's decoder, built once: engines share it (its fused weights copy ~2/3 of the model).
        Raises FastPathUnavailable with the reason when the model or the machine cannot take it."""
        reason = unsupported_reason(model)
        if reason is not None:
            raise FastPathUnavailable(reason)
        if model not in cls._by_model:
            try:
                lib = kernels.load()
            except kernels.KernelBuildError as exc:
                raise FastPathUnavailable(str(exc)) from None
            cls._by_model[model] = cls(model, lib)
        return cls._by_model[model]

    def __init__(self, model, lib):
        """Use `for_model`: it checks the model and builds the kernels first."""
        self.lib = lib
        cfg = model.config.get_text_config()
        inner = model.model
        self.hidden = cfg.hidden_size
        self.q_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = head_dim_of(cfg)
        self.inter = cfg.intermediate_size
        self.eps = float(cfg.rms_norm_eps)
        self.scaling = float(inner.layers[0].self_attn.scaling)
        self.wtype = _WEIGHT_CODES[model.lm_head.weight.dtype]
        self.rotary = inner.rotary_emb
        self.embed = inner.embed_tokens.weight
        self.final_norm = inner.norm.weight.detach().float().contiguous()
        self.head = model.lm_head.weight.detach().contiguous()
        # the layer dimensions, once, as the C struct every kernel takes (kernels/h2okit_kernels.h)
        self.dims = kernels.ffi.new("h2k_dims *", {
            "wtype": self.wtype, "hidden": self.hidden, "q_heads": self.q_heads, "kv_heads": self.kv_heads,
            "head_dim": self.head_dim, "inter": self.inter, "eps": self.eps, "scale": self.scaling})
        self.layers = []
        with torch.no_grad():
            for block in inner.layers:
                attn, mlp = block.self_attn, block.mlp
                self.layers.append(_Layer(
                    input_norm=block.input_layernorm.weight.detach().float().contiguous(),
                    qkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).contiguous(),
                    o=attn.o_proj.weight.detach().contiguous(),
                    post_norm=block.post_attention_layernorm.weight.detach().float().contiguous(),
                    gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).contiguous(),
                    down=mlp.down_proj.weight.detach().contiguous()))
        self._ptrs = [tuple(_ptr(t) for t in (L.input_norm, L.qkv, L.o, L.post_norm, L.gate_up, L.down))
                      for L in self.layers]
        q_dim, kv_dim = self.q_heads * self.head_dim, self.kv_heads * self.head_dim
        self.q_dim, self.kv_dim = q_dim, kv_dim
        self.x = torch.empty(self.hidden)
        self.h = torch.empty(self.hidden)
        self.qkv = torch.empty(q_dim + 2 * kv_dim)
        self.attn = torch.empty(q_dim)
        self.gate_up = torch.empty(2 * self.inter)
        self.logits = torch.empty(self.head.shape[0])
        # k and v of this step as [1, kv_heads, 1, head_dim] views of the qkv buffer (what layer.append takes)
        self.k_new = self.qkv[q_dim:q_dim + kv_dim].view(1, self.kv_heads, 1, self.head_dim)
        self.v_new = self.qkv[q_dim + kv_dim:].view(1, self.kv_heads, 1, self.head_dim)
        # cffi pointers of the fixed buffers and weights, made once (a cast per call costs ~0.3 us)
        self._buffers = tuple(_ptr(t) for t in (self.x, self.h, self.qkv, self.attn, self.gate_up))
        self._final_norm_ptr, self._head_ptr, self._logits_ptr = (_ptr(t) for t in (self.final_norm, self.head,
                                                                                       self.logits))
        self._probs = self._head_mass = self._partial = torch.empty(0)
        self._cos = self._sin = torch.empty(0, self.head_dim)

    @property
    def weight_bytes(self) -> int:
        """Weight bytes one decode step reads (the embedding row aside)."""
        tensors = [self.head] + [t for L in self.layers for t in (L.qkv, L.o, L.gate_up, L.down)]
        return sum(t.numel() * t.element_size() for t in tensors)

    def _rope_at(self, position: int) -> tuple[object, object]:
        """Pointers to the float32 cos/sin rows of `position`, from the model's own rotary module."""
        if position >= self._cos.shape[0]:
            n = max(2 * self._cos.shape[0], position + 1, 1024)
            positions = torch.arange(n).unsqueeze(0)
            cos, sin = self.rotary(torch.zeros(1, dtype=torch.float32), positions)
            self._cos, self._sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        return _ptr(self._cos[position]), _ptr(self._sin[position])

    def _scratch(self, tokens: int) -> tuple[object, torch.Tensor]:
        """The attention's probability rows (pointer) and a [kv_heads, tokens] per-head mass tensor,
        grown as the cache grows."""
        if self._probs.numel() < self.q_heads * tokens:
            n = max(tokens, 2 * self._probs.numel() // self.q_heads, 1024)
            self._probs = torch.empty(self.q_heads * n)
            self._head_mass = torch.empty(self.kv_heads * n)
        return _ptr(self._probs), self._head_mass[:self.kv_heads * tokens].view(self.kv_heads, tokens)

    @torch.inference_mode()
    def step(self, cache: H2OCache, token: int, position: int) -> torch.Tensor:
        """Feed one token at absolute `position`; returns its logits [vocab] (float32, a new tensor)."""
        lib, dims, null = self.lib, self.dims, kernels.NULL
        cos, sin = self._rope_at(position)
        self.x.copy_(self.embed[token])
        x, h, qkv, attn, gate_up = self._buffers
        slots = torch.get_num_threads()
        if self._partial.numel() < slots * self.q_dim:
            self._partial = torch.empty(slots * self.q_dim)
        partial = _ptr(self._partial)
        for layer, (in_norm, w_qkv, w_o, post_norm, w_gu, w_down) in zip(cache.layers, self._ptrs):
            slot = layer.decode_slot()  # None in store mode: the layer's own append stores k and v
            k_slot, v_slot, stride = (kernels.address(slot[0]), kernels.address(slot[1]), slot[2]) \
                if slot is not None else (null, null, 0)
            lib.h2k_attention_input(dims, x, in_norm, w_qkv, h, qkv, cos, sin, k_slot, v_slot, stride,
                                    _KV_CODES[layer.store_dtype])
            # K/V come back as [1, kv_heads, T, head_dim] with contiguous rows (buffer views or a concat)
            keys, values = layer.commit_slot() if slot is not None else layer.append(self.k_new, self.v_new)
            tokens = keys.shape[2]
            probs, head_mass = self._scratch(tokens)
            needs_mass = layer.needs_mass
            lib.h2k_attend(dims, qkv, _ptr(keys), _ptr(values), keys.stride(1), _KV_CODES[keys.dtype], tokens,
                           probs, attn, _ptr(head_mass) if needs_mass else null, partial, slots)
            layer.after_decode_step(head_mass if needs_mass else None)
            lib.h2k_mlp_block(dims, x, attn, w_o, post_norm, w_gu, w_down, h, gate_up)
        lib.h2k_norm_gemv(dims, x, self._final_norm_ptr, self._head_ptr, self.logits.shape[0], h,
                          self._logits_ptr, 0, null, null)
        return self.logits.clone()
