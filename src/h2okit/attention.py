"""The attention function h2okit registers with transformers (`attn_implementation="h2o"`).

Prefill and non-H2O layers use torch's SDPA, as plain transformers does. In an H2O layer's
decode step the probabilities are computed explicitly (the same math as SDPA, once), the
output is taken from them, and their per-token mass goes to the layer's policy: attention
is never computed twice. The mask is built here from the cache's physical layout, because
after an eviction absolute positions and cache slots no longer agree.

A sliding-window layer (the model passes `sliding_window`, e.g. Gemma 3's local layers) sees the
last `window` tokens, itself included. Its cache layer never compacts (cache.SlidingWindowLayer),
so slots are consecutive positions and the window is the last slots: a decode step attends to the
last `window` of them, a prefill row to the `window` slots ending at its own.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

ATTN_IMPLEMENTATION = "h2o"


def attention_with_mass(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """One query row per head over the whole cache. Returns (output [1,Hq,1,D], mass [Hkv, T]).

    mass[g, t] = sum over the query heads of KV head g of p[h, t] / (Hq * q_rows): summed over g it
    is SPEC §2's signal, with GQA (each query head counts, grouped onto its KV head without
    materialising repeat_kv); per g it is what per-head selection scores.
    """
    batch, q_heads, q_rows, dim = query.shape
    kv_heads = key.shape[1]
    group = q_heads // kv_heads
    q = query.reshape(batch, kv_heads, group * q_rows, dim) * scaling  # scale q, not the T logits
    probs = torch.softmax(torch.matmul(q, key.transpose(-1, -2)), dim=-1, dtype=torch.float32)
    out = torch.matmul(probs.to(value.dtype), value).reshape(batch, q_heads, q_rows, dim)
    return out, probs[0].sum(dim=1).div_(q_heads * q_rows)


def causal_attention_with_mass(query, key, value, scaling: float, rows_per_chunk: int = 256):
    """Causal attention of q_len new rows over the cache (the last q_len slots are theirs), computed
    explicitly in row chunks to bound memory. Returns (output, mass [Hkv, T]) as attention_with_mass."""
    batch, q_heads, q_rows, dim = query.shape
    kv_heads, kv_len = key.shape[1], key.shape[2]
    group = q_heads // kv_heads
    q = query.reshape(batch, kv_heads, group, q_rows, dim)
    out = torch.empty_like(query).reshape(batch, kv_heads, group, q_rows, dim)
    mass = torch.zeros(kv_heads, kv_len, dtype=torch.float32)
    visible_all = _causal_mask(q_rows, kv_len, query.device)
    for start in range(0, q_rows, rows_per_chunk):
        stop = min(q_rows, start + rows_per_chunk)
        logits = torch.matmul(q[:, :, :, start:stop], key.unsqueeze(2).transpose(-1, -2)) * scaling
        visible = visible_all[start:stop]
        logits = logits.masked_fill(~visible, float("-inf"))
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        out[:, :, :, start:stop] = torch.matmul(probs.to(value.dtype), value.unsqueeze(2))
        mass += probs[0].sum(dim=(1, 2))
    return out.reshape(batch, q_heads, q_rows, dim), mass / (q_heads * q_rows)


def _causal_mask(q_len: int, kv_len: int, device, window: int | None = None) -> torch.Tensor:
    """Boolean mask for q_len new rows appended after kv_len - q_len cached tokens; with `window`,
    each row sees only the `window` slots ending at its own."""
    past = kv_len - q_len
    rows = torch.arange(q_len, device=device).unsqueeze(1) + past
    cols = torch.arange(kv_len, device=device).unsqueeze(0)
    visible = cols <= rows
    return visible & (cols > rows - window) if window else visible


def h2o_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                  h2o_cache=None, sliding_window=None, **kwargs):
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    q_len, kv_len = query.shape[2], key.shape[2]
    layer = h2o_cache.layers[module.layer_idx] if h2o_cache is not None else None
    if layer is not None and layer.needs_queries:  # (prompt rows too: the first plan has a full window)
        layer.record_queries(query[0], scaling)
    if sliding_window:  # a local layer: never an H2O layer, so no mass is needed
        if layer is not None and getattr(layer, "window", None) != sliding_window:
            raise ValueError(f"layer {module.layer_idx} attends to a window of {sliding_window} tokens, but its "
                             f"cache layer was built without it")
        if q_len == 1:
            out = F.scaled_dot_product_attention(query, key[:, :, -sliding_window:], value[:, :, -sliding_window:],
                                                 scale=scaling, enable_gqa=True)
            if layer is not None:
                layer.after_decode_step(None)
        else:
            out = F.scaled_dot_product_attention(query, key, value, attn_mask=_causal_mask(
                q_len, kv_len, query.device, sliding_window), scale=scaling, enable_gqa=True)
            if layer is not None:  # the prompt (chunk) has attended: what left the window goes now
                layer.drop_outside_window()
        return out.transpose(1, 2), None
    if layer is not None and q_len == 1:  # a decode step: H2O scoring and the codec's cadence
        mass = None
        if layer.needs_mass:
            out, mass = attention_with_mass(query, key, value, scaling)
        else:
            out = F.scaled_dot_product_attention(query, key, value, scale=scaling, enable_gqa=True)
        layer.after_decode_step(mass)
        return out.transpose(1, 2), None
    if layer is not None and layer.policy is not None and h2o_cache.prefill_chunk_tokens:
        # chunked prefill in an evicting layer: attention over what the layer kept plus the chunk (the
        # chunk's rows are the last slots), then the layer scores the chunk and evicts to its budget
        if layer.needs_mass:
            out, mass = causal_attention_with_mass(query, key, value, scaling)
        else:
            out, mass = F.scaled_dot_product_attention(query, key, value, attn_mask=_causal_mask(
                q_len, kv_len, query.device), scale=scaling, enable_gqa=True), None
        layer.after_prefill_chunk(mass)
        return out.transpose(1, 2), None
    if layer is not None and layer.scores_prefill and q_len == kv_len:  # opt-in: score the prompt too
        rows = h2o_cache.kv.h2o_score_prefill_rows
        if 0 < rows < q_len:  # SnapKV's observation window: only the last rows' attention scores
            out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, enable_gqa=True)
            _, mass = causal_attention_with_mass(query[:, :, -rows:], key, value, scaling)
        else:
            out, mass = causal_attention_with_mass(query, key, value, scaling)
        layer.observe_prefill(mass)
        return out.transpose(1, 2), None
    if attention_mask is not None and attention_mask.dim() == 4:
        mask, causal = attention_mask, False
    elif q_len == 1:
        mask, causal = None, False
    elif q_len == kv_len:
        mask, causal = None, True
    else:
        mask, causal = _causal_mask(q_len, kv_len, query.device), False
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal,
                                         scale=scaling, enable_gqa=True)
    return out.transpose(1, 2), None


def register() -> None:
    AttentionInterface.register(ATTN_IMPLEMENTATION, h2o_attention)
