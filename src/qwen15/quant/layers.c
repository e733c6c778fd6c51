/* The decoder layers of a dense Qwen2 model for a few tokens (decode steps, speculative verification,
   small serving steps), in one call: the matmuls are kernels.c's, everything between them (RMSNorm, bias, RoPE,
   the KV cache write, attention, SiLU, residuals) is a loop here instead of ~45 PyTorch ops a layer, each
   of which costs more dispatch time than its arithmetic at these sizes.

   Rows are M tokens, each at its own position with its own cache slots: the engine's rows are consecutive
   tokens of one sequence (slot = position), the server's are the tokens of several sequences in a paged
   cache (a slot table per row). Every row is computed exactly as if it were alone (the matmul kernels
   treat rows independently; attention runs row by row over that row's keys), so a verification forward
   of M rows equals M decode steps bit for bit.

   Included by kernels.c (one library). Layout matches model.py: fused qkv rows [q (H*D) | k | v],
   fused gate_up rows [gate (I) | up (I)], RoPE tables [M, D] with rotate-half's sign folded into sin
   (x * cos + roll(x, D/2) * sin). A key of kv head g in cache slot s is at g * head_stride + s * slot_stride
   floats from the layer's k_cache (engine: [KV, max_len, D]; server: [slots, KV, D]). */

#include <sched.h>
#include <stdatomic.h>

typedef struct {
    const int8_t *q;
    const float *scale;
    const float *offset;  /* NULL when the type has no mins */
    int block, out, in, q8;  /* q8: int8 activations (else the exact float kernel) */
    const uint8_t *raw;  /* GGUF blocks as in the file (gguf_kernels.c), or NULL for block int8 */
    int qtype;  /* their ggml type */
} QMat;

typedef struct {
    QMat qkv, o, gate_up, down;
    const float *qkv_bias;  /* NULL: none */
    const float *norm1, *norm2;
    float *k_cache, *v_cache;  /* this layer's keys and values (strides in QDims) */
} QLayer;

typedef struct {
    int layers, hidden, heads, kv_heads, head_dim, inter, nthreads;
    long head_stride, slot_stride;
    float eps;
} QDims;

/* ---- one team for the whole forward ----
   A step is ~13 phases a layer (norms, each matmul, RoPE, attention, ...). An OpenMP parallel region per
   phase is a fork and a join each, and when more threads exist than cores (a server's engine thread has
   its own OpenMP team beside the main thread's), libgomp's workers sleep between regions instead of
   spinning, and waking them 120 times a step cost a third of the step. So the forward is one parallel
   region: every thread works on its share of each phase and waits for the others at a spinning barrier. */

typedef struct {
    atomic_int arrived;
    atomic_int phase;
} Barrier;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#endif
}

static void barrier_wait(Barrier *b, int nt) {
    if (nt == 1) return;
    const int phase = atomic_load_explicit(&b->phase, memory_order_relaxed);
    if (atomic_fetch_add_explicit(&b->arrived, 1, memory_order_acq_rel) == nt - 1) {
        atomic_store_explicit(&b->arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&b->phase, phase + 1, memory_order_release);
        return;
    }
    /* phases last microseconds; yield only when the others are clearly not running (more threads than cores) */
    for (unsigned spins = 0; atomic_load_explicit(&b->phase, memory_order_acquire) == phase; spins++) {
        if (spins < (1u << 14)) cpu_relax(); else sched_yield();
    }
}

typedef struct {  /* activation buffers shared by the team for one matmul at a time */
    int8_t *xq;  /* [M, K] int8 activations (q8 kernel) */
    float *dx;  /* [M, K / 32] their scales */
    float *xsum;  /* [M, K / block] float block sums (types with mins) */
} MatScratch;

/* y [M, w->out] = x [M, w->in] @ W.T by the whole team: the activations are prepared row by row, then each
   thread computes its share of the output columns. Every thread returns after y is complete. */
