/* One decode step of a Llama-style layer (and Gemma 3's variant of it), for h2okit's fast decode path
 * (fastpath.py; the per-architecture differences are arguments, described in arch.py).
 *
 * Decoding one token is a chain of matrix-vector products: every weight is read once per
 * token, so speed is memory bandwidth. These kernels read row-major [out, in] weights
 * (nn.Linear's own layout) with each output row a contiguous dot product, split across
 * OpenMP threads (torch's libgomp, so the two share one thread pool). Activations are
 * float32 (the quantized GEMVs may take int8 inputs instead: h2k_dims.act_q8, opt-in);
 * weights are float32, bfloat16 (widened on load) or GGML Q4_1/Q8_0 blocks; K/V may be
 * float32, bfloat16 or float16. No allocation here: every buffer comes from the caller.
 *
 * Built at first use by kernels.py with `cc -O3 -march=native -fopenmp`; no -ffast-math
 * (it would set flush-to-zero for the whole process). Reductions use `omp simd`, which
 * allows the reassociation that vectorising a dot product needs.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

#include "h2okit_kernels.h"

/* The vector code comes in two widths, chosen at compile time by what -march=native offers: 16 lanes
 * (AVX-512) or 8 lanes (AVX2 with FMA and F16C: Zen 1-3, Intel before Ice Lake). Each kernel below
 * has the two, plus a portable scalar form for other CPUs and shapes. Within one build a value's
 * arithmetic never depends on the batch, the threads or the split of the work; across the builds
 * only the summation order differs. */
#if defined(__AVX512F__)
#define SIMD16 1
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define SIMD8 1
#endif
#if defined(SIMD16) || defined(SIMD8)
#include <immintrin.h>
#endif

/* Phase timers for benchmarks/step_phases.py, only in a build with -DH2K_PROFILE (the shipped build has
 * none: PHASE_START and PHASE_ADD compile to nothing). Seconds per phase, summed over calls on the
 * calling thread (the attention's logits, softmax and values: OpenMP thread 0's share, and thread 1's
 * apart, as *_thread1; other threads' not at all);
 * h2k_profile_take reads and clears them, h2k_profile_name names them (kernels.PhaseTimers reads both;
 * they are not in the header, since the shipped build has none). Phases: qkv = input norm + qkv GEMV;
 * rope = q/k norms, RoPE and the K/V stores; attention (logits, softmax + mass, values within it); o =
 * o GEMV (+ norm, residual); gate_up = norm + gate/up GEMV; act = activation; down = down GEMV (+ norm,
 * residual); head = final norm + lm_head GEMV; step = the whole h2k_decode_step call. */
#ifdef H2K_PROFILE
#include <time.h>
#define PHASES(X)                                                                                          \
    X(QKV, "qkv") X(ROPE, "rope") X(ATTEND, "attention") X(LOGITS, "logits") X(SOFTMAX, "softmax")           \
    X(VALUES, "values") X(LOGITS1, "logits_thread1") X(SOFTMAX1, "softmax_thread1")                          \
    X(VALUES1, "values_thread1") X(O, "o") X(GATE_UP, "gate_up") X(ACT, "act") X(DOWN, "down")               \
    X(HEAD, "head") X(STEP, "step")
