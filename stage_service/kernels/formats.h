/* What qlinear.c and layer.c share: the formats of matrices and activations (cpu_kernels.py:
 * FORMATS), 8 values of one as float32, one value as float32, a horizontal sum. */
#include <immintrin.h>
#include <stdint.h>

enum { Q8 = 0, Q4 = 1, F32 = 2, BF16 = 3, F16 = 4 };

static inline float hsum(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* elements i .. i + 7 of p, in format fmt (F32, BF16 or F16) */
static inline __attribute__((always_inline)) __m256 load8(int64_t fmt, const void *p, int64_t i) {
    if (fmt == F32) return _mm256_loadu_ps((const float *)p + i);
    __m128i v = _mm_loadu_si128((const __m128i *)((const uint16_t *)p + i));
    if (fmt == F16) return _mm256_cvtph_ps(v);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

static inline __attribute__((always_inline)) float load1(int64_t fmt, const void *p, int64_t i) {
    if (fmt == F32) return ((const float *)p)[i];
    uint16_t h = ((const uint16_t *)p)[i];
    if (fmt == F16) return _cvtsh_ss(h);
    uint32_t u = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}
