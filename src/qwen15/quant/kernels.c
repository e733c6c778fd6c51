/* Block-int8 matrix times activations, for decode (M = 1) and small batches (M <= ~16).

   Weights: q int8 [O, K], scale/offset float32 [O, K/B] (offset may be NULL), B = 16 or 32 (any B
   that divides K on the scalar paths): w = q * scale + offset. Output y float32 [M, O].

   Two kernels:
   - blockint8_matmul: float32 activations, exact up to summation order (the reference path).
       y[m, o] = sum_b scale[o,b] * (sum_j q[o,b,j] * x[m,b,j])  +  offset[o,b] * xsum[m,b]
   - blockint8_matmul_q8: activations rounded to int8 per block of 32 (x ~ xq * dx, as llama.cpp's Q8_0
       activations), so the inner product is an integer dot product: four times fewer instructions per
       weight than converting the weights to float, which makes decode memory-bound instead of
       compute-bound. The offset term uses the float block sums of x.

   Parallel over output rows with OpenMP; each weight row is read from memory once and reused from L1 for
   every activation row of a tile. Paths: AVX-512 (exact kernel), AVX2 + FMA (both kernels), plain C.
   The library is built with -march=native on the machine that runs it, so the #if picks the path. */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stddef.h>
#include <stdlib.h>

#define TILE 8

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>

static inline float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}
#endif

/* ---------------------------------------------------------------- exact kernel, float activations */

/* Plain C, any block size: the vector paths' fallback for shapes they do not take. */
static inline void scalar_tile(const int8_t *qrow, const float *srow, const float *x, int K, int B, int MT,
                               float *out) {
    const int nb = K / B;
    for (int m = 0; m < MT; m++) {
        const float *xm = x + (size_t)m * K;
        float r = 0.f;
        for (int b = 0; b < nb; b++) {
            float t = 0.f;
            for (int j = 0; j < B; j++) t += (float)qrow[b * B + j] * xm[b * B + j];
            r += srow[b] * t;
        }
        out[m] = r;
    }
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
#define EXACT_ISA 2

static inline __attribute__((always_inline)) __m512 load_q16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

static inline __attribute__((always_inline)) void exact_tile(
        const int8_t *qrow, const float *srow, const float *x, int K, int B, int MT, float *out) {
    __m512 acc[TILE];
    for (int m = 0; m < MT; m++) acc[m] = _mm512_setzero_ps();
    const int nb = K / B;
    if (MT == 1 && (B == 32 || B == 16) && (K % 64) == 0) {
        /* decode: four independent FMA chains over 64 weights per step (one chain would wait on latency) */
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (int k = 0; k < K; k += 64) {
            __m512 s0, s1, s2, s3;
            if (B == 32) {
                s0 = s1 = _mm512_set1_ps(srow[k / 32]);
                s2 = s3 = _mm512_set1_ps(srow[k / 32 + 1]);
            } else {
                s0 = _mm512_set1_ps(srow[k / 16]); s1 = _mm512_set1_ps(srow[k / 16 + 1]);
                s2 = _mm512_set1_ps(srow[k / 16 + 2]); s3 = _mm512_set1_ps(srow[k / 16 + 3]);
            }
            a0 = _mm512_fmadd_ps(_mm512_mul_ps(load_q16(qrow + k), s0), _mm512_loadu_ps(x + k), a0);
            a1 = _mm512_fmadd_ps(_mm512_mul_ps(load_q16(qrow + k + 16), s1), _mm512_loadu_ps(x + k + 16), a1);
            a2 = _mm512_fmadd_ps(_mm512_mul_ps(load_q16(qrow + k + 32), s2), _mm512_loadu_ps(x + k + 32), a2);
            a3 = _mm512_fmadd_ps(_mm512_mul_ps(load_q16(qrow + k + 48), s3), _mm512_loadu_ps(x + k + 48), a3);
        }
        acc[0] = _mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3));
    } else if (B % 16 == 0) {
        for (int b = 0; b < nb; b++) {
            const __m512 s = _mm512_set1_ps(srow[b]);
            for (int j = 0; j < B; j += 16) {
                const __m512 w = _mm512_mul_ps(load_q16(qrow + b * B + j), s);
                for (int m = 0; m < MT; m++)
                    acc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + (size_t)m * K + b * B + j), acc[m]);
            }
        }
    } else {
        scalar_tile(qrow, srow, x, K, B, MT, out);
        return;
    }
    for (int m = 0; m < MT; m++) out[m] = _mm512_reduce_add_ps(acc[m]);
}

