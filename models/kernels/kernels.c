// CPU kernels for weight-only quantized weights: matrix-vector products and one whole decoder layer
// per call for batch-1 decode (tandem_layers, at the end), and a fused dequantize + GEMM for prefill.
//
// Weights stay exactly as quantized (Q4_1-style int4 with a scale and a minimum per group, or
// int8 with a scale per group); activations are quantized per block of 32 to int16, so the
// integer dot products lose about 1e-5 of the block's largest value, far below the weights' own
// rounding (llama.cpp quantizes activations to int8 here; int16 keeps us at fp32 fidelity).
//
// Weights arrive packed (layout below, at "The packed weight layout"): int4 codes in GGUF's
// Q4_0/Q4_1 block order, or int8 codes, with an fp16 scale (and for int4 an fp16 minimum) per
// 32-input block, interleaved four rows at a time. Larger groups repeat their scale per block (the
// packer expands them) so the inner loop never divides. w = code * scale (+ minimum for int4).
// y (M, O) = x (M, I) @ W^T, float32. I must be a multiple of 32.
//
// Threads: rows are split across OpenMP threads. The library links the same libgomp.so.1 that
// torch has already loaded, so both share one thread pool instead of spinning against each other.

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#else
static inline int omp_get_num_threads(void) { return 1; }
static inline int omp_get_thread_num(void) { return 0; }
#endif
#ifdef __AVX2__
#include <immintrin.h>
#endif

// Denormal floats (below 1.2e-38) take microcode assists of ~100 cycles each on x86. Softmax
// weights of far-away positions land there (e^-80 times a small value), so every thread flushes
// them to zero (MXCSR is per thread: torch's own setting does not reach our OpenMP workers).
// Each thread restores its own setting before it leaves, so torch's arithmetic is untouched.
#ifdef __SSE2__
#include <xmmintrin.h>
#define FLUSH_DENORMALS_BEGIN() unsigned saved_csr_ = _mm_getcsr(); _mm_setcsr(saved_csr_ | 0x8040)  // FTZ|DAZ
#define FLUSH_DENORMALS_END() _mm_setcsr(saved_csr_)
#else
#define FLUSH_DENORMALS_BEGIN() ((void)0)
#define FLUSH_DENORMALS_END() ((void)0)
#endif

static inline float half_to_float(uint16_t h) {
#ifdef __F16C__
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else {  // subnormal: renormalise
            exp = 127 - 15 + 1;
            while (!(man & 0x400)) { man <<= 1; exp--; }
            bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000 | (man << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

// float -> IEEE fp16 bits, rounding to nearest even (as torch's .half()), for fp16 KV caches.
static inline uint16_t float_to_half(float f) {
#ifdef __F16C__
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffff;
    if (ax >= 0x7f800000) return (uint16_t)(sign | 0x7c00 | (ax > 0x7f800000 ? 0x200 : 0));  // inf, nan
    if (ax >= 0x477ff000) return (uint16_t)(sign | 0x7c00);  // 65520 and up round to inf
    if (ax < 0x38800000) {  // below 2^-14: a subnormal half. Adding 0.5 puts the value where a
        float a;            // float's ulp (2^-24) is the subnormal step, so the add rounds for us.
        memcpy(&a, &ax, 4);
        a += 0.5f;
        uint32_t r;
        memcpy(&r, &a, 4);
        return (uint16_t)(sign | (r - 0x3f000000));
    }
    ax += 0xc8000fff + ((ax >> 13) & 1);  // rebias the exponent (-112 << 23), round to nearest even
    return (uint16_t)(sign | (ax >> 13));
#endif
}

#ifdef __AVX2__
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

// x (I,) -> xq (I,) int16, xs (I/32,) block scales, xsum (I/32,) exact block sums.
static void quantize_x(const float* x, int I, int16_t* xq, float* xs, float* xsum) {
    for (int b = 0; b < I / 32; b++) {
        const float* xb = x + b * 32;
#ifdef __AVX2__
        const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
        __m256 v[4], amax = _mm256_setzero_ps(), sum = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(xb + 8 * k);
            amax = _mm256_max_ps(amax, _mm256_and_ps(v[k], absmask));
            sum = _mm256_add_ps(sum, v[k]);
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float a = _mm_cvtss_f32(m4), inv = a > 0.f ? 32767.f / a : 0.f;
        __m256 scale = _mm256_set1_ps(inv);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], scale)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], scale));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], scale)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], scale));
        // packs interleaves 128-bit lanes; permute restores element order.
        __m256i p01 = _mm256_permute4x64_epi64(_mm256_packs_epi32(i0, i1), 0xd8);
        __m256i p23 = _mm256_permute4x64_epi64(_mm256_packs_epi32(i2, i3), 0xd8);
        _mm256_storeu_si256((__m256i*)(xq + b * 32), p01);
        _mm256_storeu_si256((__m256i*)(xq + b * 32 + 16), p23);
        xs[b] = a / 32767.f;
        xsum[b] = hsum8(sum);
#else
        float amax = 0.f, sum = 0.f;
        for (int i = 0; i < 32; i++) {
            float a = fabsf(xb[i]);
            amax = a > amax ? a : amax;
            sum += xb[i];
        }
        float inv = amax > 0.f ? 32767.f / amax : 0.f;
        for (int i = 0; i < 32; i++) xq[b * 32 + i] = (int16_t)lrintf(xb[i] * inv);
        xs[b] = amax / 32767.f;
        xsum[b] = sum;
#endif
    }
}

// ---- The packed weight layout and matrix-vector products -------------------------------------
//
// A quantized weight (O, I) is packed in groups of 4 output rows (the last group padded with zero
// rows), each group's 32-input blocks one after another, each block holding the 4 rows' scales
// (fp16), for int4 their minima (fp16), then their codes:
//   int4 block: d[4] m[4] codes[4][16]   80 bytes (a row's byte j: code j low nibble, j + 16 high)
//   int8 block: d[4] codes[4][32]        136 bytes
// so a thread computing 4 rows reads one contiguous stream: decode reads ~25% more bytes a second
// than from separate code, scale and minimum arrays (12 streams a thread), which the hardware
// prefetchers did not follow. w = code * d (+ m for int4).
#define BLOCK_BYTES(bits) ((bits) == 4 ? 80 : 136)
#define PREFETCH_AHEAD 2560  // bytes ahead of the block being read (32 int4 blocks): 5% faster than 640 in an in-process A/B

typedef struct {
    int bits;  // 4 or 8
    int rows, cols;
    const uint8_t* packed;  // (ceil(rows/4), cols/32, BLOCK_BYTES(bits))
} QWeight;

static inline const uint8_t* group_at(const QWeight* w, int r) {  // r: a multiple of 4
    return w->packed + (size_t)(r / 4) * (w->cols / 32) * BLOCK_BYTES(w->bits);
}

typedef struct {  // an activation vector quantized for the row kernels
    int16_t* xq;
    float *xs, *xsum;
} Act;

#ifdef __AVX2__
// Integer dot products of one 32-input block (8 int32 lanes to be summed).
static inline __m256i q4_block(const uint8_t* q, const int16_t* xq) {
    // One byte holds codes j and j + 16: widen to 16 bits, then the low and high nibbles are an
    // AND and a shift away, already in the lanes that meet xq[j] and xq[j + 16].
    __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)q));
    __m256i lo = _mm256_madd_epi16(_mm256_and_si256(c, _mm256_set1_epi16(0x0f)), _mm256_loadu_si256((const __m256i*)xq));
    __m256i hi = _mm256_madd_epi16(_mm256_srli_epi16(c, 4), _mm256_loadu_si256((const __m256i*)(xq + 16)));
    return _mm256_add_epi32(lo, hi);
}

