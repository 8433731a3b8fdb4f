/* Linear layers for x86-64 CPUs with AVX2 and FMA, y = x W^T + b, activations and sums in
 * float32: float weights (float32, bfloat16, float16) for the batch-invariant mode, and
 * weight-only quantized ones: int8 or int4 with a float32 scale per group of `group` inputs of
 * each output channel (int4 also a float32 minimum). Quantized weights are dequantized in
 * registers, so a decode step reads about 1/4 (int8) or 1/7 (int4) of the bytes of float32
 * weights.
 *
 * Layouts (made by stage_service/packed.py and quant.py, which also undo them in torch):
 *   float and int8: blocks of 16 output channels, each block K-major (the block's 16 weights
 *   of input k side by side), then the last N % 16 channels as plain rows; int8 w = q *
 *   scale[n][g] (see the float and int8 sections).
 *   int4: output channels in blocks of 4, the channels of a block interleaved so that the kernel
 *   reads memory in one sequential stream: for each step of 16 inputs (8 bytes), the 4
 *   channels' weights one after the other; the last N % 4 channels follow as plain rows. Byte
 *   j holds weight j in its low nibble and weight j + 8 in its high nibble, as values 0..15;
 *   w = q * scale[n][g] + minimum[n][g].
 *   g = k / group. K and group are multiples of 16 (the last group may be shorter than group).
 *
 * int4: per row and group, the kernel sums x * q and then scales the sum (adding the minimum
 * times the row's sum of x over the group, computed once per row), so the per-weight work is
 * a conversion and one FMA. Rows go one at a time over a block whose weights stay in L1. Many
 * rows (prefill, large batches) are better served by torch's float32 matmul on blocks
 * dequantized by q4_dequant (see quant.py), except in the batch-invariant mode, which keeps to
 * these kernels.
 *
 * Batch invariance: every output y[m][n] is computed by the same sequence of operations
 * whatever M is and wherever row m sits (float: one FMA chain over K; int8: one per group
 * and one over the groups; int4: 8-lane sums over K in order, one horizontal sum, the K % 8
 * tail in order), and threads split output
 * channels, never a sum. Compiled as ISO C (-std=c11), gcc contracts no a * b + c into an FMA
 * of its own and reorders no float sum.
 */
#include <math.h>

#include "formats.h"

#define PREFETCH 1024 /* bytes ahead of the weight stream */

static inline float dot(const float *a, const float *b, int64_t n) {
    __m256 acc = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
    float s = hsum(acc);
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

static inline __attribute__((always_inline)) __m256 i8x8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

/* 16 int4 weights (8 bytes) as floats 0..15: weights 0-7 in *lo, 8-15 in *hi. */
static inline void u4x16(const uint8_t *p, __m256 *lo, __m256 *hi) {
    __m128i v = _mm_loadl_epi64((const __m128i *)p), mask = _mm_set1_epi8(0x0F);
    *lo = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(v, mask)));
    *hi = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), mask)));
}

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Output channels [c0, c1) of N as blocks of 4 and then plain rows, each thread its share. */
#define FOR_BLOCKS(threads, N, body)                                                       \
    do {                                                                                   \
        int64_t blocks_ = (N) / 4, per_ = (blocks_ + (threads) - 1) / (threads);           \
        _Pragma("omp parallel for num_threads(threads) schedule(static) if (threads > 1)") \
        for (int t_ = 0; t_ < (threads); t_++)                                             \
            for (int64_t b = t_ * per_; b < min64((t_ + 1) * per_, blocks_); b++) body     \
    } while (0)

/* ---------------------------------------------------------------- float weights */

/* Float matrices (F32, BF16, F16) in the packed layout of stage_service/packed.py: blocks of
 * FB output channels, each block K-major, so that one step of k reads the block's FB weights
 * of input k side by side: element (n, k) at ((n / FB) * K + k) * FB + n % FB; the last N % FB
 * channels follow as plain rows. A tile of R rows and V blocks keeps R * 2V sums in registers
 * and broadcasts each x[r][k] once for all of them (an outer product per k), so a weight loaded
 * is used by R rows, an x loaded by 16V channels.
 *
 * Each output is one chain of FMAs over k = 0 .. K - 1 in order, from zero, then + bias: the
 * same operations whatever R, V, M or the thread count (the batch-invariant mode). A plain
 * row's chain is scalar fmaf, which rounds as one lane of the vector FMA does. */