#define PHASE_ENUM(id, name) PHASE_##id,
#define PHASE_NAME(id, name) name,
enum { PHASES(PHASE_ENUM) PHASE_COUNT };
static const char *const phase_names[] = {PHASES(PHASE_NAME)};
static double phase_seconds[PHASE_COUNT];
static inline double phase_clock(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
#define PHASE_START(v) double v = phase_clock()
#define PHASE_ADD(id, v) (phase_seconds[PHASE_##id] += phase_clock() - (v))
/* an attention phase: OpenMP thread 0's time into `id`, thread 1's into `id`1 (each its own entry) */
#define PHASE_ADD_TEAM(id, v)                                                                              \
    (omp_get_thread_num() == 0   ? (void)PHASE_ADD(id, v)                                                  \
     : omp_get_thread_num() == 1 ? (void)(phase_seconds[PHASE_##id##1] += phase_clock() - (v))              \
                                 : (void)0)
/* The phases' names in order; NULL past the last. */
const char *h2k_profile_name(int i) { return i >= 0 && i < PHASE_COUNT ? phase_names[i] : NULL; }
/* seconds[i] = phase i's time since the last take (n at most the phase count), then zeroed. */
void h2k_profile_take(double *seconds, int n) {
    for (int i = 0; i < PHASE_COUNT; i++) {
        if (i < n) seconds[i] = phase_seconds[i];
        phase_seconds[i] = 0.0;
    }
}
#else
#define PHASE_START(v) ((void)0)
#define PHASE_ADD(id, v) ((void)0)
#define PHASE_ADD_TEAM(id, v) ((void)0)
#endif

enum { F32 = H2K_F32, BF16 = H2K_BF16, F16 = H2K_F16, Q4_1 = H2K_Q4_1, Q8_0 = H2K_Q8_0 };
enum { QBLOCK = 32, Q4_1_BYTES = 20, Q8_0_BYTES = 34 }; /* weights per block, bytes per block */

/* Type punning through a union: gcc vectorises it (a memcpy here blocked vectorisation). */
typedef union {
    uint32_t u;
    int32_t i;
    float f;
} word32;

static inline float bf16_to_f32(uint16_t h) {
    word32 w = {.u = (uint32_t)h << 16};
    return w.f;
}

static inline float f16_to_f32(uint16_t h) {
    _Float16 v;
    memcpy(&v, &h, 2);
    return (float)v;
}

/* exp(x) for the softmax and SiLU, vectorisable (libm's expf is not without -ffast-math).
 * Cody-Waite range reduction and a degree-6 polynomial: relative error below 2e-7. */
static inline float exp_approx(float x) {
    x = x > -87.0f ? x : -87.0f; /* written as max/min so that it vectorises */
    x = x < 88.0f ? x : 88.0f;
    float n = floorf(x * 1.44269504f + 0.5f);
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    word32 scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

#ifdef SIMD16
/* exp_approx on 16 lanes (gcc leaves the scalar one unvectorised in the softmax loop). */
static inline __m512 exp_approx16(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504f), _mm512_set1_ps(0.5f)),
                                    _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fmadd_ps(n, _mm512_set1_ps(2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(e));
}
#endif

#ifdef SIMD8
/* exp_approx on 8 lanes, the same steps as exp_approx16. */
static inline __m256 exp_approx8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 n = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504f), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fmadd_ps(n, _mm256_set1_ps(2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(_mm256_mul_ps(p, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

#endif

#if defined(SIMD16) || defined(SIMD8)
/* The sum of a vector's 8 lanes, by a fixed tree. */
static inline float sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

/* The 8 lane sums of a[0..7] as one vector (lane r: the sum of a[r]); each row's sum takes the same
 * path whatever the other rows hold. */
static inline __m256 sum_rows8(const __m256 *a) {
    __m256 t0 = _mm256_hadd_ps(a[0], a[1]), t1 = _mm256_hadd_ps(a[2], a[3]);
    __m256 t2 = _mm256_hadd_ps(a[4], a[5]), t3 = _mm256_hadd_ps(a[6], a[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3); /* per 128-bit half: rows' partial sums */
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

/* p[t] = exp(p[t] - m) for t < n; returns the sum. */
static float exp_shifted(float *p, int n, float m) {
    float s = 0.0f;
    int t = 0;
#ifdef SIMD16
    __m512 acc = _mm512_setzero_ps(), shift = _mm512_set1_ps(m);
    for (; t + 16 <= n; t += 16) {
        __m512 e = exp_approx16(_mm512_sub_ps(_mm512_loadu_ps(p + t), shift));
        _mm512_storeu_ps(p + t, e);
        acc = _mm512_add_ps(acc, e);
    }
    s = _mm512_reduce_add_ps(acc);
#elif defined(SIMD8)
    __m256 acc = _mm256_setzero_ps(), shift = _mm256_set1_ps(m);
    for (; t + 8 <= n; t += 8) {
        __m256 e = exp_approx8(_mm256_sub_ps(_mm256_loadu_ps(p + t), shift));
        _mm256_storeu_ps(p + t, e);
        acc = _mm256_add_ps(acc, e);
    }
    s = sum8(acc);
#endif
    for (; t < n; t++) {
        p[t] = exp_approx(p[t] - m);
        s += p[t];
    }
    return s;
}

static inline float dot_f32(const float *w, const float *x, int n) {
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int c = 0; c < n; c++) acc += w[c] * x[c];
    return acc;
}

/* Dot products of FROWS float32 weight rows (row r at w + r * row_stride elements) with up to MULTI inputs
 * (x_j = x + j * xstride), one accumulator per row and input: the rows are loaded once per 16 columns
 * for all inputs and each input's 16 columns once for all rows, and the independent accumulators keep
 * the FMA units busy (one input alone is a single latency-bound chain, hidden behind memory in a
 * one-sequence GEMV; a batch would be compute-bound on it). out[r * MULTI + j]. The result for row r
 * and input j does not depend on how many rows or inputs ride along, so a batch gives each sequence
 * what it gets alone, bit for bit. */
/* PREFETCH: bytes ahead of the block being read that are fetched into L1 (below); PREFETCH_L2: further
 * ahead, into L2, so that memory stays busy while a batch's arithmetic holds the core
 * (benchmarks/kernel_ab.py against the build without it, P=512: fp32 1.04x at B=1, 1.09x at B=8; on
 * AVX2 a float32 GEMV of one input now reads 8 rows without it instead, dot_rows1_f32). */
enum { MULTI = 8, FROWS = 2, PREFETCH = 4096, PREFETCH_L2 = 16384, WIDE_ROW = 768 };

/* Always inlined, so each call site (literal rows and inputs) gets its own loop with the unused
 * accumulators gone. */
static inline __attribute__((always_inline)) void dot_float_multi(const float *w, long row_stride, int rows,
                                                                   const float *x, long xstride, int m, int n,
                                                                   float *out) {
#ifdef SIMD16
    if (n % 16 == 0) {
        __m512 acc[FROWS][MULTI];
        for (int r = 0; r < FROWS; r++)
            for (int j = 0; j < MULTI; j++) acc[r][j] = _mm512_setzero_ps();
        for (int c = 0; c < n; c += 16) {
            __m512 wv[FROWS];
            for (int r = 0; r < FROWS; r++) {
                wv[r] = _mm512_setzero_ps();
                if (r < rows) {
                    const float *wf = w + r * row_stride;
                    /* the row's bytes PREFETCH ahead: with a batch, each line takes long enough to use
                       that the hardware prefetcher alone left memory idle (B=8 cost load + compute) */
                    _mm_prefetch((const char *)(wf + c) + PREFETCH, _MM_HINT_T0);
                    _mm_prefetch((const char *)(wf + c) + PREFETCH_L2, _MM_HINT_T1);
                    wv[r] = _mm512_loadu_ps(wf + c);
                }
            }
#pragma GCC unroll 8
            for (int j = 0; j < MULTI; j++) {
                if (j < m) {
                    __m512 xv = _mm512_loadu_ps(x + j * xstride + c);
                    for (int r = 0; r < FROWS; r++)
                        if (r < rows) acc[r][j] = _mm512_fmadd_ps(wv[r], xv, acc[r][j]);
                }
            }
        }
        for (int r = 0; r < rows; r++)
            for (int j = 0; j < m; j++) out[r * MULTI + j] = _mm512_reduce_add_ps(acc[r][j]);
        return;
    }
#elif defined(SIMD8)
    /* more than 4 inputs: one row at a time against all of them (an accumulator per input, the
       inputs' vectors read from L1 into the FMAs). Each row is read once, from memory, as memory
       delivers it; with FROWS rows in passes of 4 inputs (below), the second pass over them issued no
       reads of its own (B=8: the layers' GEMVs 1.14x faster from memory). Only for rows of up to
       WIDE_ROW columns: 8 longer inputs do not fit L1 beside the rows (the MLP's down matrix, 1536
       columns: 8 inputs are 48 KB), and the passes of 4 were faster there (the layers' GEMVs 1.12x);
       gemv_batch now sends those to dot_wide_group, in column chunks. */
    if (n % 8 == 0 && m > 4 && n <= WIDE_ROW) {
        for (int r = 0; r < rows; r++) {
            const float *wf = w + r * row_stride;
            __m256 acc[MULTI];
            for (int j = 0; j < MULTI; j++) acc[j] = _mm256_setzero_ps();
            for (int c = 0; c < n; c += 8) {
                if (c % 16 == 0) { /* once per cache line */
                    _mm_prefetch((const char *)(wf + c) + PREFETCH, _MM_HINT_T0);
                    _mm_prefetch((const char *)(wf + c) + PREFETCH_L2, _MM_HINT_T1);
                }
                __m256 wv = _mm256_loadu_ps(wf + c);
#pragma GCC unroll 8
                for (int j = 0; j < MULTI; j++)
                    if (j < m) acc[j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + j * xstride + c), acc[j]);
            }
            for (int j = 0; j < m; j++) out[r * MULTI + j] = sum8(acc[j]);
        }
        return;
    }
    /* 16 registers: the inputs in passes of 4 (FROWS x 4 accumulators), the rows' bytes from cache after
       the first pass */
    if (n % 8 == 0) {
        for (int j0 = 0; j0 < m; j0 += 4) {
            __m256 acc[FROWS][4];
            for (int r = 0; r < FROWS; r++)
                for (int j = 0; j < 4; j++) acc[r][j] = _mm256_setzero_ps();
            for (int c = 0; c < n; c += 8) {
                __m256 wv[FROWS];
                for (int r = 0; r < FROWS; r++) {
                    wv[r] = _mm256_setzero_ps();
                    if (r < rows) {
                        const float *wf = w + r * row_stride;
                        if (j0 == 0 && c % 16 == 0) { /* once per cache line */
                            _mm_prefetch((const char *)(wf + c) + PREFETCH, _MM_HINT_T0);
                            _mm_prefetch((const char *)(wf + c) + PREFETCH_L2, _MM_HINT_T1);
                        }
                        wv[r] = _mm256_loadu_ps(wf + c);
                    }
                }
#pragma GCC unroll 4
                for (int j = 0; j < 4; j++) {
                    if (j0 + j < m) {
                        __m256 xv = _mm256_loadu_ps(x + (j0 + j) * xstride + c);
                        for (int r = 0; r < FROWS; r++)
                            if (r < rows) acc[r][j] = _mm256_fmadd_ps(wv[r], xv, acc[r][j]);
                    }
                }
            }
            for (int r = 0; r < rows; r++)
                for (int j = 0; j0 + j < m && j < 4; j++) out[r * MULTI + j0 + j] = sum8(acc[r][j]);
        }
        return;
    }
#endif
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < m; j++) out[r * MULTI + j] = dot_f32(w + r * row_stride, x + j * xstride, n);
}

#ifdef SIMD8
/* One float32 input against ROWS1 rows of float32 weights (one FMA chain per row, as dot_float_multi's,
 * so the result is the same bits): out[r]. Eight rows' streams in flight kept memory busier than
 * FROWS rows with software prefetch (the layers' GEMVs from memory at B=1: 1.03-1.18x over four
 * interleaved runs; prefetch on top of the eight rows took back a third of it). */
enum { ROWS1 = 8 };
static inline __attribute__((always_inline)) void dot_rows1_f32(const float *w, long row_stride, int rows,
                                                                 const float *x, int n, float *out) {
    __m256 acc[ROWS1];
    for (int r = 0; r < ROWS1; r++) acc[r] = _mm256_setzero_ps();
    for (int c = 0; c < n; c += 8) {
        __m256 xv = _mm256_loadu_ps(x + c);
        for (int r = 0; r < ROWS1; r++)
            if (r < rows) acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(w + r * row_stride + c), xv, acc[r]);
    }
    for (int r = 0; r < rows; r++) out[r] = sum8(acc[r]);
}
#endif

/* bf16 weights, tiled (kernels.bf16_tiles writes them): the rows in tiles of BTILE (the last may be
 * shorter); a tile of n rows holds, for each of the cols / 16 full column blocks, its n rows' 16 weights
 * (32 bytes a row) in pair order: the 32-bit word i of a row's block holds column i in its low half and
 * column i + 8 in its high half. Then the tile's rows' last cols % 16 weights, row by row, in order.
 * Why: widening bf16 to float32 took a load, a zero-extension and a shift per 8 weights (vpmovzxwd +
 * vpslld), which held a one-sequence GEMV to ~21 GB/s even from L3, below what memory delivers; in pair
 * order one 256-bit load, a shift (the low halves) and an AND (the high halves) widen 16, and the
 * FMAs still run over the columns in their natural order, so the result is the bits of a plain
 * row-major dot with one 8-lane chain (what the previous layout gave). A tile's blocks are one
 * contiguous stream instead of 8 rows' streams. The layers' GEMVs from memory at B=1: 1.29x (25.8
 * against 19.4 GB/s, fp32 rows 24.5 GB/s in the same run); at B=8 1.08x with the next tile
 * prefetched during the passes over this one. */
enum { BTILE = H2K_BF16_TILE, BCOLS = 16 };

/* The dot of a row's last cols % 16 weights with x's; one copy, so every path adds the same bits. */
static __attribute__((noinline)) float bf16_tail_dot(const uint16_t *w, const float *x, int n) {
    float acc = 0.0f;
    for (int c = 0; c < n; c++) acc += bf16_to_f32(w[c]) * x[c];
    return acc;
}

#if !defined(SIMD16) && !defined(SIMD8)
/* Weight k (< 16) of a row's pair-ordered block: where it sits. */
static inline int pair_slot(int k) { return k < 8 ? 2 * k : 2 * (k - 8) + 1; }

/* Row r (of n) of a tile with input x, one element at a time (the portable build). */
static float bf16_tile_dot(const uint16_t *tile, int n, int r, const float *x, int cols) {
    int full = cols / BCOLS * BCOLS;
    float acc = 0.0f;
    for (int c = 0; c < full; c += BCOLS)
        for (int k = 0; k < BCOLS; k++) acc += bf16_to_f32(tile[(long)c * n + r * BCOLS + pair_slot(k)]) * x[c + k];
    return acc + bf16_tail_dot(tile + (long)full * n + (long)r * (cols - full), x + full, cols - full);
}
#endif

#if defined(SIMD16) || defined(SIMD8)
/* 16 bf16 values at p in pair order (32-bit word i: values i and i + 8, or 2i and 2i + 1 of a row in
 * natural order) as two float32 vectors: the low halves shifted up, the high halves masked. */
static inline __attribute__((always_inline)) void widen_bf16_pairs(const uint16_t *p, __m256 *low, __m256 *high) {
    __m256i v = _mm256_loadu_si256((const __m256i *)p);
    *low = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
    *high = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32((int)0xFFFF0000u)));
}

/* Prefetch cursor: each call fetches the next `lines` cache lines of the span [*at, end) into L2. A
 * batch's passes over a tile walk it forward, so the next tile is in flight while the current one is
 * computed on (B=8, the layers' GEMVs from memory: 1.08x against no prefetch, whose memory idled
 * during the passes from L1). One input makes one pass: it reads its own stream AHEAD1 bytes ahead into
 * L1 instead (the 4 lines of the block 4 blocks on; 1.17x against the cursor, which was no better
 * than no prefetch; 512 or 2048 bytes ahead 0.98x and 0.92x). */
enum { AHEAD1 = 1024 };
static inline __attribute__((always_inline)) void prefetch_next(const char **at, const char *end, int lines) {
    for (int l = 0; l < lines && *at < end; l++, *at += 64) _mm_prefetch(*at, _MM_HINT_T1);
}

#ifdef SIMD8
/* Rows wider than WIDE_ROW against more than 4 inputs (the MLP's down matrix, 1536 columns): GROUP_ROWS
 * rows at a time, in column chunks of WIDE_CHUNK, so that the inputs' chunk stays in L1 while the
 * group's rows pass it (8 whole inputs are 48 KB, and at a stride of 1536 floats their lines fall in
 * two of L1's 64 sets per column); each row and input keeps one 8-lane FMA chain over its columns in
 * order (the accumulators wait in `acc` between chunks): the bits of dot_float_multi's. The next
 * group's bytes are fetched into L2 while this one is computed on (a cursor, one line per line
 * used), so the chunks read the group from L2. The down matrices from memory at B=8 against the
 * passes of 4: 4.52-4.98 against 5.30-5.43 ms (two runs); 256 columns and 4 rows were the best of
 * 128-768 and 1-16. out[r * MULTI + j]. */
enum { GROUP_ROWS = 4, WIDE_CHUNK = 256 };
static void dot_wide_group(const float *w, int rows, const float *x, long xstride, int m, int n,
                           const char **pf_at, const char *pf_end, float *out) {
    __m256 acc[GROUP_ROWS][MULTI];
    for (int c0 = 0; c0 < n; c0 += WIDE_CHUNK) {
        int c1 = c0 + WIDE_CHUNK < n ? c0 + WIDE_CHUNK : n;
        for (int r = 0; r < rows; r++) {
            const float *wf = w + (long)r * n;
            __m256 a[MULTI];
            for (int j = 0; j < MULTI; j++) a[j] = c0 == 0 || j >= m ? _mm256_setzero_ps() : acc[r][j];
            for (int c = c0; c < c1; c += 8) {
                if (c % 16 == 0) prefetch_next(pf_at, pf_end, 1);
                __m256 wv = _mm256_loadu_ps(wf + c);
#pragma GCC unroll 8
                for (int j = 0; j < MULTI; j++)
                    if (j < m) a[j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + j * xstride + c), a[j]);
            }
            for (int j = 0; j < MULTI; j++) acc[r][j] = a[j];
        }
    }
    for (int r = 0; r < rows; r++)
        for (int j = 0; j < m; j++) out[r * MULTI + j] = sum8(acc[r][j]);
}
#endif

/* Rows r0..r0+RR-1 of a tile of n rows against m <= MM inputs (x_j = x + j * xstride): out[r * MULTI +
 * j]. Per row and input one 8-lane FMA chain over the columns in order, then the tail: the same bits
 * for any RR, MM, n. `lines`: cache lines of the next tile fetched per column block (prefetch_next);
 * with MM == 1 the block AHEAD1 bytes on is fetched instead. */
static inline __attribute__((always_inline)) void bf16_tile_multi(const uint16_t *tile, int n, int r0, int RR,
                                                                   const float *x, long xstride, int m, int MM,
                                                                   int cols, float *out, const char **pf,
                                                                   const char *pf_end, int lines) {
    const int full = cols / BCOLS * BCOLS;
    __m256 acc[BTILE][4];
    for (int r = 0; r < RR; r++)
        for (int j = 0; j < MM; j++) acc[r][j] = _mm256_setzero_ps();
    for (int c = 0; c < full; c += BCOLS) {
        const uint16_t *block = tile + (long)c * n + r0 * BCOLS;
        if (MM == 1) { /* one input: a row's two halves go straight into its chain */
            for (int l = 0; l < BTILE * 32 / 64; l++) /* a whole block ahead: n == BTILE rows, 4 lines */
                _mm_prefetch((const char *)block + AHEAD1 + 64 * l, _MM_HINT_T0);
            __m256 x0 = _mm256_loadu_ps(x + c), x1 = _mm256_loadu_ps(x + c + 8);
            for (int r = 0; r < RR; r++) {
                __m256 lo, hi;
                widen_bf16_pairs(block + r * BCOLS, &lo, &hi);
                acc[r][0] = _mm256_fmadd_ps(lo, x0, acc[r][0]);
                acc[r][0] = _mm256_fmadd_ps(hi, x1, acc[r][0]);
            }
        } else { /* several: each row widened once for all of them */
            prefetch_next(pf, pf_end, lines);
            __m256 lo[BTILE], hi[BTILE];
            for (int r = 0; r < RR; r++) widen_bf16_pairs(block + r * BCOLS, &lo[r], &hi[r]);
            for (int j = 0; j < MM; j++) {
                if (j < m) {
                    __m256 x0 = _mm256_loadu_ps(x + j * xstride + c), x1 = _mm256_loadu_ps(x + j * xstride + c + 8);
                    for (int r = 0; r < RR; r++) {
                        acc[r][j] = _mm256_fmadd_ps(lo[r], x0, acc[r][j]);
                        acc[r][j] = _mm256_fmadd_ps(hi[r], x1, acc[r][j]);
                    }
                }
            }
        }
    }
    const uint16_t *tails = tile + (long)full * n;
    for (int r = 0; r < RR; r++)
        for (int j = 0; j < m; j++)
            out[r * MULTI + j] = sum8(acc[r][j]) + bf16_tail_dot(tails + (long)(r0 + r) * (cols - full),
                                                                 x + j * xstride + full, cols - full);
}
#endif

/* y_b (+)= W x_b for a bf16 tiled W, tile by tile in parallel: one input takes a full tile's rows at
 * once (8 chains); a batch takes them 2 rows by 4 inputs per pass (16 registers), the tile from L1
 * after the first pass. */
static void gemv_bf16_tiles(const uint16_t *W, const float *x, float *y, int rows, int cols, int accumulate,
                            int batch, int threads) {
    int tiles = (rows + BTILE - 1) / BTILE;
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int t = 0; t < tiles; t++) {
        int r0 = t * BTILE, n = rows - r0 < BTILE ? rows - r0 : BTILE;
        const uint16_t *tile = W + (long)r0 * cols;
        float v[BTILE * MULTI];
#if defined(SIMD16) || defined(SIMD8)
        const char *pf = (const char *)(tile + (long)n * cols), *pf_end = (const char *)(W + (long)rows * cols);
        if (pf_end > pf + (long)BTILE * cols * 2) pf_end = pf + (long)BTILE * cols * 2; /* the next tile only */
        if (batch == 1 && n == BTILE) {
            bf16_tile_multi(tile, BTILE, 0, BTILE, x, cols, 1, 1, cols, v, &pf, pf_end, 0);
            for (int k = 0; k < n; k++) y[r0 + k] = accumulate ? y[r0 + k] + v[k * MULTI] : v[k * MULTI];
            continue;
        }
        for (int i0 = 0; i0 < batch; i0 += 4) {
            int m = batch - i0 < 4 ? batch - i0 : 4;
            const float *xi = x + (long)i0 * cols;
            for (int k0 = 0; k0 < n; k0 += 2) { /* passes of 2 rows: a line of the next tile each block */
                if (k0 + 2 <= n && m == 4) bf16_tile_multi(tile, n, k0, 2, xi, cols, 4, 4, cols, v, &pf, pf_end, 1);
                else if (k0 + 2 <= n) bf16_tile_multi(tile, n, k0, 2, xi, cols, m, 4, cols, v, &pf, pf_end, 1);
                else bf16_tile_multi(tile, n, k0, 1, xi, cols, m, 4, cols, v, &pf, pf_end, 1);
                for (int k = k0; k < k0 + 2 && k < n; k++)
                    for (int j = 0; j < m; j++) {
                        float *yi = y + (long)(i0 + j) * rows + r0 + k;
                        *yi = accumulate ? *yi + v[(k - k0) * MULTI + j] : v[(k - k0) * MULTI + j];
                    }
            }
        }
#else
        (void)v;
        for (int k = 0; k < n; k++)
            for (int i = 0; i < batch; i++) {
                float *yi = y + (long)i * rows + r0 + k;
                float dot = bf16_tile_dot(tile, n, k, x + (long)i * cols, cols);
                *yi = accumulate ? *yi + dot : dot;
            }
#endif
    }
}