static inline __m256i q8_block(const int8_t* q, const int16_t* xq) {
    __m256i lo = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)q)),
                                   _mm256_loadu_si256((const __m256i*)xq));
    __m256i hi = _mm256_madd_epi16(_mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)(q + 16))),
                                   _mm256_loadu_si256((const __m256i*)(xq + 16)));
    return _mm256_add_epi32(lo, hi);
}

// The 4 rows of one packed group into out[0 .. 4). Per block: the 4 scales times the activation's
// block scale in one vector, each row's integer dot product converted and accumulated with its
// own; the int4 minimum term (m * sum of the block's activations) for all 4 rows in one FMA.
static inline __attribute__((always_inline)) void rows4_bits(const int bits, int nb, const uint8_t* g, const Act* a,
                                                              float* out) {
    const int q4 = bits == 4, codes = q4 ? 16 : 8, row = q4 ? 16 : 32;
    __m256 acc[4];
    __m128 am = _mm_setzero_ps();
    for (int r = 0; r < 4; r++) acc[r] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++, g += BLOCK_BYTES(bits)) {
        _mm_prefetch((const char*)g + PREFETCH_AHEAD, _MM_HINT_T0);
        _mm_prefetch((const char*)g + PREFETCH_AHEAD + 64, _MM_HINT_T0);
        __m128 d = _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)g)), _mm_set1_ps(a->xs[b]));
        __m256 d8 = _mm256_set_m128(d, d);
        const int16_t* xb = a->xq + b * 32;
        __m256i s0, s1, s2, s3;
        if (q4) {
            am = _mm_fmadd_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(g + 8))), _mm_set1_ps(a->xsum[b]), am);
            s0 = q4_block(g + codes, xb), s1 = q4_block(g + codes + row, xb);
            s2 = q4_block(g + codes + 2 * row, xb), s3 = q4_block(g + codes + 3 * row, xb);
        } else {
            const int8_t* c = (const int8_t*)(g + codes);
            s0 = q8_block(c, xb), s1 = q8_block(c + row, xb), s2 = q8_block(c + 2 * row, xb), s3 = q8_block(c + 3 * row, xb);
        }
        acc[0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s0), _mm256_permute_ps(d8, 0x00), acc[0]);
        acc[1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s1), _mm256_permute_ps(d8, 0x55), acc[1]);
        acc[2] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s2), _mm256_permute_ps(d8, 0xaa), acc[2]);
        acc[3] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s3), _mm256_permute_ps(d8, 0xff), acc[3]);
    }
    __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));
    __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    _mm_storeu_ps(out, _mm_add_ps(sums, am));
}

// One copy of the loop per width, so neither tests the width at every block.
static void rows4(const QWeight* w, const uint8_t* g, const Act* a, float* out) {
    if (w->bits == 4) {
        rows4_bits(4, w->cols / 32, g, a, out);
    } else {
        rows4_bits(8, w->cols / 32, g, a, out);
    }
}
#else
// The same in plain C (no AVX2: an ARM board's build).
static void rows4(const QWeight* w, const uint8_t* g, const Act* a, float* out) {
    int nb = w->cols / 32, q4 = w->bits == 4;
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
    for (int b = 0; b < nb; b++, g += BLOCK_BYTES(w->bits)) {
        const uint16_t* d = (const uint16_t*)g;
        const int16_t* xb = a->xq + b * 32;
        for (int r = 0; r < 4; r++) {
            int32_t dot = 0;
            if (q4) {
                const uint8_t* c = g + 16 + 16 * r;
                for (int j = 0; j < 16; j++) dot += (c[j] & 0x0f) * xb[j] + (c[j] >> 4) * xb[16 + j];
                acc[r] += half_to_float(d[4 + r]) * a->xsum[b];
            } else {
                const int8_t* c = (const int8_t*)(g + 8 + 32 * r);
                for (int j = 0; j < 32; j++) dot += c[j] * xb[j];
            }
            acc[r] += half_to_float(d[r]) * a->xs[b] * (float)dot;
        }
    }
    memcpy(out, acc, sizeof(acc));
}
#endif

// Rows [r, r + n) of w into out[0 .. n); r is a multiple of 4. A group's rows past n (or past
// the weight: the padding) are computed and dropped.
static void qrows(const QWeight* w, int r, int n, const Act* a, float* out) {
    for (; n > 0; r += 4, n -= 4, out += 4) {
        if (n >= 4) {
            rows4(w, group_at(w, r), a, out);
        } else {
            float last[4];
            rows4(w, group_at(w, r), a, last);
            memcpy(out, last, n * sizeof(float));
        }
    }
}

typedef struct {
    int dim, n_heads, n_kv_heads, head_dim, ffn_dim;
    int qk_norm, sandwich, gelu, window;  // window 0: attend to every earlier position
    float eps, query_scale, attn_softcap;
    QWeight wq, wk, wv, wo, w_gate, w_up, w_down;
    const float *attn_norm, *ffn_norm, *q_norm, *k_norm, *post_attn_norm, *post_ffn_norm;
    void *k_cache, *v_cache;  // (n_kv_heads, max_len, head_dim), this request's cache
    int max_len;
    const float *cos, *sin;  // (max_len, head_dim) RoPE tables of this layer's base
    int kv_half;             // the caches hold fp16 (else float32)
} LayerStep;

// bits 4 or 8. Returns 0, or -1 when I is not a multiple of 32 or memory runs out.
int tandem_qmatvec(int bits, const uint8_t* packed, const float* x, float* y, int M, int O, int I, int nthreads) {
    if (I % 32 || (bits != 4 && bits != 8)) return -1;
    int nb = I / 32;
    int16_t* xq = (int16_t*)aligned_alloc(32, (size_t)M * I * sizeof(int16_t) + 32);
    float* xs = (float*)malloc((size_t)M * nb * sizeof(float));
    float* xsum = (float*)malloc((size_t)M * nb * sizeof(float));
    if (!xq || !xs || !xsum) {
        free(xq), free(xs), free(xsum);
        return -1;
    }
    for (int m = 0; m < M; m++) quantize_x(x + (size_t)m * I, I, xq + (size_t)m * I, xs + m * nb, xsum + m * nb);
    QWeight w = {bits, O, I, packed};
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int g = 0; g < (O + 3) / 4; g++) {
        int r = 4 * g, n = O - r < 4 ? O - r : 4;
        for (int m = 0; m < M; m++) {
            Act a = {xq + (size_t)m * I, xs + m * nb, xsum + m * nb};
            float out[4];
            qrows(&w, r, n, &a, out);
            for (int i = 0; i < n; i++) y[(size_t)m * O + r + i] = out[i];
        }
    }
    free(xq), free(xs), free(xsum);
    return 0;
}

// Row r of w, dequantized into out (I floats).
static void dequant_row(const QWeight* w, int r, float* out) {
    int nb = w->cols / 32, i = r % 4;
    const uint8_t* g = group_at(w, r - i);
    for (int b = 0; b < nb; b++, g += BLOCK_BYTES(w->bits)) {
        float d = half_to_float(((const uint16_t*)g)[i]);
        float* o = out + b * 32;
        if (w->bits == 4) {
            float mn = half_to_float(((const uint16_t*)g)[4 + i]);
            const uint8_t* c = g + 16 + 16 * i;
            for (int j = 0; j < 16; j++) {
                o[j] = (c[j] & 0x0f) * d + mn;
                o[16 + j] = (c[j] >> 4) * d + mn;
            }
        } else {
            const int8_t* c = (const int8_t*)(g + 8 + 32 * i);
            for (int j = 0; j < 32; j++) o[j] = c[j] * d;
        }
    }
}

