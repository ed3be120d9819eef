/* The fast decode path's kernel interface, declared once: llama_decode.c includes this file and
 * kernels/__init__.py hands it to cffi (ABI mode), so Python and C cannot disagree about an
 * argument. Keep it to plain declarations (no macros): cffi parses it as it is. */

/* F32/F16: plain elements. BF16: plain elements in the K/V cache; as weights, rows regrouped in tiles
 * of H2K_BF16_TILE rows (llama_decode.c; kernels.bf16_tiles). Q4_1 and Q8_0: GGML's blocks of 32
 * weights (Q4_1: fp16 scale d, fp16 minimum m, 16 bytes of nibbles, w = d q + m; Q8_0: fp16 d, 32 int8,
 * w = d q), weights only, with the rows' blocks regrouped by H2K_QGROUP rows (llama_decode.c;
 * gguf_blocks.QuantMatrix.kernel_layout). */
enum h2k_dtype { H2K_F32 = 0, H2K_BF16 = 1, H2K_F16 = 2, H2K_Q4_1 = 3, H2K_Q8_0 = 4 };
enum h2k_layout { H2K_QGROUP = 16, H2K_BF16_TILE = 8 };

/* The MLP's gate activation: SiLU (Llama) or GELU with the tanh approximation (Gemma 3). */
enum h2k_act { H2K_SILU = 0, H2K_GELU_TANH = 1 };

/* A model's layer dimensions, passed by pointer instead of a dozen positional ints. */
typedef struct {
    int wtype;    /* weight dtype: H2K_F32, H2K_BF16 (tiled), H2K_Q4_1 or H2K_Q8_0 (rows of whole blocks) */
    int hidden;   /* model width (the input of every GEMV but down) */
    int q_heads;
    int kv_heads;
    int head_dim;
    int inter;    /* MLP width */
    float eps;    /* RMSNorm epsilon */
    float scale;  /* attention logit scale */
    int act;      /* MLP activation: H2K_SILU or H2K_GELU_TANH */
    int threads;  /* threads of the GEMVs' parallel loops; 0: OpenMP's default (attention takes its own) */
    int act_q8;   /* Q4_1/Q8_0 weights: 1 = inputs rounded to int8 per block of 32 and integer dot products
                     (llama.cpp's and MNN's low-precision way; not exact), 0 = float32 inputs (exact) */
} h2k_dims;

/* h = rmsnorm(x); y = W h (W [rows, hidden] in its weight type's layout); RoPE on the first rope_heads
 * heads of y. */
void h2k_norm_gemv(const h2k_dims *d, const float *x, const float *norm_w, const void *W, int rows, float *h,
                   float *y, int rope_heads, const float *cos, const float *sin);

/* float32 -> storage dtype (kvtype), rounding as torch does. */
void h2k_store_row(const float *src, void *dst, int n, int kvtype);

/* qkv = W_qkv rmsnorm(x), per-head RMSNorm on q and k (q_norm_w/k_norm_w, NULL: none), RoPE on q and k,
 * and this token's k and v stored into the cache slot. */
void h2k_attention_input(const h2k_dims *d, const float *x, const float *norm_w, const void *Wqkv, float *h,
                         float *qkv, const float *q_norm_w, const float *k_norm_w, const float *cos,
                         const float *sin, void *k_slot, void *v_slot, long slot_stride, int kvtype);

/* x += out_norm(Wo attn); h = rmsnorm(x); gu = Wgu h; x += mlp_out_norm(Wd (act(gate) * up)).
 * The two output norms are Gemma's post-attention / post-feedforward norms (NULL: none, Llama). */
void h2k_mlp_block(const h2k_dims *d, float *x, const float *attn, const void *Wo, const float *attn_out_norm_w,
                   const float *post_norm_w, const void *Wgu, const void *Wd, const float *mlp_out_norm_w, float *h,
                   float *gu);

/* The same three steps for `batch` sequences at once (batched decode): every weight is read once per
 * step for all of them. Per-sequence arrays are [batch, width] row-major; cos/sin/k_slot/v_slot/
 * slot_stride have one entry per sequence (its own position and cache). */
void h2k_norm_gemv_batch(const h2k_dims *d, int batch, const float *x, const float *norm_w, const void *W, int rows,
                         float *h, float *y);
void h2k_attention_input_batch(const h2k_dims *d, int batch, const float *x, const float *norm_w, const void *Wqkv,
                               float *h, float *qkv, const float *q_norm_w, const float *k_norm_w,
                               const float *const *cos, const float *const *sin, void *const *k_slot,
                               void *const *v_slot, const long *slot_stride, int kvtype);
