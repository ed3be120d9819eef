"""What the fast decode path needs to know about a model family, one small function per family.

The kernels (kernels/llama_decode.c) run a pre-norm decoder layer with grouped-query attention;
a family differs in a few places, all described by `Architecture`:

- norms: Llama has two per layer (before attention, before the MLP); Gemma 3 adds one on the
  attention output and one on the MLP output, and per-head RMSNorm on q and k (QK-norm);
- the MLP activation (SiLU, GELU-tanh);
- the embedding scale (Gemma 3 multiplies the embedding row by sqrt(hidden));
- RoPE tables: one for Llama, one per layer type for Gemma 3 (local layers use another base);
- whether llama.cpp stored attn_q / attn_k rows permuted in the GGUF (it does for Llama only).

Norm weights are given as the kernels apply them, x / rms(x) * w: Gemma's (1 + w) is folded in
here, in float32 as transformers computes it, so the product is the same. Sliding windows are a
property of the cache (model.sliding_windows_of, cache.SlidingWindowLayer), not of the kernels.

A new family (e.g. Qwen2, with q/k/v biases) is a new function in FAMILIES plus, if it needs
one, a new kernel argument.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from . import kernels


class ArchitectureUnsupported(Exception):
    """Why the fast path cannot run this model (one line)."""


@dataclass
class LayerNorms:
    """One layer's norm weights, float32, as the kernels multiply them (None: the layer has none)."""

    attn_in: torch.Tensor
    mlp_in: torch.Tensor
    attn_out: torch.Tensor | None = None
    mlp_out: torch.Tensor | None = None
    q: torch.Tensor | None = None
    k: torch.Tensor | None = None


@dataclass
class Architecture:
    family: str
    norms: list[LayerNorms]
    final_norm: torch.Tensor
    activation: int  # kernels.SILU or kernels.GELU_TANH
    embed_scale: torch.Tensor | None  # multiplies the embedding row (in the weights' dtype), or None
    rope_kinds: list[str | None]  # per layer: which RoPE table (the rotary module's layer_type, or None)
    rotary: Callable[[torch.Tensor, str | None], tuple[torch.Tensor, torch.Tensor]]  # positions -> cos, sin
    gguf_qk_permuted: bool  # llama.cpp's converter permuted attn_q / attn_k rows in the GGUF

    _rope_memo: dict = field(default_factory=dict, repr=False, compare=False)

    def rope_tables(self, layer: int, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Layer `layer`'s RoPE tables (cos, sin) at `positions`, each [n, D] float32 numpy (read-only).
        Every evicting layer plans at the same step and asks for the same positions, and the rotary module
        takes ~0.2 ms a call, so the last few answers are kept."""
        positions = np.asarray(positions, dtype=np.int64)
        key = (self.rope_kinds[layer], positions.tobytes())
        if key not in self._rope_memo:
            if len(self._rope_memo) >= 8:
                self._rope_memo.clear()
            cos, sin = self.rotary(torch.from_numpy(positions).unsqueeze(0), self.rope_kinds[layer])
            tables = cos[0].float().numpy(), sin[0].float().numpy()
            for table in tables:
                table.setflags(write=False)
            self._rope_memo[key] = tables
        return self._rope_memo[key]


def _f32(weight: torch.Tensor) -> torch.Tensor:
    return weight.detach().float().contiguous()


def _check_common(cfg) -> None:
    if getattr(cfg, "attention_bias", False) or getattr(cfg, "mlp_bias", False):
        raise ArchitectureUnsupported("the model has linear biases")
    from .model import head_dim_of

    if head_dim_of(cfg) > 256:
        raise ArchitectureUnsupported(f"head_dim {head_dim_of(cfg)} > 256")


def _llama(model) -> Architecture:
    cfg = model.config.get_text_config()
    _check_common(cfg)
    if getattr(cfg, "hidden_act", "silu") != "silu":
        raise ArchitectureUnsupported(f"activation '{cfg.hidden_act}' (Llama family: only silu)")
    inner = model.model
    rotary = inner.rotary_emb
    return Architecture(
        family="llama",
        norms=[LayerNorms(_f32(b.input_layernorm.weight), _f32(b.post_attention_layernorm.weight))
               for b in inner.layers],
        final_norm=_f32(inner.norm.weight), activation=kernels.SILU, embed_scale=None,
        rope_kinds=[None] * len(inner.layers),
        rotary=lambda positions, kind: rotary(torch.zeros(1, dtype=torch.float32), positions),
        gguf_qk_permuted=True)


def _gemma3(model) -> Architecture:
    cfg = model.config.get_text_config()
    _check_common(cfg)
    if cfg.hidden_activation != "gelu_pytorch_tanh":
        raise ArchitectureUnsupported(f"activation '{cfg.hidden_activation}' (Gemma 3: only gelu_pytorch_tanh)")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        if getattr(cfg, key, None) is not None:
            raise ArchitectureUnsupported(f"{key} is set (the kernels do not soft-cap)")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise ArchitectureUnsupported("bidirectional attention")
    inner = model.model

    def gemma_norm(norm) -> torch.Tensor:  # Gemma3RMSNorm: x / rms(x) * (1 + w), in float32
        return (1.0 + norm.weight.detach().float()).contiguous()

    rotary = inner.rotary_emb
    return Architecture(
        family="gemma3",
        norms=[LayerNorms(attn_in=gemma_norm(b.input_layernorm), mlp_in=gemma_norm(b.pre_feedforward_layernorm),
                          attn_out=gemma_norm(b.post_attention_layernorm),
                          mlp_out=gemma_norm(b.post_feedforward_layernorm),
                          q=gemma_norm(b.self_attn.q_norm), k=gemma_norm(b.self_attn.k_norm)) for b in inner.layers],
        final_norm=gemma_norm(inner.norm), activation=kernels.GELU_TANH,
        embed_scale=inner.embed_tokens.embed_scale.detach().to(inner.embed_tokens.weight.dtype),
        rope_kinds=list(cfg.layer_types),
        rotary=lambda positions, kind: rotary(torch.zeros(1, dtype=torch.float32), positions, kind),
        gguf_qk_permuted=False)


FAMILIES: dict[str, Callable[[object], Architecture]] = {"llama": _llama, "gemma3_text": _gemma3}
_BY_MODEL: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def architecture_of(model) -> Architecture:
    """The model's Architecture, built once per model; ArchitectureUnsupported names what the fast path lacks."""
    if model not in _BY_MODEL:
        model_type = model.config.get_text_config().model_type
        family = FAMILIES.get(model_type)
        if family is None:
            raise ArchitectureUnsupported(f"model_type '{model_type}' (the fast path covers: {', '.join(FAMILIES)})")
        _BY_MODEL[model] = family(model)
    return _BY_MODEL[model]