// Rows rows[0 .. n) of w into out (n, I) float32 (embedding lookups); -1 for a row outside [0, O).
int tandem_dequant_rows(int bits, const uint8_t* packed, const int64_t* rows, int n, float* out, int O, int I) {
    if (I % 32 || (bits != 4 && bits != 8)) return -1;
    for (int i = 0; i < n; i++)
        if (rows[i] < 0 || rows[i] >= O) return -1;
    QWeight w = {bits, O, I, packed};
    for (int i = 0; i < n; i++) dequant_row(&w, (int)rows[i], out + (size_t)i * I);
    return 0;
}

// Dequantize rows [0, O) into out (O, I) float32.
int tandem_dequant(int bits, const uint8_t* packed, float* out, int O, int I, int nthreads) {
    if (I % 32 || (bits != 4 && bits != 8)) return -1;
    QWeight w = {bits, O, I, packed};
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int r = 0; r < O; r++) dequant_row(&w, r, out + (size_t)r * I);
    return 0;
}

// ---- Many tokens at once (prefill): a fused dequantize + fp32 GEMM ----------------------------
//
// y (M, O) = x (M, I) @ W^T with W dequantized 16 output rows at a time into a panel (I, 16) that
// stays in L2, then swept by every group of 6 tokens: a 6x16 tile of y lives in 12 ymm registers
// for the whole of I (per input: 2 panel loads, 6 broadcasts, 12 FMAs). Each weight is
// dequantized once, never written out whole (the separate dequantize wrote 4 bytes a weight and
// the GEMM read them back), and this beats MKL's fp32 GEMM on AMD's AVX2 cores (~50% of peak
// there). Sums run in input order in fp32, as a naive dot product would.
#ifdef __AVX2__
// r[i] holds row i's 8 values; on return r[k] holds value k of the 8 rows.
static inline void transpose8(__m256 r[8]) {
    __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xee);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xee);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xee);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xee);
    r[0] = _mm256_permute2f128_ps(u0, u4, 0x20), r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    r[2] = _mm256_permute2f128_ps(u2, u6, 0x20), r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    r[4] = _mm256_permute2f128_ps(u0, u4, 0x31), r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    r[6] = _mm256_permute2f128_ps(u2, u6, 0x31), r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// Row i of packed group g, block b (32 inputs), dequantized into out[0 .. 32).
static inline void dequant_block(int bits, const uint8_t* g, int i, float* out) {
    __m256 d = _mm256_set1_ps(half_to_float(((const uint16_t*)g)[i]));
    if (bits == 4) {  // byte t holds codes t (low nibble) and t + 16 (high)
        __m256 mn = _mm256_set1_ps(half_to_float(((const uint16_t*)g)[4 + i]));
        __m128i c = _mm_loadu_si128((const __m128i*)(g + 16 + 16 * i));
        __m128i lo = _mm_and_si128(c, _mm_set1_epi8(0x0f)), hi = _mm_and_si128(_mm_srli_epi16(c, 4), _mm_set1_epi8(0x0f));
        __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        for (int p = 0; p < 4; p++)
            _mm256_storeu_ps(out + 8 * p,  // code * d, then + m: the weights dequant_row and torch give
                             _mm256_add_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(parts[p])), d), mn));
    } else {
        const int8_t* c = (const int8_t*)(g + 8 + 32 * i);
        for (int p = 0; p < 4; p++)
            _mm256_storeu_ps(out + 8 * p, _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(c + 8 * p)))), d));
    }
}

// Rows [n0, n0 + 16) of w (n0 a multiple of 16: four packed groups) into bp (I, 16):
// bp[k * 16 + j] = W[n0 + j][k]. Eight rows at a time: each block's 8 x 32 values dequantized,
// then turned 8 x 8 at a time in registers.
static void pack_panel(const QWeight* w, int n0, float* bp) {
    int nb = w->cols / 32;
    float rows[8][32];
    for (int j0 = 0; j0 < 16; j0 += 8) {
        const uint8_t* g0 = group_at(w, n0 + j0);
        const uint8_t* g1 = group_at(w, n0 + j0 + 4);
        for (int b = 0; b < nb; b++) {
            size_t off = (size_t)b * BLOCK_BYTES(w->bits);
            for (int i = 0; i < 4; i++) {
                dequant_block(w->bits, g0 + off, i, rows[i]);
                dequant_block(w->bits, g1 + off, i, rows[4 + i]);
            }
            for (int c = 0; c < 4; c++) {
                __m256 r[8];
                for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(rows[i] + 8 * c);
                transpose8(r);
                float* dst = bp + (size_t)(b * 32 + 8 * c) * 16 + j0;
                for (int k = 0; k < 8; k++) _mm256_storeu_ps(dst + k * 16, r[k]);
            }
        }
    }
}

// y[i][0 .. 16) = x[i] . bp for the MR rows at x (row stride ldx), over I inputs; bp holds 16
// columns a row at row stride ldb; y rows at stride ldy.
static inline __attribute__((always_inline)) void gemm_tile(int MR, const float* x, size_t ldx, int I, const float* bp,
                                                            size_t ldb, float* y, size_t ldy) {
    __m256 c0[6], c1[6];
    for (int i = 0; i < MR; i++) c0[i] = c1[i] = _mm256_setzero_ps();
    for (int k = 0; k < I; k++) {
        __m256 b0 = _mm256_loadu_ps(bp + k * ldb), b1 = _mm256_loadu_ps(bp + k * ldb + 8);
        for (int i = 0; i < MR; i++) {
            __m256 a = _mm256_broadcast_ss(x + i * ldx + k);
            c0[i] = _mm256_fmadd_ps(a, b0, c0[i]);
            c1[i] = _mm256_fmadd_ps(a, b1, c1[i]);
        }
    }
    for (int i = 0; i < MR; i++) {
        _mm256_storeu_ps(y + i * ldy, c0[i]);
        _mm256_storeu_ps(y + i * ldy + 8, c1[i]);
    }
}

// y (M, 16) = x (M, I) . bp (I, 16 columns at row stride ldb): tiles of 6 rows, then the tail.
static void gemm_panel(int M, const float* x, size_t ldx, int I, const float* bp, size_t ldb, float* y, size_t ldy) {
    int m = 0;
    for (; m + 6 <= M; m += 6) gemm_tile(6, x + m * ldx, ldx, I, bp, ldb, y + m * ldy, ldy);
    const float* xm = x + m * ldx;
    float* ym = y + m * ldy;
    switch (M - m) {  // constant row counts, so each tail tile keeps its sums in registers too
        case 5: gemm_tile(5, xm, ldx, I, bp, ldb, ym, ldy); break;
        case 4: gemm_tile(4, xm, ldx, I, bp, ldb, ym, ldy); break;
        case 3: gemm_tile(3, xm, ldx, I, bp, ldb, ym, ldy); break;
        case 2: gemm_tile(2, xm, ldx, I, bp, ldb, ym, ldy); break;
        case 1: gemm_tile(1, xm, ldx, I, bp, ldb, ym, ldy); break;
        default: break;
    }
}
#endif

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define TANDEM_VNNI 1
#endif

#ifdef TANDEM_VNNI
// ---- Prefill GEMM on integer dot products (AVX-512 VNNI) ---------------------------------------
//
// Where the CPU has VNNI, prefill multiplies the weights' own integer codes by activations
// quantized to int16 per block of 32 (as decode's row kernels do, so prefill keeps the same
// fp32-level fidelity): one vpdpwssd is 32 multiply-adds where an fp32 FMA is 16, at the same
// rate (measured on Zen 4). Each block's int32 sums are then scaled in fp32:
// y += (d * xs) * sum(code * xq) (+ m * sum(x) for int4).
#define VNNI_MR 6  // prompt rows a tile: 6 int32 + 6 float sums (8 and 12 were 3-8% slower on Zen 4)