#define FB 16

static inline __attribute__((always_inline)) void f_tile(int fmt, int R, int V, const float *x,
                                                         int64_t K, const void *w, int64_t b0,
                                                         const float *bias, float *y, int64_t N) {
    __m256 acc[12]; /* acc[r * 2V + c]: R * 2V <= 12 */
#pragma GCC unroll 12
    for (int i = 0; i < R * 2 * V; i++) acc[i] = _mm256_setzero_ps();
    const char *wb = (const char *)w + b0 * K * FB * (fmt == F32 ? 4 : 2);
    for (int64_t k = 0; k < K; k++) {
        __m256 wv[4];
        for (int v = 0; v < V; v++) {
            wv[2 * v] = load8(fmt, wb, (v * K + k) * FB);
            wv[2 * v + 1] = load8(fmt, wb, (v * K + k) * FB + 8);
        }
        for (int r = 0; r < R; r++) {
            __m256 xv = _mm256_broadcast_ss(x + r * K + k);
            for (int c = 0; c < 2 * V; c++)
                acc[r * 2 * V + c] = _mm256_fmadd_ps(xv, wv[c], acc[r * 2 * V + c]);
        }
    }
    float sums[12 * 8]; /* the registers, stored once: only constant indexes touch acc */
#pragma GCC unroll 12
    for (int i = 0; i < R * 2 * V; i++) _mm256_storeu_ps(sums + 8 * i, acc[i]);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 2 * V; c++) {
            int64_t n = b0 * FB + c * 8;
            const float *s = sums + 8 * (r * 2 * V + c);
            float *out = y + r * N + n;
            __m256 v = _mm256_loadu_ps(s);
            if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n));
            _mm256_storeu_ps(out, v);
        }
}

/* The last N % FB channels, plain rows from channel n0, for every row of x. */
static void f_plain(int fmt, const float *x, int64_t M, int64_t K, const void *w, int64_t n0,
                    const float *bias, float *y, int64_t N) {
    for (int64_t n = n0; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; k++) acc = fmaf(x[m * K + k], load1(fmt, w, n * K + k), acc);
            y[m * N + n] = acc + (bias ? bias[n] : 0.0f);
        }
}

/* Rows m .. m + R - 1 against blocks [b, b + V) */
#define F_TILE(R, V) f_tile(fmt, R, V, x + m * K, K, w, b, bias, y + m * N, N)

/* Blocks [b0, b1) of the output for every row: a block's weights (FB * K values) are read from
 * memory once and stay in cache while every tile of rows passes over them. */
static inline __attribute__((always_inline)) void f_blocks(int fmt, const float *x, int64_t M,
                                                           int64_t K, const void *w,
                                                           const float *bias, float *y, int64_t N,
                                                           int64_t b0, int64_t b1) {
    if (M <= 3) { /* few rows: 2 to 4 blocks at a time, for enough independent sums */
        int64_t b = b0, m = 0;
        for (; b + 2 <= b1; b += 2) {
            if (M == 1) F_TILE(1, 2);
            else if (M == 2) F_TILE(2, 2);
            else F_TILE(3, 2);
        }
        for (; b < b1; b++) {
            if (M == 1) F_TILE(1, 1);
            else if (M == 2) F_TILE(2, 1);
            else F_TILE(3, 1);
        }
        return;
    }
    for (int64_t b = b0; b < b1; b++) {
        int64_t m = 0;
        for (; m + 6 <= M; m += 6) F_TILE(6, 1);
        switch (M - m) {
        case 5: F_TILE(5, 1); break;
        case 4: F_TILE(4, 1); break;
        case 3: F_TILE(3, 1); break;
        case 2: F_TILE(2, 1); break;
        case 1: F_TILE(1, 1); break;
        }
    }
}