#elif defined(__AVX2__) && defined(__FMA__)
#define EXACT_ISA 1

static inline __attribute__((always_inline)) __m256 load_q8(const int8_t *p) {
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)p)));
}

static inline __attribute__((always_inline)) void exact_tile(
        const int8_t *qrow, const float *srow, const float *x, int K, int B, int MT, float *out) {
    const int nb = K / B;
    if (B % 16 != 0) {
        scalar_tile(qrow, srow, x, K, B, MT, out);
        return;
    }
    __m256 acc[TILE];
    for (int m = 0; m < MT; m++) acc[m] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const __m256 s = _mm256_set1_ps(srow[b]);
        for (int j = 0; j < B; j += 16) {
            const __m256 w0 = _mm256_mul_ps(load_q8(qrow + b * B + j), s);
            const __m256 w1 = _mm256_mul_ps(load_q8(qrow + b * B + j + 8), s);
            for (int m = 0; m < MT; m++) {
                const float *xp = x + (size_t)m * K + b * B + j;
                acc[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp), acc[m]);
                acc[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + 8), acc[m]);
            }
        }
    }
    for (int m = 0; m < MT; m++) out[m] = hsum256(acc[m]);
}

#else
#define EXACT_ISA 0

static inline void exact_tile(const int8_t *qrow, const float *srow, const float *x, int K, int B, int MT,
                              float *out) {
    scalar_tile(qrow, srow, x, K, B, MT, out);
}
#endif

/* sum_b offset[b] * xsum[b], eight blocks at a time where AVX2 is: a chain of nb dependent float adds per
   activation row (152 for a 4864-wide down projection) held the packed Q4_K kernel at 16 rows to 2.9 ms,
   1.5 ms vectorized. The packed kernels call the same function, so both layouts still give the same bits. */
static inline float offset_dot(const float *orow, const float *xs, int nb) {
    int b = 0;
    float o = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
    if (nb >= 8) {
        __m256 a = _mm256_setzero_ps();
        for (; b + 8 <= nb; b += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(orow + b), _mm256_loadu_ps(xs + b), a);
        o = hsum256(a);
    }
#endif
    for (; b < nb; b++) o += orow[b] * xs[b];
    return o;
}

/* The offset term of one weight row for MT activation rows: sum_b offset[b] * xsum[m, b]. */
static inline void add_offsets(const float *orow, const float *xsum, int nb, int MT, float *out) {
    for (int m = 0; m < MT; m++) out[m] += offset_dot(orow, xsum + (size_t)m * nb, nb);
}

#define DISPATCH_TILE(call)                                                      \
    switch (mt) { /* constant row counts keep the accumulators in registers */   \
        case 1: call(1); break; case 2: call(2); break; case 3: call(3); break;  \
        case 4: call(4); break; case 5: call(5); break; case 6: call(6); break;  \
        case 7: call(7); break; default: call(8); break;                        \
    }

/* Output column o of y = x @ W.T for all M activation rows (the unit of work of every parallel split). */
static inline void exact_row(int o, const float *x, const float *xsum, int M, int K, const int8_t *q,
                             const float *scale, const float *offset, int B, int O, float *y) {
    const int nb = K / B;
    const int8_t *qrow = q + (size_t)o * K;
    const float *srow = scale + (size_t)o * nb;
    float out[TILE];
    for (int m0 = 0; m0 < M; m0 += TILE) {
        const int mt = M - m0 < TILE ? M - m0 : TILE;
        const float *xm = x + (size_t)m0 * K;
#define EXACT(n) exact_tile(qrow, srow, xm, K, B, n, out)
        DISPATCH_TILE(EXACT)
        if (offset) add_offsets(offset + (size_t)o * nb, xsum + (size_t)m0 * nb, nb, mt, out);
        for (int m = 0; m < mt; m++) y[(size_t)(m0 + m) * O + o] = out[m];
    }
}