// Rows [n0, n0 + 16) of w as int16 codes, (nb, 16 pairs, 16 rows, 2): each 64-byte line holds
// inputs 2p and 2p + 1 of the 16 rows, the operand of one vpdpwssd; dp, mp (nb, 16) the rows'
// scales and minima as floats.
static void pack_panel_i16(const QWeight* w, int n0, int16_t* wp, float* dp, float* mp) {
    int nb = w->cols / 32;
    int16_t rows[16][32];
    for (int b = 0; b < nb; b++) {
        for (int r = 0; r < 16; r++) {
            const uint8_t* g = group_at(w, n0 + (r & ~3)) + (size_t)b * BLOCK_BYTES(w->bits);
            int i = r & 3;
            dp[b * 16 + r] = half_to_float(((const uint16_t*)g)[i]);
            if (w->bits == 4) {  // byte j: code j (low nibble), code j + 16 (high)
                mp[b * 16 + r] = half_to_float(((const uint16_t*)g)[4 + i]);
                __m256i c = _mm256_cvtepu8_epi16(_mm_loadu_si128((const __m128i*)(g + 16 + 16 * i)));
                _mm256_storeu_si256((__m256i*)rows[r], _mm256_and_si256(c, _mm256_set1_epi16(0x0f)));
                _mm256_storeu_si256((__m256i*)(rows[r] + 16), _mm256_srli_epi16(c, 4));
            } else {
                mp[b * 16 + r] = 0.f;
                _mm512_storeu_si512(rows[r], _mm512_cvtepi8_epi16(_mm256_loadu_si256((const __m256i*)(g + 8 + 32 * i))));
            }
        }
        // (16 rows, 16 pairs) of int32 -> (16 pairs, 16 rows): a gather per pair.
        const __m512i idx = _mm512_setr_epi32(0, 16, 32, 48, 64, 80, 96, 112, 128, 144, 160, 176, 192, 208, 224, 240);
        for (int p = 0; p < 16; p++)
            _mm512_storeu_si512(wp + ((size_t)b * 16 + p) * 32, _mm512_i32gather_epi32(idx, (const int*)rows + p, 4));
    }
}

// y[i][0 .. 16) for the MR quantized prompt rows at xq (row stride I), over nb blocks.
static inline __attribute__((always_inline)) void vnni_tile(int MR, int min, const int16_t* xq, const float* xs,
                                                            const float* xsum, int nb, const int16_t* wp,
                                                            const float* dp, const float* mp, float* y, size_t ldy) {
    __m512 f[VNNI_MR];
    for (int i = 0; i < MR; i++) f[i] = _mm512_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m512i s[VNNI_MR];
        for (int i = 0; i < MR; i++) s[i] = _mm512_setzero_si512();
        const int16_t* wb = wp + (size_t)b * 512;
        for (int p = 0; p < 16; p++) {
            __m512i wv = _mm512_loadu_si512(wb + 32 * p);
            for (int i = 0; i < MR; i++) {
                int32_t pair;
                memcpy(&pair, xq + (size_t)i * nb * 32 + b * 32 + 2 * p, 4);
                s[i] = _mm512_dpwssd_epi32(s[i], wv, _mm512_set1_epi32(pair));
            }
        }
        __m512 d = _mm512_loadu_ps(dp + b * 16);
        for (int i = 0; i < MR; i++) {
            f[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s[i]), _mm512_mul_ps(d, _mm512_set1_ps(xs[i * nb + b])), f[i]);
            if (min) f[i] = _mm512_fmadd_ps(_mm512_loadu_ps(mp + b * 16), _mm512_set1_ps(xsum[i * nb + b]), f[i]);
        }
    }
    for (int i = 0; i < MR; i++) _mm512_storeu_ps(y + i * ldy, f[i]);
}

static void vnni_panel(int min, int M, const int16_t* xq, const float* xs, const float* xsum, int nb,
                       const int16_t* wp, const float* dp, const float* mp, float* y, size_t ldy) {
    int m = 0;
#define VNNI_AT(MR) vnni_tile(MR, min, xq + (size_t)m * nb * 32, xs + (size_t)m * nb, xsum + (size_t)m * nb, nb, wp, dp, mp, y + m * ldy, ldy)
    for (; m + VNNI_MR <= M; m += VNNI_MR) VNNI_AT(VNNI_MR);
    switch (M - m) {  // constant row counts, so the tail's sums stay in registers too
        case 5: VNNI_AT(5); break;
        case 4: VNNI_AT(4); break;
        case 3: VNNI_AT(3); break;
        case 2: VNNI_AT(2); break;
        case 1: VNNI_AT(1); break;
        default: break;
    }
#undef VNNI_AT
}

static int qgemm_vnni(const QWeight* w, const float* x, float* y, int M, int nthreads) {
    int O = w->rows, I = w->cols, nb = I / 32;
    size_t panel = (size_t)nb * 512;  // int16 codes of one 16-row panel
    int16_t* xq = (int16_t*)aligned_alloc(64, ((size_t)M * I * sizeof(int16_t) + 63) / 64 * 64);
    float* xs = (float*)malloc((size_t)M * nb * sizeof(float));
    float* xsum = (float*)malloc((size_t)M * nb * sizeof(float));
    int16_t* wp = (int16_t*)aligned_alloc(64, (size_t)nthreads * panel * sizeof(int16_t));
    float* dmp = (float*)malloc((size_t)nthreads * nb * 32 * sizeof(float));
    if (!xq || !xs || !xsum || !wp || !dmp) {
        free(xq), free(xs), free(xsum), free(wp), free(dmp);
        return -2;
    }
#pragma omp parallel num_threads(nthreads)
    {
        int t = omp_get_thread_num();
#pragma omp for schedule(static)
        for (int m = 0; m < M; m++) quantize_x(x + (size_t)m * I, I, xq + (size_t)m * I, xs + (size_t)m * nb, xsum + (size_t)m * nb);
        int16_t* mine = wp + (size_t)t * panel;
        float *dp = dmp + (size_t)t * nb * 32, *mp = dp + (size_t)nb * 16;
#pragma omp for schedule(static)
        for (int p = 0; p < O / 16; p++) {
            pack_panel_i16(w, p * 16, mine, dp, mp);
            if (w->bits == 4) {
                vnni_panel(1, M, xq, xs, xsum, nb, mine, dp, mp, y + p * 16, O);
            } else {
                vnni_panel(0, M, xq, xs, xsum, nb, mine, dp, mp, y + p * 16, O);
            }
        }
    }
    free(xq), free(xs), free(xsum), free(wp), free(dmp);
    return 0;
}
#endif

// 1 when tandem_qgemm multiplies integer codes by int16 activations (VNNI), 0 for fp32 FMAs.
int tandem_qgemm_integer(void) {
#ifdef TANDEM_VNNI
    return !getenv("TANDEM_QGEMM_FP32");
#else
    return 0;
#endif
}

// bits 4 or 8. Returns 0; -1 when I is not a multiple of 32 or O of 16 (the
// caller dequantizes and runs a dense matmul instead), or when AVX2 is missing; -2 out of memory.
// With AVX-512 VNNI the products are integer (qgemm_vnni, above), else fp32 FMAs over
// dequantized panels.
int tandem_qgemm(int bits, const uint8_t* packed, const float* x, float* y, int M, int O, int I, int nthreads) {
#ifdef __AVX2__
    if (I % 32 || O % 16 || M < 1 || (bits != 4 && bits != 8)) return -1;
    QWeight w = {bits, O, I, packed};
#ifdef TANDEM_VNNI
    if (tandem_qgemm_integer()) return qgemm_vnni(&w, x, y, M, nthreads);
#endif
    size_t panel = (size_t)I * 16;
    float* scratch = (float*)aligned_alloc(32, (size_t)nthreads * panel * sizeof(float));
    if (!scratch) return -2;
#pragma omp parallel num_threads(nthreads)
    {
        float* bp = scratch + (size_t)omp_get_thread_num() * panel;
#pragma omp for schedule(static)
        for (int p = 0; p < O / 16; p++) {
            pack_panel(&w, p * 16, bp);
            gemm_panel(M, x, I, I, bp, 16, y + p * 16, O);
        }
    }
    free(scratch);
    return 0;
#else
    (void)bits, (void)packed, (void)x, (void)y, (void)M, (void)O, (void)I, (void)nthreads;
    return -1;
#endif
}