static void f_linear_f32(const float *x, int64_t M, int64_t K, const void *w, const float *bias,
                         float *y, int64_t N, int64_t b0, int64_t b1) {
    f_blocks(F32, x, M, K, w, bias, y, N, b0, b1);
}

static void f_linear_bf16(const float *x, int64_t M, int64_t K, const void *w, const float *bias,
                          float *y, int64_t N, int64_t b0, int64_t b1) {
    f_blocks(BF16, x, M, K, w, bias, y, N, b0, b1);
}

static void f_linear_f16(const float *x, int64_t M, int64_t K, const void *w, const float *bias,
                         float *y, int64_t N, int64_t b0, int64_t b1) {
    f_blocks(F16, x, M, K, w, bias, y, N, b0, b1);
}

/* The same tiles in AVX-512 where the CPU has it (chosen at run time: kernel_isa): a block
 * is one 16-lane register, tiles of up to 8 rows x 2 blocks (1-3 rows x 4). Every lane runs
 * the chain the AVX2 code runs for its output, so the two give the same bits. */
#define AVX512 __attribute__((target("avx512f")))

static inline AVX512 __attribute__((always_inline)) __m512 load16(int fmt, const void *p, int64_t i) {
    if (fmt == F32) return _mm512_loadu_ps((const float *)p + i);
    __m256i v = _mm256_loadu_si256((const __m256i *)((const uint16_t *)p + i));
    if (fmt == F16) return _mm512_cvtph_ps(v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}

static inline AVX512 __attribute__((always_inline)) void f_tile16(int fmt, int R, int V,
                                                                 const float *x, int64_t K,
                                                                 const void *w, int64_t b0,
                                                                 const float *bias, float *y,
                                                                 int64_t N) {
    __m512 acc[16]; /* acc[r * V + v]: R * V <= 16 */
#pragma GCC unroll 16
    for (int i = 0; i < R * V; i++) acc[i] = _mm512_setzero_ps();
    const char *wb = (const char *)w + b0 * K * FB * (fmt == F32 ? 4 : 2);
    for (int64_t k = 0; k < K; k++) {
        __m512 wv[4];
        for (int v = 0; v < V; v++) wv[v] = load16(fmt, wb, (v * K + k) * FB);
        for (int r = 0; r < R; r++) {
            __m512 xv = _mm512_set1_ps(x[r * K + k]);
            for (int v = 0; v < V; v++) acc[r * V + v] = _mm512_fmadd_ps(xv, wv[v], acc[r * V + v]);
        }
    }
    float sums[16 * 16];
#pragma GCC unroll 16
    for (int i = 0; i < R * V; i++) _mm512_storeu_ps(sums + 16 * i, acc[i]);
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) {
            int64_t n = (b0 + v) * FB;
            __m512 s = _mm512_loadu_ps(sums + 16 * (r * V + v));
            if (bias) s = _mm512_add_ps(s, _mm512_loadu_ps(bias + n));
            _mm512_storeu_ps(y + r * N + n, s);
        }
}

#define F_TILE16(R, V) f_tile16(fmt, R, V, x + m * K, K, w, b, bias, y + m * N, N)

static inline AVX512 __attribute__((always_inline)) void f_blocks16(int fmt, const float *x,
                                                                   int64_t M, int64_t K,
                                                                   const void *w,
                                                                   const float *bias, float *y,
                                                                   int64_t N, int64_t b0,
                                                                   int64_t b1) {
    if (M <= 3) {
        int64_t b = b0, m = 0;
        for (; b + 4 <= b1; b += 4) {
            if (M == 1) F_TILE16(1, 4);
            else if (M == 2) F_TILE16(2, 4);
            else F_TILE16(3, 4);
        }
        for (; b < b1; b++) {
            if (M == 1) F_TILE16(1, 1);
            else if (M == 2) F_TILE16(2, 1);
            else F_TILE16(3, 1);
        }
        return;
    }
    int64_t b = b0;
    for (; b + 2 <= b1; b += 2) {
        int64_t m = 0;
        for (; m + 8 <= M; m += 8) F_TILE16(8, 2);
        switch (M - m) {
        case 7: F_TILE16(7, 2); break;
        case 6: F_TILE16(6, 2); break;
        case 5: F_TILE16(5, 2); break;
        case 4: F_TILE16(4, 2); break;
        case 3: F_TILE16(3, 2); break;
        case 2: F_TILE16(2, 2); break;
        case 1: F_TILE16(1, 2); break;
        }
    }
    for (; b < b1; b++) {
        int64_t m = 0;
        for (; m + 8 <= M; m += 8) F_TILE16(8, 1);
        switch (M - m) {
        case 7: F_TILE16(7, 1); break;
        case 6: F_TILE16(6, 1); break;
        case 5: F_TILE16(5, 1); break;
        case 4: F_TILE16(4, 1); break;
        case 3: F_TILE16(3, 1); break;
        case 2: F_TILE16(2, 1); break;
        case 1: F_TILE16(1, 1); break;
        }
    }
}

