/* Weight-only quantized linear layers for x86-64 CPUs with AVX2 and FMA: y = x W^T + b with
 * W stored as int8 (one scale per output channel) or int4 (a scale and a minimum per group of
 * `group` inputs), activations and accumulation in float32. The weights are dequantized in
 * registers, so a decode step reads 1/4 (int8) or about 1/7 (int4) of the bytes of float32
 * weights and computes what the dequantized float32 model computes, up to float32 rounding.
 *
 * Layouts (made by stage_service/quant.py, which also undoes them in torch):
 *   Output channels go in blocks of 4, the channels of a block interleaved so that the kernel
 *   reads memory in one sequential stream: for each step of S inputs, the 4 channels' weights
 *   one after the other. The last N % 4 channels follow as plain rows.
 *   int8: S = 8, one byte per weight; w = q * scale[n].
 *   int4: S = 16 in 8 bytes; byte j holds weight j in its low nibble and weight j + 8 in its
 *         high nibble, as values 0..15; w = q * scale[n][g] + minimum[n][g] for group g.
 * K must be a multiple of 16 and `group` a multiple of 16 (the last group may be shorter).
 *
 * Few rows (decode): each block of weights comes from memory once and is reused from L1 for
 * every row (two rows at a time for int8, one for int4). Many rows
 * (prefill, large batches): the caller dequantizes blocks of channels with *_dequant and hands
 * them to torch's float32 matmul, which reuses each weight for every row.
 */
#include <immintrin.h>
#include <stdint.h>

#define PREFETCH 1024 /* bytes ahead of the weight stream */

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static inline __m256 i8x8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* 16 int4 weights (8 bytes) as floats 0..15: weights 0-7 in *lo, 8-15 in *hi. */
static inline void u4x16(const uint8_t *p, __m256 *lo, __m256 *hi) {
    __m128i v = _mm_loadl_epi64((const __m128i *)p), mask = _mm_set1_epi8(0x0F);
    *lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(v, mask)));
    *hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), mask)));
}

static inline float bias_at(const float *bias, int64_t n) { return bias ? bias[n] : 0.0f; }

/* ---------------------------------------------------------------- int8 */

/* R rows of x against one interleaved block of 4 channels (4 * K bytes at w). */
static inline void q8_block4(int R, const float *x, int64_t K, const int8_t *w, float out[][4]) {
    __m256 acc[2][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8, w += 32) {
        _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
        __m256 w0 = i8x8(w), w1 = i8x8(w + 8), w2 = i8x8(w + 16), w3 = i8x8(w + 24);
        for (int r = 0; r < R; r++) {
            __m256 xv = _mm256_loadu_ps(x + r * K + k);
            acc[r][0] = _mm256_fmadd_ps(xv, w0, acc[r][0]);
            acc[r][1] = _mm256_fmadd_ps(xv, w1, acc[r][1]);
            acc[r][2] = _mm256_fmadd_ps(xv, w2, acc[r][2]);
            acc[r][3] = _mm256_fmadd_ps(xv, w3, acc[r][3]);
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) out[r][c] = hsum(acc[r][c]);
}

static inline float q8_row(const float *x, const int8_t *w, int64_t K) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + k), i8x8(w + k), acc);
    return hsum(acc);
}

/* Blocks [b0, b1) for every row: a block's weights come from memory once and stay in L1 while
 * the rows go by two at a time. */
static void q8_blocks(const float *x, int64_t M, int64_t K, const int8_t *w, const float *scale,
                      const float *bias, float *y, int64_t N, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++)
        for (int64_t m = 0; m < M; m += 2) {
            float out[2][4];
            int R = M - m >= 2 ? 2 : 1;
            if (R == 2) q8_block4(2, x + m * K, K, w + b * 4 * K, out);
            else q8_block4(1, x + m * K, K, w + b * 4 * K, out);
            for (int r = 0; r < R; r++)
                for (int c = 0; c < 4; c++) {
                    int64_t n = b * 4 + c;
                    y[(m + r) * N + n] = out[r][c] * scale[n] + bias_at(bias, n);
                }
        }
}

void q8_linear(const float *x, int64_t M, int64_t K, const int8_t *w, const float *scale,
               const float *bias, float *y, int64_t N, int threads) {
    int64_t blocks = N / 4, per = (blocks + threads - 1) / threads;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int t = 0; t < threads; t++) {
        int64_t b0 = t * per, b1 = b0 + per < blocks ? b0 + per : blocks;
        if (b0 < b1) q8_blocks(x, M, K, w, scale, bias, y, N, b0, b1);
    }
    for (int64_t n = blocks * 4; n < N; n++)
        for (int64_t m = 0; m < M; m++)
            y[m * N + n] = q8_row(x + m * K, w + n * K, K) * scale[n] + bias_at(bias, n);
}