void blockint8_matmul(const float *x, const float *xsum, int M, int K,
                      const int8_t *q, const float *scale, const float *offset, int B, int O,
                      float *y, int nthreads) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int o = 0; o < O; o++) exact_row(o, x, xsum, M, K, q, scale, offset, B, O, y);
}

/* ---------------------------------------------------------------- q8 kernel, int8 activations */

/* x [M, K] -> xq int8 [M, K] and dx [M, K/32]: per block of 32, dx = max|x| / 127, xq = round(x / dx)
   (nearest, ties to even, as torch.round). Zero blocks get dx = 0, xq = 0. */
static void quantize_rows(const float *x, int M, int K, int8_t *xq, float *dx) {
    const int nb = K / 32;
    for (int m = 0; m < M; m++) {
        for (int b = 0; b < nb; b++) {
            const float *xp = x + (size_t)m * K + b * 32;
            int8_t *qp = xq + (size_t)m * K + b * 32;
#if defined(__AVX2__)
            /* the same operations 8 at a time: max is exact in any order, and round_ps to nearest is
               nearbyintf's ties-to-even */
            const __m256 sign = _mm256_set1_ps(-0.f);
            __m256 v[4], mx = _mm256_setzero_ps();
            for (int k = 0; k < 4; k++) {
                v[k] = _mm256_loadu_ps(xp + 8 * k);
                mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[k]));
            }
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            const float amax = _mm_cvtss_f32(h);
            const __m256 id = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            __m256i q[4];
            for (int k = 0; k < 4; k++)
                q[k] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[k], id),
                                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            /* packs work within 128-bit lanes: put the 32 bytes back in order */
            const __m256i p16 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
            _mm256_storeu_si256((__m256i *)qp, _mm256_permutevar8x32_epi32(p16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
            dx[(size_t)m * nb + b] = amax / 127.f;
#else
            float amax = 0.f;
            for (int j = 0; j < 32; j++) amax = fmaxf(amax, fabsf(xp[j]));
            const float d = amax / 127.f;
            const float id = amax > 0.f ? 127.f / amax : 0.f;
            for (int j = 0; j < 32; j++) qp[j] = (int8_t)nearbyintf(xp[j] * id);
            dx[(size_t)m * nb + b] = d;
#endif
        }
    }
}

#if defined(__AVX2__) && defined(__FMA__)
#define Q8_ISA 1

/* 32 signed weights . 32 signed activations -> 8 int32 lanes as float (lane i: elements 4i..4i+3).
   maddubs wants unsigned x signed: |w| times x carrying w's sign. A pair sums to at most
   2 * 128 * 127 < 2^15, so the int16 saturation never triggers. */
static inline __attribute__((always_inline)) __m256 dot32(__m256i aw, __m256i w, __m256i xq) {
    const __m256i p16 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(xq, w));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

static inline __attribute__((always_inline)) __m256 block_scale(const float *srow, int b32, int B, float d) {
    if (B == 32) return _mm256_set1_ps(srow[b32] * d);
    /* B == 16: lanes 0-3 hold the first 16 elements, lanes 4-7 the second 16 */
    return _mm256_set_m128(_mm_set1_ps(srow[2 * b32 + 1] * d), _mm_set1_ps(srow[2 * b32] * d));
}

static inline __attribute__((always_inline)) void q8_tile(
        const int8_t *qrow, const float *srow, const int8_t *xq, const float *dx, int K, int B, int MT,
        float *out) {
    const int nb32 = K / 32;
    __m256 acc[TILE], acc2[TILE];
    for (int m = 0; m < MT; m++) acc[m] = acc2[m] = _mm256_setzero_ps();
    int b = 0;
    for (; b + 1 < nb32; b += 2) {  /* two blocks a step: two independent accumulator chains */
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(qrow + b * 32));
        const __m256i w1 = _mm256_loadu_si256((const __m256i *)(qrow + b * 32 + 32));
        const __m256i a0 = _mm256_sign_epi8(w0, w0), a1 = _mm256_sign_epi8(w1, w1);
        for (int m = 0; m < MT; m++) {
            const int8_t *xp = xq + (size_t)m * K + b * 32;
            const float *dp = dx + (size_t)m * nb32 + b;
            acc[m] = _mm256_fmadd_ps(dot32(a0, w0, _mm256_loadu_si256((const __m256i *)xp)),
                                     block_scale(srow, b, B, dp[0]), acc[m]);
            acc2[m] = _mm256_fmadd_ps(dot32(a1, w1, _mm256_loadu_si256((const __m256i *)(xp + 32))),
                                      block_scale(srow, b + 1, B, dp[1]), acc2[m]);
        }
    }
    if (b < nb32) {
        const __m256i w0 = _mm256_loadu_si256((const __m256i *)(qrow + b * 32));
        const __m256i a0 = _mm256_sign_epi8(w0, w0);
        for (int m = 0; m < MT; m++) {
            const int8_t *xp = xq + (size_t)m * K + b * 32;
            acc[m] = _mm256_fmadd_ps(dot32(a0, w0, _mm256_loadu_si256((const __m256i *)xp)),
                                     block_scale(srow, b, B, dx[(size_t)m * nb32 + b]), acc[m]);
        }
    }
    for (int m = 0; m < MT; m++) out[m] = hsum256(_mm256_add_ps(acc[m], acc2[m]));
}