static AVX512 void f_linear_f32_512(const float *x, int64_t M, int64_t K, const void *w,
                                    const float *bias, float *y, int64_t N, int64_t b0, int64_t b1) {
    f_blocks16(F32, x, M, K, w, bias, y, N, b0, b1);
}

static AVX512 void f_linear_bf16_512(const float *x, int64_t M, int64_t K, const void *w,
                                     const float *bias, float *y, int64_t N, int64_t b0, int64_t b1) {
    f_blocks16(BF16, x, M, K, w, bias, y, N, b0, b1);
}

static AVX512 void f_linear_f16_512(const float *x, int64_t M, int64_t K, const void *w,
                                    const float *bias, float *y, int64_t N, int64_t b0, int64_t b1) {
    f_blocks16(F16, x, M, K, w, bias, y, N, b0, b1);
}

enum { ISA_AVX2 = 0, ISA_AVX512 = 1 };
static int isa = -1; /* what f_linear and q8_linear run: set by kernel_isa, else at first call */

/* Sets what f_linear and q8_linear run (want: ISA_AVX2, ISA_AVX512, or -1 for the best this CPU has);
 * AVX-512 only where the CPU and the OS support it. Returns the one in force. */
int kernel_isa(int want) {
    int has = __builtin_cpu_supports("avx512f") ? ISA_AVX512 : ISA_AVX2;
    isa = want < 0 || want > has ? has : want;
    return isa;
}

/* y[M, N] = x[M, K] @ W.T + bias, W packed (above) in format fmt, float32 x and y. Threads
 * take runs of blocks. */
void f_linear(const float *x, int64_t M, int64_t K, const void *w, int64_t fmt, const float *bias,
              float *y, int64_t N, int threads) {
    if (isa < 0) kernel_isa(-1);
    void (*run)(const float *, int64_t, int64_t, const void *, const float *, float *, int64_t,
                int64_t, int64_t);
    if (isa == ISA_AVX512)
        run = fmt == F32 ? f_linear_f32_512 : fmt == BF16 ? f_linear_bf16_512 : f_linear_f16_512;
    else
        run = fmt == F32 ? f_linear_f32 : fmt == BF16 ? f_linear_bf16 : f_linear_f16;
    int64_t blocks = N / FB, per = (blocks + threads - 1) / threads;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int t = 0; t < threads; t++) run(x, M, K, w, bias, y, N, t * per, min64((t + 1) * per, blocks));
    f_plain((int)fmt, x, M, K, w, blocks * FB, bias, y, N);
}

/* ---------------------------------------------------------------- int8 */

/* int8 weights in the float matrices' packed layout (a byte a weight), with scale[n][g] for
 * the inputs g * group .. of channel n. Each output is, per group, one chain of FMAs of x * q
 * over the group's inputs in order, from zero, and over the groups one chain total =
 * part * scale + total, then + bias: the same operations whatever the rows. A tile converts
 * each weight once for its R rows (AVX2: up to 3 rows x 16 channels, or 1 row x 32; the
 * group's sums and the totals both stay in registers). */