void h2k_mlp_block_batch(const h2k_dims *d, int batch, float *x, const float *attn, const void *Wo,
                         const float *attn_out_norm_w, const float *post_norm_w, const void *Wgu, const void *Wd,
                         const float *mlp_out_norm_w, float *h, float *gu);

/* One query per head over T cached tokens; head_mass [kv_heads, ceil(T / block)] block sums or NULL
 * (see llama_decode.c). */
void h2k_attend(const h2k_dims *d, const float *q, const void *K, const void *V, long head_stride, int kvtype,
                int T, float *probs, float *out, float *head_mass, int block, float *partial, int parts);

/* The fused decode step (h2k_decode_step): one call runs every layer and the lm_head, so Python runs
 * between steps only. */

/* One layer's decode weights and norms (NULL norms: the family has none). */
typedef struct {
    const float *attn_in_norm;
    const void *qkv;             /* [q; k; v] rows */
    const float *q_norm;
    const float *k_norm;
    const void *o;
    const float *attn_out_norm;
    const float *mlp_in_norm;
    const void *gate_up;         /* [gate; up] rows */
    const void *down;
    const float *mlp_out_norm;
} h2k_layer_weights;

/* One layer's cache and scores for this step, filled by the caller before each step. */
typedef struct {
    void *K;                     /* slot 0 of KV head 0; head g starts head_stride elements later */
    void *V;
    long head_stride;
    int kvtype;                  /* storage dtype of K/V */
    int length;                  /* tokens held before the step: this token's k/v go to slot `length` */
    int first_visible;           /* the first slot the query attends to (a sliding layer's window), else 0 */
    const float *cos;            /* RoPE rows of this step's position, in the layer's table */
    const float *sin;
    int block;                   /* block size the attention mass is summed in; 0: no mass */
    double *scores;              /* [score_rows, score_stride] or NULL: per block, scores = decay * scores
                                    + gain * mass (mass per KV head, or summed over them when score_rows
                                    is 1), as the policy's scorer would update them */
    int score_rows;
    long score_stride;
    double decay;
    double gain;
    float *query_out;            /* [q_heads, head_dim] or NULL: where this step's query (after RoPE, unscaled)
                                    is copied, for a policy that plans from recent queries */
} h2k_layer_cache;

/* A whole decode step for `batch` sequences: for each layer, attention input (each sequence's k/v into
 * its slot `length`; the weights read once for all), per sequence attention over slots
 * [first_visible, length] with its score update, then the MLP; then logits = head rmsnorm(x).
 * c is [layers][batch]; x, h: [batch, hidden], qkv: [batch, (q_heads + 2 kv_heads) head_dim], attn:
 * [batch, q_heads head_dim], gu: [batch, 2 inter], logits: [batch, vocab]; x holds the tokens'
 * embeddings on entry. Scratch as h2k_attend's, sized for the longest layer; attention splits its
 * tokens into `parts` (h2k_attend), the loops run on d->threads. Each sequence gets what the per-layer
 * kernels give it alone (batch 1 is exactly that chain), on any number of threads. */
void h2k_decode_step(const h2k_dims *d, const h2k_dims *head_dims, const h2k_layer_weights *w,
                     const h2k_layer_cache *c, int layers, int batch, float *x, float *h, float *qkv, float *attn,
                     float *gu, float *probs, float *head_mass, float *partial, int parts, long scratch_tokens,
                     const float *final_norm, const void *head, int vocab, float *logits);

/* The fused step's score update alone (for tests): scores[r, b] = decay * scores[r, b] + gain * m_r[b]. */
void h2k_update_scores(const float *head_mass, int kv_heads, int blocks, double *scores, int score_rows,
                       long score_stride, double decay, double gain);

/* Compaction of a layer's K and V buffers in place (h2okit.cache.KVBuffer.keep_runs): for each of `heads`
 * heads (head g at k + g * head_stride bytes, and so in v; a token a row of row_bytes), its kept runs moved
 * to the front, in order. runs: (begin, length) token pairs, ascending and disjoint, row r's run_counts[r]
 * pairs after the earlier rows'; head g takes row g, or row 0 when rows == 1 (one plan for every head).
 * The heads of K and of V are shared out among `threads` threads. */
void h2k_keep_runs(void *k, void *v, long head_stride, int heads, long row_bytes, const long *runs,
                   const int *run_counts, int rows, int threads);

/* The lanes of the build's vector kernels: 16 (AVX-512), 8 (AVX2 + FMA + F16C) or 1 (portable C only). */
int h2k_vector_lanes(void);

/* Read bandwidth probe for benchmarks/roofline.py. */
float h2k_read_sum(const float *a, long n);