static void qmat_mul_team(const QMat *w, const float *x, int M, float *y, MatScratch *s, Barrier *bar,
                          int tid, int nt) {
    const int K = w->in, packed = w->raw != NULL, block = packed ? 32 : w->block, nb = K / block;
    const int kq = packed && is_kquant(w->qtype);  /* Q8_K activations: dx holds K/256 scales, xsum int16 16-sums */
    const int sums = packed ? 0 : w->offset != NULL;  /* block int8 with offsets needs float sum(x) a block */
    for (int m = tid; m < M; m += nt) {
        const float *xm = x + (size_t)m * K;
        if (kq) quantize_rows_k(xm, 1, K, s->xq + (size_t)m * K, s->dx + (size_t)m * (K / 256),
                                (int16_t *)s->xsum + (size_t)m * (K / 16));
        else if (w->q8 || packed) quantize_rows(xm, 1, K, s->xq + (size_t)m * K, s->dx + (size_t)m * (K / 32));
        if (sums)
            for (int b = 0; b < nb; b++) {
                float t = 0.f;
                for (int j = 0; j < block; j++) t += xm[b * block + j];
                s->xsum[(size_t)m * nb + b] = t;
            }
    }
    barrier_wait(bar, nt);
    int o0, o1;
    share(w->out, tid, nt, 8, &o0, &o1);
    if (kq)
        kquant_rows(o0, o1, s->xq, s->dx, (const int16_t *)s->xsum, M, K, w->raw, w->qtype, y, w->out);
    else if (packed)
        packed_rows(o0, o1, s->xq, s->dx, s->xsum, M, K, w->raw, w->qtype, y, w->out);
    else if (w->q8)
        for (int o = o0; o < o1; o++) q8_row(o, s->xq, s->dx, s->xsum, M, K, w->q, w->scale, w->offset, w->block, w->out, y);
    else
        for (int o = o0; o < o1; o++) exact_row(o, x, s->xsum, M, K, w->q, w->scale, w->offset, w->block, w->out, y);
    barrier_wait(bar, nt);
}

static void rms_norm(const float *x, const float *weight, int n, float eps, float *out) {
    float ss = 0.f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[i] = weight[i] * (x[i] * r);
}

/* q . k over one head (the attention's inner loop: a plain C reduction is not vectorized without
   -ffast-math, and at 600 cached tokens its serial adds were a sixth of a decode step). */
static inline float dot_f32(const float *a, const float *b, int n) {
    int i = 0;
    float s = 0.f;
#if defined(__AVX2__) && defined(__FMA__)
    if (n >= 16) {
        __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
        for (; i + 16 <= n; i += 16) {
            s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
            s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
        }
        s = hsum256(_mm256_add_ps(s0, s1));
    }
#endif
    for (; i < n; i++) s += a[i] * b[i];
    return s;
}

#if defined(__AVX2__) && defined(__FMA__)
/* e^x for x <= 0 (softmax after subtracting the max), 8 at a time: Cephes' expf (range reduction by ln 2 in two
   parts, a degree-6 polynomial), within 2 ulp of expf; below -87.3 it gives ~1e-38 instead of underflowing. */
static inline __m256 exp_neg256(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.3f));
    const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
    const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* [sum(a[0]), ..., sum(a[7])]: eight horizontal sums at once. */