static inline __attribute__((always_inline)) void q8_tile(int R, int V, const float *x, int64_t K,
                                                          const int8_t *w, int64_t b0,
                                                          int64_t group, const float *scale,
                                                          int64_t G, const float *bias, float *y,
                                                          int64_t N) {
    __m256 tot[6]; /* tot[r * 2V + c], R * 2V <= 6... or 4 for one row of 2 blocks */
#pragma GCC unroll 6
    for (int i = 0; i < R * 2 * V; i++) tot[i] = _mm256_setzero_ps();
    const int8_t *wb = w + b0 * K * FB;
    for (int64_t g = 0; g < G; g++) {
        __m256 part[6];
#pragma GCC unroll 6
        for (int i = 0; i < R * 2 * V; i++) part[i] = _mm256_setzero_ps();
        for (int64_t k = g * group; k < min64(K, (g + 1) * group); k++) {
            __m256 wv[4];
            for (int c = 0; c < 2 * V; c++) wv[c] = i8x8(wb + ((c / 2) * K + k) * FB + (c % 2) * 8);
            for (int r = 0; r < R; r++) {
                __m256 xv = _mm256_broadcast_ss(x + r * K + k);
                for (int c = 0; c < 2 * V; c++)
                    part[r * 2 * V + c] = _mm256_fmadd_ps(xv, wv[c], part[r * 2 * V + c]);
            }
        }
        float sb[2 * FB]; /* the tile's channels' scales for group g */
        for (int j = 0; j < V * FB; j++) sb[j] = scale[(b0 * FB + j) * G + g];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < 2 * V; c++)
                tot[r * 2 * V + c] =
                    _mm256_fmadd_ps(part[r * 2 * V + c], _mm256_loadu_ps(sb + 8 * c), tot[r * 2 * V + c]);
    }
    float sums[6 * 8];
#pragma GCC unroll 6
    for (int i = 0; i < R * 2 * V; i++) _mm256_storeu_ps(sums + 8 * i, tot[i]);
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 2 * V; c++) {
            int64_t n = b0 * FB + c * 8;
            __m256 v = _mm256_loadu_ps(sums + 8 * (r * 2 * V + c));
            if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + n));
            _mm256_storeu_ps(y + r * N + n, v);
        }
}

#define Q8_TILE(R, V) q8_tile(R, V, x + m * K, K, w, b, group, scale, G, bias, y + m * N, N)

static void q8_blocks(const float *x, int64_t M, int64_t K, const int8_t *w, int64_t group,
                      const float *scale, int64_t G, const float *bias, float *y, int64_t N,
                      int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        int64_t m = 0;
        if (M == 1 && b + 1 < b1) { /* one row: two blocks at a time, for independent sums */
            Q8_TILE(1, 2);
            b++;
            continue;
        }
        for (; m + 3 <= M; m += 3) Q8_TILE(3, 1);
        if (M - m == 2) Q8_TILE(2, 1);
        else if (M - m == 1) Q8_TILE(1, 1);
    }
}

/* The int8 tiles in AVX-512 (kernel_isa): a block is one register, up to 12 rows x 1 block
 * (1 row x 4, 2-3 rows x 2); every lane runs q8_tile's chains, so the bits are the same. */
static inline AVX512 __attribute__((always_inline)) void q8_tile16(int R, int V, const float *x,
                                                                  int64_t K, const int8_t *w,
                                                                  int64_t b0, int64_t group,
                                                                  const float *scale, int64_t G,
                                                                  const float *bias, float *y,
                                                                  int64_t N) {
    __m512 tot[12]; /* tot[r * V + v], R * V <= 12 */
#pragma GCC unroll 12
    for (int i = 0; i < R * V; i++) tot[i] = _mm512_setzero_ps();
    const int8_t *wb = w + b0 * K * FB;
    for (int64_t g = 0; g < G; g++) {
        __m512 part[12];
#pragma GCC unroll 12
        for (int i = 0; i < R * V; i++) part[i] = _mm512_setzero_ps();
        for (int64_t k = g * group; k < min64(K, (g + 1) * group); k++) {
            __m512 wv[4];
            for (int v = 0; v < V; v++)
                wv[v] = _mm512_cvtepi32_ps(
                    _mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(wb + (v * K + k) * FB))));
            for (int r = 0; r < R; r++) {
                __m512 xv = _mm512_set1_ps(x[r * K + k]);
                for (int v = 0; v < V; v++) part[r * V + v] = _mm512_fmadd_ps(xv, wv[v], part[r * V + v]);
            }
        }
        float sb[4 * FB];
        for (int j = 0; j < V * FB; j++) sb[j] = scale[(b0 * FB + j) * G + g];
        for (int r = 0; r < R; r++)
            for (int v = 0; v < V; v++)
                tot[r * V + v] = _mm512_fmadd_ps(part[r * V + v], _mm512_loadu_ps(sb + 16 * v), tot[r * V + v]);
    }
    float sums[12 * 16];