// ---- One decoder layer for one token (batch 1, T = 1), the whole layer in one call ----------
//
// Mirrors models/transformer.py Block.forward for both families (llama; gemma3 with q/k norms,
// sandwich norms, GELU and sliding windows). Python keeps control of which layers run (layer
// ranges, skipping); this removes the ~15 torch dispatches a layer costs at batch 1.

// out = x / rms(x) * w, like RMSNorm.forward (fp32).
static void rmsnorm(const float* x, const float* w, int n, float eps, float* out) {
    float ss = 0.f;
    int i = 0;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();  // eight partial sums: the sequential sum is latency-bound
    for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(x + i), acc);
    ss = hsum8(acc);
#endif
    for (; i < n; i++) ss += x[i] * x[i];
    float inv = 1.f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[i] = x[i] * inv * w[i];
}

// Rotate-half RoPE on one head, in place.
static void rope(float* x, const float* cos, const float* sin, int hd) {
    int half = hd / 2;
    for (int i = 0; i < half; i++) {
        float x1 = x[i], x2 = x[i + half];
        x[i] = x1 * cos[i] - x2 * sin[i];
        x[i + half] = x2 * cos[i + half] + x1 * sin[i + half];
    }
}

// Dot product of two float vectors (the compiler keeps a scalar loop's order, so vectorize here).
static float dot(const float* a, const float* b, int n) {
    int j = 0;
    float t = 0.f;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps();
    for (; j + 8 <= n; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc);
    t = hsum8(acc);
#endif
    for (; j < n; j++) t += a[j] * b[j];
    return t;
}

#ifdef __AVX2__
// exp of 8 floats: 2^n * e^r with n = round(x / ln 2) and a degree-6 polynomial for e^r on
// |r| <= ln2/2 (Cephes' coefficients; about 1e-7 relative, like expf). Inputs are clamped to
// the range where the result is a normal float or 0.
static inline __m256 exp8(__m256 x) {
    x = _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(88.3762626647949f)), _mm256_set1_ps(-87.3365478515625f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(0.693359375f)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(-2.12194440e-4f)));
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}
#endif

// s[i] = exp(s[i] - mx) for i < n; returns their sum.
static float exp_shift_sum(float* s, int n, float mx) {
    int i = 0;
    float sum = 0.f;
#ifdef __AVX2__
    __m256 acc = _mm256_setzero_ps(), m = _mm256_set1_ps(mx);
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), m));
        _mm256_storeu_ps(s + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    sum = hsum8(acc);
#endif
    for (; i < n; i++) {
        s[i] = expf(s[i] - mx);
        sum += s[i];
    }
    return sum;
}

// out (n,) += p * v (n,)
static void axpy(float* out, float p, const float* v, int n) {
    int j = 0;
#ifdef __AVX2__
    __m256 pv = _mm256_set1_ps(p);
    for (; j + 8 <= n; j += 8) _mm256_storeu_ps(out + j, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + j), _mm256_loadu_ps(out + j)));
#endif
    for (; j < n; j++) out[j] += p * v[j];
}

// Cached keys and values are float32 or fp16 (half != 0); row t of a head starts at t * hd.
static inline float cache_at(const void* base, size_t i, int half) {
    return half ? half_to_float(((const uint16_t*)base)[i]) : ((const float*)base)[i];
}

#ifdef __AVX2__
static inline __m256 load8_f32(const void* base, size_t i) { return _mm256_loadu_ps((const float*)base + i); }
static inline __m256 load8_f16(const void* base, size_t i) {
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)((const uint16_t*)base + i)));
}

// Eight positions at a time: eight independent FMA chains, reduced together by one hadd tree
// (a per-position horizontal sum would serialise on its latency). Returns the next position.
#define SCORES8(NAME, LOAD)                                                                                \
    static int NAME(const float* qh, const void* kh, int hd, int t, int t1, float scale, float* sc) {     \
        for (; t + 8 <= t1; t += 8) {                                                                      \
            __m256 acc[8];                                                                                 \
            _Pragma("GCC unroll 8") for (int p = 0; p < 8; p++) acc[p] = _mm256_setzero_ps();              \
            for (int j = 0; j < hd; j += 8) {                                                              \
                __m256 qv = _mm256_loadu_ps(qh + j);                                                       \
                _Pragma("GCC unroll 8") for (int p = 0; p < 8; p++) acc[p] =                               \
                    _mm256_fmadd_ps(qv, LOAD(kh, (size_t)(t + p) * hd + j), acc[p]);                       \
            }                                                                                              \
            __m256 h0 = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));    \
            __m256 h1 = _mm256_hadd_ps(_mm256_hadd_ps(acc[4], acc[5]), _mm256_hadd_ps(acc[6], acc[7]));    \
            __m256 s8 = _mm256_add_ps(_mm256_permute2f128_ps(h0, h1, 0x20), _mm256_permute2f128_ps(h0, h1, 0x31)); \
            _mm256_storeu_ps(sc + t, _mm256_mul_ps(s8, _mm256_set1_ps(scale)));                            \
        }                                                                                                  \
        return t;                                                                                          \
    }
SCORES8(scores8_f32, load8_f32)
SCORES8(scores8_f16, load8_f16)

// out[j0 .. j0 + 64) = sum over t of p[t] * v_t: the output stays in eight registers instead of
// a load and a store per position.
#define VALUES64(NAME, LOAD)                                                                               \
    static void NAME(const float* p, const void* vh, int hd, int j0, int t0, int t1, float* out) {         \
        __m256 acc[8];                                                                                     \
        _Pragma("GCC unroll 8") for (int k = 0; k < 8; k++) acc[k] = _mm256_setzero_ps();                  \
        for (int t = t0; t < t1; t++) {                                                                    \
            __m256 pt = _mm256_set1_ps(p[t]);                                                              \
            _Pragma("GCC unroll 8") for (int k = 0; k < 8; k++) acc[k] =                                   \
                _mm256_fmadd_ps(pt, LOAD(vh, (size_t)t * hd + j0 + 8 * k), acc[k]);                        \
        }                                                                                                  \
        _Pragma("GCC unroll 8") for (int k = 0; k < 8; k++) _mm256_storeu_ps(out + j0 + 8 * k, acc[k]);    \
    }
VALUES64(values64_f32, load8_f32)
VALUES64(values64_f16, load8_f16)
#endif

// sc[t] = scale * q . k_t for t in [t0, t1), then the optional tanh softcap.
static void head_scores(const float* qh, const void* kh, int half, int hd, int t0, int t1, float scale,
                        float softcap, float* sc) {
    int t = t0;
#ifdef __AVX2__
    if (hd % 8 == 0) t = half ? scores8_f16(qh, kh, hd, t, t1, scale, sc) : scores8_f32(qh, kh, hd, t, t1, scale, sc);
#endif
    for (; t < t1; t++) {
        float d = 0.f;
        if (half) {
            for (int j = 0; j < hd; j++) d += qh[j] * cache_at(kh, (size_t)t * hd + j, 1);
        } else {
            d = dot(qh, (const float*)kh + (size_t)t * hd, hd);
        }
        sc[t] = d * scale;
    }
    if (softcap > 0.f) {
        for (t = t0; t < t1; t++) sc[t] = tanhf(sc[t] / softcap) * softcap;
    }
}

