/* One decoder layer for a few tokens of one session (batch-1 decode, or a speculative verify
 * step, on a CPU stage with quantized weights), in one call: at that size eager PyTorch spends more time dispatching its ~40 small
 * ops per layer than the int8 matmuls take to read the weights (bench/CPU_NOTES.md). The math is
 * stage_service/model.py's decoder_layer, in float32: RMSNorm, fused q/k/v projection, RoPE,
 * the token's K/V written into the session's cache, GQA attention over positions 0..pos,
 * output projection onto the residual, RMSNorm, SwiGLU MLP onto the residual.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

void q8_linear(const float *x, int64_t M, int64_t K, const int8_t *w, int64_t group,
               const float *scale, const float *bias, float *y, int64_t N, int threads);
void q4_linear(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t group,
               const float *scale, const float *mins, const float *bias, float *y, int64_t N,
               float *xs, int threads);

/* A quantized matrix as quant.py holds it (bits 8 or 4; mins only for 4). */
typedef struct {
    int64_t bits, n, k, group;
    const void *data;
    const float *scale, *mins, *bias;
} QMat;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, inter;
    float eps;
    const float *norm1, *norm2;
    QMat qkv, o, gate_up, down;
} Layer;

/* y[M, n] = x[M, k] @ W.T + bias: the weights come from memory once for all M rows. */
static void mat(const QMat *m, const float *x, int64_t M, float *y, float *xs, int threads) {
    if (m->bits == 8)
        q8_linear(x, M, m->k, (const int8_t *)m->data, m->group, m->scale, m->bias, y, m->n, threads);
    else
        q4_linear(x, M, m->k, (const uint8_t *)m->data, m->group, m->scale, m->mins, m->bias, y, m->n,
                  xs, threads);
}

static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    float r = _mm_cvtss_f32(s);
    for (; i < n; i++) r += a[i] * b[i];
    return r;
}

/* out[n] += p * v[n] */
static inline void axpy(float p, const float *v, float *out, int64_t n) {
    __m256 pv = _mm256_set1_ps(p);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(out + i)));
    for (; i < n; i++) out[i] += p * v[i];
}

static void rms_norm(const float *x, const float *w, int64_t n, float eps, float *out) {
    float ss = dot(x, x, n);
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = w[i] * (x[i] * r);
}

/* x[head_dim] rotated in place: x * cos + rotate_half(x) * sin. */
static void rope(float *x, const float *cos, const float *sin, int64_t d) {
    int64_t half = d / 2;
    for (int64_t i = 0; i < half; i++) {
        float a = x[i], b = x[i + half];
        x[i] = a * cos[i] - b * sin[i];
        x[i + half] = b * cos[i + half] + a * sin[i + half];
    }
}

/* x[M, hidden]: the hidden states of M consecutive tokens of one session at positions pos ..
 * pos + M - 1 (one decode token, or a token and the drafts a speculative step verifies),
 * updated in place. cos, sin: [M, head_dim]. k_cache, v_cache: [kv_heads, cap, head_dim]; the
 * tokens go to their positions, each attends to positions 0 .. its own. scratch: M rows of
 * per-row scratch and pos + M scores (fused_decode.py sizes it). */
void decode_layer(const Layer *L, float *x, int64_t M, const float *cos, const float *sin,
                  float *k_cache, float *v_cache, int64_t cap, int64_t pos, float *scratch,
                  int threads) {
    int64_t H = L->hidden, nh = L->heads, nkv = L->kv_heads, D = L->head_dim, I = L->inter;
    int64_t qkv_n = (nh + 2 * nkv) * D, group = nh / nkv;
    float *h = scratch, *qkv = h + M * H, *attn = qkv + M * qkv_n, *gu = attn + M * nh * D;
    float *scores = gu + M * 2 * I, *xs = scores + pos + M;  /* xs: int4 group sums, M rows */

    for (int64_t m = 0; m < M; m++) rms_norm(x + m * H, L->norm1, H, L->eps, h + m * H);
    mat(&L->qkv, h, M, qkv, xs, threads);
    for (int64_t m = 0; m < M; m++) {
        float *row = qkv + m * qkv_n;
        for (int64_t j = 0; j < nh + nkv; j++) rope(row + j * D, cos + m * D, sin + m * D, D);
        const float *k_new = row + nh * D, *v_new = k_new + nkv * D;
        for (int64_t j = 0; j < nkv; j++)
            for (int64_t i = 0; i < D; i++) {
                k_cache[(j * cap + pos + m) * D + i] = k_new[j * D + i];
                v_cache[(j * cap + pos + m) * D + i] = v_new[j * D + i];
            }
    }
    float inv = 1.0f / sqrtf((float)D);
    for (int64_t m = 0; m < M; m++) {
        int64_t T = pos + m + 1;  /* causal: this row sees positions 0 .. its own */
        for (int64_t hq = 0; hq < nh; hq++) {
            const float *q = qkv + m * qkv_n + hq * D;
            const float *kh = k_cache + (hq / group) * cap * D, *vh = v_cache + (hq / group) * cap * D;
            float top = -INFINITY;
            for (int64_t t = 0; t < T; t++) {
                scores[t] = dot(q, kh + t * D, D) * inv;
                if (scores[t] > top) top = scores[t];
            }
            float sum = 0.0f;
            for (int64_t t = 0; t < T; t++) sum += scores[t] = expf(scores[t] - top);
            float *out = attn + (m * nh + hq) * D;
            for (int64_t i = 0; i < D; i++) out[i] = 0.0f;
            for (int64_t t = 0; t < T; t++) axpy(scores[t] / sum, vh + t * D, out, D);
        }
    }
    mat(&L->o, attn, M, h, xs, threads);
    for (int64_t i = 0; i < M * H; i++) x[i] += h[i];
    for (int64_t m = 0; m < M; m++) rms_norm(x + m * H, L->norm2, H, L->eps, h + m * H);
    mat(&L->gate_up, h, M, gu, xs, threads);
    for (int64_t m = 0; m < M; m++) {
        float *row = gu + m * 2 * I;
        for (int64_t i = 0; i < I; i++) {
            float g = row[i];
            row[i] = g / (1.0f + expf(-g)) * row[I + i];  /* silu(gate) * up */
        }
    }
    /* down reads M rows of I inputs: the silu products, packed */
    for (int64_t m = 1; m < M; m++)
        for (int64_t i = 0; i < I; i++) gu[m * I + i] = gu[m * 2 * I + i];
    mat(&L->down, gu, M, h, xs, threads);
    for (int64_t i = 0; i < M * H; i++) x[i] += h[i];
}
