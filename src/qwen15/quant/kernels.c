/* Block-int8 matrix times activations, for decode (M = 1) and small batches (M <= ~16).

   y[m, o] = sum_b scale[o,b] * (sum_j q[o,b,j] * x[m,b,j])  +  offset[o,b] * xsum[m,b]

   q int8 [O, K], scale/offset float32 [O, K/B], x float32 [M, K], xsum float32 [M, K/B] (only read when
   offset != NULL), y float32 [M, O]. Parallel over output rows with OpenMP; each weight row is read from
   memory once and reused from L1 for every tile of activation rows. AVX-512 when the compiler targets it
   (built with -march=native on the machine that runs it), plain C otherwise. */

#include <stdint.h>
#include <stddef.h>

#define TILE 8

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>

static inline __attribute__((always_inline)) __m512 load_q16(const int8_t *p) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
}

/* One weight row against MT (compile-time after inlining) activation rows; B a multiple of 16. */
static inline __attribute__((always_inline)) void row_tile(
        const int8_t *qrow, const float *srow, const float *orow, const float *x, const float *xsum,
        int K, int B, int MT, float *out) {
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
    } else if (B == 32) {
        for (int b = 0; b < nb; b++) {
            const __m512 s = _mm512_set1_ps(srow[b]);
            const __m512 w0 = _mm512_mul_ps(load_q16(qrow + b * 32), s);
            const __m512 w1 = _mm512_mul_ps(load_q16(qrow + b * 32 + 16), s);
            for (int m = 0; m < MT; m++) {
                const float *xp = x + (size_t)m * K + b * 32;
                acc[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), acc[m]);
                acc[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp + 16), acc[m]);
            }
        }
    } else if (B == 16) {
        for (int b = 0; b < nb; b++) {
            const __m512 w0 = _mm512_mul_ps(load_q16(qrow + b * 16), _mm512_set1_ps(srow[b]));
            for (int m = 0; m < MT; m++)
                acc[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + (size_t)m * K + b * 16), acc[m]);
        }
    } else {
        for (int b = 0; b < nb; b++) {
            const __m512 s = _mm512_set1_ps(srow[b]);
            for (int j = 0; j < B; j += 16) {
                const __m512 w = _mm512_mul_ps(load_q16(qrow + b * B + j), s);
                for (int m = 0; m < MT; m++)
                    acc[m] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + (size_t)m * K + b * B + j), acc[m]);
            }
        }
    }
    for (int m = 0; m < MT; m++) {
        float r = _mm512_reduce_add_ps(acc[m]);
        if (orow) {
            const float *xs = xsum + (size_t)m * nb;
            float o = 0.f;
            for (int b = 0; b < nb; b++) o += orow[b] * xs[b];
            r += o;
        }
        out[m] = r;
    }
}
#define HAVE_AVX512 1
#else
static inline void row_tile(
        const int8_t *qrow, const float *srow, const float *orow, const float *x, const float *xsum,
        int K, int B, int MT, float *out) {
    const int nb = K / B;
    for (int m = 0; m < MT; m++) {
        const float *xm = x + (size_t)m * K;
        float r = 0.f;
        for (int b = 0; b < nb; b++) {
            float t = 0.f;
            for (int j = 0; j < B; j++) t += (float)qrow[b * B + j] * xm[b * B + j];
            r += srow[b] * t;
            if (orow) r += orow[b] * xsum[(size_t)m * nb + b];
        }
        out[m] = r;
    }
}
#define HAVE_AVX512 0
#endif

int blockint8_has_avx512(void) { return HAVE_AVX512; }

void blockint8_matmul(const float *x, const float *xsum, int M, int K,
                      const int8_t *q, const float *scale, const float *offset, int B, int O,
                      float *y, int nthreads) {
    const int nb = K / B;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int o = 0; o < O; o++) {
        const int8_t *qrow = q + (size_t)o * K;
        const float *srow = scale + (size_t)o * nb;
        const float *orow = offset ? offset + (size_t)o * nb : NULL;
        float out[TILE];
        for (int m0 = 0; m0 < M; m0 += TILE) {
            const int mt = M - m0 < TILE ? M - m0 : TILE;
            const float *xm = x + (size_t)m0 * K;
            const float *xs = xsum ? xsum + (size_t)m0 * nb : NULL;
            switch (mt) {  /* constant row counts let the compiler keep the accumulators in registers */
                case 1: row_tile(qrow, srow, orow, xm, xs, K, B, 1, out); break;
                case 2: row_tile(qrow, srow, orow, xm, xs, K, B, 2, out); break;
                case 3: row_tile(qrow, srow, orow, xm, xs, K, B, 3, out); break;
                case 4: row_tile(qrow, srow, orow, xm, xs, K, B, 4, out); break;
                case 5: row_tile(qrow, srow, orow, xm, xs, K, B, 5, out); break;
                case 6: row_tile(qrow, srow, orow, xm, xs, K, B, 6, out); break;
                case 7: row_tile(qrow, srow, orow, xm, xs, K, B, 7, out); break;
                default: row_tile(qrow, srow, orow, xm, xs, K, B, 8, out); break;
            }
            for (int m = 0; m < mt; m++) y[(size_t)(m0 + m) * O + o] = out[m];
        }
    }
}