// out (hd,) = sum over t in [t0, t1) of p[t] * v_t.
static void head_values(const float* p, const void* vh, int half, int hd, int t0, int t1, float* out) {
#ifdef __AVX2__
    if (hd % 64 == 0) {
        for (int j0 = 0; j0 < hd; j0 += 64) {
            if (half) {
                values64_f16(p, vh, hd, j0, t0, t1, out);
            } else {
                values64_f32(p, vh, hd, j0, t0, t1, out);
            }
        }
        return;
    }
#endif
    for (int j = 0; j < hd; j++) out[j] = 0.f;
    for (int t = t0; t < t1; t++) {
        if (half) {
            for (int j = 0; j < hd; j++) out[j] += p[t] * cache_at(vh, (size_t)t * hd + j, 1);
        } else {
            axpy(out, p[t], (const float*)vh + (size_t)t * hd, hd);
        }
    }
}

// Row `pos` of a head's cache <- x (hd,), converted to the cache's type.
static void cache_write(void* base, int half, size_t row, const float* x, int hd) {
    if (!half) {
        memcpy((float*)base + row * hd, x, hd * sizeof(float));
        return;
    }
    uint16_t* out = (uint16_t*)base + row * hd;
    int j = 0;
#if defined(__AVX2__) && defined(__F16C__)
    for (; j + 8 <= hd; j += 8)
        _mm_storeu_si128((__m128i*)(out + j),
                         _mm256_cvtps_ph(_mm256_loadu_ps(x + j), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
#endif
    for (; j < hd; j++) out[j] = float_to_half(x[j]);
}

static float gelu_tanh(float x) {
    return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}

// gate[i] <- act(gate[i]) * up[i] for i in [lo, hi): SiLU x / (1 + e^-x), or tanh-GELU with
// tanh(u) = 1 - 2 / (e^2u + 1); eight at a time through exp8.
static void glu_range(float* gate, const float* up, long lo, long hi, int gelu) {
    long i = lo;
#ifdef __AVX2__
    const __m256 one = _mm256_set1_ps(1.f), two = _mm256_set1_ps(2.f);
    for (; i + 8 <= hi; i += 8) {
        __m256 x = _mm256_loadu_ps(gate + i), a;
        if (gelu) {
            __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.7978845608028654f),
                                     _mm256_add_ps(x, _mm256_mul_ps(_mm256_set1_ps(0.044715f),
                                                                    _mm256_mul_ps(x, _mm256_mul_ps(x, x)))));
            __m256 t = _mm256_sub_ps(one, _mm256_div_ps(two, _mm256_add_ps(exp8(_mm256_mul_ps(two, u)), one)));
            a = _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(one, t));
        } else {
            a = _mm256_div_ps(x, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
        }
        _mm256_storeu_ps(gate + i, _mm256_mul_ps(a, _mm256_loadu_ps(up + i)));
    }
#endif
    for (; i < hi; i++) {
        float g = gate[i];
        gate[i] = (gelu ? gelu_tanh(g) : g / (1.f + expf(-g))) * up[i];
    }
}

#define MAX_PARTS 4  // a head's cached positions split at most this many ways in decode attention

// Scratch of one tandem_layers call. Shared: what threads hand each other. Private (one per thread):
// values every thread computes for itself because they are cheaper than a barrier (the normed,
// quantized input of a projection; the merged attention output; the residual after attention).
typedef struct {
    float *q, *k, *v, *p1, *gate, *up, *p2, *scores, *pm, *ps, *po;
    Act down_in;  // the gated activation, quantized block by block by whichever thread made it
} Shared;

typedef struct {
    float *xn, *hres, *att;
    Act act;
} Private;

// rows [0, n) of w in units of 4 rows shared out across the team (an orphaned omp for).
static void team_rows(const QWeight* w, int n, const Act* a, float* out) {
#pragma omp for schedule(static)
    for (int g = 0; g < (n + 3) / 4; g++) qrows(w, 4 * g, n - 4 * g < 4 ? n - 4 * g : 4, a, out + 4 * g);
}

// q, k or v of one head: rows, q/k norm, RoPE, and for k and v the write into this layer's cache.
static void project_head(const LayerStep* L, int u, int pos, const Shared* sh, const Private* me) {
    int H = L->n_heads, K = L->n_kv_heads, hd = L->head_dim;
    const float* c = L->cos + (size_t)pos * hd;
    const float* s = L->sin + (size_t)pos * hd;
    if (u < H) {
        float* x = sh->q + u * hd;
        qrows(&L->wq, u * hd, hd, &me->act, x);
        if (L->qk_norm) rmsnorm(x, L->q_norm, hd, L->eps, x);
        rope(x, c, s, hd);
    } else if (u < H + K) {
        int i = u - H;
        float* x = sh->k + i * hd;
        qrows(&L->wk, i * hd, hd, &me->act, x);
        if (L->qk_norm) rmsnorm(x, L->k_norm, hd, L->eps, x);
        rope(x, c, s, hd);
        cache_write(L->k_cache, L->kv_half, (size_t)i * L->max_len + pos, x, hd);
    } else {
        int i = u - H - K;
        float* x = sh->v + i * hd;
        qrows(&L->wv, i * hd, hd, &me->act, x);
        cache_write(L->v_cache, L->kv_half, (size_t)i * L->max_len + pos, x, hd);
    }
}

