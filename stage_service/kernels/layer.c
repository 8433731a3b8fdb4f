/* Decoder layers and the head of a CPU range in C, each row computed on its own: the math of
 * stage_service/model.py's decoder_layer (RMSNorm, fused q/k/v projection, RoPE, the rows' K/V
 * written into their sessions' caches, GQA attention over positions 0..pos, output projection
 * onto the residual, RMSNorm, SwiGLU MLP onto the residual), one C call per layer.
 *
 * Two uses (stage_service/fused_layers.py):
 * - Batch-1 decode and speculative verify steps on a stage with quantized weights: at that size
 *   eager PyTorch spends more time dispatching its ~40 small ops per layer than the int8
 *   matmuls take to read the weights (bench/CPU_NOTES.md).
 * - The batch-invariant mode (--batch-invariant): every step, any rows of any sessions, any
 *   weight format. Row m's result is a function of row m's input and its session's cache only:
 *   the matrix kernels' sums are fixed per output (qlinear.c), attention reads exactly the
 *   row's own positions 0..pos[m] in order, norms and activations go row by row, threads split
 *   channels or rows and never a sum.
 *
 * Activations are float32 here; `act` says the stage's dtype (F32, BF16, F16), and every value
 * that PyTorch would hold in that dtype is rounded to it where model.py's ops round it (each
 * matmul's output, the norm's output before and after its weight, RoPE's products and sum,
 * the attention scores and probabilities, silu and its product, the residual sums). The KV
 * caches are in that dtype.
 */
#include <math.h>
#include <string.h>

#include "formats.h"

void q8_linear(const float *x, int64_t M, int64_t K, const int8_t *w, int64_t group,
               const float *scale, const float *bias, float *y, int64_t N, int threads);
void q4_linear(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t group,
               const float *scale, const float *mins, const float *bias, float *y, int64_t N,
               float *xs, int threads);
void f_linear(const float *x, int64_t M, int64_t K, const void *w, int64_t fmt, const float *bias,
              float *y, int64_t N, int threads);

/* A matrix as quant.py (Q8, Q4) or packed.py (F32, BF16, F16) holds it; mins only for Q4;
 * bias float32 or NULL. */
typedef struct {
    int64_t format, n, k, group;
    const void *data;
    const float *scale, *mins, *bias;
} QMat;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter, act;
    float eps;
    const float *norm1, *norm2; /* float32 copies of the norms' weights */
    const float *q_norm, *k_norm; /* [head_dim] each: per-head RMSNorm of q and k (Qwen3), or NULL */
    QMat qkv, o, gate_up, down;
} Layer;

/* v rounded to the activation dtype (round to nearest even, as torch's casts). */
static inline float rnd(float v, int64_t act) {
    if (act == F32) return v;
    if (act == F16) return _cvtsh_ss(_cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT));
    uint32_t u;
    memcpy(&u, &v, 4);
    if ((u & 0x7f800000u) == 0x7f800000u) { /* inf stays, NaN stays NaN */
        if (u & 0x007fffffu) u |= 0x00400000u;
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
    }
    u &= 0xffff0000u;
    memcpy(&v, &u, 4);
    return v;
}

static inline void rnd_all(float *x, int64_t n, int64_t act) {
    if (act != F32)
        for (int64_t i = 0; i < n; i++) x[i] = rnd(x[i], act);
}

/* The caches hold the activation dtype: read with load1/load8 (formats.h), stored here. */
static inline void cache_put(void *c, int64_t i, float v, int64_t act) {
    if (act == F32) {
        ((float *)c)[i] = v;
    } else if (act == F16) {
        ((uint16_t *)c)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
    } else {
        uint32_t u;
        v = rnd(v, BF16);
        memcpy(&u, &v, 4);
        ((uint16_t *)c)[i] = (uint16_t)(u >> 16);
    }
}