/* The short dots of attention (one K row against one query head). `omp simd` sums the 16 lanes
 * one by one (16 dependent adds), which made these latency-bound; AVX-512 sums them as a tree. */
static inline float dot_short(const float *a, const float *b, int n) {
#ifdef SIMD16
    if (n % 16 == 0) {
        __m512 acc = _mm512_mul_ps(_mm512_loadu_ps(a), _mm512_loadu_ps(b));
        for (int c = 16; c < n; c += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + c), _mm512_loadu_ps(b + c), acc);
        return _mm512_reduce_add_ps(acc);
    }
#elif defined(SIMD8)
    if (n % 16 == 0) { /* two chains, so the FMAs' latency overlaps */
        __m256 a0 = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b));
        __m256 a1 = _mm256_mul_ps(_mm256_loadu_ps(a + 8), _mm256_loadu_ps(b + 8));
        for (int c = 16; c < n; c += 16) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c), _mm256_loadu_ps(b + c), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + c + 8), _mm256_loadu_ps(b + c + 8), a1);
        }
        return sum8(_mm256_add_ps(a0, a1));
    }
#endif
    return dot_f32(a, b, n);
}

static inline float f16_at(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return f16_to_f32(h);
}

/* Quantized matrices (Q4_1, Q8_0) in the kernels' layout (gguf_blocks.QuantMatrix.kernel_layout): the
 * rows in groups of QGROUP (the last group may be shorter); a group of n rows with nb blocks per row
 * holds the blocks' fp16 scales d [nb][n], for Q4_1 then their fp16 minima m [nb][n], then their
 * quants [nb][n][16 bytes of nibbles | 32 int8]. These are the GGUF's bytes, regrouped: a row's
 * dot is sum_b d_b (q_b . x_b) (+ m_b xsum_b for Q4_1, xsum_b the sum of x over block b, computed once
 * per GEMV), the same value as dequantising w = d q (+ m) and taking the dot (exact in float32: d q
 * has at most 15 significant bits); only the summation order differs.
 * Why regrouped: unpacking 32 weights to floats takes ~7 vector operations, so the GGUF's own
 * layout (20- or 34-byte blocks, one row at a time) read Q4_1 at ~9 GB/s per core even from cache.
 * Here a group's 16 scales of a block convert in one instruction and are broadcast from memory for
 * free, the minima's term is one vector per group, the 16 rows' accumulators are summed by one
 * transposing reduction instead of 16, and the quants of a block column are 256 (Q4_1) or 512 (Q8_0)
 * contiguous bytes: Q4_1 at 16.0 GB/s per core from cache, against 9.1 (benchmarks/gemv.py measures
 * the kernels on the model's matrices from memory; 16-lane code on the AVX-512 machine). The 8-lane
 * code on the AVX2 machine reads a hot gate/up matrix at 9.4 GB/s on one core and 17.6 on two, near
 * what it reads from memory (14-16 GB/s): there Q4_1 with float inputs is bound by the unpacking. */
/* Inputs per pass over a group's blocks (a batch takes several passes, each from cache). */
enum { QGROUP = H2K_QGROUP, QMULTI = 4 };

static inline int scale_bytes(int wtype) { return wtype == Q4_1 ? 4 : 2; } /* per block and row: d (and m) */
static inline int quant_bytes(int wtype) { return wtype == Q4_1 ? 16 : 32; }

#if defined(SIMD16) || defined(SIMD8)
/* Each of the next `lines` cache lines at p, PREFETCH ahead into L1 and PREFETCH_L2 ahead into L2. Always
 * inlined: gcc deems a function that only prefetches free of effects and deletes calls to it. */
static inline __attribute__((always_inline)) void prefetch_lines(const uint8_t *p, int lines) {
    for (int l = 0; l < lines; l++) {
        _mm_prefetch((const char *)(p + 64 * l + PREFETCH), _MM_HINT_T0);
        _mm_prefetch((const char *)(p + 64 * l + PREFETCH_L2), _MM_HINT_T1);
    }
}
#endif

#if defined(SIMD16) || defined(SIMD8)
/* For the quantized matrices with int8 inputs (dot_group16_q8), which are bound by memory, not by their
 * arithmetic: gemv_batch fetches the whole next group into L2 as a group starts, and the group's block
 * columns come into L1 PREFETCH ahead. With prefetch_lines (a line at a time, into L1 and into L2
 * PREFETCH_L2 ahead) one core read the layers' gate/up groups from memory at 11-12 GB/s, where it computes
 * them at 23 GB/s hot and reads plain memory at 18: arithmetic and memory barely overlapped. Decode,
 * Q4_1 with int8 inputs (benchmarks/kernel_ab.py, 48-64 pairs each): B=1 1.035x and 1.025x at P=512,
 * 1.074x at P=2048 (seed H2O); B=8 0.999x. Fetched by the kernel itself, once per input, B=8 was 0.934x;
 * two, three or four groups ahead instead of one: 1.028x, 1.004x, 0.993x at B=1. The float-input
 * kernels are bound by their unpacking: the same fetch made Q4_1 0.963x and the Q8_0 lm_head no faster
 * (1.010x), so they keep prefetch_lines. Measured on AVX2 only. */
static inline __attribute__((always_inline)) void prefetch_group(const uint8_t *grp, long group_bytes) {
    for (long o = 0; o < group_bytes; o += 64) _mm_prefetch((const char *)(grp + o), _MM_HINT_T1);
}
static inline __attribute__((always_inline)) void prefetch_lines_l1(const uint8_t *p, int lines) {
    for (int l = 0; l < lines; l++) _mm_prefetch((const char *)(p + 64 * l + PREFETCH), _MM_HINT_T0);
}
#endif

#ifdef SIMD16

/* One row's block (its quants at q) as two float vectors: weights 0..15 and 16..31 (before d and m).
 * Q4_1's nibbles become floats by a table lookup (vpermps reads the low 4 bits of each lane). */
static inline __attribute__((always_inline)) void unpack_block(int wtype, const uint8_t *q, __m512 nibble_values,
                                                                __m512 *lo, __m512 *hi) {
    if (wtype == Q4_1) {
        __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)q));
        *lo = _mm512_permutexvar_ps(bytes, nibble_values);
        *hi = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), nibble_values);
    } else {
        *lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)q)));
        *hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(q + 16))));
    }
}

/* The 16 lane sums of a[0..15] as one vector (lane r: the sum of a[r]), by a transposing tree; each
 * row's sum takes the same path whatever the other rows hold. */
static inline __m512 sum_rows16(const __m512 *a) {
    __m512 t[8], u[4], v[2];
    for (int i = 0; i < 8; i++) /* per 128-bit lane: [a0+a2, b0+b2, a1+a3, b1+b3] of rows a, b = 2i, 2i+1 */
        t[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
    for (int i = 0; i < 4; i++) { /* per 128-bit lane k: rows 4i..4i+3, each summed over lane k */
        __m512d p = _mm512_castps_pd(t[2 * i]), q = _mm512_castps_pd(t[2 * i + 1]);
        u[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(p, q)), _mm512_castpd_ps(_mm512_unpackhi_pd(p, q)));
    }
    for (int i = 0; i < 2; i++) /* [u(2i) lanes 0+1, 2+3; u(2i+1) lanes 0+1, 2+3] */
        v[i] = _mm512_add_ps(_mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0x88),
                             _mm512_shuffle_f32x4(u[2 * i], u[2 * i + 1], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(v[0], v[1], 0x88), _mm512_shuffle_f32x4(v[0], v[1], 0xDD));
}

/* A full group (QGROUP rows) against m <= QMULTI inputs: out[j * QGROUP + r]. Per row and input the
 * operations are the same, in the same order, for any m: a batch gives each sequence what it gets
 * alone, bit for bit. Always inlined per weight type. */
static inline __attribute__((always_inline)) void dot_group16(int wtype, const uint8_t *grp, int nb, const float *x,
                                                               long xstride, const float *xsum, int m, float *out) {
    const uint16_t *d16 = (const uint16_t *)grp;
    const uint8_t *quants = grp + (long)nb * QGROUP * scale_bytes(wtype);
    const int qbytes = quant_bytes(wtype), lines = QGROUP * qbytes / 64;
    const __m512 nibble_values = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    float scales[nb * QGROUP] __attribute__((aligned(64)));
    __m512 tails[QMULTI];
    for (int j = 0; j < QMULTI; j++) tails[j] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        _mm512_store_ps(scales + b * QGROUP, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d16 + b * QGROUP))));
        if (wtype == Q4_1) { /* the minima's term for every row at once: sum_b m_b xsum_b */
            __m512 mins = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(d16 + (nb + b) * QGROUP)));
            for (int j = 0; j < m; j++) tails[j] = _mm512_fmadd_ps(mins, _mm512_set1_ps(xsum[j * nb + b]), tails[j]);
        }
    }
    if (m == 1) { /* one input: all 16 rows per block column, their accumulators in registers */
        __m512 acc[QGROUP];
        for (int r = 0; r < QGROUP; r++) acc[r] = _mm512_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const uint8_t *column = quants + (long)b * QGROUP * qbytes;
            prefetch_lines(column, lines);
            __m512 x0 = _mm512_loadu_ps(x + b * QBLOCK), x1 = _mm512_loadu_ps(x + b * QBLOCK + 16);
#pragma GCC unroll 16
            for (int r = 0; r < QGROUP; r++) {
                __m512 lo, hi;
                unpack_block(wtype, column + r * qbytes, nibble_values, &lo, &hi);
                __m512 s = _mm512_fmadd_ps(hi, x1, _mm512_mul_ps(lo, x0));
                acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(scales[b * QGROUP + r]), s, acc[r]);
            }
        }
        _mm512_storeu_ps(out, _mm512_add_ps(sum_rows16(acc), tails[0]));
        return;
    }
    { /* several inputs: 4 rows at a time, each block unpacked once for all inputs */
        __m512 acc[QMULTI][QGROUP];
        for (int r0 = 0; r0 < QGROUP; r0 += 4) {
            __m512 part[4][QMULTI];
            for (int r = 0; r < 4; r++)
                for (int j = 0; j < QMULTI; j++) part[r][j] = _mm512_setzero_ps();
            for (int b = 0; b < nb; b++) {
                const uint8_t *column = quants + (long)b * QGROUP * qbytes;
                if (r0 == 0) prefetch_lines(column, lines);
#pragma GCC unroll 4
                for (int r = 0; r < 4; r++) {
                    __m512 lo, hi;
                    unpack_block(wtype, column + (r0 + r) * qbytes, nibble_values, &lo, &hi);
                    __m512 scale = _mm512_set1_ps(scales[b * QGROUP + r0 + r]);
#pragma GCC unroll 4
                    for (int j = 0; j < QMULTI; j++) {
                        if (j < m) {
                            const float *xj = x + j * xstride + b * QBLOCK;
                            __m512 s = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xj + 16), _mm512_mul_ps(lo, _mm512_loadu_ps(xj)));
                            part[r][j] = _mm512_fmadd_ps(scale, s, part[r][j]);
                        }
                    }
                }
            }
            for (int r = 0; r < 4; r++)
                for (int j = 0; j < m; j++) acc[j][r0 + r] = part[r][j];
        }
        for (int j = 0; j < m; j++) _mm512_storeu_ps(out + j * QGROUP, _mm512_add_ps(sum_rows16(acc[j]), tails[j]));
    }
}
#endif

#ifdef SIMD8
/* One row's block (its quants at q) as four float vectors: weights 0..7, 8..15, 16..23, 24..31 (Q4_1:
 * the low nibbles of bytes 0..15, then their high nibbles). */