/* Channels [n0, n1) (n0 a multiple of 4) as float32 rows out[n - n0][K]. */
void q8_dequant(const int8_t *w, const float *scale, int64_t K, int64_t N, int64_t n0,
                int64_t n1, float *out) {
    int64_t full = N / 4 * 4;
    for (int64_t n = n0; n < n1; n++) {
        float *o = out + (n - n0) * K;
        __m256 s = _mm256_set1_ps(scale[n]);
        if (n < full) {
            const int8_t *p = w + (n / 4) * 4 * K + (n % 4) * 8;
            for (int64_t k = 0; k < K; k += 8, p += 32) _mm256_storeu_ps(o + k, _mm256_mul_ps(i8x8(p), s));
        } else {
            const int8_t *p = w + n * K;
            for (int64_t k = 0; k < K; k += 8) _mm256_storeu_ps(o + k, _mm256_mul_ps(i8x8(p + k), s));
        }
    }
}

/* ---------------------------------------------------------------- int4 */

/* R rows of x against C channels whose weights advance by `stride` bytes per 16 inputs (32
 * for an interleaved block, 8 for a plain row), dequantized in registers group by group. */
static inline void q4_chan(int R, int C, const float *x, int64_t K, const uint8_t *w,
                           int64_t stride, int64_t group, const float *scale, const float *mins,
                           int64_t G, float out[][4]) {
    __m256 acc[1][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) acc[r][c] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        int64_t k0 = g * group, k1 = k0 + group < K ? k0 + group : K;
        __m256 s[4], z[4];
        for (int c = 0; c < C; c++) {
            s[c] = _mm256_set1_ps(scale[c * G + g]);
            z[c] = _mm256_set1_ps(mins[c * G + g]);
        }
        for (int64_t k = k0; k < k1; k += 16, w += stride) {
            _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
            __m256 x0[1], x1[1];
            for (int r = 0; r < R; r++) {
                x0[r] = _mm256_loadu_ps(x + r * K + k);
                x1[r] = _mm256_loadu_ps(x + r * K + k + 8);
            }
            for (int c = 0; c < C; c++) {
                __m256 lo, hi;
                u4x16(w + c * 8, &lo, &hi);
                lo = _mm256_fmadd_ps(lo, s[c], z[c]);
                hi = _mm256_fmadd_ps(hi, s[c], z[c]);
                for (int r = 0; r < R; r++) {
                    acc[r][c] = _mm256_fmadd_ps(x0[r], lo, acc[r][c]);
                    acc[r][c] = _mm256_fmadd_ps(x1[r], hi, acc[r][c]);
                }
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) out[r][c] = hsum(acc[r][c]);
}

static void q4_blocks(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t group,
                      const float *scale, const float *mins, const float *bias, float *y,
                      int64_t N, int64_t b0, int64_t b1) {
    int64_t G = (K + group - 1) / group;
    for (int64_t b = b0; b < b1; b++)
        for (int64_t m = 0; m < M; m++) {
            float out[1][4];
            q4_chan(1, 4, x + m * K, K, w + b * 2 * K, 32, group, scale + b * 4 * G, mins + b * 4 * G, G, out);
            for (int c = 0; c < 4; c++) y[m * N + b * 4 + c] = out[0][c] + bias_at(bias, b * 4 + c);
        }
}

void q4_linear(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t group,
               const float *scale, const float *mins, const float *bias, float *y, int64_t N,
               int threads) {
    int64_t G = (K + group - 1) / group, blocks = N / 4, per = (blocks + threads - 1) / threads;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int t = 0; t < threads; t++) {
        int64_t b0 = t * per, b1 = b0 + per < blocks ? b0 + per : blocks;
        if (b0 < b1) q4_blocks(x, M, K, w, group, scale, mins, bias, y, N, b0, b1);
    }
    for (int64_t n = blocks * 4; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            float out[1][4];
            q4_chan(1, 1, x + m * K, K, w + n * (K / 2), 8, group, scale + n * G, mins + n * G, G, out);
            y[m * N + n] = out[0][0] + bias_at(bias, n);
        }
}

void q4_dequant(const uint8_t *w, int64_t group, const float *scale, const float *mins,
                int64_t K, int64_t N, int64_t n0, int64_t n1, float *out) {
    int64_t G = (K + group - 1) / group, full = N / 4 * 4;
    for (int64_t n = n0; n < n1; n++) {
        float *o = out + (n - n0) * K;
        const uint8_t *p = n < full ? w + (n / 4) * 2 * K + (n % 4) * 8 : w + n * (K / 2);
        int64_t stride = n < full ? 32 : 8;
        for (int64_t k = 0; k < K; k += 16, p += stride) {
            int64_t g = k / group;
            __m256 s = _mm256_set1_ps(scale[n * G + g]), z = _mm256_set1_ps(mins[n * G + g]);
            __m256 lo, hi;
            u4x16(p, &lo, &hi);
            _mm256_storeu_ps(o + k, _mm256_fmadd_ps(lo, s, z));
            _mm256_storeu_ps(o + k + 8, _mm256_fmadd_ps(hi, s, z));
        }
    }
}