/* a (float32) . b (a cache row in the activation dtype) */
static inline float dot_cache(const float *a, const void *b, int64_t off, int64_t n, int64_t act) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(act, b, off + i), acc);
    float r = hsum(acc);
    for (; i < n; i++) r += a[i] * load1(act, b, off + i);
    return r;
}

static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float r = hsum(acc);
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

/* out[n] += p * v[n], v a cache row */
static inline void axpy_cache(float p, const void *v, int64_t off, float *out, int64_t n, int64_t act) {
    __m256 pv = _mm256_set1_ps(p);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, load8(act, v, off + i), _mm256_loadu_ps(out + i)));
    for (; i < n; i++) out[i] += p * load1(act, v, off + i);
}

/* y[M, n] = x[M, k] @ W.T + bias, rounded to the activation dtype. */
static void mat(const QMat *m, const float *x, int64_t M, float *y, float *xs, int threads, int64_t act) {
    if (m->format == Q8)
        q8_linear(x, M, m->k, (const int8_t *)m->data, m->group, m->scale, m->bias, y, m->n, threads);
    else if (m->format == Q4)
        q4_linear(x, M, m->k, (const uint8_t *)m->data, m->group, m->scale, m->mins, m->bias, y, m->n,
                  xs, threads);
    else
        f_linear(x, M, m->k, m->data, m->format, m->bias, y, m->n, threads);
    rnd_all(y, M * m->n, act);
}

/* As transformers' LlamaRMSNorm: normalised in float32, rounded, scaled, rounded. */
static void rms_norm(const float *x, const float *w, int64_t n, float eps, float *out, int64_t act) {
    float ss = dot(x, x, n);
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = rnd(w[i] * rnd(x[i] * r, act), act);
}

/* x[head_dim] rotated in place: x * cos + rotate_half(x) * sin, each product and sum rounded. */
static void rope(float *x, const float *cos, const float *sin, int64_t d, int64_t act) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = rnd(rnd(a * cos[i], act) + rnd(-b * sin[i], act), act);
        x[i + half] = rnd(rnd(b * cos[i + half], act) + rnd(a * sin[i + half], act), act);
    }
}

/* One query head of one row over its session's positions 0 .. T - 1; scores: T floats. */
static void attend(const float *q, const void *kh, const void *vh, int64_t T, int64_t D,
                   float *scores, float *out, int64_t act) {
    float root = sqrtf((float)D), top = -INFINITY;
    for (int64_t t = 0; t < T; t++) {
        scores[t] = rnd(rnd(dot_cache(q, kh, t * D, D, act), act) / root, act);
        if (scores[t] > top) top = scores[t];
    }
    float sum = 0.0f;
    for (int64_t t = 0; t < T; t++) sum += scores[t] = expf(scores[t] - top);
    for (int64_t i = 0; i < D; i++) out[i] = 0.0f;
    for (int64_t t = 0; t < T; t++) axpy_cache(rnd(scores[t] / sum, act), vh, t * D, out, D, act);
    rnd_all(out, D, act);
}

/* x[M, hidden]: the hidden states of M rows, updated in place. Row m is the token at position
 * pos[m] of the session whose caches (this layer's, [kv_heads, cap[m], head_dim] in the
 * activation dtype) start at k_caches[m], v_caches[m]: its K/V go to its position, then it
 * attends to positions 0 .. pos[m] of its cache (rows of one session are consecutive
 * positions: a prefill chunk, or a token and its drafts). cos, sin: [M, head_dim].
 * scratch: M * row_scratch + M * (max(pos) + 1) floats (fused_layers.py sizes it). */