#pragma GCC unroll 12
    for (int i = 0; i < R * V; i++) _mm512_storeu_ps(sums + 16 * i, tot[i]);
    for (int r = 0; r < R; r++)
        for (int v = 0; v < V; v++) {
            int64_t n = (b0 + v) * FB;
            __m512 s = _mm512_loadu_ps(sums + 16 * (r * V + v));
            if (bias) s = _mm512_add_ps(s, _mm512_loadu_ps(bias + n));
            _mm512_storeu_ps(y + r * N + n, s);
        }
}

#define Q8_TILE16(R, V) q8_tile16(R, V, x + m * K, K, w, b, group, scale, G, bias, y + m * N, N)

static AVX512 void q8_blocks16(const float *x, int64_t M, int64_t K, const int8_t *w,
                               int64_t group, const float *scale, int64_t G, const float *bias,
                               float *y, int64_t N, int64_t b0, int64_t b1) {
    int64_t b = b0, m = 0;
    if (M <= 3) {
        int V = M == 1 ? 4 : 2;
        for (; b + V <= b1; b += V) {
            if (M == 1) Q8_TILE16(1, 4);
            else if (M == 2) Q8_TILE16(2, 2);
            else Q8_TILE16(3, 2);
        }
        for (; b < b1; b++) {
            if (M == 1) Q8_TILE16(1, 1);
            else if (M == 2) Q8_TILE16(2, 1);
            else Q8_TILE16(3, 1);
        }
        return;
    }
    for (; b < b1; b++) {
        for (m = 0; m + 12 <= M; m += 12) Q8_TILE16(12, 1);
        switch (M - m) {
        case 11: Q8_TILE16(11, 1); break;
        case 10: Q8_TILE16(10, 1); break;
        case 9: Q8_TILE16(9, 1); break;
        case 8: Q8_TILE16(8, 1); break;
        case 7: Q8_TILE16(7, 1); break;
        case 6: Q8_TILE16(6, 1); break;
        case 5: Q8_TILE16(5, 1); break;
        case 4: Q8_TILE16(4, 1); break;
        case 3: Q8_TILE16(3, 1); break;
        case 2: Q8_TILE16(2, 1); break;
        case 1: Q8_TILE16(1, 1); break;
        }
    }
}

void q8_linear(const float *x, int64_t M, int64_t K, const int8_t *w, int64_t group,
               const float *scale, const float *bias, float *y, int64_t N, int threads) {
    int64_t G = (K + group - 1) / group, blocks = N / FB, per = (blocks + threads - 1) / threads;
    if (isa < 0) kernel_isa(-1);
    void (*run)(const float *, int64_t, int64_t, const int8_t *, int64_t, const float *, int64_t,
                const float *, float *, int64_t, int64_t, int64_t) =
        isa == ISA_AVX512 ? q8_blocks16 : q8_blocks;
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int t = 0; t < threads; t++)
        run(x, M, K, w, group, scale, G, bias, y, N, t * per, min64((t + 1) * per, blocks));
    for (int64_t n = blocks * FB; n < N; n++) /* the plain rows */
        for (int64_t m = 0; m < M; m++) {
            float total = 0.0f;
            for (int64_t g = 0; g < G; g++) {
                float part = 0.0f;
                for (int64_t k = g * group; k < min64(K, (g + 1) * group); k++)
                    part = fmaf(x[m * K + k], (float)w[n * K + k], part);
                total = fmaf(part, scale[n * G + g], total);
            }
            y[m * N + n] = total + (bias ? bias[n] : 0.0f);
        }
}