static inline __attribute__((always_inline)) void unpack_block8(int wtype, const uint8_t *q, __m256 w[4]) {
    if (wtype == Q4_1) {
        const __m256i low4 = _mm256_set1_epi32(0x0F);
        for (int h = 0; h < 2; h++) {
            __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * h)));
            w[h] = _mm256_cvtepi32_ps(_mm256_and_si256(bytes, low4));
            w[2 + h] = _mm256_cvtepi32_ps(_mm256_srli_epi32(bytes, 4));
        }
    } else {
        for (int k = 0; k < 4; k++)
            w[k] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(q + 8 * k))));
    }
}

/* q_b . x_b of one unpacked block, in one fixed order. */
static inline __attribute__((always_inline)) __m256 block_dot8(const __m256 w[4], const float *xb) {
    __m256 s = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
    s = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), s);
    s = _mm256_fmadd_ps(w[2], _mm256_loadu_ps(xb + 16), s);
    return _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), s);
}

/* dot_group16 on 8 lanes (16 registers): a full group against m <= QMULTI inputs, out[j * QGROUP + r],
 * each (row, input) accumulated alone in the same order for any m, so a batch gives each sequence
 * what it gets alone, bit for bit. One input: 8 rows per pass over the group's blocks; several: 2 rows
 * per pass, each block unpacked once for all inputs. Passes after the first read the group from cache. */
static inline __attribute__((always_inline)) void dot_group16_8(int wtype, const uint8_t *grp, int nb, const float *x,
                                                                 long xstride, const float *xsum, int m, float *out) {
    const uint16_t *d16 = (const uint16_t *)grp;
    const uint8_t *quants = grp + (long)nb * QGROUP * scale_bytes(wtype);
    const int qbytes = quant_bytes(wtype), lines = QGROUP * qbytes / 64;
    float scales[nb * QGROUP] __attribute__((aligned(32)));
    __m256 tails[QMULTI][2];
    for (int j = 0; j < QMULTI; j++) tails[j][0] = tails[j][1] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        for (int h = 0; h < 2; h++) {
            _mm256_store_ps(scales + b * QGROUP + 8 * h,
                            _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d16 + b * QGROUP + 8 * h))));
            if (wtype == Q4_1) { /* the minima's term for 8 rows at once: sum_b m_b xsum_b */
                __m256 mins = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d16 + (nb + b) * QGROUP + 8 * h)));
                for (int j = 0; j < m; j++)
                    tails[j][h] = _mm256_fmadd_ps(mins, _mm256_set1_ps(xsum[j * nb + b]), tails[j][h]);
            }
        }
    }
    __m256 acc[QMULTI][QGROUP];
    if (m == 1) {
        for (int r0 = 0; r0 < QGROUP; r0 += 8) {
            __m256 part[8];
            for (int r = 0; r < 8; r++) part[r] = _mm256_setzero_ps();
            for (int b = 0; b < nb; b++) {
                const uint8_t *column = quants + (long)b * QGROUP * qbytes;
                if (r0 == 0) prefetch_lines(column, lines);
#pragma GCC unroll 8
                for (int r = 0; r < 8; r++) {
                    __m256 w[4];
                    unpack_block8(wtype, column + (r0 + r) * qbytes, w);
                    part[r] = _mm256_fmadd_ps(_mm256_set1_ps(scales[b * QGROUP + r0 + r]), block_dot8(w, x + b * QBLOCK),
                                              part[r]);
                }
            }
            for (int r = 0; r < 8; r++) acc[0][r0 + r] = part[r];
        }
    } else {
        for (int r0 = 0; r0 < QGROUP; r0 += 2) {
            __m256 part[2][QMULTI];
            for (int r = 0; r < 2; r++)
                for (int j = 0; j < QMULTI; j++) part[r][j] = _mm256_setzero_ps();
            for (int b = 0; b < nb; b++) {
                const uint8_t *column = quants + (long)b * QGROUP * qbytes;
                if (r0 == 0) prefetch_lines(column, lines);
                for (int r = 0; r < 2; r++) {
                    __m256 w[4];
                    unpack_block8(wtype, column + (r0 + r) * qbytes, w);
                    __m256 scale = _mm256_set1_ps(scales[b * QGROUP + r0 + r]);
#pragma GCC unroll 4
                    for (int j = 0; j < QMULTI; j++)
                        if (j < m)
                            part[r][j] = _mm256_fmadd_ps(scale, block_dot8(w, x + j * xstride + b * QBLOCK), part[r][j]);
                }
            }
            for (int r = 0; r < 2; r++)
                for (int j = 0; j < m; j++) acc[j][r0 + r] = part[r][j];
        }
    }
    for (int j = 0; j < m; j++)
        for (int h = 0; h < 2; h++)
            _mm256_storeu_ps(out + j * QGROUP + 8 * h, _mm256_add_ps(sum_rows8(acc[j] + 8 * h), tails[j][h]));
}
#endif

/* A group of n rows (the layout above) against m <= QMULTI inputs x_j = x + j * xstride (xsum_j =
 * xsum + j * nb: Q4_1's block sums of x_j): out[j * QGROUP + r]. */
static void dot_group(int wtype, const uint8_t *grp, int n, int nb, const float *x, long xstride, const float *xsum,
                      int m, float *out) {
#ifdef SIMD16
    if (n == QGROUP) {
        if (wtype == Q4_1) dot_group16(Q4_1, grp, nb, x, xstride, xsum, m, out);
        else dot_group16(Q8_0, grp, nb, x, xstride, xsum, m, out);
        return;
    }
#elif defined(SIMD8)
    if (n == QGROUP) {
        if (wtype == Q4_1) dot_group16_8(Q4_1, grp, nb, x, xstride, xsum, m, out);
        else dot_group16_8(Q8_0, grp, nb, x, xstride, xsum, m, out);
        return;
    }
#endif
    const uint8_t *d16 = grp, *quants = grp + (long)nb * n * scale_bytes(wtype);
    const int qbytes = quant_bytes(wtype);
    for (int r = 0; r < n; r++) {
        for (int j = 0; j < m; j++) {
            float total = 0.0f;
            for (int b = 0; b < nb; b++) {
                const uint8_t *q = quants + ((long)b * n + r) * qbytes;
                const float *xb = x + j * xstride + b * QBLOCK;
                float s = 0.0f;
                if (wtype == Q4_1) {
                    for (int i = 0; i < QBLOCK / 2; i++) s += (float)(q[i] & 0x0F) * xb[i] + (float)(q[i] >> 4) * xb[i + 16];
                    total += f16_at(d16 + 2 * ((long)b * n + r)) * s
                             + f16_at(d16 + 2 * ((long)(nb + b) * n + r)) * xsum[j * nb + b];
                } else {
                    for (int i = 0; i < QBLOCK; i++) s += (float)(int8_t)q[i] * xb[i];
                    total += f16_at(d16 + 2 * ((long)b * n + r)) * s;
                }
            }
            out[j * QGROUP + r] = total;
        }
    }
}

/* 8-bit activations (h2k_dims.act_q8, llm_activation_dtype q8): each input's block of 32 values becomes
 * int8 q with one float scale dx (x ~ dx q, dx = max|x| / 127, rounded to nearest even), and a row's
 * block dot is the integer q_w . q_x times d_w dx, as llama.cpp does for Q4_1 x Q8_1 and MNN in its low
 * precision. Not exact: the inputs are rounded. The Q4_1 minima's term takes the sums of the rounded
 * inputs (qsum = dx sum q): with the float sums, the rounding errors times q_w (0..15, mean ~7.5) would
 * no longer cancel against m_b (~ -7.5 d_b), and the error was 3.6x larger.
 * Why: on 8 lanes, widening 32 nibbles to floats takes ~18 instructions per block and row, so Q4_1
 * with float inputs is compute-bound below memory speed; bytes multiply-added as bytes take ~5. */
static void quantize_q8(const float *x, int cols, int8_t *q, float *dx, float *qsum) {
    for (int b = 0; b < cols / QBLOCK; b++) {
        const float *xb = x + b * QBLOCK;
        float amax = 0.0f;
        for (int k = 0; k < QBLOCK; k++) { /* not fmaxf: gcc calls it out of line */
            float a = fabsf(xb[k]);
            amax = a > amax ? a : amax;
        }
        float d = amax / 127.0f, inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        int sum = 0;
        for (int k = 0; k < QBLOCK; k++) {
            q[b * QBLOCK + k] = (int8_t)nearbyintf(xb[k] * inv);
            sum += q[b * QBLOCK + k];
        }
        dx[b] = d;
        qsum[b] = d * (float)sum;
    }
}

#if defined(SIMD16) || defined(SIMD8)
/* A full group against one quantized input: out[r] for its QGROUP rows. Q4_1: two rows per 32-byte
 * load (lanes 0-3 of an accumulator sum row 2p, lanes 4-7 row 2p + 1), the low nibbles multiplied
 * with inputs 0..15 and the high with 16..31; Q8_0: 8 rows per pass, the group's second pass from
 * cache. Integer block dots are exact; only the float sum over blocks is in lane order. */
static inline __attribute__((always_inline)) void dot_group16_q8(int wtype, const uint8_t *grp, int nb,
                                                                  const int8_t *qx, const float *dx, const float *qsum,
                                                                  float *out) {
    const uint16_t *d16 = (const uint16_t *)grp;
    const uint8_t *quants = grp + (long)nb * QGROUP * scale_bytes(wtype);
    const int qbytes = quant_bytes(wtype), lines = QGROUP * qbytes / 64;
    const __m256i ones16 = _mm256_set1_epi16(1);
    float result[QGROUP] __attribute__((aligned(32)));
    __m256 tail[2] = {_mm256_setzero_ps(), _mm256_setzero_ps()};
    float scales[nb * QGROUP] __attribute__((aligned(32))); /* d_w dx per block and row */
    for (int b = 0; b < nb; b++)
        for (int h = 0; h < 2; h++) {
            _mm256_store_ps(scales + b * QGROUP + 8 * h,
                            _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d16 + b * QGROUP + 8 * h))),
                                          _mm256_set1_ps(dx[b])));
            if (wtype == Q4_1) {
                __m256 mins = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(d16 + (nb + b) * QGROUP + 8 * h)));
                tail[h] = _mm256_fmadd_ps(mins, _mm256_set1_ps(qsum[b]), tail[h]);
            }
        }
    if (wtype == Q4_1) {
        const __m256i low4 = _mm256_set1_epi8(0x0F);
        __m256 acc[8];
        for (int p = 0; p < 8; p++) acc[p] = _mm256_setzero_ps();
        for (int b = 0; b < nb; b++) {
            const uint8_t *column = quants + (long)b * QGROUP * qbytes;
            prefetch_lines_l1(column, lines);
            __m256i xlo = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(qx + b * QBLOCK)));
            __m256i xhi = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(qx + b * QBLOCK + 16)));
#pragma GCC unroll 8
            for (int p = 0; p < 8; p++) {
                __m256i v = _mm256_loadu_si256((const __m256i *)(column + 32 * p));
                __m256i lo = _mm256_and_si256(v, low4), hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low4);
                __m256i s16 = _mm256_add_epi16(_mm256_maddubs_epi16(lo, xlo), _mm256_maddubs_epi16(hi, xhi));
                __m256 s = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones16));
                const float *sp = scales + b * QGROUP + 2 * p; /* [row 2p x4, row 2p+1 x4] */
                acc[p] = _mm256_fmadd_ps(s, _mm256_set_m128(_mm_broadcast_ss(sp + 1), _mm_broadcast_ss(sp)), acc[p]);
            }
        }
        /* rows 0..7 from acc[0..3], 8..15 from acc[4..7]: hadd twice gives [r0 r2 r4 r6 r1 r3 r5 r7] */
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
        for (int h = 0; h < 2; h++) {
            const __m256 *a = acc + 4 * h;
            __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
            _mm256_store_ps(result + 8 * h, _mm256_add_ps(_mm256_permutevar8x32_ps(u, order), tail[h]));
        }
    } else {
        for (int r0 = 0; r0 < QGROUP; r0 += 8) {
            __m256 acc[8];
            for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
            for (int b = 0; b < nb; b++) {
                const uint8_t *column = quants + (long)b * QGROUP * qbytes;
                if (r0 == 0) prefetch_lines_l1(column, lines);
                __m256i xb = _mm256_loadu_si256((const __m256i *)(qx + b * QBLOCK));
#pragma GCC unroll 8
                for (int r = 0; r < 8; r++) {
                    __m256i w = _mm256_loadu_si256((const __m256i *)(column + (r0 + r) * qbytes));
                    /* |w| (unsigned) times x with w's sign: maddubs wants one unsigned operand */
                    __m256i s16 = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(xb, w));
                    __m256 s = _mm256_cvtepi32_ps(_mm256_madd_epi16(s16, ones16));
                    acc[r] = _mm256_fmadd_ps(s, _mm256_set1_ps(scales[b * QGROUP + r0 + r]), acc[r]);
                }
            }
            _mm256_store_ps(result + r0, sum_rows8(acc));
        }
    }
    memcpy(out, result, sizeof result);
}
#endif

