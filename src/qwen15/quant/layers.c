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

typedef struct {
    const int8_t *q;
    const float *scale;
    const float *offset;  /* NULL when the type has no mins */
    int block, out, in, q8;  /* q8: int8 activations (else the exact float kernel) */
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

static int qmat_mul(const QMat *w, const float *x, int M, float *y, int nthreads) {
    float *xsum = NULL;
    if (w->offset) {  /* the offset term needs the float block sums of x */
        const int nb = w->in / w->block;
        xsum = malloc((size_t)M * nb * sizeof(float));
        if (!xsum) return -1;
        for (int m = 0; m < M; m++)
            for (int b = 0; b < nb; b++) {
                float s = 0.f;
                for (int j = 0; j < w->block; j++) s += x[(size_t)m * w->in + b * w->block + j];
                xsum[(size_t)m * nb + b] = s;
            }
    }
    int status = 0;
    if (w->q8)
        status = blockint8_matmul_q8(x, xsum, M, w->in, w->q, w->scale, w->offset, w->block, w->out, y, nthreads);
    else
        blockint8_matmul(x, xsum, M, w->in, w->q, w->scale, w->offset, w->block, w->out, y, nthreads);
    free(xsum);
    return status;
}

static void rms_norm(const float *x, const float *weight, int n, float eps, float *out) {
    float ss = 0.f;
    for (int i = 0; i < n; i++) ss += x[i] * x[i];
    const float r = 1.f / sqrtf(ss / n + eps);
    for (int i = 0; i < n; i++) out[i] = weight[i] * (x[i] * r);
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
    float *xn = malloc((size_t)M * (Hd > I ? Hd : I) * sizeof(float));
    float *qkv = malloc((size_t)M * qkv_w * sizeof(float));
    float *att = malloc((size_t)M * H * D * sizeof(float));
    float *gu = malloc((size_t)M * 2 * I * sizeof(float));
    float *tmp = malloc((size_t)M * Hd * sizeof(float));
    float *scores = malloc((size_t)H * S * sizeof(float));
    int status = (xn && qkv && att && gu && tmp && scores) ? 0 : -1;
    for (int l = 0; l < d->layers && status == 0; l++) {
        const QLayer *L = &layers[l];
        for (int m = 0; m < M; m++) rms_norm(x + (size_t)m * Hd, L->norm1, Hd, d->eps, xn + (size_t)m * Hd);
        if ((status = qmat_mul(&L->qkv, xn, M, qkv, d->nthreads))) break;
        for (int m = 0; m < M; m++) {
            float *row = qkv + (size_t)m * qkv_w;
            if (L->qkv_bias) for (int i = 0; i < qkv_w; i++) row[i] += L->qkv_bias[i];
            for (int h = 0; h < H + KV; h++) rope(row + h * D, cos + (size_t)m * D, sin + (size_t)m * D, D);
            for (int g = 0; g < KV; g++) {  /* this row's key and value go to its cache slot */
                const size_t at = (size_t)g * hs + (size_t)write_slot[m] * ss;
                memcpy(L->k_cache + at, row + (H + g) * D, D * sizeof(float));
                memcpy(L->v_cache + at, row + (H + KV + g) * D, D * sizeof(float));
            }
        }
        /* Attention, row by row: row m sees its n_read[m] slots (its own position and everything before). */
        for (int m = 0; m < M; m++) {
            const int n = n_read[m];
            const int *slots = read_slots ? read_slots + (size_t)m * s_max : NULL;
#pragma omp parallel for num_threads(d->nthreads) schedule(static)
            for (int h = 0; h < H; h++) {
                const float *qh = qkv + (size_t)m * qkv_w + h * D;
                const float *kh = L->k_cache + (size_t)(h / group) * hs;
                const float *vh = L->v_cache + (size_t)(h / group) * hs;
                float *sc = scores + (size_t)h * S, *out = att + (size_t)m * H * D + h * D;
                float mx = -INFINITY;
                for (int j = 0; j < n; j++) {
                    const float *kj = kh + (size_t)(slots ? slots[j] : j) * ss;
                    float s = 0.f;
                    for (int i = 0; i < D; i++) s += qh[i] * kj[i];
                    sc[j] = s * scale;
                    mx = sc[j] > mx ? sc[j] : mx;
                }
                float sum = 0.f;
                for (int j = 0; j < n; j++) { sc[j] = expf(sc[j] - mx); sum += sc[j]; }
                const float inv = 1.f / sum;
                for (int i = 0; i < D; i++) out[i] = 0.f;
                for (int j = 0; j < n; j++) {
                    const float p = sc[j] * inv, *vj = vh + (size_t)(slots ? slots[j] : j) * ss;
                    for (int i = 0; i < D; i++) out[i] += p * vj[i];
                }
            }
        }
        if ((status = qmat_mul(&L->o, att, M, tmp, d->nthreads))) break;
        for (size_t i = 0; i < (size_t)M * Hd; i++) x[i] += tmp[i];
        for (int m = 0; m < M; m++) rms_norm(x + (size_t)m * Hd, L->norm2, Hd, d->eps, xn + (size_t)m * Hd);
        if ((status = qmat_mul(&L->gate_up, xn, M, gu, d->nthreads))) break;
        for (int m = 0; m < M; m++)
            for (int i = 0; i < I; i++) {
                const float g = gu[(size_t)m * 2 * I + i], u = gu[(size_t)m * 2 * I + I + i];
                xn[(size_t)m * I + i] = g / (1.f + expf(-g)) * u;
            }
        if ((status = qmat_mul(&L->down, xn, M, tmp, d->nthreads))) break;
        for (size_t i = 0; i < (size_t)M * Hd; i++) x[i] += tmp[i];
    }
    free(xn); free(qkv); free(att); free(gu); free(tmp); free(scores);
    return status;
}