/* ---------------------------------------------------------------- int4 */

/* As q8_chan for int4 (stride: bytes per 16 inputs, 32 in a block, 8 in a plain row); the
 * minimums' part, sum_g minimum[g] * xs[g], is added by the caller. */
static inline void q4_chan(int C, const float *x, int64_t K, const uint8_t *w, int64_t stride,
                           int64_t group, const float *scale, int64_t G, float *out) {
    __m256 tot[4];
    for (int c = 0; c < C; c++) tot[c] = _mm256_setzero_ps();
    for (int64_t g = 0; g < G; g++) {
        __m256 part[4];
        for (int c = 0; c < C; c++) part[c] = _mm256_setzero_ps();
        for (int64_t k = g * group; k < min64(K, (g + 1) * group); k += 16, w += stride) {
            _mm_prefetch((const char *)w + PREFETCH, _MM_HINT_T0);
            __m256 x0 = _mm256_loadu_ps(x + k), x1 = _mm256_loadu_ps(x + k + 8);
            for (int c = 0; c < C; c++) {
                __m256 lo, hi;
                u4x16(w + 8 * c, &lo, &hi);
                part[c] = _mm256_fmadd_ps(x0, lo, part[c]);
                part[c] = _mm256_fmadd_ps(x1, hi, part[c]);
            }
        }
        for (int c = 0; c < C; c++) tot[c] = _mm256_fmadd_ps(part[c], _mm256_set1_ps(scale[c * G + g]), tot[c]);
    }
    for (int c = 0; c < C; c++) out[c] = hsum(tot[c]);
}

/* xs: scratch of M * G floats (each row's sum of x over each group). */
void q4_linear(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t group,
               const float *scale, const float *mins, const float *bias, float *y, int64_t N,
               float *xs, int threads) {
    int64_t G = (K + group - 1) / group;
    for (int64_t m = 0; m < M; m++)
        for (int64_t g = 0; g < G; g++) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t k = g * group; k < min64(K, (g + 1) * group); k += 8)
                acc = _mm256_add_ps(acc, _mm256_loadu_ps(x + m * K + k));
            xs[m * G + g] = hsum(acc);
        }
    FOR_BLOCKS(threads, N, {
        for (int64_t m = 0; m < M; m++) {
            float out[4];
            q4_chan(4, x + m * K, K, w + b * 2 * K, 32, group, scale + b * 4 * G, G, out);
            for (int c = 0; c < 4; c++) {
                int64_t n = b * 4 + c;
                y[m * N + n] = out[c] + dot(mins + n * G, xs + m * G, G) + (bias ? bias[n] : 0.0f);
            }
        }
    });
    for (int64_t n = N / 4 * 4; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            float out[4];
            q4_chan(1, x + m * K, K, w + n * (K / 2), 8, group, scale + n * G, G, out);
            y[m * N + n] = out[0] + dot(mins + n * G, xs + m * G, G) + (bias ? bias[n] : 0.0f);
        }
}

void q4_dequant(const uint8_t *w, int64_t group, const float *scale, const float *mins,
                int64_t K, int64_t N, int64_t n0, int64_t n1, float *out) {
    int64_t G = (K + group - 1) / group, full = N / 4 * 4;
    for (int64_t n = n0; n < n1; n++) {
        const uint8_t *p = n < full ? w + (n / 4) * 2 * K + (n % 4) * 8 : w + n * (K / 2);
        int64_t stride = n < full ? 32 : 8;
        for (int64_t k = 0; k < K; k += 16, p += stride) {
            __m256 s = _mm256_set1_ps(scale[n * G + k / group]), z = _mm256_set1_ps(mins[n * G + k / group]);
            __m256 lo, hi;
            u4x16(p, &lo, &hi);
            _mm256_storeu_ps(out + (n - n0) * K + k, _mm256_fmadd_ps(lo, s, z));
            _mm256_storeu_ps(out + (n - n0) * K + k + 8, _mm256_fmadd_ps(hi, s, z));
        }
    }
}