/* A group of n rows against one input quantized by quantize_q8 (qx, dx, qsum): out[r]. */
static void dot_group_q8(int wtype, const uint8_t *grp, int n, int nb, const int8_t *qx, const float *dx,
                         const float *qsum, float *out) {
#if defined(SIMD16) || defined(SIMD8)
    if (n == QGROUP) {
        if (wtype == Q4_1) dot_group16_q8(Q4_1, grp, nb, qx, dx, qsum, out);
        else dot_group16_q8(Q8_0, grp, nb, qx, dx, qsum, out);
        return;
    }
#endif
    const uint8_t *d16 = grp, *quants = grp + (long)nb * n * scale_bytes(wtype);
    const int qbytes = quant_bytes(wtype);
    for (int r = 0; r < n; r++) {
        float total = 0.0f;
        for (int b = 0; b < nb; b++) {
            const uint8_t *q = quants + ((long)b * n + r) * qbytes;
            const int8_t *xb = qx + b * QBLOCK;
            int dot = 0;
            if (wtype == Q4_1) {
                for (int i = 0; i < QBLOCK / 2; i++) dot += (q[i] & 0x0F) * xb[i] + (q[i] >> 4) * xb[i + 16];
                total += f16_at(d16 + 2 * ((long)b * n + r)) * dx[b] * (float)dot
                         + f16_at(d16 + 2 * ((long)(nb + b) * n + r)) * qsum[b];
            } else {
                for (int i = 0; i < QBLOCK; i++) dot += (int8_t)q[i] * xb[i];
                total += f16_at(d16 + 2 * ((long)b * n + r)) * dx[b] * (float)dot;
            }
        }
        out[r] = total;
    }
}

/* Threads of the kernels' parallel loops: the caller's choice (d->threads, e.g. one while another
 * process holds a core), else OpenMP's default. */
static inline int team_size(const h2k_dims *d) {
    return d->threads > 0 ? d->threads : omp_get_max_threads();
}

/* y_{i0 + j}[r0 + k] (+)= v[k * MULTI + j] for k < n, j < m (y_b = y + b * rows): a group of rows'
 * dots with m inputs into the outputs. */
static inline void put_rows(float *y, int rows, int r0, int n, int i0, int m, const float *v, int accumulate) {
    for (int k = 0; k < n; k++)
        for (int j = 0; j < m; j++) {
            float *yi = y + (long)(i0 + j) * rows + r0 + k;
            *yi = accumulate ? *yi + v[k * MULTI + j] : v[k * MULTI + j];
        }
}

/* y_b[r] (+)= W[r, :] . x_b for r < rows and each of `batch` inputs (x_b = x + b * cols, y_b = y + b * rows;
 * quantized types: cols is a multiple of 32). Each group of rows is read from memory once and dotted with
 * every input while it is in cache: a batch costs the weight bytes of one sequence. */
static void gemv_batch(const h2k_dims *d, const void *W, const float *x, float *y, int rows, int cols, int accumulate,
                       int batch) {
    int wtype = d->wtype, threads = team_size(d);
    if (wtype == Q4_1 || wtype == Q8_0) {
        int nb = cols / QBLOCK;
        long group_bytes = (long)QGROUP * nb * (wtype == Q4_1 ? Q4_1_BYTES : Q8_0_BYTES);
        const uint8_t *w = (const uint8_t *)W;
        int groups = (rows + QGROUP - 1) / QGROUP;
        if (d->act_q8) { /* each input quantized once; each group read once, dotted with every input */
            int8_t qx[batch][cols];
            float dx[batch][nb > 0 ? nb : 1], qsum[batch][nb > 0 ? nb : 1];
            for (int i = 0; i < batch; i++) quantize_q8(x + (long)i * cols, cols, qx[i], dx[i], qsum[i]);
#pragma omp parallel for schedule(static) num_threads(threads)
            for (int g = 0; g < groups; g++) {
                int r0 = g * QGROUP, n = rows - r0 < QGROUP ? rows - r0 : QGROUP;
                float v[QGROUP];
#if defined(SIMD16) || defined(SIMD8)
                if (g + 1 < groups) prefetch_group(w + (g + 1) * group_bytes, group_bytes);
#endif
                for (int i = 0; i < batch; i++) {
                    dot_group_q8(wtype, w + g * group_bytes, n, nb, qx[i], dx[i], qsum[i], v);
                    float *yi = y + (long)i * rows + r0;
                    for (int k = 0; k < n; k++) yi[k] = accumulate ? yi[k] + v[k] : v[k];
                }
            }
            return;
        }
        float xsum[batch][nb > 0 ? nb : 1];
        for (int i = 0; wtype == Q4_1 && i < batch; i++)
            for (int b = 0; b < nb; b++) {
                float s = 0.0f;
                for (int k = 0; k < QBLOCK; k++) s += x[(long)i * cols + b * QBLOCK + k];
                xsum[i][b] = s;
            }
        const float *sums = &xsum[0][0];
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int g = 0; g < groups; g++) {
            int r0 = g * QGROUP, n = rows - r0 < QGROUP ? rows - r0 : QGROUP;
            float v[QMULTI * QGROUP];
            for (int i0 = 0; i0 < batch; i0 += QMULTI) {
                int m = batch - i0 < QMULTI ? batch - i0 : QMULTI;
                dot_group(wtype, w + g * group_bytes, n, nb, x + (long)i0 * cols, cols, sums + i0 * nb, m, v);
                for (int j = 0; j < m; j++) {
                    float *yi = y + (long)(i0 + j) * rows + r0;
                    for (int k = 0; k < n; k++) yi[k] = accumulate ? yi[k] + v[j * QGROUP + k] : v[j * QGROUP + k];
                }
            }
        }
    } else if (wtype == BF16) {
        gemv_bf16_tiles((const uint16_t *)W, x, y, rows, cols, accumulate, batch, threads);
#ifdef SIMD8
    } else if (wtype == F32 && batch == 1 && cols % 8 == 0) {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int r0 = 0; r0 < rows; r0 += ROWS1) {
            int n = rows - r0 < ROWS1 ? rows - r0 : ROWS1;
            float v[ROWS1];
            const float *w = (const float *)W + (long)r0 * cols;
            if (n == ROWS1) dot_rows1_f32(w, cols, ROWS1, x, cols, v);
            else dot_rows1_f32(w, cols, n, x, cols, v);
            for (int k = 0; k < n; k++) y[r0 + k] = accumulate ? y[r0 + k] + v[k] : v[k];
        }
    } else if (wtype == F32 && batch > 4 && cols > WIDE_ROW && cols % 8 == 0) {
#pragma omp parallel num_threads(threads)
        {
            int tid = omp_get_thread_num(), used = omp_get_num_threads();
            int groups = (rows + GROUP_ROWS - 1) / GROUP_ROWS, per = (groups + used - 1) / used;
            int g0 = tid * per < groups ? tid * per : groups, g1 = g0 + per < groups ? g0 + per : groups;
            const float *Wf = (const float *)W;
            const char *pf_end = (const char *)(Wf + (long)(g1 * GROUP_ROWS < rows ? g1 * GROUP_ROWS : rows) * cols);
            for (int g = g0; g < g1; g++) {
                int r0 = g * GROUP_ROWS, n = rows - r0 < GROUP_ROWS ? rows - r0 : GROUP_ROWS;
                const char *pf_at = (const char *)(Wf + (long)(r0 + n) * cols);
                for (int i0 = 0; i0 < batch; i0 += MULTI) {
                    int m = batch - i0 < MULTI ? batch - i0 : MULTI;
                    const float *xi = x + (long)i0 * cols;
                    float v[GROUP_ROWS * MULTI];
                    dot_wide_group(Wf + (long)r0 * cols, n, xi, cols, m, cols, &pf_at, pf_end, v);
                    put_rows(y, rows, r0, n, i0, m, v, accumulate);
                }
            }
        }
#endif
    } else {
#pragma omp parallel for schedule(static) num_threads(threads)
        for (int r0 = 0; r0 < rows; r0 += FROWS) {
            int n = rows - r0 < FROWS ? rows - r0 : FROWS;
            float v[FROWS * MULTI];
            for (int i0 = 0; i0 < batch; i0 += MULTI) {
                int m = batch - i0 < MULTI ? batch - i0 : MULTI;
                const float *xi = x + (long)i0 * cols, *w = (const float *)W + (long)r0 * cols;
                if (n == FROWS && m == 1) dot_float_multi(w, cols, FROWS, xi, cols, 1, cols, v);
                else if (n == FROWS && m == MULTI) dot_float_multi(w, cols, FROWS, xi, cols, MULTI, cols, v);
                else dot_float_multi(w, cols, n, xi, cols, m, cols, v);
                put_rows(y, rows, r0, n, i0, m, v, accumulate);
            }
        }
    }
}

/* h = x / rms(x) * weight (Llama RMSNorm, computed in float32). */
static void rms_norm(const float *x, const float *weight, float eps, float *h, int n) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    float inv = 1.0f / sqrtf(ss / (float)n + eps);
    for (int i = 0; i < n; i++) h[i] = weight[i] * (x[i] * inv);
}

/* Rotary embedding in place on `heads` consecutive heads (rotate-half layout, as HF Llama). */
static void rope(float *v, int heads, int head_dim, const float *cos, const float *sin) {
    int half = head_dim / 2;
    for (int h = 0; h < heads; h++) {
        float *q = v + h * head_dim;
        for (int i = 0; i < half; i++) {
            float a = q[i], b = q[i + half];
            q[i] = a * cos[i] - b * sin[i];
            q[i + half] = b * cos[i + half] + a * sin[i + half];
        }
    }
}

/* norm -> y = W h, optional RoPE on the first rope_heads heads of y (the q and k of a fused qkv). */
void h2k_norm_gemv(const h2k_dims *d, const float *x, const float *norm_w, const void *W, int rows, float *h,
                   float *y, int rope_heads, const float *cos, const float *sin) {
    rms_norm(x, norm_w, d->eps, h, d->hidden);
    gemv_batch(d, W, h, y, rows, d->hidden, 0, 1);
    if (rope_heads > 0) rope(y, rope_heads, d->head_dim, cos, sin);
}

/* h2k_norm_gemv for `batch` inputs x [batch, hidden] (h the same shape), y [batch, rows], no RoPE. */
void h2k_norm_gemv_batch(const h2k_dims *d, int batch, const float *x, const float *norm_w, const void *W, int rows,
                         float *h, float *y) {
    for (int i = 0; i < batch; i++)
        rms_norm(x + (long)i * d->hidden, norm_w, d->eps, h + (long)i * d->hidden, d->hidden);
    gemv_batch(d, W, h, y, rows, d->hidden, 0, batch);
}