void layer_rows(const Layer *L, float *x, int64_t M, const float *cos, const float *sin,
                void *const *k_caches, void *const *v_caches, const int64_t *cap, const int64_t *pos,
                float *scratch, int threads) {
    int64_t H = L->hidden, nh = L->heads, nkv = L->kv_heads, D = L->head_dim, I = L->inter;
    int64_t qkv_n = (nh + 2 * nkv) * D, group = nh / nkv, act = L->act, longest = 0;
    for (int64_t m = 0; m < M; m++)
        if (pos[m] + 1 > longest) longest = pos[m] + 1;
    float *h = scratch, *qkv = h + M * H, *attn = qkv + M * qkv_n, *gu = attn + M * nh * D;
    float *xs = gu + M * 2 * I;                        /* int4 group sums: M rows */
    float *scores = xs + M * ((H > I ? H : I) / 16 + 1); /* per row: longest */

    for (int64_t m = 0; m < M; m++) rms_norm(x + m * H, L->norm1, H, L->eps, h + m * H, act);
    mat(&L->qkv, h, M, qkv, xs, threads, act);
    for (int64_t m = 0; m < M; m++) {
        float *row = qkv + m * qkv_n;
        if (L->q_norm) /* each head on its own, before RoPE (in place: a head is read, then written) */
            for (int64_t j = 0; j < nh + nkv; j++)
                rms_norm(row + j * D, j < nh ? L->q_norm : L->k_norm, D, L->eps, row + j * D, act);
        for (int64_t j = 0; j < nh + nkv; j++) rope(row + j * D, cos + m * D, sin + m * D, D, act);
        const float *k_new = row + nh * D, *v_new = k_new + nkv * D;
        for (int64_t j = 0; j < nkv; j++)
            for (int64_t i = 0; i < D; i++) {
                cache_put(k_caches[m], (j * cap[m] + pos[m]) * D + i, k_new[j * D + i], act);
                cache_put(v_caches[m], (j * cap[m] + pos[m]) * D + i, v_new[j * D + i], act);
            }
    }
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1 && M > 1)
    for (int64_t m = 0; m < M; m++) {
        for (int64_t hq = 0; hq < nh; hq++) {
            int64_t base = (hq / group) * cap[m] * D; /* head h reads KV head h // group */
            const float *q = qkv + m * qkv_n + hq * D;
            const char *kh = (const char *)k_caches[m] + base * (act == F32 ? 4 : 2);
            const char *vh = (const char *)v_caches[m] + base * (act == F32 ? 4 : 2);
            attend(q, kh, vh, pos[m] + 1, D, scores + m * longest, attn + (m * nh + hq) * D, act);
        }
    }
    mat(&L->o, attn, M, h, xs, threads, act);
    for (int64_t i = 0; i < M * H; i++) x[i] = rnd(x[i] + h[i], act);
    for (int64_t m = 0; m < M; m++) rms_norm(x + m * H, L->norm2, H, L->eps, h + m * H, act);
    mat(&L->gate_up, h, M, gu, xs, threads, act);
    for (int64_t m = 0; m < M; m++) {
        float *row = gu + m * 2 * I;
        for (int64_t i = 0; i < I; i++) {
            float g = row[i];
            row[i] = rnd(rnd(g / (1.0f + expf(-g)), act) * row[I + i], act); /* silu(gate) * up */
        }
    }
    /* down reads M rows of I inputs: the silu products, packed */
    for (int64_t m = 1; m < M; m++) memmove(gu + m * I, gu + m * 2 * I, I * sizeof(float));
    mat(&L->down, gu, M, h, xs, threads, act);
    for (int64_t i = 0; i < M * H; i++) x[i] = rnd(x[i] + h[i], act);
}

/* The last stage's end: logits[M, vocab] (float32) of the final norm of x[M, hidden] through
 * the head, rounded to the activation dtype first as torch's head matmul would be. scratch:
 * M * hidden + M * (hidden / 16 + 1) floats. */
void head_rows(const float *x, int64_t M, int64_t H, const float *norm, float eps, int64_t act,
               const QMat *head, float *logits, float *scratch, int threads) {
    float *h = scratch, *xs = scratch + M * H;
    for (int64_t m = 0; m < M; m++) rms_norm(x + m * H, norm, H, eps, h + m * H, act);
    mat(head, h, M, logits, xs, threads, act);
}
