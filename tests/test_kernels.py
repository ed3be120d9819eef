"""The fast path's C kernels against the torch math they replace (no model needed)."""

import platform

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from h2okit import kernels
from h2okit.attention import attention_with_mass
from h2okit.cpu import cpu_flags
from h2okit.policy import LayerPolicy, PlanParams

P = kernels.ptr


def _builds() -> list[str]:
    """The native build, then each narrower one this CPU can run (x86): every vector width's kernels are
    checked wherever they can run, not only the widest the CPU has."""
    builds = ["native"]
    if platform.machine() in ("x86_64", "AMD64"):
        flags = cpu_flags()
        if "avx512f" in flags and {"avx2", "fma", "f16c"} <= flags:
            builds.append("avx2")
        if flags & {"avx2", "avx512f"}:
            builds.append("portable")
    return builds


@pytest.fixture(scope="module", params=_builds())
def lib(request):
    return kernels.load() if request.param == "native" else kernels.load_narrower(request.param)


def test_each_build_has_the_vector_width_its_flags_allow(lib):
    flags = cpu_flags()
    native = 16 if "avx512f" in flags else 8 if {"avx2", "fma", "f16c"} <= flags else 1
    assert kernels.load().h2k_vector_lanes() == native
    assert lib.h2k_vector_lanes() in {native, 8, 1}
    if lib is not kernels.load():
        assert lib.h2k_vector_lanes() < native


def dims(hidden=0, q_heads=1, kv_heads=1, head_dim=1, inter=0, wtype=kernels.F32, eps=1e-5, scale=1.0,
         act=kernels.SILU, act_q8=0):
    return kernels.ffi.new("h2k_dims *", {"wtype": wtype, "hidden": hidden, "q_heads": q_heads,
                                          "kv_heads": kv_heads, "head_dim": head_dim, "inter": inter, "eps": eps,
                                          "scale": scale, "act": act, "act_q8": act_q8})


def rms_norm(x, w, eps):
    return w * (x * torch.rsqrt(x.pow(2).mean() + eps))


def laid_out(weights: torch.Tensor) -> torch.Tensor:
    """A float weight matrix as the kernels read it (bf16: tiled)."""
    return kernels.bf16_tiles(weights) if weights.dtype == torch.bfloat16 else weights


def rotate(v, cos, sin):  # HF Llama: v * cos + rotate_half(v) * sin
    half = v.shape[-1] // 2
    return v * cos + torch.cat([-v[..., half:], v[..., :half]], dim=-1) * sin


@pytest.mark.parametrize("dtype,code", [(torch.float32, kernels.F32), (torch.bfloat16, kernels.BF16)])
def test_norm_gemv_with_rope_matches_torch(lib, dtype, code):
    torch.manual_seed(0)
    rows, cols, head_dim, rope_heads = 96, 80, 16, 4
    x, norm_w = torch.randn(cols), torch.rand(cols) + 0.5
    weight = torch.randn(rows, cols).to(dtype)
    cos, sin = torch.rand(head_dim), torch.rand(head_dim)
    h, y = torch.empty(cols), torch.empty(rows)
    kernel_weight = laid_out(weight)  # held in a name: the kernels get a raw pointer
    lib.h2k_norm_gemv(dims(hidden=cols, head_dim=head_dim, wtype=code), P(x), P(norm_w), P(kernel_weight), rows,
                      P(h), P(y), rope_heads, P(cos), P(sin))
    expected = weight.float() @ rms_norm(x, norm_w, 1e-5)
    roped = rope_heads * head_dim
    expected[:roped] = rotate(expected[:roped].view(rope_heads, head_dim), cos, sin).reshape(-1)
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype,code", [(torch.float32, kernels.F32), (torch.bfloat16, kernels.BF16)])
def test_mlp_block_matches_torch(lib, dtype, code):
    torch.manual_seed(1)
    hidden, attn_dim, inter = 48, 64, 120  # the activation: 7 vectors of 16 and a scalar tail of 8
    x, a = torch.randn(hidden), torch.randn(attn_dim)
    w_o, w_gu, w_down = (torch.randn(*s).to(dtype) * 0.2 for s in [(hidden, attn_dim), (2 * inter, hidden),
                                                                      (hidden, inter)])
    post = torch.rand(hidden) + 0.5
    residual = x + w_o.float() @ a
    gate_up = w_gu.float() @ rms_norm(residual, post, 1e-6)
    expected = residual + w_down.float() @ (torch.nn.functional.silu(gate_up[:inter]) * gate_up[inter:])
    h, gu = torch.empty(hidden), torch.empty(2 * inter)
    w_o, w_gu, w_down = (laid_out(w) for w in (w_o, w_gu, w_down))
    lib.h2k_mlp_block(dims(hidden=hidden, q_heads=attn_dim // 16, head_dim=16, inter=inter, wtype=code, eps=1e-6),
                      P(x), P(a), P(w_o), kernels.NULL, P(post), P(w_gu), P(w_down), kernels.NULL, P(h), P(gu))
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-4)