/* float32 -> storage dtype, rounding as torch does (nearest-even; bf16 NaN -> 0x7FC0). */
void h2k_store_row(const float *src, void *dst, int n, int kvtype) {
    if (kvtype == F32) {
        memcpy(dst, src, (size_t)n * sizeof(float));
    } else if (kvtype == BF16) {
        uint16_t *out = (uint16_t *)dst;
        for (int i = 0; i < n; i++) {
            word32 w = {.f = src[i]};
            out[i] = (w.u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0 : (uint16_t)((w.u + 0x7FFFu + ((w.u >> 16) & 1u)) >> 16);
        }
    } else {
        _Float16 *out = (_Float16 *)dst;
        for (int i = 0; i < n; i++) out[i] = (_Float16)src[i];
    }
}

/* The attention input of a decode step for `batch` sequences at once: qkv_i = W_qkv rmsnorm(x_i), the
 * per-head q/k norms if given (Gemma 3's QK-norm, before RoPE as there), RoPE on the q and k heads at
 * each sequence's own position (cos[i], sin[i]), and each sequence's k and v stored into its cache
 * slot (head h at k_slot[i] + h * slot_stride[i] elements), so no separate copy is needed. A NULL
 * k_slot[i]: the caller stores that sequence's k and v itself. x, h: [batch, hidden]; qkv:
 * [batch, (q_heads + 2 kv_heads) head_dim]. The weights are read once for the whole batch. */
void h2k_attention_input_batch(const h2k_dims *d, int batch, const float *x, const float *norm_w, const void *Wqkv,
                               float *h, float *qkv, const float *q_norm_w, const float *k_norm_w,
                               const float *const *cos, const float *const *sin, void *const *k_slot,
                               void *const *v_slot, const long *slot_stride, int kvtype) {
    int kv_heads = d->kv_heads, head_dim = d->head_dim;
    int kv_dim = kv_heads * head_dim, q_dim = d->q_heads * head_dim, width = q_dim + 2 * kv_dim;
    PHASE_START(started);
    h2k_norm_gemv_batch(d, batch, x, norm_w, Wqkv, width, h, qkv);
    PHASE_ADD(QKV, started);
    PHASE_START(rope_started);
    size_t bytes = kvtype == F32 ? 4 : 2;
    for (int s = 0; s < batch; s++) {
        float *y = qkv + (long)s * width;
        for (int i = 0; q_norm_w != NULL && i < d->q_heads; i++)
            rms_norm(y + i * head_dim, q_norm_w, d->eps, y + i * head_dim, head_dim);
        for (int i = 0; k_norm_w != NULL && i < kv_heads; i++)
            rms_norm(y + q_dim + i * head_dim, k_norm_w, d->eps, y + q_dim + i * head_dim, head_dim);
        rope(y, d->q_heads + kv_heads, head_dim, cos[s], sin[s]);
        for (int g = 0; k_slot[s] != NULL && g < kv_heads; g++) {
            long offset = (long)g * slot_stride[s] * (long)bytes;
            h2k_store_row(y + q_dim + g * head_dim, (char *)k_slot[s] + offset, head_dim, kvtype);
            h2k_store_row(y + q_dim + kv_dim + g * head_dim, (char *)v_slot[s] + offset, head_dim, kvtype);
        }
    }
    PHASE_ADD(ROPE, rope_started);
}

/* One sequence: h2k_attention_input_batch with batch 1. */
void h2k_attention_input(const h2k_dims *d, const float *x, const float *norm_w, const void *Wqkv, float *h,
                         float *qkv, const float *q_norm_w, const float *k_norm_w, const float *cos,
                         const float *sin, void *k_slot, void *v_slot, long slot_stride, int kvtype) {
    h2k_attention_input_batch(d, 1, x, norm_w, Wqkv, h, qkv, q_norm_w, k_norm_w, &cos, &sin, &k_slot, &v_slot,
                              &slot_stride, kvtype);
}

/* y_i (+)= out_norm(W v_i) when out_norm_w is given (computed in h first), else y_i (+)= W v_i directly;
 * v [batch, cols], y and h [batch, rows]. */
static void gemv_normed_add(const h2k_dims *d, const void *W, const float *v, const float *out_norm_w, float *y,
                            float *h, int rows, int cols, int batch) {
    float eps = d->eps;
    if (out_norm_w == NULL) {
        gemv_batch(d, W, v, y, rows, cols, 1, batch);
        return;
    }
    gemv_batch(d, W, v, h, rows, cols, 0, batch);
    for (int i = 0; i < batch; i++) {
        float *hi = h + (long)i * rows, *yi = y + (long)i * rows;
        rms_norm(hi, out_norm_w, eps, hi, rows);
        for (int k = 0; k < rows; k++) yi[k] += hi[k];
    }
}

/* gate[i] = act(gate[i]) * up[i] for i < n. GELU-tanh is 0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3))),
 * torch's approximate="tanh", with tanh(u) = 1 - 2 / (exp(2u) + 1); SiLU is g / (1 + exp(-g)). Sixteen
 * (AVX-512) or eight (AVX2) lanes at a time (gcc leaves the scalar loop unvectorised: at batch 8 it cost
 * 1.3 ms a step), the scalar form for the rest; either way a value depends on its position only. */
static void activate(int act, float *restrict gate, const float *restrict up, int n) {
    int i = 0;
#ifdef SIMD16
    const __m512 one = _mm512_set1_ps(1.0f);
    for (; i + 16 <= n; i += 16) {
        __m512 g = _mm512_loadu_ps(gate + i), out;
        if (act == H2K_GELU_TANH) {
            __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
            __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.7978845608028654f),
                                     _mm512_fmadd_ps(_mm512_set1_ps(0.044715f), g3, g));
            __m512 e = exp_approx16(_mm512_add_ps(u, u));
            __m512 t = _mm512_sub_ps(one, _mm512_div_ps(_mm512_set1_ps(2.0f), _mm512_add_ps(e, one)));
            out = _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(_mm512_set1_ps(0.5f), g), _mm512_add_ps(one, t)),
                                _mm512_loadu_ps(up + i));
        } else {
            __m512 e = exp_approx16(_mm512_sub_ps(_mm512_setzero_ps(), g));
            out = _mm512_mul_ps(_mm512_div_ps(g, _mm512_add_ps(one, e)), _mm512_loadu_ps(up + i));
        }
        _mm512_storeu_ps(gate + i, out);
    }
#elif defined(SIMD8)
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; i + 8 <= n; i += 8) {
        __m256 g = _mm256_loadu_ps(gate + i), out;
        if (act == H2K_GELU_TANH) {
            __m256 g3 = _mm256_mul_ps(_mm256_mul_ps(g, g), g);
            __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                     _mm256_fmadd_ps(_mm256_set1_ps(0.044715f), g3, g));
            __m256 e = exp_approx8(_mm256_add_ps(u, u));
            __m256 t = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(e, one)));
            out = _mm256_mul_ps(_mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), g), _mm256_add_ps(one, t)),
                                _mm256_loadu_ps(up + i));
        } else {
            __m256 e = exp_approx8(_mm256_sub_ps(_mm256_setzero_ps(), g));
            out = _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + i));
        }
        _mm256_storeu_ps(gate + i, out);
    }
#endif
    for (; i < n; i++) {
        float g = gate[i];
        if (act == H2K_GELU_TANH) {
            float u = 0.7978845608028654f * (g + 0.044715f * g * g * g);
            float t = 1.0f - 2.0f / (exp_approx(2.0f * u) + 1.0f);
            gate[i] = 0.5f * g * (1.0f + t) * up[i];
        } else {
            gate[i] = g / (1.0f + exp_approx(-g)) * up[i];
        }
    }
}

/* The rest of the layer after attention, for `batch` sequences: x += [norm](Wo a); h = norm(x);
 * gu = Wgu h; m = act(gate) * up (activate); x += [norm](Wd m). x, h: [batch, hidden]; attn: [batch,
 * q_heads * head_dim]; gu: [batch, 2 * inter], each row [gate; up]. */
void h2k_mlp_block_batch(const h2k_dims *d, int batch, float *x, const float *attn, const void *Wo,
                         const float *attn_out_norm_w, const float *post_norm_w, const void *Wgu, const void *Wd,
                         const float *mlp_out_norm_w, float *h, float *gu) {
    int hidden = d->hidden, inter = d->inter;
    float eps = d->eps;
    PHASE_START(started);
    gemv_normed_add(d, Wo, attn, attn_out_norm_w, x, h, hidden, d->q_heads * d->head_dim, batch);
    PHASE_ADD(O, started);
    PHASE_START(gate_up_started);
    for (int i = 0; i < batch; i++) rms_norm(x + (long)i * hidden, post_norm_w, eps, h + (long)i * hidden, hidden);
    gemv_batch(d, Wgu, h, gu, 2 * inter, hidden, 0, batch);
    PHASE_ADD(GATE_UP, gate_up_started);
    PHASE_START(act_started);
    for (int s = 0; s < batch; s++) {
        float *g_row = gu + (long)s * 2 * inter;
        activate(d->act, g_row, g_row + inter, inter);
    }
    /* the activations sit in the first half of each gu row: pack them to [batch, inter] in place */
    for (int s = 1; s < batch; s++) memmove(gu + (long)s * inter, gu + (long)s * 2 * inter, sizeof(float) * inter);
    PHASE_ADD(ACT, act_started);
    PHASE_START(down_started);
    gemv_normed_add(d, Wd, gu, mlp_out_norm_w, x, h, hidden, inter, batch);
    PHASE_ADD(DOWN, down_started);
}

/* One sequence: h2k_mlp_block_batch with batch 1. */
void h2k_mlp_block(const h2k_dims *d, float *x, const float *attn, const void *Wo, const float *attn_out_norm_w,
                   const float *post_norm_w, const void *Wgu, const void *Wd, const float *mlp_out_norm_w, float *h,
                   float *gu) {
    h2k_mlp_block_batch(d, 1, x, attn, Wo, attn_out_norm_w, post_norm_w, Wgu, Wd, mlp_out_norm_w, h, gu);
}

/* Row `base` (head_dim values) of K or V as float32: float32 rows are used in place, narrower
 * ones are widened into `tmp` (one loop per type, so each vectorises). */
static inline const float *kv_row(const void *kv, int kvtype, long base, int head_dim, float *tmp) {
    if (kvtype == F32) return (const float *)kv + base;
    const uint16_t *src = (const uint16_t *)kv + base;
    if (kvtype == BF16) {
#pragma omp simd
        for (int d = 0; d < head_dim; d++) tmp[d] = bf16_to_f32(src[d]);
    } else {
        for (int d = 0; d < head_dim; d++) tmp[d] = f16_to_f32(src[d]);
    }
    return tmp;
}

#ifdef SIMD16
/* Head_dim 64 and groups of up to 4 query heads per KV head: K/V rows are widened straight into
 * registers (no float copy for bf16/fp16 rows) and each row is loaded once for the whole group. */
static inline void load_row64(const void *kv, int kvtype, long base, __m512 r[4]) {
    /* the row PREFETCH bytes ahead (and PREFETCH_L2 into L2), every line of it: one thread streaming its
       own K/V (a batch's sequences run one per thread) left memory idle on the hardware prefetcher alone */
    const char *row = (const char *)kv + base * (kvtype == F32 ? 4 : 2);
    for (int line = 0; line < (kvtype == F32 ? 4 : 2); line++) {
        _mm_prefetch(row + PREFETCH + 64 * line, _MM_HINT_T0);
        _mm_prefetch(row + PREFETCH_L2 + 64 * line, _MM_HINT_T1);
    }
    if (kvtype == F32) {
        const float *p = (const float *)kv + base;
        for (int d = 0; d < 4; d++) r[d] = _mm512_loadu_ps(p + 16 * d);
    } else if (kvtype == BF16) {
        const uint16_t *p = (const uint16_t *)kv + base;
        for (int d = 0; d < 4; d++)
            r[d] = _mm512_castsi512_ps(
                _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(p + 16 * d))), 16));
    } else {
        const uint16_t *p = (const uint16_t *)kv + base;
        for (int d = 0; d < 4; d++) r[d] = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(p + 16 * d)));
    }
}

/* probs[h, t] = scale * q_h . K[g(h), t] for t in [t0, t1). */
static void attend_logits64(const float *q, float scale, int T, const void *K, int kvtype, long head_stride,
                            int kv_heads, int group, int t0, int t1, float *probs) {
    for (int g = 0; g < kv_heads; g++) {
        __m512 qv[4][4];
        for (int j = 0; j < group; j++)
            for (int d = 0; d < 4; d++) qv[j][d] = _mm512_loadu_ps(q + (g * group + j) * 64 + 16 * d);
        float *p = probs + (long)g * group * T;
        for (int t = t0; t < t1; t++) {
            __m512 k[4];
            load_row64(K, kvtype, g * head_stride + (long)t * 64, k);
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                if (j < group) {
                    __m512 acc = _mm512_mul_ps(qv[j][0], k[0]);
                    acc = _mm512_fmadd_ps(qv[j][1], k[1], acc);
                    acc = _mm512_fmadd_ps(qv[j][2], k[2], acc);
                    acc = _mm512_fmadd_ps(qv[j][3], k[3], acc);
                    p[(long)j * T + t] = _mm512_reduce_add_ps(acc) * scale;
                }
            }
        }
    }
}

/* The attention output of tokens [t0, t1): the group's 4 x 4 accumulators stay in registers
 * (a read-modify-write of the accumulators in memory was the attention's main cost). */
static void attend_values64(const float *probs, int T, const void *V, int kvtype, long head_stride, int kv_heads,
                            int group, int t0, int t1, float *acc) {
    for (int g = 0; g < kv_heads; g++) {
        __m512 a[4][4];
#pragma GCC unroll 4
        for (int j = 0; j < 4; j++) a[j][0] = a[j][1] = a[j][2] = a[j][3] = _mm512_setzero_ps();
        const float *p = probs + (long)g * group * T;
        for (int t = t0; t < t1; t++) {
            __m512 v[4];
            load_row64(V, kvtype, g * head_stride + (long)t * 64, v);
#pragma GCC unroll 4
            for (int j = 0; j < 4; j++) {
                if (j < group) {
                    __m512 w = _mm512_set1_ps(p[(long)j * T + t]);
                    a[j][0] = _mm512_fmadd_ps(w, v[0], a[j][0]);
                    a[j][1] = _mm512_fmadd_ps(w, v[1], a[j][1]);
                    a[j][2] = _mm512_fmadd_ps(w, v[2], a[j][2]);
                    a[j][3] = _mm512_fmadd_ps(w, v[3], a[j][3]);
                }
            }
        }
        for (int j = 0; j < group; j++)
            for (int d = 0; d < 4; d++) _mm512_storeu_ps(acc + (g * group + j) * 64 + 16 * d, a[j][d]);
    }
}
#endif

#ifdef SIMD8
/* 8 dims of a K/V row (float32, bf16 or fp16 at element `at`) as float32 lanes (load_row64 on 8 lanes
 * takes 8 of them). No software prefetch: with the logits' three K streams read side by side (below),
 * the hardware prefetcher alone was faster (an A/B of h2k_attend from memory on one thread, 544
 * tokens: the prefetch cost 4-10 %). */