#else
#define Q8_ISA 0

static inline void q8_tile(const int8_t *qrow, const float *srow, const int8_t *xq, const float *dx,
                           int K, int B, int MT, float *out) {
    const int nb32 = K / 32;
    for (int m = 0; m < MT; m++) {
        const int8_t *xp = xq + (size_t)m * K;
        float r = 0.f;
        for (int b = 0; b < nb32; b++) {
            const float d = dx[(size_t)m * nb32 + b];
            for (int s = 0; s < 32; s += B < 32 ? B : 32) {  /* weight blocks inside this activation block */
                const int n = B < 32 ? B : 32;
                int32_t t = 0;
                for (int j = 0; j < n; j++) t += (int32_t)qrow[b * 32 + s + j] * (int32_t)xp[b * 32 + s + j];
                r += (float)t * (srow[(b * 32 + s) / B] * d);
            }
        }
        out[m] = r;
    }
}
#endif

static inline void q8_row(int o, const int8_t *xq, const float *dx, const float *xsum, int M, int K,
                          const int8_t *q, const float *scale, const float *offset, int B, int O, float *y) {
    const int nb = K / B;
    const int8_t *qrow = q + (size_t)o * K;
    const float *srow = scale + (size_t)o * nb;
    float out[TILE];
    for (int m0 = 0; m0 < M; m0 += TILE) {
        const int mt = M - m0 < TILE ? M - m0 : TILE;
        const int8_t *xm = xq + (size_t)m0 * K;
        const float *dm = dx + (size_t)m0 * (K / 32);
#define Q8(n) q8_tile(qrow, srow, xm, dm, K, B, n, out)
        DISPATCH_TILE(Q8)
        if (offset) add_offsets(offset + (size_t)o * nb, xsum + (size_t)m0 * nb, nb, mt, out);
        for (int m = 0; m < mt; m++) y[(size_t)(m0 + m) * O + o] = out[m];
    }
}

/* Needs K % 32 == 0 and B in {16, 32} (the caller checks). xsum: float block sums over B, or NULL.
   Returns 0, or -1 when the activation buffers cannot be allocated. */
int blockint8_matmul_q8(const float *x, const float *xsum, int M, int K,
                        const int8_t *q, const float *scale, const float *offset, int B, int O,
                        float *y, int nthreads) {
    int8_t *xq = malloc((size_t)M * K);
    float *dx = malloc((size_t)M * (K / 32) * sizeof(float));
    if (!xq || !dx) { free(xq); free(dx); return -1; }
    quantize_rows(x, M, K, xq, dx);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int o = 0; o < O; o++) q8_row(o, xq, dx, xsum, M, K, q, scale, offset, B, O, y);
    free(xq);
    free(dx);
    return 0;
}

/* Activation rounding exactly as the q8 kernel does it (for tests and the PyTorch reference). */
void blockint8_quantize_rows(const float *x, int M, int K, int8_t *xq, float *dx) {
    quantize_rows(x, M, K, xq, dx);
}

/* ---------------------------------------------------------------- dequantize rows, for prefill */

/* Rows of w = q * scale (+ offset) as float32 out [O, K], in one pass (prefill multiplies a panel of
   these with BLAS while it is still in cache, instead of materializing the whole float matrix). */