def test_mlp_block_gemma_variant_matches_torch(lib):
    """Gemma 3's layer tail: norms on the attention and MLP outputs, GELU-tanh (torch's approximate="tanh")."""
    torch.manual_seed(2)
    hidden, attn_dim, inter = 48, 64, 120  # the activation: 7 vectors of 16 and a scalar tail of 8
    x, a = torch.randn(hidden), torch.randn(attn_dim) * 3
    w_o, w_gu, w_down = (torch.randn(*s) * 0.5 for s in [(hidden, attn_dim), (2 * inter, hidden), (hidden, inter)])
    attn_out, pre, mlp_out = (torch.rand(hidden) + 0.5 for _ in range(3))
    residual = x + rms_norm(w_o @ a, attn_out, 1e-6)
    gate_up = w_gu @ rms_norm(residual, pre, 1e-6)
    act = torch.nn.functional.gelu(gate_up[:inter], approximate="tanh") * gate_up[inter:]
    expected = residual + rms_norm(w_down @ act, mlp_out, 1e-6)
    assert (gate_up[:inter].abs() > 4).any()  # the tails of the tanh are exercised
    h, gu = torch.empty(hidden), torch.empty(2 * inter)
    lib.h2k_mlp_block(dims(hidden=hidden, q_heads=attn_dim // 16, head_dim=16, inter=inter, eps=1e-6,
                           act=kernels.GELU_TANH),
                      P(x), P(a), P(w_o), P(attn_out), P(pre), P(w_gu), P(w_down), P(mlp_out), P(h), P(gu))
    torch.testing.assert_close(x, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "gemma3-qk-norm"])