// One decoder layer, run by every thread of the team (the work-shared loops inside are orphaned
// omp for's). Five barriers a layer, each at the end of one: the heads' projections, the attention
// parts, the output projection, the MLP's gate and up half, and its down projection.
static void layer_team(const LayerStep* L, float* h, int pos, const Shared* sh, const Private* me) {
    int D = L->dim, H = L->n_heads, K = L->n_kv_heads, hd = L->head_dim, F = L->ffn_dim;
    int lo = L->window > 0 && pos - L->window + 1 > 0 ? pos - L->window + 1 : 0;
    int n_ctx = pos + 1 - lo;
    int S = n_ctx >= 256 ? MAX_PARTS : (n_ctx >= 64 ? 2 : 1);  // parts of each head's positions

    rmsnorm(h, L->attn_norm, D, L->eps, me->xn);
    quantize_x(me->xn, D, me->act.xq, me->act.xs, me->act.xsum);
#pragma omp for schedule(static)
    for (int u = 0; u < H + 2 * K; u++) project_head(L, u, pos, sh, me);

    // Attention: each head's cached positions [lo, pos] in S parts (so 2 threads share 9 heads
    // evenly); each part keeps its own max, sum of exponentials and unnormalised output, merged
    // per head below (the split-softmax merge of flash decoding). Units run kv group by group and
    // part by part, so a group's query heads read the same K and V rows while they are in cache.
#pragma omp for schedule(static)
    for (int u = 0; u < H * S; u++) {
        int hpg = H / K, g = u / (S * hpg), part = (u / hpg) % S, i = g * hpg + u % hpg;
        int t0 = n_ctx * part / S, t1 = n_ctx * (part + 1) / S;
        size_t first = ((size_t)g * L->max_len + lo) * hd, bytes = L->kv_half ? 2 : 4;
        const char* kg = (const char*)L->k_cache + first * bytes;
        const char* vg = (const char*)L->v_cache + first * bytes;
        float* sc = sh->scores + (size_t)i * n_ctx;
        head_scores(sh->q + i * hd, kg, L->kv_half, hd, t0, t1, L->query_scale, L->attn_softcap, sc);
        float mx = -INFINITY;
        for (int t = t0; t < t1; t++) mx = sc[t] > mx ? sc[t] : mx;
        int w = i * S + part;
        sh->pm[w] = mx;
        sh->ps[w] = t1 > t0 ? exp_shift_sum(sc + t0, t1 - t0, mx) : 0.f;
        head_values(sc, vg, L->kv_half, hd, t0, t1, sh->po + (size_t)w * hd);
    }
    // Every thread merges every head for itself: cheaper than a barrier.
    for (int i = 0; i < H; i++) {
        float m = -INFINITY, total = 0.f;
        for (int part = 0; part < S; part++) m = sh->pm[i * S + part] > m ? sh->pm[i * S + part] : m;
        float* out = me->att + i * hd;
        for (int j = 0; j < hd; j++) out[j] = 0.f;
        for (int part = 0; part < S; part++) {
            if (sh->ps[i * S + part] == 0.f) continue;  // an empty part
            float w = expf(sh->pm[i * S + part] - m);
            total += w * sh->ps[i * S + part];
            axpy(out, w, sh->po + (size_t)(i * S + part) * hd, hd);
        }
        for (int j = 0; j < hd; j++) out[j] /= total;
    }
    quantize_x(me->att, H * hd, me->act.xq, me->act.xs, me->act.xsum);
    team_rows(&L->wo, D, &me->act, sh->p1);

    // Residual and the MLP's input, each thread its own copy (h is only written after the next
    // barrier, by the down projection's rows).
    const float* attn_out = sh->p1;
    if (L->sandwich) {
        rmsnorm(sh->p1, L->post_attn_norm, D, L->eps, me->xn);
        attn_out = me->xn;
    }
    for (int i = 0; i < D; i++) me->hres[i] = h[i] + attn_out[i];
    rmsnorm(me->hres, L->ffn_norm, D, L->eps, me->xn);
    quantize_x(me->xn, D, me->act.xq, me->act.xs, me->act.xsum);
    // Gate and up rows 32 at a time, then their activation and its quantization for the down
    // projection: all in one loop, so no barrier sits between them.
#pragma omp for schedule(static)
    for (int c = 0; c < F / 32; c++) {
        qrows(&L->w_gate, 32 * c, 32, &me->act, sh->gate + 32 * c);
        qrows(&L->w_up, 32 * c, 32, &me->act, sh->up + 32 * c);
        glu_range(sh->gate, sh->up, 32L * c, 32L * c + 32, L->gelu);
        quantize_x(sh->gate + 32 * c, 32, sh->down_in.xq + 32 * c, sh->down_in.xs + c, sh->down_in.xsum + c);
    }
    if (!L->sandwich) {
#pragma omp for schedule(static)
        for (int g = 0; g < (D + 3) / 4; g++) {
            int r = 4 * g, n = D - r < 4 ? D - r : 4;
            qrows(&L->w_down, r, n, &sh->down_in, sh->p2 + r);
            for (int i = r; i < r + n; i++) h[i] = me->hres[i] + sh->p2[i];
        }
        return;
    }
    team_rows(&L->w_down, D, &sh->down_in, sh->p2);
    float ss = 0.f;  // rmsnorm's sum, computed by every thread in the same order
    for (int i = 0; i < D; i++) ss += sh->p2[i] * sh->p2[i];
    float inv = 1.f / sqrtf(ss / D + L->eps);
#pragma omp for schedule(static)
    for (int i = 0; i < D; i++) h[i] = me->hres[i] + sh->p2[i] * inv * L->post_ffn_norm[i];
}

// Layers steps[0 .. n) on T tokens h (T, dim) in place, at cache slots pos, pos+1, ..., pos+T-1:
// one parallel region for all of them. Every layer must share dim, heads and widths (one model's
// layers do). skip: NULL, or n flags; a layer whose flag is set neither runs nor reads or writes
// its cache (early layer skipping: its caches need not even be bound).
// Layer by layer, token by token within a layer: each token's arithmetic is exactly what T = 1
// computes for it alone (at layer l, token t reads the slots tokens before it wrote at that layer,
// as one-token-at-a-time decode would), while a layer's weights are fetched from memory once and
// re-read from cache for the next tokens (a self-speculative verify pass, bit-identical to decode).
// Returns 0; -1 for a position outside a cache or widths the kernels cannot run; -2 out of memory.
int tandem_layers_tokens(const LayerStep* steps, int n, const uint8_t* skip, float* h, int T, int pos,
                         int nthreads) {
    if (n <= 0 || T <= 0) return 0;
    const LayerStep* L0 = steps;
    int D = L0->dim, H = L0->n_heads, K = L0->n_kv_heads, hd = L0->head_dim, F = L0->ffn_dim, qd = H * hd;
    if (D % 32 || qd % 32 || F % 32 || hd % 4 || K <= 0 || H % K) return -1;  // rows go in groups of 4
    for (int l = 0; l < n; l++) {
        if (skip && skip[l]) continue;
        const LayerStep* L = steps + l;
        if (pos < 0 || pos + T > L->max_len || L->dim != D || L->n_heads != H || L->n_kv_heads != K ||
            L->head_dim != hd || L->ffn_dim != F)
            return -1;
    }
    int n_ctx = pos + T, S = MAX_PARTS, wide = qd > D ? qd : D;  // the last token's context
    if (nthreads < 1) nthreads = 1;
    size_t shared_floats = (size_t)qd + 2 * (size_t)K * hd + D + 2 * (size_t)F + D + (size_t)H * n_ctx +
                           (size_t)H * S * (hd + 2) + (size_t)F / 32 * 2;
    size_t private_floats = 2 * (size_t)wide + qd + (size_t)wide / 32 * 2;
    float* sbuf = (float*)malloc(shared_floats * sizeof(float));
    float* pbuf = (float*)malloc(private_floats * nthreads * sizeof(float));
    int16_t* xqbuf = (int16_t*)aligned_alloc(32, ((size_t)F + (size_t)wide * nthreads) * sizeof(int16_t) + 64);
    if (!sbuf || !pbuf || !xqbuf) {
        free(sbuf), free(pbuf), free(xqbuf);
        return -2;
    }
    Shared sh;
    sh.q = sbuf, sh.k = sh.q + qd, sh.v = sh.k + K * hd, sh.p1 = sh.v + K * hd;
    sh.gate = sh.p1 + D, sh.up = sh.gate + F, sh.p2 = sh.up + F, sh.scores = sh.p2 + D;
    sh.pm = sh.scores + (size_t)H * n_ctx, sh.ps = sh.pm + H * S, sh.po = sh.ps + H * S;
    sh.down_in.xq = xqbuf, sh.down_in.xs = sh.po + (size_t)H * S * hd, sh.down_in.xsum = sh.down_in.xs + F / 32;

#pragma omp parallel num_threads(nthreads)
    {
        FLUSH_DENORMALS_BEGIN();
        int id = omp_get_thread_num();
        float* mine = pbuf + private_floats * id;
        float* act_s = mine + 2 * wide + qd;
        Private me = {mine, mine + wide, mine + 2 * wide, {xqbuf + F + (size_t)wide * id, act_s, act_s + wide / 32}};
        for (int l = 0; l < n; l++)  // each layer_team ends on a barrier; every thread skips alike
            if (!skip || !skip[l])
                for (int t = 0; t < T; t++) layer_team(steps + l, h + (size_t)t * D, pos + t, &sh, &me);
        FLUSH_DENORMALS_END();
    }
    free(sbuf), free(pbuf), free(xqbuf);
    return 0;
}

// One token: tandem_layers_tokens with T = 1 (decode's one C call a token).
int tandem_layers(const LayerStep* steps, int n, const uint8_t* skip, float* h, int pos, int nthreads) {
    return tandem_layers_tokens(steps, n, skip, h, 1, pos, nthreads);
}

// ---- Elementwise pieces of prefill (many tokens), in place: one pass instead of several ops --