static inline __m256 hsum8x8(const __m256 *a) {
    const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
#endif

/* One row's attention for query heads h0..h1 of one kv group (the heads that share its keys and values):
   q and out hold the row's heads D apart, kh / vh the group's cache, slot j at (slots ? slots[j] : j) * ss;
   sc: (h1 - h0) x n floats of scratch. Keys and values are read once for all the group's heads (from L1/L2
   for the second head on), 8 slots' dot products reduce together, and exp is vectorized. Each head's
   result depends only on its own inputs: the same bits whichever heads share a call. */
static void attend_heads(const float *q, int h0, int h1, const float *kh, const float *vh, const int *slots, int n,
                         long ss, int D, float scale, float *sc, float *out) {
    const int G = h1 - h0;
    int j = 0;
#define SLOT(j) ((size_t)(slots ? slots[j] : (j)) * ss)
#if defined(__AVX2__) && defined(__FMA__)
    if (D % 8 == 0) {
        for (; j + 8 <= n; j += 8) {
            const float *kj[8];
            for (int t = 0; t < 8; t++) kj[t] = kh + SLOT(j + t);
            for (int g = 0; g < G; g++) {
                const float *qh = q + (size_t)(h0 + g) * D;
                __m256 acc[8];
                for (int t = 0; t < 8; t++) acc[t] = _mm256_setzero_ps();
                for (int d = 0; d < D; d += 8) {
                    const __m256 qv = _mm256_loadu_ps(qh + d);
                    for (int t = 0; t < 8; t++) acc[t] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(kj[t] + d), acc[t]);
                }
                _mm256_storeu_ps(sc + (size_t)g * n + j, _mm256_mul_ps(hsum8x8(acc), _mm256_set1_ps(scale)));
            }
        }
    }
#endif
    for (; j < n; j++)
        for (int g = 0; g < G; g++) sc[(size_t)g * n + j] = dot_f32(q + (size_t)(h0 + g) * D, kh + SLOT(j), D) * scale;
    for (int g = 0; g < G; g++) {
        float *s = sc + (size_t)g * n, *o = out + (size_t)(h0 + g) * D;
        float mx = -INFINITY;
        for (int i = 0; i < n; i++) mx = s[i] > mx ? s[i] : mx;
        float sum = 0.f;
        int i = 0;
#if defined(__AVX2__) && defined(__FMA__)
        __m256 vs = _mm256_setzero_ps();
        for (; i + 8 <= n; i += 8) {
            const __m256 e = exp_neg256(_mm256_sub_ps(_mm256_loadu_ps(s + i), _mm256_set1_ps(mx)));
            _mm256_storeu_ps(s + i, e);
            vs = _mm256_add_ps(vs, e);
        }
        sum = hsum256(vs);
#endif
        for (; i < n; i++) { s[i] = expf(s[i] - mx); sum += s[i]; }
        const float inv = 1.f / sum;
        int d = 0;
#if defined(__AVX2__) && defined(__FMA__)
        for (; d + 32 <= D; d += 32) {  /* 32 outputs in registers over all slots */
            __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
            for (int jj = 0; jj < n; jj++) {
                const float *vj = vh + SLOT(jj) + d;
                const __m256 pj = _mm256_set1_ps(s[jj] * inv);
                a0 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj), a0);
                a1 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 8), a1);
                a2 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 16), a2);
                a3 = _mm256_fmadd_ps(pj, _mm256_loadu_ps(vj + 24), a3);
            }
            _mm256_storeu_ps(o + d, a0); _mm256_storeu_ps(o + d + 8, a1);
            _mm256_storeu_ps(o + d + 16, a2); _mm256_storeu_ps(o + d + 24, a3);
        }
#endif
        for (int dd = d; dd < D; dd++) o[dd] = 0.f;
        for (int jj = 0; jj < n && d < D; jj++) {
            const float pj = s[jj] * inv, *vj = vh + SLOT(jj);
            for (int dd = d; dd < D; dd++) o[dd] = fmaf(pj, vj[dd], o[dd]);
        }
    }
#undef SLOT
}

static void rope(float *v, const float *cos, const float *sin, int D) {
    float tmp[512];  /* head_dim <= 512 (checked by the caller) */
    for (int i = 0; i < D; i++) tmp[i] = v[i] * cos[i] + v[(i + D / 2) % D] * sin[i];
    for (int i = 0; i < D; i++) v[i] = tmp[i];
}

/* x [M, hidden] is updated in place through every layer. Row m's position is in its RoPE rows cos/sin[m];
   it writes its key and value to slot write_slot[m] and attends to the n_read[m] slots read_slots[m * s_max ...] (NULL: slots
   0 .. n_read[m]-1). Returns 0, or -1 when memory runs out. */
