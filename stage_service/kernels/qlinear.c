/* Linear layers for x86-64 CPUs with AVX2 and FMA (AVX-512 where the CPU has it, chosen at run
 * time: kernel_isa), y = x W^T + b, activations and sums in float32: float weights (float32,
 * bfloat16, float16) for the batch-invariant mode, and weight-only quantized ones: int8 or int4
 * with a float32 scale per group of `group` inputs of each output channel (int4 also a float32
 * minimum). Quantized weights are converted in registers, so a decode step reads about 1/4
 * (int8) or 1/7 (int4) of the bytes of float32 weights.
 *
 * Layout (made by stage_service/packed.py and quant.py, which also undo it in torch): blocks of
 * 16 output channels, each block K-major (the block's 16 weights of input k side by side), then
 * the last N % 16 channels as plain rows; the float and quantized sections say how a block's
 * weights are held. g = k / group; K and group are multiples of 16 for quantized matrices (the
 * last group may be shorter than group).
 *
 * Every kernel works in tiles of R rows x 16V channels, an outer product per input: each weight
 * is loaded (and converted) once per tile, each x once per 16V channels. Outside the
 * batch-invariant mode, int4 from many rows on goes to torch's matmul on blocks dequantized by
 * q4_dequant (quant.py).
 *
 * Batch invariance: every output y[m][n] is computed by the same sequence of operations
 * whatever M is, wherever row m sits, whichever ISA runs (each lane of a tile runs the chain of
 * its own output; float: one FMA chain over K; quantized: one per group and one over the
 * groups), and threads split output channels, never a sum. Compiled as ISO C (-std=c11), gcc
 * contracts no a * b + c into an FMA of its own and reorders no float sum.
 */
#include <math.h>

#include "formats.h"

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


static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }


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

/* ---------------------------------------------------------------- int8 and int4 */

/* Quantized weights in the float matrices' packed layout: int8 a byte a weight (the block's 16
 * bytes of input k side by side); int4 8 bytes for the block's 16 weights of input k, byte j
 * holding channel j in its low nibble and channel j + 8 in its high one, as levels 0..15. The
 * last N % 16 channels follow as plain rows (int4: per 16 inputs 8 bytes, byte j holding input
 * j low and j + 8 high). scale[n][g] (int4 also mins[n][g]) for the inputs g * group .. of
 * channel n.
 *
 * Each output is, per group, one chain of FMAs of x * q over the group's inputs in order, from
 * zero; over the groups one chain total = part * scale + total; then int4 adds
 * dot(mins[n], xs[m]) (xs: the row's sums of x over each group) and both add the bias: the
 * same operations whatever the rows. A tile converts each weight once for its R rows (AVX2: up
 * to 3 rows x 16 channels, or 1 row x 32; the group's sums and the totals stay in
 * registers). */
static inline __attribute__((always_inline)) void q_load(int fmt, const uint8_t *p, __m256 *a,
                                                         __m256 *b) {
    if (fmt == Q8) {
        *a = i8x8((const int8_t *)p);
        *b = i8x8((const int8_t *)p + 8);
    } else {
        __m128i v = _mm_loadl_epi64((const __m128i *)p), mask = _mm_set1_epi8(0x0F);
        *a = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(v, mask)));
        *b = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(v, 4), mask)));
    }
}

/* Output (m, n) from its total: int4's minimums' part, then the bias. */
static inline float q_out(float total, int64_t n, int64_t m, const float *mins, const float *xs,
                          int64_t G, const float *bias) {
    if (mins) total = total + dot(mins + n * G, xs + m * G, G);
    return total + (bias ? bias[n] : 0.0f);
}