// x (T, H, hd): rotate-half RoPE of every head of token t with cos/sin row t (T, hd).
int tandem_rope_rows(float* x, const float* cos, const float* sin, int T, int H, int hd, int nthreads) {
    if (hd % 2) return -1;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int t = 0; t < T; t++) {
        for (int h = 0; h < H; h++) rope(x + ((size_t)t * H + h) * hd, cos + (size_t)t * hd, sin + (size_t)t * hd, hd);
    }
    return 0;
}

// gate (n,) <- act(gate) * up, act SiLU or tanh-GELU.
int tandem_glu(float* gate, const float* up, long n, int gelu, int nthreads) {
    long chunk = 1 << 14;
#pragma omp parallel for schedule(static) num_threads(nthreads)
    for (long c = 0; c < (n + chunk - 1) / chunk; c++) glu_range(gate, up, c * chunk, c + 1 < (n + chunk - 1) / chunk ? (c + 1) * chunk : n, gelu);
    return 0;
}

// ---- Causal attention over a prompt (prefill) ------------------------------------------------
//
// q (T, H, hd) float32 as the projections wrote it; k, v: this layer's cache (K, kv_stride, hd),
// fp16 (kv_half) or float32, holding slots [0, p0 + T); out (T, H, hd). Query t, at position
// p0 + t, attends keys [0, p0 + t], or with a sliding window w > 0 the last w of them (no
// soft-cap: the caller checks). Each unit of work
// is one kv group and one block of 32 queries: scores for each of the group's query heads are a
// GEMM against the group's keys transposed into 16-key panels (done once a call), and the output
// a GEMM of the softmaxed scores against the values. Blocks past the diagonal are never computed
// (torch's CPU flash attention reached ~35 GFLOPS on these shapes; this runs at GEMM speed).
#define ATT_BQ 32

#ifdef __AVX2__
// s[i] = exp(scale * (s[i] - max s)) for i < n (scale > 0: the max of the scaled scores is the
// scaled max); returns their sum, by which the caller divides.
static float softmax_weights(float* s, int n, float scale) {
    __m256 m8 = _mm256_set1_ps(-INFINITY);
    int i = 0;
    for (; i + 8 <= n; i += 8) m8 = _mm256_max_ps(m8, _mm256_loadu_ps(s + i));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    float mx = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    for (; i < n; i++) mx = s[i] > mx ? s[i] : mx;
    __m256 acc = _mm256_setzero_ps(), mm = _mm256_set1_ps(mx), sc = _mm256_set1_ps(scale);
    float sum = 0.f;
    for (i = 0; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(s + i), mm), sc));
        _mm256_storeu_ps(s + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    for (; i < n; i++) {
        s[i] = expf(scale * (s[i] - mx));
        sum += s[i];
    }
    return sum + hsum8(acc);
}
#endif

int tandem_prefill_attention(const float* q, const void* k, const void* v, int kv_half, long kv_stride, float* out,
                             int T, int p0, int H, int K, int hd, float scale, int window, int nthreads) {
#ifdef __AVX2__
    if (T < 1 || p0 < 0 || K < 1 || H % K || hd % 16 || window < 0 || (long)p0 + T > kv_stride) return -1;
    int L = p0 + T, Lp = (L + 15) / 16 * 16, hpg = H / K, nq = (T + ATT_BQ - 1) / ATT_BQ;
    size_t group = (size_t)hd * Lp, per_thread = (size_t)ATT_BQ * Lp + ATT_BQ;
    float* shared = (float*)aligned_alloc(32, (2 * group * K + per_thread * nthreads) * sizeof(float) + 32);
    if (!shared) return -2;
    float *kt = shared, *vf = kt + group * K;  // K^T panels and fp32 values of every group
#pragma omp parallel num_threads(nthreads)
    {
        FLUSH_DENORMALS_BEGIN();
        // kt[g][j / 16][d][j % 16] = k[g][j][d], zero for j >= L; vf[g][j][d] = v[g][j][d].
#pragma omp for schedule(static)
        for (int u = 0; u < K * (Lp / 16); u++) {
            int g = u / (Lp / 16), j0 = 16 * (u % (Lp / 16));
            float* panel = kt + g * group + (size_t)j0 * hd;
            for (int jj = 0; jj < 16; jj++) {
                int j = j0 + jj;
                size_t row = ((size_t)g * kv_stride + j) * hd;
                float* vrow = vf + g * group + (size_t)j * hd;
                float krow[hd];
                for (int d = 0; d < hd; d += 8) {
                    __m256 kk = _mm256_setzero_ps(), vv = _mm256_setzero_ps();
                    if (j < L) {
                        kk = kv_half ? load8_f16(k, row + d) : load8_f32(k, row + d);
                        vv = kv_half ? load8_f16(v, row + d) : load8_f32(v, row + d);
                    }
                    _mm256_storeu_ps(krow + d, kk);
                    _mm256_storeu_ps(vrow + d, vv);
                }
                for (int d = 0; d < hd; d++) panel[d * 16 + jj] = krow[d];
            }
        }
        float* sc = shared + 2 * group * K + per_thread * omp_get_thread_num();
        float* sums = sc + (size_t)ATT_BQ * Lp;
#pragma omp for schedule(dynamic, 1)
        for (int u = 0; u < K * nq; u++) {
            int g = u % K, qb = nq - 1 - u / K;  // the longest blocks first
            int t0 = qb * ATT_BQ, t1 = t0 + ATT_BQ < T ? t0 + ATT_BQ : T, m = t1 - t0;
            int n = p0 + t1, np = (n + 15) / 16 * 16;  // keys [0, n) reach the block's last query
            for (int i = 0; i < hpg; i++) {
                int h = g * hpg + i;
                const float* qh = q + ((size_t)t0 * H + h) * hd;
                for (int p = 0; p < np / 16; p++)
                    gemm_panel(m, qh, (size_t)H * hd, hd, kt + g * group + (size_t)p * hd * 16, 16, sc + p * 16, Lp);
                for (int t = 0; t < m; t++) {
                    float* row = sc + (size_t)t * Lp;
                    int valid = p0 + t0 + t + 1, lo = window > 0 && valid > window ? valid - window : 0;
                    sums[t] = softmax_weights(row + lo, valid - lo, scale);
                    for (int j = 0; j < lo; j++) row[j] = 0.f;
                    for (int j = valid; j < np; j++) row[j] = 0.f;
                }
                float* oh = out + ((size_t)t0 * H + h) * hd;
                for (int d0 = 0; d0 < hd; d0 += 16) gemm_panel(m, sc, Lp, n, vf + g * group + d0, hd, oh + d0, (size_t)H * hd);
                for (int t = 0; t < m; t++) {
                    float inv = 1.f / sums[t];
                    for (int d = 0; d < hd; d++) oh[(size_t)t * H * hd + d] *= inv;
                }
            }
        }
        FLUSH_DENORMALS_END();
    }
    free(shared);
    return 0;
#else
    (void)q, (void)k, (void)v, (void)kv_half, (void)kv_stride, (void)out, (void)T, (void)p0, (void)H, (void)K, (void)hd;
    (void)scale, (void)window, (void)nthreads;
    return -1;
#endif
}

// out (T, D) = RMSNorm of each row of x (T, D) with weight w, as RMSNorm.forward (fp32): the
// prompt's norms in one pass instead of torch's five ops over (T, D) tensors.
int tandem_rmsnorm_rows(const float* x, const float* w, float* out, int T, int D, float eps, int nthreads) {
    if (T < 1 || D < 1) return -1;
#pragma omp parallel for schedule(static) num_threads(nthreads) if (T > 16)
    for (int t = 0; t < T; t++) rmsnorm(x + (size_t)t * D, w, D, eps, out + (size_t)t * D);
    return 0;
}