static inline __attribute__((always_inline)) __m256 load_chunk8(const void *kv, int kvtype, long at) {
    if (kvtype == F32) return _mm256_loadu_ps((const float *)kv + at);
    __m128i h = _mm_loadu_si128((const __m128i *)((const uint16_t *)kv + at));
    if (kvtype == BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    return _mm256_cvtph_ps(h);
}

/* The sums of s[0..3]'s lanes as one vector (lane u: the sum of s[u]), each by sum8's tree:
 * ((v0 + v4) + (v2 + v6)) + ((v1 + v5) + (v3 + v7)), so the same bits as sum8 row by row. */
static inline __m128 sum_rows4(const __m256 s[4]) {
    __m256 c01 = _mm256_add_ps(_mm256_permute2f128_ps(s[0], s[1], 0x20), _mm256_permute2f128_ps(s[0], s[1], 0x31));
    __m256 c23 = _mm256_add_ps(_mm256_permute2f128_ps(s[2], s[3], 0x20), _mm256_permute2f128_ps(s[2], s[3], 0x31));
    /* per 128-bit half (low: rows 0, 2; high: rows 1, 3): lanes i + (i + 2) of each row */
    __m256d a = _mm256_castps_pd(c01), b = _mm256_castps_pd(c23);
    __m256 d = _mm256_add_ps(_mm256_castpd_ps(_mm256_unpacklo_pd(a, b)), _mm256_castpd_ps(_mm256_unpackhi_pd(a, b)));
    __m256 r = _mm256_hadd_ps(d, d); /* low half [r0 r2 r0 r2], high half [r1 r3 r1 r3] */
    return _mm_unpacklo_ps(_mm256_castps256_ps128(r), _mm256_extractf128_ps(r, 1));
}

/* attend_logits64 on 8 lanes, LTILE tokens at a time. Per KV head, a few of the tile's tokens at a time,
 * each 8-dim chunk of a K row is loaded and widened once and multiplied by the same chunk of every query
 * head of the group, held in registers: per dot two 4-FMA chains (even and odd chunks) and their sum per
 * lane, then the tile's LTILE dots per head reduced together (sum_rows4); a part's last t1 - t0 mod
 * LTILE tokens are reduced one at a time (sum8), by the same tree, so a logit has the same bits whichever
 * way it is reduced, and the same as the kernel before this one, which widened the tile's rows into
 * memory and went over them once per query head (1500 random h2k_attend cases, all K/V types, 1-4 query
 * heads per KV head, 1-3 parts: 0 differ).
 * Why: that kernel was arithmetic-bound on bf16 K: 11-12 cycles a dot on one core, hot in L2 (~11 GB/s
 * of K, where each of two threads has ~17 GB/s of memory); this one 7.4-8.6 (the logits hot, 2048 tokens;
 * float32 K unchanged at ~8). In decode (benchmarks/kernel_ab.py, bf16 weights and K/V, P=2048): B=1
 * 1.078x [1.063, 1.093], B=8 1.090x [1.078, 1.103]; float32 K/V 1.01x. */
enum { LTILE = 4 };

/* The dots of `tokens` K rows (from element `base`, 64 apart) with the `heads` query heads at qg (64
 * apart), before their reduction: sums[j * LTILE + u] for row u and head j, lane i = the products of
 * dims i, 16 + i, 32 + i, 48 + i plus those of dims 8 + i, 24 + i, ... (two chains, in dim order).
 * tokens and heads are constants where it is inlined: 2 * tokens * heads accumulators + heads query
 * chunks + the K chunk must fit the 16 registers. */
static inline __attribute__((always_inline)) void dot_rows_heads(const void *K, int kvtype, long base,
                                                                 const float *qg, int tokens, int heads,
                                                                 __m256 *sums) {
    __m256 acc[2][4][4]; /* [chain][token][head] */
#pragma GCC unroll 8
    for (int c = 0; c < 8; c++) {
        __m256 qc[4];
#pragma GCC unroll 4
        for (int j = 0; j < heads; j++) qc[j] = _mm256_loadu_ps(qg + j * 64 + 8 * c);
#pragma GCC unroll 4
        for (int u = 0; u < tokens; u++) {
            __m256 k = load_chunk8(K, kvtype, base + (long)u * 64 + 8 * c);
#pragma GCC unroll 4
            for (int j = 0; j < heads; j++)
                acc[c & 1][u][j] = c < 2 ? _mm256_mul_ps(k, qc[j]) : _mm256_fmadd_ps(k, qc[j], acc[c & 1][u][j]);
        }
    }
#pragma GCC unroll 4
    for (int u = 0; u < tokens; u++)
#pragma GCC unroll 4
        for (int j = 0; j < heads; j++) sums[j * LTILE + u] = _mm256_add_ps(acc[0][u][j], acc[1][u][j]);
}

/* attend_logits64's body, inlined once per K/V type and group size (constants there, so each chunk's
 * load and widening is chosen at compile time and the accumulators stay in registers; with either a
 * variable, 1.2-1.4x slower), `per_pass` of the tile's tokens at a time. */
static inline __attribute__((always_inline)) void logits64_typed(const float *q, float scale, int T, const void *K,
                                                                 int kvtype, long head_stride, int kv_heads,
                                                                 int group, int per_pass, int t0, int t1,
                                                                 float *probs) {
    __m256 sums[4 * LTILE];
    int t = t0;
    for (; t + LTILE <= t1; t += LTILE) {
        for (int g = 0; g < kv_heads; g++) {
            const float *qg = q + g * group * 64;
            long base = g * head_stride + (long)t * 64;
#pragma GCC unroll 4
            for (int u = 0; u < LTILE; u += per_pass)
                dot_rows_heads(K, kvtype, base + (long)u * 64, qg, per_pass, group, sums + u);
            float *p = probs + (long)g * group * T + t;
#pragma GCC unroll 4
            for (int j = 0; j < group; j++)
                _mm_storeu_ps(p + (long)j * T, _mm_mul_ps(sum_rows4(sums + j * LTILE), _mm_set1_ps(scale)));
        }
    }
    for (; t < t1; t++) /* the part's last tokens, one at a time */
        for (int g = 0; g < kv_heads; g++) {
            const float *qg = q + g * group * 64;
            for (int j = 0; j < group; j++) {
                dot_rows_heads(K, kvtype, g * head_stride + (long)t * 64, qg + j * 64, 1, 1, sums);
                probs[(long)(g * group + j) * T + t] = sum8(sums[0]) * scale;
            }
        }
}

/* Per K/V type and group size, the tokens per pass: as many as leave registers to spare (group 3 with 2
 * tokens, all 16 registers, spilled: 1.1x slower than 1 token, hot, both K types). */
#define LOGITS64_OF(type)                                                                                   \
    static __attribute__((noinline)) void logits64_##type(const float *q, float scale, int T, const void *K, \
                                                          long head_stride, int kv_heads, int group, int t0, \
                                                          int t1, float *probs) {                           \
        switch (group) {                                                                                    \
        case 1: logits64_typed(q, scale, T, K, type, head_stride, kv_heads, 1, 4, t0, t1, probs); break;    \
        case 2: logits64_typed(q, scale, T, K, type, head_stride, kv_heads, 2, 2, t0, t1, probs); break;    \
        case 3: logits64_typed(q, scale, T, K, type, head_stride, kv_heads, 3, 1, t0, t1, probs); break;    \
        default: logits64_typed(q, scale, T, K, type, head_stride, kv_heads, 4, 1, t0, t1, probs); break;   \
        }                                                                                                   \
    }
LOGITS64_OF(F32)
LOGITS64_OF(BF16)
LOGITS64_OF(F16)
#undef LOGITS64_OF

static void attend_logits64(const float *q, float scale, int T, const void *K, int kvtype, long head_stride,
                            int kv_heads, int group, int t0, int t1, float *probs) {
    (kvtype == F32    ? logits64_F32
     : kvtype == BF16 ? logits64_BF16
                      : logits64_F16)(q, scale, T, K, head_stride, kv_heads, group, t0, t1, probs);
}

/* One row of K or V (head_dim 64) fetched into L1 ahead of its use. */
static inline __attribute__((always_inline)) void prefetch_row64(const void *kv, int kvtype, long base) {
    const char *row = (const char *)kv + base * (kvtype == F32 ? 4 : 2);
    for (int line = 0; line < (kvtype == F32 ? 4 : 2); line++) _mm_prefetch(row + 64 * line, _MM_HINT_T0);
}

/* a[0..7] += w * the V row at `base`. A bf16 row is widened 16 dims at a time by one load, a shift (the
 * even dims, low halves) and an AND (the odd dims): a[2k] holds dims 16k + 2i, a[2k + 1] dims 16k + 2i + 1
 * (natural_from_pairs64 restores the order). Each dim's sum takes the same steps as in natural order,
 * so the same bits; the widening took twice the instructions (h2k_attend from memory, bf16 K/V, 2048
 * tokens: 1.20x on one thread, 1.13-1.14x on two). */
static inline __attribute__((always_inline)) void fma_row64_8(const void *kv, int kvtype, long base, __m256 w,
                                                              __m256 a[8]) {
    if (kvtype == BF16) {
        for (int k = 0; k < 4; k++) {
            __m256 even, odd;
            widen_bf16_pairs((const uint16_t *)kv + base + 16 * k, &even, &odd);
            a[2 * k] = _mm256_fmadd_ps(w, even, a[2 * k]);
            a[2 * k + 1] = _mm256_fmadd_ps(w, odd, a[2 * k + 1]);
        }
    } else {
        for (int d = 0; d < 8; d++) a[d] = _mm256_fmadd_ps(w, load_chunk8(kv, kvtype, base + 8 * d), a[d]);
    }
}