def test_attention_input_matches_torch(lib, qk_norm):
    """qkv = W rmsnorm(x); [per-head RMSNorm of q and k]; RoPE on q and k; k and v written to the slots."""
    torch.manual_seed(4)
    hidden, q_heads, kv_heads, head_dim = 40, 4, 2, 16
    x, norm_w = torch.randn(hidden), torch.rand(hidden) + 0.5
    rows = (q_heads + 2 * kv_heads) * head_dim
    weight = torch.randn(rows, hidden)
    q_norm, k_norm = torch.rand(head_dim) + 0.5, torch.rand(head_dim) + 0.5
    cos, sin = torch.rand(head_dim), torch.rand(head_dim)
    y = weight @ rms_norm(x, norm_w, 1e-6)
    q, k, v = y[:q_heads * head_dim].view(q_heads, -1), y[q_heads * head_dim:rows - kv_heads * head_dim].view(
        kv_heads, -1), y[rows - kv_heads * head_dim:].view(kv_heads, -1)
    if qk_norm:
        q = torch.stack([rms_norm(r, q_norm, 1e-6) for r in q])
        k = torch.stack([rms_norm(r, k_norm, 1e-6) for r in k])
    q, k = rotate(q, cos, sin), rotate(k, cos, sin)
    h, qkv = torch.empty(hidden), torch.empty(rows)
    k_cache, v_cache = torch.zeros(kv_heads, 3, head_dim), torch.zeros(kv_heads, 3, head_dim)  # slot 1 of 3
    opt = (P(q_norm), P(k_norm)) if qk_norm else (kernels.NULL, kernels.NULL)
    lib.h2k_attention_input(dims(hidden=hidden, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, eps=1e-6),
                            P(x), P(norm_w), P(weight), P(h), P(qkv), *opt, P(cos), P(sin),
                            kernels.address(k_cache[:, 1].data_ptr()), kernels.address(v_cache[:, 1].data_ptr()),
                            k_cache.stride(0), kernels.F32)
    torch.testing.assert_close(qkv[:q_heads * head_dim].view(q_heads, -1), q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(k_cache[:, 1], k, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(v_cache[:, 1], v, rtol=1e-5, atol=1e-5)
    assert not k_cache[:, 0].any() and not k_cache[:, 2].any()


def attend(lib, q, keys, values, scaling, threads=2, block=1, parts=None):
    """Run h2k_attend on [1, kv_heads, T, D] K/V (any layout with contiguous rows) on `threads` threads,
    the tokens in `parts` ranges (default: one per thread); (out, mass [Hkv, ceil(T / block)])."""
    parts = parts or threads
    q_heads, head_dim = q.shape[1], q.shape[-1]
    kv_heads, tokens = keys.shape[1], keys.shape[2]
    probs, out = torch.empty(q_heads * tokens), torch.empty(q_heads * head_dim)
    mass = torch.empty(kv_heads, -(-tokens // block))
    partial = torch.empty(parts * q_heads * head_dim)
    code = {torch.float32: kernels.F32, torch.bfloat16: kernels.BF16, torch.float16: kernels.F16}[keys.dtype]
    layer_dims = dims(q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, scale=scaling)
    layer_dims.threads = threads
    lib.h2k_attend(layer_dims, P(q.contiguous()), P(keys), P(values), keys.stride(1), code, tokens, P(probs), P(out),
                   P(mass), block, P(partial), parts)
    return out.view(1, q_heads, 1, head_dim), mass


def block_sums(mass, block):
    return torch.nn.functional.pad(mass, (0, -mass.shape[-1] % block)).view(mass.shape[0], -1, block).sum(-1)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("tokens", [1, 37, 300])
@pytest.mark.parametrize("q_heads,kv_heads,head_dim", [(9, 3, 64), (4, 4, 64), (4, 2, 64), (8, 2, 64), (9, 3, 32),
                                                     (8, 1, 64)],
                         ids=["smollm2", "group-1", "group-2", "group-4", "generic-head-dim", "generic-group"])
# head_dim 64 and up to 4 query heads per KV head take the vector kernels (each group size its own
# instance of the logits), the last two the generic path
def test_attend_matches_attention_with_mass(lib, kv_dtype, tokens, q_heads, kv_heads, head_dim):
    torch.manual_seed(tokens)
    q = torch.randn(1, q_heads, 1, head_dim)
    capacity = tokens + 5  # a view into a bigger buffer, as the cache holds it
    k_buf = torch.randn(1, kv_heads, capacity, head_dim).to(kv_dtype)
    v_buf = torch.randn(1, kv_heads, capacity, head_dim).to(kv_dtype)
    keys, values = k_buf[:, :, :tokens], v_buf[:, :, :tokens]
    out, mass = attend(lib, q, keys, values, scaling=0.125)
    expected, expected_mass = attention_with_mass(q, keys.float(), values.float(), 0.125)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    assert mass.shape == (kv_heads, tokens)
    torch.testing.assert_close(mass, expected_mass, rtol=1e-5, atol=1e-7)
    assert mass.sum().item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("tokens,block", [(300, 32), (37, 4), (5, 8)])
def test_attend_sums_the_mass_per_block(lib, tokens, block):
    """The kernel's block sums are the per-token mass summed per block (the last block partial)."""
    torch.manual_seed(tokens)
    q, keys, values = torch.randn(1, 9, 1, 64), torch.randn(1, 3, tokens, 64), torch.randn(1, 3, tokens, 64)
    _, per_token = attend(lib, q, keys, values, 0.125)
    _, per_block = attend(lib, q, keys, values, 0.125, block=block)
    torch.testing.assert_close(per_block, block_sums(per_token, block), rtol=1e-5, atol=1e-7)


def test_attend_is_the_same_with_one_or_two_threads(lib):
    torch.manual_seed(3)
    q, keys, values = torch.randn(1, 9, 1, 64), torch.randn(1, 3, 200, 64), torch.randn(1, 3, 200, 64)
    one, mass_one = attend(lib, q, keys, values, 0.125, threads=1)
    two, mass_two = attend(lib, q, keys, values, 0.125, threads=2)
    torch.testing.assert_close(one, two, rtol=1e-6, atol=1e-6)
    assert torch.equal(mass_one, mass_two)


@pytest.mark.parametrize("head_dim", [64, 32])  # the AVX-512 path and the generic one
def test_attend_depends_on_its_parts_not_on_its_threads(lib, head_dim):
    """One thread doing both parts of the tokens gives exactly what two threads give (the decode step
    may drop to one thread under load, threads.py); a different split is only close."""
    torch.manual_seed(4)
    q, keys, values = torch.randn(1, 9, 1, head_dim), torch.randn(1, 3, 301, head_dim), torch.randn(1, 3, 301, head_dim)
    one, mass_one = attend(lib, q, keys, values, 0.125, threads=1, parts=2)
    two, mass_two = attend(lib, q, keys, values, 0.125, threads=2, parts=2)
    assert torch.equal(one, two) and torch.equal(mass_one, mass_two)
    three, _ = attend(lib, q, keys, values, 0.125, threads=2, parts=3)
    torch.testing.assert_close(three, two, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("policy,block,per_head", [("h2o", 16, False), ("tova", 1, True), ("mean", 4, True)])
def test_same_attention_inputs_give_identical_plans(lib, policy, block, per_head):
    """The policy sees the kernel's mass instead of torch's; over many steps with evictions,
    its plans must be the same ones (the masses differ only in summation order)."""
    torch.manual_seed(4)
    params = PlanParams(block_tokens=block, sink_tokens=16, recent_tokens=16, keep_ratio=0.5, per_head=per_head)
    policies = [LayerPolicy(layer=2, params=params, ema_alpha=0.9, update_interval=8, trigger_min_tokens=64,
                            policy=policy) for _ in range(2)]
    keys, values = torch.randn(1, 3, 400, 64), torch.randn(1, 3, 400, 64)
    live = [torch.arange(160), torch.arange(160)]  # which of the 400 rows each side still holds
    plans = [[], []]
    for step in range(120):
        q = torch.randn(1, 9, 1, 64) * 2
        for side, layer_policy in enumerate(policies):
            index = live[side].expand(3, -1) if live[side].dim() == 1 else live[side]
            k = torch.gather(keys, 2, index[None, :, :, None].expand(1, 3, -1, 64))
            v = torch.gather(values, 2, index[None, :, :, None].expand(1, 3, -1, 64))
            _, mass = attention_with_mass(q, k, v, 0.125) if side == 0 else attend(lib, q, k, v, 0.125)
            layer_policy.observe_blocks(block_sums(mass, block).double().numpy())
            event = layer_policy.maybe_plan(index.shape[1])
            if event is not None:
                plans[side].append(event.plan.runs)
                kept = torch.from_numpy(event.plan.kept_token_indices())
                live[side] = torch.gather(index, 1, kept.expand(3, -1))
                layer_policy.applied(event.plan)
            nxt = 160 + step
            live[side] = torch.cat([index, torch.full((3, 1), nxt)], dim=1)
    assert len(plans[0]) >= 5
    assert plans[0] == plans[1]


@pytest.mark.parametrize("policy", ["h2o", "tova", "window"])
@pytest.mark.parametrize("per_head", [False, True])
def test_score_update_in_c_is_the_scorers_numpy_update_bit_for_bit(lib, policy, per_head):
    """h2k_update_scores (the fused step's scoring) on the scorer's own storage gives exactly what
    LayerPolicy.observe_blocks computes in numpy, step after step, as blocks appear."""
    rng = np.random.default_rng(3)
    params = PlanParams(block_tokens=4, sink_tokens=4, recent_tokens=8, keep_ratio=0.5, per_head=per_head)
    numpy_side, c_side = (LayerPolicy(layer=1, params=params, ema_alpha=0.87, update_interval=99,
                                      trigger_min_tokens=10**6, policy=policy) for _ in range(2))
    kv_heads = 3
    for length in range(30, 60):
        mass = rng.random((kv_heads, -(-length // 4)), dtype=np.float32)
        numpy_side.observe_blocks(mass)
        storage, decay, gain = c_side.in_place_update(kv_heads, length)
        lib.h2k_update_scores(kernels.ffi.cast("float *", mass.ctypes.data), kv_heads, mass.shape[1],
                              kernels.ffi.cast("double *", storage.ctypes.data), storage.shape[0], storage.shape[1],
                              decay, gain)
        c_side.observed_in_place(length)
        assert c_side.scores.shape == numpy_side.scores.shape
        np.testing.assert_array_equal(c_side.scores, numpy_side.scores)
    assert c_side.steps_since_eviction == numpy_side.steps_since_eviction == 30


def test_a_missing_compiler_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("CC", "no-such-cc")
    monkeypatch.setattr(kernels, "_loaded", None)
    with pytest.raises(kernels.KernelBuildError, match="no C compiler 'no-such-cc' on PATH"):
        kernels.load()


def test_the_library_is_rebuilt_when_the_source_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("H2OKIT_CACHE", str(tmp_path))
    source = tmp_path / "llama_decode.c"
    source.write_text(kernels.SOURCE.read_text())
    monkeypatch.setattr(kernels, "SOURCE", source)
    first = kernels.library_path("cc")
    source.write_text(kernels.SOURCE.read_text() + "\n/* edited */\n")
    assert kernels.library_path("cc") != first


def test_the_library_is_rebuilt_on_another_kind_of_cpu(tmp_path, monkeypatch):
    """-march=native: a build for one CPU may not run (or not run the same code) on another that shares
    the user cache."""
    monkeypatch.setenv("H2OKIT_CACHE", str(tmp_path))
    here = kernels.library_path("cc")
    assert kernels.cpu_signature().startswith(platform.machine())
    monkeypatch.setattr(kernels, "cpu_signature", lambda: "x86_64 sse2")
    assert kernels.library_path("cc") != here


@pytest.mark.parametrize("dtype,code", [(torch.float32, kernels.F32), (torch.bfloat16, kernels.BF16),
                                        (torch.float16, kernels.F16)])
def test_cache_writes_round_as_torch_does(lib, dtype, code):
    """The kernel stores k/v into the cache itself; its rounding must be torch's `.to(dtype)`."""
    rng = np.random.default_rng(7)
    values = np.concatenate([rng.standard_normal(4000) * 10.0 ** rng.integers(-8, 6, 4000),
                             [0.0, -0.0, np.inf, -np.inf, 65504.0, 65520.0, 1e-8, -3e38, 1.0 + 2.0 ** -8]])
    src = torch.from_numpy(values.astype(np.float32))
    out = torch.empty(len(src), dtype=dtype)
    lib.h2k_store_row(P(src), P(out), len(src), code)
    expected = src.to(dtype)
    assert torch.equal(out.view(torch.int16 if dtype != torch.float32 else torch.int32),
                       expected.view(torch.int16 if dtype != torch.float32 else torch.int32))
    nan = torch.tensor([float("nan")])
    nan_out = torch.empty(1, dtype=dtype)
    lib.h2k_store_row(P(nan), P(nan_out), 1, code)
    assert torch.isnan(nan_out).all()


def random_blocks(type_name, rows, cols, seed):
    """GGML blocks with random nibbles/int8 and random fp16 scales (and minima), as a GGUF stores them."""
    from h2okit.gguf_blocks import QuantMatrix

    rng = np.random.default_rng(seed)
    nb = cols // 32
    if type_name == "Q4_1":
        scales = rng.uniform(0.001, 0.05, (rows, nb, 2)).astype(np.float16)
        scales[..., 1] = -scales[..., 1] * 8  # minimum
        body = rng.integers(0, 256, (rows, nb, 16), dtype=np.uint8)
        blocks = np.concatenate([scales.view(np.uint8), body], axis=2)
    else:
        scale = rng.uniform(0.001, 0.05, (rows, nb, 1)).astype(np.float16)
        body = rng.integers(-128, 128, (rows, nb, 32)).astype(np.int8).view(np.uint8)
        blocks = np.concatenate([scale.view(np.uint8), body], axis=2)
    return QuantMatrix(type_name, np.ascontiguousarray(blocks.reshape(rows, -1)), cols)


@pytest.mark.parametrize("type_name,code", [("Q4_1", kernels.Q4_1), ("Q8_0", kernels.Q8_0)])
@pytest.mark.parametrize("cols", [32, 576, 1536])
def test_block_gemv_matches_the_dequantised_weights(lib, type_name, code, cols):
    """Q4_1/Q8_0 rows read as stored give the dot product of the dequantised float32 weights."""
    rows = 70
    m = random_blocks(type_name, rows, cols, seed=cols)
    weight = torch.from_numpy(m.dequantize())
    assert weight.shape == (rows, cols)
    x, norm_w = torch.randn(cols), torch.rand(cols) + 0.5
    h, y, blocks = torch.empty(cols), torch.empty(rows), torch.from_numpy(m.kernel_layout())
    lib.h2k_norm_gemv(dims(hidden=cols, wtype=code), P(x), P(norm_w), P(blocks), rows, P(h), P(y), 0, kernels.NULL,
                      kernels.NULL)
    expected = (weight.double() @ rms_norm(x, norm_w, 1e-5).double()).float()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4 * cols ** 0.5)


def int8_inputs(h: np.ndarray) -> np.ndarray:
    """llm_activation_dtype q8's rounding in numpy: per block of 32, q = rint(x * (127 / max|x|)) in float32
    (ties to even, as the kernels' nearbyintf), and the float64 values dx q the int8 inputs stand for."""
    blocks = h.astype(np.float32).reshape(-1, 32)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127.0) / np.where(amax > 0, amax, 1), np.float32(0)).astype(np.float32)
    q = np.rint(blocks * inv)
    assert np.abs(q).max() <= 127
    return ((amax / np.float32(127.0)).astype(np.float32).astype(np.float64) * q).reshape(-1)


@pytest.mark.parametrize("type_name,code", [("Q4_1", kernels.Q4_1), ("Q8_0", kernels.Q8_0)])
@pytest.mark.parametrize("cols", [32, 576, 1536])
def test_block_gemv_with_int8_inputs_is_the_dot_with_the_rounded_inputs(lib, type_name, code, cols):
    """act_q8: each row's dot with the inputs rounded to int8 per block (the integer dot products are exact,
    so only float rounding remains), and not the float-input result: the rounding really happens."""
    rows = 70  # four full groups and a short one
    m = random_blocks(type_name, rows, cols, seed=cols + 1)
    weight = torch.from_numpy(m.dequantize()).double()
    x, norm_w = torch.randn(cols), torch.rand(cols) + 0.5
    blocks = torch.from_numpy(m.kernel_layout())
    out = {}
    for act_q8 in (0, 1):
        h, y = torch.empty(cols), torch.empty(rows)
        lib.h2k_norm_gemv(dims(hidden=cols, wtype=code, act_q8=act_q8), P(x), P(norm_w), P(blocks), rows, P(h), P(y),
                          0, kernels.NULL, kernels.NULL)
        out[act_q8] = (h, y)
    h = out[1][0]
    expected = weight @ torch.from_numpy(int8_inputs(h.numpy()))
    torch.testing.assert_close(out[1][1].double(), expected, rtol=1e-5, atol=1e-4 * cols ** 0.5)
    exact = weight @ h.double()
    assert not torch.equal(out[1][1], out[0][1])
    # the rounding's error is small next to the outputs (per-block scales; 8 bits)
    assert (out[1][1].double() - exact).norm() < 0.02 * exact.norm()


def test_q4_1_dequantisation_is_exact_in_float32():
    """w = d q + m with fp16 d and m: d q has at most 15 significant bits, so the kernel's
    factorised dot (d (q . x) + m sum(x)) and the reference's dequantised weights are the same model."""
    m = random_blocks("Q4_1", 4, 64, seed=3)
    raw = m.blocks.reshape(4, 2, 20)
    d = raw[..., 0:2].copy().view(np.float16).astype(np.float32)
    mins = raw[..., 2:4].copy().view(np.float16).astype(np.float32)
    nib = raw[..., 4:]
    q = np.concatenate([nib & 0x0F, nib >> 4], axis=-1).astype(np.float32)
    assert np.array_equal((d * q + mins).reshape(4, 64), m.dequantize())


@given(rows=st.integers(1, 40), blocks=st.integers(1, 4), type_name=st.sampled_from(["Q4_1", "Q8_0"]))
@settings(max_examples=40, deadline=None)
def test_kernel_layout_puts_every_field_where_the_kernels_read_it(rows, blocks, type_name):
    """QuantMatrix.kernel_layout: per group of QGROUP rows (n in the last), the scales [block][row], for Q4_1
    the minima [block][row], then the quants [block][row]; the same bytes as the GGUF's blocks."""
    m = random_blocks(type_name, rows, 32 * blocks, seed=rows * 7 + blocks)
    layout = m.kernel_layout()
    assert layout.shape == m.blocks.shape and layout.dtype == np.uint8
    flat, size = layout.reshape(-1), m.blocks.shape[1] // blocks  # bytes per block
    fields = [(0, 2), (2, 4), (4, size)] if type_name == "Q4_1" else [(0, 2), (2, size)]
    for r in range(rows):
        group, i = divmod(r, kernels.QGROUP)
        n = min(kernels.QGROUP, rows - group * kernels.QGROUP)
        start = group * kernels.QGROUP * blocks * size
        for b in range(blocks):
            stored = m.blocks[r, b * size:(b + 1) * size]
            offset = start
            for lo, hi in fields:
                width = hi - lo
                at = offset + (b * n + i) * width
                assert np.array_equal(flat[at:at + width], stored[lo:hi]), (r, b, lo)
                offset += blocks * n * width


@pytest.mark.parametrize("act_q8", [0, 1], ids=["float-inputs", "int8-inputs"])
@pytest.mark.parametrize("type_name,code", [("Q4_1", kernels.Q4_1), ("Q8_0", kernels.Q8_0)])
def test_block_gemv_of_a_batch_is_each_input_alone_bit_for_bit(lib, type_name, code, act_q8):
    """9 inputs (passes of 4, 4 and 1 over each group) and 40 rows (two full groups and a short one): every
    input's outputs are those of a GEMV with it alone."""
    rows, cols, batch = 40, 96, 9
    blocks = torch.from_numpy(random_blocks(type_name, rows, cols, seed=5).kernel_layout())
    x, norm_w = torch.randn(batch, cols), torch.rand(cols) + 0.5
    h, y = torch.empty(batch, cols), torch.empty(batch, rows)
    d = dims(hidden=cols, wtype=code, act_q8=act_q8)
    lib.h2k_norm_gemv_batch(d, batch, P(x), P(norm_w), P(blocks), rows, P(h), P(y))
    for i in range(batch):
        alone, h1 = torch.empty(rows), torch.empty(cols)
        lib.h2k_norm_gemv(d, P(x[i]), P(norm_w), P(blocks), rows, P(h1), P(alone), 0, kernels.NULL, kernels.NULL)
        assert torch.equal(y[i], alone), i


@pytest.mark.parametrize("cols", [96, 800, 100], ids=["narrow", "wide", "tail"])
@pytest.mark.parametrize("dtype,code", [(torch.float32, kernels.F32), (torch.bfloat16, kernels.BF16)],
                         ids=["fp32", "bf16"])
def test_float_gemv_of_a_batch_is_each_input_alone_bit_for_bit(lib, dtype, code, cols):
    """Float weights, 21 rows (not a whole number of any kernel's row group or tile) and 13 inputs (one
    pass of 8 and one of 5: one row against many inputs on narrow rows, groups of 4 rows in column chunks
    on rows wider than L1 holds for 8 inputs (800: three whole chunks and a part); bf16 tiles 2 rows by 4
    inputs; `tail`: columns past the last whole vector or
    bf16 block): every input's outputs are those of a GEMV with it alone (rows 8 at a time there),
    bit for bit, and the torch product within float tolerance."""
    rows, batch = 21, 13
    torch.manual_seed(11)
    w = (torch.randn(rows, cols) * 0.2).to(dtype)
    x, norm_w = torch.randn(batch, cols), torch.rand(cols) + 0.5
    h, y = torch.empty(batch, cols), torch.empty(batch, rows)
    d, kernel_w = dims(hidden=cols, wtype=code), laid_out(w)
    lib.h2k_norm_gemv_batch(d, batch, P(x), P(norm_w), P(kernel_w), rows, P(h), P(y))
    for i in range(batch):
        alone, h1 = torch.empty(rows), torch.empty(cols)
        lib.h2k_norm_gemv(d, P(x[i]), P(norm_w), P(kernel_w), rows, P(h1), P(alone), 0, kernels.NULL, kernels.NULL)
        assert torch.equal(y[i], alone), i
        expected = w.float() @ rms_norm(x[i], norm_w, 1e-5)
        torch.testing.assert_close(alone, expected, rtol=1e-4, atol=1e-4)


def test_bf16_tiles_lay_out_tiles_of_pair_ordered_blocks():
    """Where kernels.bf16_tiles puts each weight (the layout gemv_bf16_tiles reads): 11 rows (a tile of
    8 and one of 3) by 37 columns (two blocks of 16 and 5 more)."""
    rows, cols, tile = 11, 37, kernels.BF16_TILE
    index = torch.arange(rows * cols).view(rows, cols)  # each weight's row-major position
    laid = kernels.bf16_tiles(index).reshape(-1)
    assert sorted(laid.tolist()) == list(range(rows * cols))  # a permutation
    pair_order = [c for i in range(8) for c in (i, i + 8)]
    expected = []
    for r0, n in ((0, tile), (tile, rows - tile)):
        for block in (0, 16):
            for r in range(r0, r0 + n):
                expected += [r * cols + block + c for c in pair_order]
        for r in range(r0, r0 + n):
            expected += [r * cols + c for c in range(32, cols)]
    assert laid.tolist() == expected


def _weights(kind, rows, cols, seed):
    """(the kernels' weight tensor, its code) for a weight kind."""
    if kind in ("Q4_1", "Q8_0"):
        return torch.from_numpy(random_blocks(kind, rows, cols, seed).kernel_layout()), getattr(kernels, kind)
    torch.manual_seed(seed)
    w = torch.randn(rows, cols) * 0.2
    return (laid_out(w.to(torch.bfloat16)), kernels.BF16) if kind == "bf16" else (w, kernels.F32)


@pytest.mark.parametrize("kind", ["fp32", "bf16", "Q4_1", "Q8_0"])
@pytest.mark.parametrize("gemma", [False, True], ids=["llama", "gemma3"])
def test_a_batch_step_is_each_sequence_step(lib, kind, gemma):
    """The batched kernels (weights read once for all sequences) give each sequence exactly what the
    one-sequence kernels give it: attention input with its own position and cache slot, the MLP
    block, the final norm + GEMV."""
    batch, hidden, q_heads, kv_heads, head_dim, inter = 3, 64, 4, 2, 16, 96
    width = (q_heads + 2 * kv_heads) * head_dim
    d = dims(hidden=hidden, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, inter=inter, eps=1e-6,
             wtype=_weights(kind, 1, 32, 0)[1], act=kernels.GELU_TANH if gemma else kernels.SILU)
    w_qkv, _ = _weights(kind, width, hidden, 1)
    w_o, _ = _weights(kind, hidden, q_heads * head_dim, 2)
    w_gu, _ = _weights(kind, 2 * inter, hidden, 3)
    w_down, _ = _weights(kind, hidden, inter, 4)
    torch.manual_seed(5)
    norms = [torch.rand(n) + 0.5 for n in (hidden, hidden, head_dim, head_dim, hidden, hidden)]
    in_norm, mlp_norm, q_norm, k_norm, attn_out, mlp_out = (P(t) for t in norms)
    if not gemma:
        q_norm = k_norm = attn_out = mlp_out = kernels.NULL
    x, attn = torch.randn(batch, hidden), torch.randn(batch, q_heads * head_dim)
    cos, sin = torch.rand(batch, head_dim), torch.rand(batch, head_dim)
    caches = [torch.zeros(kv_heads, 4, head_dim) for _ in range(2 * batch)]  # k, v per sequence; slot 2

    def slot(t):
        return kernels.address(t[:, 2].data_ptr())

    # one sequence at a time (scratch tensors held in names: the kernels get raw pointers)
    single_qkv, single_x = torch.empty(batch, width), x.clone()
    h, gu = torch.empty(batch, hidden), torch.empty(batch, 2 * inter)
    for i in range(batch):
        lib.h2k_attention_input(d, P(x[i]), in_norm, P(w_qkv), P(h[0]), P(single_qkv[i]), q_norm,
                                k_norm, P(cos[i]), P(sin[i]), slot(caches[2 * i]), slot(caches[2 * i + 1]), 4,
                                kernels.F32)
        lib.h2k_mlp_block(d, P(single_x[i]), P(attn[i]), P(w_o), attn_out, mlp_norm, P(w_gu), P(w_down), mlp_out,
                          P(h[0]), P(gu[0]))
    single_caches = [c.clone() for c in caches]
    for c in caches:
        c.zero_()
    # the batch
    qkv, bx = torch.empty(batch, width), x.clone()
    ptrs = kernels.ffi.new("float *[]", [kernels.ffi.cast("float *", t.data_ptr()) for t in (*cos, *sin)])
    k_slots = kernels.ffi.new("void *[]", [slot(caches[2 * i]) for i in range(batch)])
    v_slots = kernels.ffi.new("void *[]", [slot(caches[2 * i + 1]) for i in range(batch)])
    strides = kernels.ffi.new("long []", [4] * batch)
    lib.h2k_attention_input_batch(d, batch, P(x), in_norm, P(w_qkv), P(h), P(qkv), q_norm,
                                  k_norm, ptrs, ptrs + batch, k_slots, v_slots, strides, kernels.F32)
    lib.h2k_mlp_block_batch(d, batch, P(bx), P(attn), P(w_o), attn_out, mlp_norm, P(w_gu), P(w_down), mlp_out,
                            P(h), P(gu))
    torch.testing.assert_close(qkv, single_qkv, rtol=0, atol=0)
    torch.testing.assert_close(bx, single_x, rtol=0, atol=0)
    for got, expected in zip(caches, single_caches):
        assert torch.equal(got, expected) and got[:, 2].any()
    head, _ = _weights(kind, 40, hidden, 6)
    y, single_y = torch.empty(batch, 40), torch.empty(batch, 40)
    lib.h2k_norm_gemv_batch(d, batch, P(x), in_norm, P(head), 40, P(h), P(y))
    for i in range(batch):
        lib.h2k_norm_gemv(d, P(x[i]), in_norm, P(head), 40, P(h[0]), P(single_y[i]), 0, kernels.NULL, kernels.NULL)
    assert torch.equal(y, single_y)


@pytest.mark.parametrize("kv_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attend_logits_do_not_depend_on_the_token_split(lib, kv_dtype):
    """The logits run 4 tokens at a time with one reduction for the 4 and the split's last tokens one
    at a time; each token's logit must be the same bits either way. The mass (softmax over all tokens,
    per head in token order, whatever the split) is bitwise the same for 1, 2 or 3 parts only if every
    logit is; 301 tokens put tokens in a tile under one split and in a part's tail under another."""
    torch.manual_seed(5)
    q = torch.randn(1, 9, 1, 64)
    keys, values = torch.randn(1, 3, 301, 64).to(kv_dtype), torch.randn(1, 3, 301, 64).to(kv_dtype)
    masses = [attend(lib, q, keys, values, 0.125, threads=2, parts=parts)[1] for parts in (1, 2, 3)]
    assert torch.equal(masses[0], masses[1]) and torch.equal(masses[0], masses[2])


def test_only_the_profiled_build_has_phase_timers():
    """The shipped kernels carry no timers (their phases cost nothing); the profiled build names its own."""
    import ctypes

    kernels.load()
    assert not hasattr(ctypes.CDLL(str(kernels.loaded_path)), "h2k_profile_take")
    _, timers = kernels.load_profiled()
    assert timers.names[-1] == "step" and len(set(timers.names)) == len(timers.names)
    assert {"qkv", "attention", "logits", "gate_up", "down", "head"} <= set(timers.names)