int qwen_layers_forward(float *x, int M, const int *write_slot, const int *read_slots, const int *n_read, int s_max,
                        const float *cos, const float *sin, const QLayer *layers, const QDims *d) {
    const int H = d->heads, KV = d->kv_heads, D = d->head_dim, Hd = d->hidden, I = d->inter;
    const int qkv_w = (H + 2 * KV) * D, group = H / KV, S = s_max;
    const long hs = d->head_stride, ss = d->slot_stride;
    const float scale = 1.f / sqrtf((float)D);
    const int kmax = Hd > I ? (Hd > H * D ? Hd : H * D) : (I > H * D ? I : H * D);  /* widest matmul input */
    float *xn = malloc((size_t)M * (Hd > I ? Hd : I) * sizeof(float));
    float *qkv = malloc((size_t)M * qkv_w * sizeof(float));
    float *att = malloc((size_t)M * H * D * sizeof(float));
    float *gu = malloc((size_t)M * 2 * I * sizeof(float));
    float *tmp = malloc((size_t)M * Hd * sizeof(float));
    /* attention tasks: split a kv group's heads only when rows x groups leave threads idle */
    int parts = M * KV >= d->nthreads ? 1 : d->nthreads / (M * KV);
    if (parts > group) parts = group;
    if (parts < 1) parts = 1;
    float *scores = malloc((size_t)(d->nthreads > 0 ? d->nthreads : 1) * group * S * sizeof(float));  /* per thread */
    MatScratch ms = {malloc((size_t)M * kmax), malloc((size_t)M * (kmax / 16 + 1) * sizeof(float)),
                     malloc((size_t)M * (kmax / 16 + 1) * sizeof(float))};
    int status = (xn && qkv && att && gu && tmp && scores && ms.xq && ms.dx && ms.xsum) ? 0 : -1;
    Barrier bar = {0, 0};
    if (status == 0) {
#pragma omp parallel num_threads(d->nthreads)
        {
            const int tid = omp_get_thread_num(), nt = omp_get_num_threads();
            for (int l = 0; l < d->layers; l++) {
                const QLayer *L = &layers[l];
                /* the previous layer's MLP residual (rows are owned by the same thread in both), then norm 1 */
                for (int m = tid; m < M; m += nt) {
                    float *xm = x + (size_t)m * Hd;
                    if (l > 0) for (int i = 0; i < Hd; i++) xm[i] += tmp[(size_t)m * Hd + i];
                    rms_norm(xm, L->norm1, Hd, d->eps, xn + (size_t)m * Hd);
                }
                barrier_wait(&bar, nt);
                qmat_mul_team(&L->qkv, xn, M, qkv, &ms, &bar, tid, nt);
                /* bias, RoPE on q and k heads, and this row's key and value to its cache slot: one head each */
                for (int it = tid; it < M * (H + 2 * KV); it += nt) {
                    const int m = it / (H + 2 * KV), h = it % (H + 2 * KV);
                    float *v = qkv + (size_t)m * qkv_w + h * D;
                    if (L->qkv_bias) for (int i = 0; i < D; i++) v[i] += L->qkv_bias[h * D + i];
                    if (h < H + KV) rope(v, cos + (size_t)m * D, sin + (size_t)m * D, D);
                    if (h >= H) {
                        const int g = h < H + KV ? h - H : h - H - KV;
                        float *cache = h < H + KV ? L->k_cache : L->v_cache;
                        memcpy(cache + (size_t)g * hs + (size_t)write_slot[m] * ss, v, D * sizeof(float));
                    }
                }
                barrier_wait(&bar, nt);
                /* Attention, row by row: row m sees its n_read[m] slots (its own position and everything before).
                   Tasks are (row, kv group, part of the group's heads): the group's heads share one pass over
                   its keys and values, and parts split a group only where threads would otherwise idle. */
                const int tasks = M * KV * parts;
                for (int t = tid; t < tasks; t += nt) {
                    const int m = t / (KV * parts), g = t / parts % KV, part = t % parts;
                    const int h0 = g * group + part * group / parts, h1 = g * group + (part + 1) * group / parts;
                    attend_heads(qkv + (size_t)m * qkv_w, h0, h1, L->k_cache + (size_t)g * hs, L->v_cache + (size_t)g * hs,
                                 read_slots ? read_slots + (size_t)m * s_max : NULL, n_read[m], ss, D, scale,
                                 scores + (size_t)tid * group * S, att + (size_t)m * H * D);
                }
                barrier_wait(&bar, nt);
                qmat_mul_team(&L->o, att, M, tmp, &ms, &bar, tid, nt);
                for (int m = tid; m < M; m += nt) {
                    float *xm = x + (size_t)m * Hd;
                    for (int i = 0; i < Hd; i++) xm[i] += tmp[(size_t)m * Hd + i];
                    rms_norm(xm, L->norm2, Hd, d->eps, xn + (size_t)m * Hd);
                }
                barrier_wait(&bar, nt);
                qmat_mul_team(&L->gate_up, xn, M, gu, &ms, &bar, tid, nt);
                int i0, i1;
                share(M * I, tid, nt, 16, &i0, &i1);
                for (int k = i0; k < i1; k++) {
                    const int m = k / I, i = k % I;
                    const float g = gu[(size_t)m * 2 * I + i], u = gu[(size_t)m * 2 * I + I + i];
                    xn[k] = g / (1.f + expf(-g)) * u;
                }
                barrier_wait(&bar, nt);
                qmat_mul_team(&L->down, xn, M, tmp, &ms, &bar, tid, nt);
            }
            for (int m = tid; m < M && d->layers > 0; m += nt)  /* the last layer's MLP residual */
                for (int i = 0; i < Hd; i++) x[(size_t)m * Hd + i] += tmp[(size_t)m * Hd + i];
        }
    }
    free(xn); free(qkv); free(att); free(gu); free(tmp); free(scores); free(ms.xq); free(ms.dx); free(ms.xsum);
    return status;
}