/* 64 sums from fma_row64_8's bf16 order (per 16 dims: 8 even, then 8 odd) back to natural order. */
static inline void natural_from_pairs64(float *o) {
    for (int k = 0; k < 4; k++, o += 16) {
        __m256 even = _mm256_loadu_ps(o), odd = _mm256_loadu_ps(o + 8);
        __m256 lo = _mm256_unpacklo_ps(even, odd), hi = _mm256_unpackhi_ps(even, odd); /* per 128-bit half */
        _mm256_storeu_ps(o, _mm256_permute2f128_ps(lo, hi, 0x20));
        _mm256_storeu_ps(o + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
    }
}

/* attend_values64 on 8 lanes: one head's 8 accumulators in registers at a time, over tiles of VTILE
 * tokens, so the group's other heads read the tile's V rows from L1. Each head still sums its tokens
 * in order from zero. While the second head of the group goes over the tile from L1 (the first, if
 * it is alone), the next tile's rows are fetched: memory sat idle there (h2k_attend from memory on
 * one thread, 544 tokens: 1.08-1.10x for float32 and bf16 V; two tiles ahead gained nothing). */
enum { VTILE = 32 };
static void attend_values64(const float *probs, int T, const void *V, int kvtype, long head_stride, int kv_heads,
                            int group, int t0, int t1, float *acc) {
    int ahead = group > 1 ? 1 : 0; /* the head whose pass fetches the next tile */
    for (int g = 0; g < kv_heads; g++) {
        const float *p = probs + (long)g * group * T;
        float *out = acc + g * group * 64;
        memset(out, 0, sizeof(float) * 64 * group);
        for (int s0 = t0; s0 < t1; s0 += VTILE) {
            int s1 = s0 + VTILE < t1 ? s0 + VTILE : t1;
            for (int j = 0; j < group; j++) {
                __m256 a[8];
                for (int d = 0; d < 8; d++) a[d] = _mm256_loadu_ps(out + j * 64 + 8 * d);
                for (int t = s0; t < s1; t++) {
                    fma_row64_8(V, kvtype, g * head_stride + (long)t * 64, _mm256_set1_ps(p[(long)j * T + t]), a);
                    if (j == ahead && t + VTILE < t1)
                        prefetch_row64(V, kvtype, g * head_stride + (long)(t + VTILE) * 64);
                }
                for (int d = 0; d < 8; d++) _mm256_storeu_ps(out + j * 64 + 8 * d, a[d]);
            }
        }
        for (int j = 0; kvtype == BF16 && j < group; j++) natural_from_pairs64(out + j * 64);
    }
}
#endif

/* Threads of an attention split into `parts`: at most one per part. */
static inline int attend_team(const h2k_dims *d, int parts) {
    return team_size(d) < parts ? team_size(d) : parts;
}

/* One attention's work on this thread's share: thread `tid` of `used`. With used > 1 the whole team
 * runs it together, separated by barriers between the phases; with used == 1 one thread does it all
 * (each thread does so for its own sequences of a batch). Every value is computed the same way
 * whatever the share: the split of the work never changes the arithmetic. Arguments as h2k_attend's;
 * the partials are left for sum_partials. */
static void attend_share(const h2k_dims *d, const float *q, const void *K, const void *V, long head_stride,
                         int kvtype, int T, float *probs, float *head_mass, int block, float *partial, int parts,
                         int tid, int used) {
    int q_heads = d->q_heads, kv_heads = d->kv_heads, head_dim = d->head_dim;
    float scale = d->scale;
    int group = q_heads / kv_heads;
    int width = q_heads * head_dim;
    float heads = (float)q_heads;
    int chunk = (T + parts - 1) / parts;
    float row[256];
    int fast64 = 0;
    PHASE_START(logits_started);
#if defined(SIMD16) || defined(SIMD8)
    fast64 = head_dim == 64 && group <= 4;
    for (int part = tid; fast64 && part < parts; part += used) {
        int t0 = part * chunk < T ? part * chunk : T, t1 = t0 + chunk < T ? t0 + chunk : T;
        attend_logits64(q, scale, T, K, kvtype, head_stride, kv_heads, group, t0, t1, probs);
    }
#endif
    if (!fast64) {
        int share = (T + used - 1) / used;
        int t1 = (tid + 1) * share < T ? (tid + 1) * share : T;
        for (int t = tid * share; t < t1; t++) {
            for (int g = 0; g < kv_heads; g++) {
                const float *k = kv_row(K, kvtype, g * head_stride + (long)t * head_dim, head_dim, row);
                for (int j = 0; j < group; j++) {
                    int h = g * group + j;
                    probs[(long)h * T + t] = dot_short(k, q + h * head_dim, head_dim) * scale;
                }
            }
        }
    }
    PHASE_ADD_TEAM(LOGITS, logits_started);
    if (used > 1) {
#pragma omp barrier
    }
    PHASE_START(softmax_started);
    for (int h = tid; h < q_heads; h += used) { /* softmax per head */
        float *restrict p = probs + (long)h * T;
        float m = -INFINITY;
#pragma omp simd reduction(max : m)
        for (int t = 0; t < T; t++) m = p[t] > m ? p[t] : m;
        float inv = 1.0f / exp_shifted(p, T, m);
#pragma omp simd
        for (int t = 0; t < T; t++) p[t] *= inv;
    }
    PHASE_ADD_TEAM(SOFTMAX, softmax_started);
    if (used > 1) {
#pragma omp barrier
    }
    PHASE_START(mass_started);
    if (head_mass != NULL) { /* per token: the group's probabilities added in head order, then / q_heads
                                (torch's order); then summed per block, in token order */
        int nb = (T + block - 1) / block;
        for (int g = tid; g < kv_heads; g += used) {
            const float *p0 = probs + (long)g * group * T;
            float *restrict m = head_mass + (long)g * nb;
            for (int b = 0; b < nb; b++) {
                int t1 = (b + 1) * block < T ? (b + 1) * block : T;
                float sum = 0.0f;
                for (int t = b * block; t < t1; t++) {
                    float v = p0[t];
                    for (int j = 1; j < group; j++) v += p0[(long)j * T + t];
                    sum += v / heads;
                }
                m[b] = sum;
            }
        }
    }
    PHASE_ADD_TEAM(SOFTMAX, mass_started);
    PHASE_START(values_started);
    /* out[h] = sum_t p[h, t] V[g(h), t]: each part of the tokens into its own partial */
    for (int part = tid; part < parts; part += used) {
        int t0 = part * chunk < T ? part * chunk : T, t1 = t0 + chunk < T ? t0 + chunk : T;
        float *acc = partial + (long)part * width;
#if defined(SIMD16) || defined(SIMD8)
        if (fast64) {
            attend_values64(probs, T, V, kvtype, head_stride, kv_heads, group, t0, t1, acc);
            continue;
        }
#endif
        memset(acc, 0, sizeof(float) * width);
        for (int t = t0; t < t1; t++) {
            for (int g = 0; g < kv_heads; g++) {
                const float *v = kv_row(V, kvtype, g * head_stride + (long)t * head_dim, head_dim, row);
                for (int j = 0; j < group; j++) {
                    int h = g * group + j;
                    float p = probs[(long)h * T + t];
                    float *a = acc + h * head_dim;
#pragma omp simd
                    for (int e = 0; e < head_dim; e++) a[e] += p * v[e];
                }
            }
        }
    }
    PHASE_ADD_TEAM(VALUES, values_started);
}

/* out = the partials added in part order: deterministic. */
static void sum_partials(const float *partial, int parts, int width, float *out) {
    for (int i = 0; i < width; i++) {
        float s = 0.0f;
        for (int part = 0; part < parts; part++) s += partial[(long)part * width + i];
        out[i] = s;
    }
}

/* One query per head over T cached tokens, grouped-query layout.
 *   q           [q_heads, head_dim] (already roped; scaled here)
 *   K, V        [kv_heads, T] rows of head_dim, head h at K + h * head_stride elements
 *   probs       scratch [q_heads, T]
 *   out         [q_heads, head_dim]
 *   head_mass   [kv_heads, ceil(T / block)] or NULL: per KV head g and block of `block` tokens, the
 *               sum over the block's tokens t of (the sum over g's query heads of p[h, t]) / q_heads
 *               (summed over g: H2O's score signal; per g: per-head selection's). block 1: per token
 *   partial     scratch [parts, q_heads * head_dim]
 * head_dim <= 256. The tokens are split into `parts` consecutive ranges, each summed into its own
 * partial and the partials added in order, so the result depends on `parts` only, not on how many
 * threads (team_size(d), at most `parts`) share them: a step on one thread while another process
 * holds a core gives what two threads give. K and V are read once per step. One parallel region:
 * its phases are separated by barriers. */
void h2k_attend(const h2k_dims *d, const float *q, const void *K, const void *V, long head_stride, int kvtype,
                int T, float *probs, float *out, float *head_mass, int block, float *partial, int parts) {
#pragma omp parallel num_threads(attend_team(d, parts))
    attend_share(d, q, K, V, head_stride, kvtype, T, probs, head_mass, block, partial, parts, omp_get_thread_num(),
                 omp_get_num_threads());
    sum_partials(partial, parts, d->q_heads * d->head_dim, out);
}

/* The scorer's update, in the arithmetic numpy does in policy.py (so the fused step's scores are the
 * per-layer path's, bit for bit): the mass as float64, summed over KV heads in head order when the
 * scores are shared, then decay * s + gain * m as two rounded products and a rounded sum (no FMA
 * contraction, which -march=native would otherwise allow). */
__attribute__((optimize("fp-contract=off"))) void h2k_update_scores(const float *head_mass, int kv_heads, int blocks,
                                                                     double *scores, int score_rows,
                                                                     long score_stride, double decay, double gain) {
    for (int r = 0; r < score_rows; r++) {
        double *s = scores + (long)r * score_stride;
        for (int b = 0; b < blocks; b++) {
            double m;
            if (score_rows == 1) {
                m = (double)head_mass[b];
                for (int g = 1; g < kv_heads; g++) m += (double)head_mass[(long)g * blocks + b];
            } else {
                m = (double)head_mass[(long)r * blocks + b];
            }
            double kept = decay * s[b], added = gain * m;
            s[b] = kept + added;
        }
    }
}

/* One sequence's attention in a layer of the fused step (thread `tid` of `used`, as attend_share) and,
 * when the layer scores, its score update (by thread 0, after the team's share). */
static void attend_cached(const h2k_dims *d, const h2k_layer_cache *sc, const float *q, float *attn, float *probs,
                          float *head_mass, float *partial, int parts, int tid, int used) {
    long row_bytes = (long)d->head_dim * (sc->kvtype == F32 ? 4 : 2);
    int T = sc->length + 1 - sc->first_visible, block = sc->block > 0 ? sc->block : 1;
    long first = sc->first_visible * row_bytes;
    attend_share(d, q, (char *)sc->K + first, (char *)sc->V + first, sc->head_stride, sc->kvtype, T, probs,
                 sc->block > 0 ? head_mass : NULL, block, partial, parts, tid, used);
    if (used > 1) {
#pragma omp barrier
    }
    if (tid == 0) {
        sum_partials(partial, parts, d->q_heads * d->head_dim, attn);
        if (sc->block > 0 && sc->scores != NULL)
            h2k_update_scores(head_mass, d->kv_heads, (T + block - 1) / block, sc->scores, sc->score_rows,
                              sc->score_stride, sc->decay, sc->gain);
    }
    if (used > 1) { /* the scratch is the team's next sequence's */
#pragma omp barrier
    }
}

/* A layer's attention for `batch` sequences. With at least as many sequences as threads, each thread
 * takes whole sequences (round robin), each with its own scratch copy (scratch_tokens tokens per copy):
 * no barriers, and every thread streams its own K/V. The rest (fewer sequences than threads) are
 * shared by the team one at a time. Each sequence's arithmetic is the same either way (attend_share). */
static void attend_batch(const h2k_dims *d, const h2k_layer_cache *lc, int batch, const float *qkv, int width,
                         float *attn, float *probs, float *head_mass, float *partial, int parts,
                         long scratch_tokens) {
    int q_dim = d->q_heads * d->head_dim, threads = attend_team(d, parts);
    int whole = threads > 1 ? batch - batch % threads : 0;
#pragma omp parallel num_threads(threads)
    {
        int tid = omp_get_thread_num(), used = omp_get_num_threads();
        float *my_probs = probs + tid * d->q_heads * scratch_tokens;
        float *my_mass = head_mass + tid * d->kv_heads * scratch_tokens;
        float *my_partial = partial + (long)tid * parts * q_dim;
        for (int s = tid; s < whole; s += used)
            attend_cached(d, lc + s, qkv + (long)s * width, attn + (long)s * q_dim, my_probs, my_mass, my_partial,
                          parts, 0, 1);
        if (whole > 0 && used > 1) {
#pragma omp barrier
        }
        for (int s = whole; s < batch; s++)
            attend_cached(d, lc + s, qkv + (long)s * width, attn + (long)s * q_dim, probs, head_mass, partial, parts,
                          tid, used);
    }
}

void h2k_decode_step(const h2k_dims *d, const h2k_dims *head_dims, const h2k_layer_weights *w,
                     const h2k_layer_cache *c, int layers, int batch, float *x, float *h, float *qkv, float *attn,
                     float *gu, float *probs, float *head_mass, float *partial, int parts, long scratch_tokens,
                     const float *final_norm, const void *head, int vocab, float *logits) {
    PHASE_START(step_started);
    int q_dim = d->q_heads * d->head_dim, width = q_dim + 2 * d->kv_heads * d->head_dim;
    const float *cos[batch], *sin[batch];
    void *k_slot[batch], *v_slot[batch];
    long stride[batch];
    for (int l = 0; l < layers; l++) {
        const h2k_layer_weights *lw = w + l;
        const h2k_layer_cache *lc = c + (long)l * batch;
        long row_bytes = (long)d->head_dim * (lc->kvtype == F32 ? 4 : 2);
        for (int s = 0; s < batch; s++) {
            cos[s] = lc[s].cos;
            sin[s] = lc[s].sin;
            k_slot[s] = (char *)lc[s].K + lc[s].length * row_bytes;
            v_slot[s] = (char *)lc[s].V + lc[s].length * row_bytes;
            stride[s] = lc[s].head_stride;
        }
        h2k_attention_input_batch(d, batch, x, lw->attn_in_norm, lw->qkv, h, qkv, lw->q_norm, lw->k_norm, cos, sin,
                                  k_slot, v_slot, stride, lc->kvtype);
        for (int s = 0; s < batch; s++)
            if (lc[s].query_out != NULL)
                memcpy(lc[s].query_out, qkv + (long)s * width, (size_t)q_dim * sizeof(float));
        PHASE_START(attend_started);
        attend_batch(d, lc, batch, qkv, width, attn, probs, head_mass, partial, parts, scratch_tokens);
        PHASE_ADD(ATTEND, attend_started);
        h2k_mlp_block_batch(d, batch, x, attn, lw->o, lw->attn_out_norm, lw->mlp_in_norm, lw->gate_up, lw->down,
                            lw->mlp_out_norm, h, gu);
    }
    PHASE_START(head_started);
    h2k_norm_gemv_batch(head_dims, batch, x, final_norm, head, vocab, h, logits);
    PHASE_ADD(HEAD, head_started);
    PHASE_ADD(STEP, step_started);
}

/* Only the runs not already in place move (with block-sized runs the sink and the oldest kept blocks
 * usually are), each by one memmove: a run may overlap its own destination, never a run after it, since
 * runs ascend and every destination is at or below its source. torch's gather and copy back read and
 * wrote every kept token twice. */
void h2k_keep_runs(void *k, void *v, long head_stride, int heads, long row_bytes, const long *runs,
                   const int *run_counts, int rows, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads)
    for (int task = 0; task < 2 * heads; task++) { /* K's heads, then V's */
        int g = task % heads, row = rows == 1 ? 0 : g;
        const long *pairs = runs;
        for (int r = 0; r < row; r++) pairs += 2 * run_counts[r];
        char *head = (char *)(task < heads ? k : v) + g * head_stride;
        long to = 0;
        for (int i = 0; i < run_counts[row]; i++) {
            long begin = pairs[2 * i], length = pairs[2 * i + 1];
            if (begin != to) memmove(head + to * row_bytes, head + begin * row_bytes, length * row_bytes);
            to += length;
        }
    }
}

int h2k_vector_lanes(void) {
#if defined(SIMD16)
    return 16;
#elif defined(SIMD8)
    return 8;
#else
    return 1;
#endif
}

/* Machine read bandwidth probe for benchmarks/roofline.py: sums n floats across threads. */
float h2k_read_sum(const float *a, long n) {
    float total = 0.0f;
#pragma omp parallel for simd reduction(+ : total) schedule(static)
    for (long i = 0; i < n; i++) total += a[i];
    return total;
}