static inline __attribute__((always_inline)) void q_tile(int fmt, int R, int V, const float *x,
                                                         int64_t K, const uint8_t *w, int64_t b0,
                                                         int64_t group, const float *scale,
                                                         const float *mins, const float *xs,
                                                         int64_t G, const float *bias, float *y,
                                                         int64_t N) {
    int64_t bytes = fmt == Q8 ? FB : FB / 2; /* a block's bytes per input */
    __m256 tot[6]; /* tot[r * 2V + c]: R * 2V <= 6, or 4 for one row of 2 blocks */
#pragma GCC unroll 6
    for (int i = 0; i < R * 2 * V; i++) tot[i] = _mm256_setzero_ps();
    const uint8_t *wb = w + b0 * K * bytes;
    for (int64_t g = 0; g < G; g++) {
        __m256 part[6];
#pragma GCC unroll 6
        for (int i = 0; i < R * 2 * V; i++) part[i] = _mm256_setzero_ps();
        for (int64_t k = g * group; k < min64(K, (g + 1) * group); k++) {
            __m256 wv[4];
            for (int v = 0; v < V; v++) q_load(fmt, wb + (v * K + k) * bytes, &wv[2 * v], &wv[2 * v + 1]);
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
        for (int c = 0; c < 2 * V; c++)
            for (int j = 0; j < 8; j++) {
                int64_t n = b0 * FB + c * 8 + j;
                y[r * N + n] = q_out(sums[8 * (r * 2 * V + c) + j], n, r, mins, xs, G, bias);
            }
}

#define Q_TILE(R, V) \
    q_tile(fmt, R, V, x + m * K, K, w, b, group, scale, mins, xs + m * G, G, bias, y + m * N, N)

static inline __attribute__((always_inline)) void q_blocks(int fmt, const float *x, int64_t M,
                                                           int64_t K, const uint8_t *w,
                                                           int64_t group, const float *scale,
                                                           const float *mins, const float *xs,
                                                           int64_t G, const float *bias, float *y,
                                                           int64_t N, int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; b++) {
        int64_t m = 0;
        if (M == 1 && b + 1 < b1) { /* one row: two blocks at a time, for independent sums */
            Q_TILE(1, 2);
            b++;
            continue;
        }
        for (; m + 3 <= M; m += 3) Q_TILE(3, 1);
        if (M - m == 2) Q_TILE(2, 1);
        else if (M - m == 1) Q_TILE(1, 1);
    }
}

typedef void (*QBlocks)(const float *, int64_t, int64_t, const uint8_t *, int64_t, const float *,
                        const float *, const float *, int64_t, const float *, float *, int64_t,
                        int64_t, int64_t);

static void q8_blocks(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t group,
                      const float *scale, const float *mins, const float *xs, int64_t G,
                      const float *bias, float *y, int64_t N, int64_t b0, int64_t b1) {
    q_blocks(Q8, x, M, K, w, group, scale, mins, xs, G, bias, y, N, b0, b1);
}

static void q4_blocks(const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t group,
                      const float *scale, const float *mins, const float *xs, int64_t G,
                      const float *bias, float *y, int64_t N, int64_t b0, int64_t b1) {
    q_blocks(Q4, x, M, K, w, group, scale, mins, xs, G, bias, y, N, b0, b1);
}

/* The quantized tiles in AVX-512 (kernel_isa): a block is one register, up to 12 rows x 1
 * block (1 row x 4, 2-3 rows x 2); every lane runs q_tile's chains, so the bits are the same. */
static inline AVX512 __attribute__((always_inline)) __m512 q_load16(int fmt, const uint8_t *p) {
    if (fmt == Q8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    __m128i v = _mm_loadl_epi64((const __m128i *)p), mask = _mm_set1_epi8(0x0F);
    __m128i both = _mm_unpacklo_epi64(_mm_and_si128(v, mask), _mm_and_si128(_mm_srli_epi16(v, 4), mask));
    return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(both));
}

static inline AVX512 __attribute__((always_inline)) void q_tile16(int fmt, int R, int V,
                                                                 const float *x, int64_t K,
                                                                 const uint8_t *w, int64_t b0,
                                                                 int64_t group, const float *scale,
                                                                 const float *mins, const float *xs,
                                                                 int64_t G, const float *bias,
                                                                 float *y, int64_t N) {
    int64_t bytes = fmt == Q8 ? FB : FB / 2;
    __m512 tot[12]; /* tot[r * V + v], R * V <= 12 */
#pragma GCC unroll 12
    for (int i = 0; i < R * V; i++) tot[i] = _mm512_setzero_ps();
    const uint8_t *wb = w + b0 * K * bytes;
    for (int64_t g = 0; g < G; g++) {
        __m512 part[12];
#pragma GCC unroll 12
        for (int i = 0; i < R * V; i++) part[i] = _mm512_setzero_ps();
        for (int64_t k = g * group; k < min64(K, (g + 1) * group); k++) {
            __m512 wv[4];
            for (int v = 0; v < V; v++) wv[v] = q_load16(fmt, wb + (v * K + k) * bytes);
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
        for (int v = 0; v < V; v++)
            for (int j = 0; j < 16; j++) {
                int64_t n = (b0 + v) * FB + j;
                y[r * N + n] = q_out(sums[16 * (r * V + v) + j], n, r, mins, xs, G, bias);
            }
}

#define Q_TILE16(R, V) \
    q_tile16(fmt, R, V, x + m * K, K, w, b, group, scale, mins, xs + m * G, G, bias, y + m * N, N)

static inline AVX512 __attribute__((always_inline)) void q_blocks16(
    int fmt, const float *x, int64_t M, int64_t K, const uint8_t *w, int64_t group,
    const float *scale, const float *mins, const float *xs, int64_t G, const float *bias, float *y,
    int64_t N, int64_t b0, int64_t b1) {
    int64_t b = b0, m = 0;
    if (M <= 3) {
        int V = M == 1 ? 4 : 2;
        for (; b + V <= b1; b += V) {
            if (M == 1) Q_TILE16(1, 4);
            else if (M == 2) Q_TILE16(2, 2);
            else Q_TILE16(3, 2);
        }
        for (; b < b1; b++) {
            if (M == 1) Q_TILE16(1, 1);
            else if (M == 2) Q_TILE16(2, 1);
            else Q_TILE16(3, 1);
        }
        return;
    }
    for (; b < b1; b++) {
        for (m = 0; m + 12 <= M; m += 12) Q_TILE16(12, 1);
        switch (M - m) {
        case 11: Q_TILE16(11, 1); break;
        case 10: Q_TILE16(10, 1); break;
        case 9: Q_TILE16(9, 1); break;
        case 8: Q_TILE16(8, 1); break;
        case 7: Q_TILE16(7, 1); break;
        case 6: Q_TILE16(6, 1); break;
        case 5: Q_TILE16(5, 1); break;
        case 4: Q_TILE16(4, 1); break;
        case 3: Q_TILE16(3, 1); break;
        case 2: Q_TILE16(2, 1); break;
        case 1: Q_TILE16(1, 1); break;
        }
    }
}

static AVX512 void q8_blocks16(const float *x, int64_t M, int64_t K, const uint8_t *w,
                               int64_t group, const float *scale, const float *mins,
                               const float *xs, int64_t G, const float *bias, float *y, int64_t N,
                               int64_t b0, int64_t b1) {
    q_blocks16(Q8, x, M, K, w, group, scale, mins, xs, G, bias, y, N, b0, b1);
}

static AVX512 void q4_blocks16(const float *x, int64_t M, int64_t K, const uint8_t *w,
                               int64_t group, const float *scale, const float *mins,
                               const float *xs, int64_t G, const float *bias, float *y, int64_t N,
                               int64_t b0, int64_t b1) {
    q_blocks16(Q4, x, M, K, w, group, scale, mins, xs, G, bias, y, N, b0, b1);
}

/* The blocks of either format, then the plain rows (one scalar chain each, as a lane's). */
static void q_linear(int fmt, const float *x, int64_t M, int64_t K, const uint8_t *w,
                     int64_t group, const float *scale, const float *mins, const float *xs,
                     const float *bias, float *y, int64_t N, int threads) {
    int64_t G = (K + group - 1) / group, blocks = N / FB, per = (blocks + threads - 1) / threads;
    if (isa < 0) kernel_isa(-1);
    QBlocks run = isa == ISA_AVX512 ? (fmt == Q8 ? q8_blocks16 : q4_blocks16)
                                    : (fmt == Q8 ? q8_blocks : q4_blocks);
#pragma omp parallel for num_threads(threads) schedule(static) if (threads > 1)
    for (int t = 0; t < threads; t++)
        run(x, M, K, w, group, scale, mins, xs, G, bias, y, N, t * per, min64((t + 1) * per, blocks));
    int64_t full = blocks * FB, row_bytes = fmt == Q8 ? K : K / 2;
    for (int64_t n = full; n < N; n++)
        for (int64_t m = 0; m < M; m++) {
            const uint8_t *p = w + full * row_bytes + (n - full) * row_bytes;
            float total = 0.0f;
            for (int64_t g = 0; g < G; g++) {
                float part = 0.0f;
                for (int64_t k = g * group; k < min64(K, (g + 1) * group); k++) {
                    float q = fmt == Q8 ? (float)((const int8_t *)p)[k]
                                        : (float)((p[k / 16 * 8 + k % 8] >> (k % 16 < 8 ? 0 : 4)) & 0x0F);
                    part = fmaf(x[m * K + k], q, part);
                }
                total = fmaf(part, scale[n * G + g], total);
            }
            y[m * N + n] = q_out(total, n, m, mins, xs, G, bias);
        }
}

void q8_linear(const float *x, int64_t M, int64_t K, const int8_t *w, int64_t group,
               const float *scale, const float *bias, float *y, int64_t N, int threads) {
    q_linear(Q8, x, M, K, (const uint8_t *)w, group, scale, NULL, NULL, bias, y, N, threads);
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
    q_linear(Q4, x, M, K, w, group, scale, mins, xs, bias, y, N, threads);
}

/* int4 blocks [b0, b1) dequantized for torch's matmul (many rows, outside the batch-invariant
 * mode): out[k][16 * (b - b0) + j] = q * scale + minimum of channel 16 b + j, input k. */
void q4_dequant(const uint8_t *w, int64_t group, const float *scale, const float *mins, int64_t K,
                int64_t b0, int64_t b1, float *out) {
    int64_t G = (K + group - 1) / group, width = (b1 - b0) * FB;
    for (int64_t b = b0; b < b1; b++)
        for (int64_t g = 0; g < G; g++) {
            float sb[FB], mb[FB];
            for (int j = 0; j < FB; j++) {
                sb[j] = scale[(b * FB + j) * G + g];
                mb[j] = mins[(b * FB + j) * G + g];
            }
            __m256 s0 = _mm256_loadu_ps(sb), s1 = _mm256_loadu_ps(sb + 8);
            __m256 z0 = _mm256_loadu_ps(mb), z1 = _mm256_loadu_ps(mb + 8);
            for (int64_t k = g * group; k < min64(K, (g + 1) * group); k++) {
                __m256 lo, hi;
                q_load(Q4, w + (b * K + k) * (FB / 2), &lo, &hi);
                float *o = out + k * width + (b - b0) * FB;
                _mm256_storeu_ps(o, _mm256_add_ps(_mm256_mul_ps(lo, s0), z0));
                _mm256_storeu_ps(o + 8, _mm256_add_ps(_mm256_mul_ps(hi, s1), z1));
            }
        }
}