void blockint8_dequantize(const int8_t *q, const float *scale, const float *offset, int B, int O, int K,
                          float *out, int nthreads) {
    const int nb = K / B;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int o = 0; o < O; o++) {
        const int8_t *qrow = q + (size_t)o * K;
        const float *srow = scale + (size_t)o * nb;
        const float *orow = offset ? offset + (size_t)o * nb : NULL;
        float *dst = out + (size_t)o * K;
        for (int b = 0; b < nb; b++) {
            const float s = srow[b], m = orow ? orow[b] : 0.f;
            for (int j = 0; j < B; j++) dst[b * B + j] = (float)qrow[b * B + j] * s + m;
        }
    }
}

int blockint8_exact_isa(void) { return EXACT_ISA; }
int blockint8_q8_isa(void) { return Q8_ISA; }

#include <string.h>

/* This thread's share [*a, *b) of n items, in chunks of `align` (output rows of a matmul stay in whole tiles). */
static inline void share(int n, int tid, int nt, int align, int *a, int *b) {
    int chunk = (n + nt - 1) / nt;
    chunk = (chunk + align - 1) / align * align;
    *a = tid * chunk < n ? tid * chunk : n;
    *b = *a + chunk < n ? *a + chunk : n;
}

#include "gguf_kernels.c"
#include "layers.c"

/* ---- Dropout without a stored mask (LoRA training) ----
   out[i] = x[i] * scale where hash(seed, i) >= threshold, else 0: element i's fate depends only on the seed
   and i, so backward recomputes the mask (nothing kept for autograd), any thread count gives the same
   mask, and gradient checkpointing's recompute, which replays the seed from the restored RNG, too.
   PyTorch's CPU bernoulli_ draws from one Mersenne Twister at ~10 ns an element: a tenth of a LoRA
   training step of the 0.5B went to dropout masks. The hash is murmur3's 32-bit finalizer of the index
   mixed with the seed (a bijection with full avalanche: keep-rates within 2^-32 of 1 - p). */
static inline uint32_t fmix32(uint32_t k) {
    k ^= k >> 16; k *= 0x85ebca6bu; k ^= k >> 13; k *= 0xc2b2ae35u; k ^= k >> 16;
    return k;
}

void hash_dropout(const float *x, float *out, long n, uint64_t seed, uint32_t threshold, float scale, int nthreads) {
    const uint32_t s_lo = fmix32((uint32_t)seed ^ 0x9e3779b9u);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long c = 0; c < (n + 4095) / 4096; c++) {
        const long i0 = c * 4096, i1 = i0 + 4096 < n ? i0 + 4096 : n;
        const uint32_t s = fmix32(s_lo ^ (uint32_t)(seed >> 32) ^ fmix32((uint32_t)(i0 >> 32)));  /* per 2^32 block */
        long i = i0;
#if defined(__AVX2__)
        const __m256i vs = _mm256_set1_epi32((int)s), thr = _mm256_set1_epi32((int)threshold);
        const __m256i m1 = _mm256_set1_epi32((int)0x85ebca6bu), m2 = _mm256_set1_epi32((int)0xc2b2ae35u);
        const __m256 vscale = _mm256_set1_ps(scale);
        for (; i + 8 <= i1; i += 8) {
            __m256i k = _mm256_xor_si256(_mm256_add_epi32(_mm256_set1_epi32((int)(uint32_t)i),
                                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)), vs);
            k = _mm256_xor_si256(k, _mm256_srli_epi32(k, 16));
            k = _mm256_mullo_epi32(k, m1);
            k = _mm256_xor_si256(k, _mm256_srli_epi32(k, 13));
            k = _mm256_mullo_epi32(k, m2);
            k = _mm256_xor_si256(k, _mm256_srli_epi32(k, 16));
            const __m256i keep = _mm256_cmpeq_epi32(_mm256_max_epu32(k, thr), k);  /* k >= threshold, unsigned */
            _mm256_storeu_ps(out + i, _mm256_and_ps(_mm256_castsi256_ps(keep), _mm256_mul_ps(_mm256_loadu_ps(x + i), vscale)));
        }
#endif
        for (; i < i1; i++) out[i] = fmix32((uint32_t)i ^ s) >= threshold ? x[i] * scale : 0.f;
    }
}
