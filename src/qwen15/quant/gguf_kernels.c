/* Matmuls that read GGUF's quantized blocks as the file stores them (Q8_0, Q5_0, Q4_0, Q4_K, Q6_K), so a
   model's weights take the file's size in memory and decode reads that many bytes a token.

   Each 32 weights of a row are unpacked in registers into signed int8 values, a float scale (two for
   Q6_K's blocks of 16) and, for Q4_K, an offset: exactly the BlockInt8 form blocks.py converts these
   types to. The products then follow q8_tile and add_offsets operation for operation, so a packed
   matrix gives the same bits as its BlockInt8 conversion through the q8 kernel (tested), and a row
   of a batch the same bits as that row alone.

   Included by kernels.c (one library), after the block-int8 kernels whose helpers it uses. */

enum { QT_Q4_0 = 2, QT_Q5_0 = 6, QT_Q8_0 = 8, QT_Q4_K = 12, QT_Q6_K = 14 };  /* ggml type ids */

#define QT_X8 0x100  /* flag on a K-quant type: the weight is in the interleaved layout (below) */

/* Bytes of one row of K weights; 0 for a type these kernels do not take. */
static long gguf_row_bytes(int qtype, int K) {
    switch (qtype & 0xFF) {
        case QT_Q4_0: return K / 32 * 18L;
        case QT_Q5_0: return K / 32 * 22L;
        case QT_Q8_0: return K / 32 * 34L;
        case QT_Q4_K: return K / 256 * 144L;
        case QT_Q6_K: return K / 256 * 210L;
        default: return 0;
    }
}

long gguf_packed_row_bytes(int qtype, int K) { return gguf_row_bytes(qtype, K); }

static inline float half_to_float(const uint8_t *p) {
    const uint16_t h = (uint16_t)(p[0] | (p[1] << 8));
#if defined(__F16C__)
    return _cvtsh_ss(h);
#else
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1F, man = h & 0x3FF;
    uint32_t bits;
    if (exp == 0x1F) bits = sign | 0x7F800000u | (man << 13);  /* inf / nan */
    else if (exp) bits = sign | ((exp + 112) << 23) | (man << 13);
    else if (!man) bits = sign;
    else {  /* subnormal: normalize */
        int e = -1;
        uint32_t m = man;
        do { m <<= 1; e++; } while (!(m & 0x400));
        bits = sign | ((uint32_t)(112 - e) << 23) | ((m & 0x3FF) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
#endif
}

/* Q4_K / Q5_K: the 6-bit scale and min of sub-block j (0..7) from the 12 packed bytes. */
static inline void k_scale_min(const uint8_t *s, int j, int *sc, int *mn) {
    if (j < 4) {
        *sc = s[j] & 0x3F;
        *mn = s[j + 4] & 0x3F;
    } else {
        *sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 2) & 0x30);
        *mn = (s[j + 4] >> 4) | ((s[j] >> 2) & 0x30);
    }
}

/* Every block's scale(s) and offset of a row: s[b] (s[2b], s[2b+1] for Q6_K's halves of 16) and, for Q4_K,
   offs[b]. The fp16 factors of a K-quant super-block are converted once for its 8 blocks. At one activation
   row this is a third of a K-quant row's work, so the vector path decodes a super-block's scales at once
   (the same products, so the same bits as the scalar loop). */
static inline __attribute__((always_inline)) void row_params(const uint8_t *row, const int qtype, int nb,
                                                            float *sc, float *offs) {
    if (qtype == QT_Q4_K) {
        for (int sbi = 0; sbi < nb / 8; sbi++) {
            const uint8_t *sb = row + sbi * 144;
            const float d = half_to_float(sb), dmin = half_to_float(sb + 2);
#if defined(__AVX2__)
            /* the 12 bytes as three words; rearranged so that bytes 0-7 are the scales, 8-15 the mins */
            uint32_t u[4];
            memcpy(u, sb + 4, 12);
            u[3] = ((u[2] >> 4) & 0x0F0F0F0Fu) | (((u[1] >> 6) & 0x03030303u) << 4);
            const uint32_t mins_lo = u[1] & 0x3F3F3F3Fu;
            u[1] = (u[2] & 0x0F0F0F0Fu) | (((u[0] >> 6) & 0x03030303u) << 4);
            u[2] = mins_lo;
            u[0] &= 0x3F3F3F3Fu;
            const __m128i b16 = _mm_loadu_si128((const __m128i *)u);
            const __m256 c = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(b16));
            const __m256 m = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(b16, 8)));
            _mm256_storeu_ps(sc + sbi * 8, _mm256_mul_ps(_mm256_set1_ps(d), c));
            _mm256_storeu_ps(offs + sbi * 8, _mm256_xor_ps(_mm256_mul_ps(_mm256_set1_ps(dmin), m), _mm256_set1_ps(-0.f)));
#else
            for (int j = 0; j < 8; j++) {
                int c, m;
                k_scale_min(sb + 4, j, &c, &m);
                sc[sbi * 8 + j] = d * (float)c;
                offs[sbi * 8 + j] = -(dmin * (float)m);
            }
#endif
        }
    } else if (qtype == QT_Q6_K) {
        for (int sbi = 0; sbi < nb / 8; sbi++) {
            const uint8_t *sb = row + sbi * 210;
            const float d = half_to_float(sb + 208);
#if defined(__AVX2__)
            const __m128i s8 = _mm_loadu_si128((const __m128i *)(sb + 192));
            const __m256 dv = _mm256_set1_ps(d);
            _mm256_storeu_ps(sc + sbi * 16, _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(s8))));
            _mm256_storeu_ps(sc + sbi * 16 + 8,
                             _mm256_mul_ps(dv, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(s8, 8)))));
#else
            for (int j = 0; j < 16; j++) sc[sbi * 16 + j] = d * (float)((const int8_t *)(sb + 192))[j];
#endif
        }
    } else {
        const int stride = qtype == QT_Q4_0 ? 18 : qtype == QT_Q5_0 ? 22 : 34;
        for (int b = 0; b < nb; b++) sc[b] = half_to_float(row + b * stride);
    }
}

/* The 32 signed weights of block b (plain C; the scalar path and dequantization). */
static inline void unpack32(const uint8_t *row, int qtype, int b, int8_t *w) {
    if (qtype == QT_Q8_0) {
        memcpy(w, row + b * 34 + 2, 32);
    } else if (qtype == QT_Q4_0) {
        const uint8_t *qs = row + b * 18 + 2;
        for (int j = 0; j < 16; j++) { w[j] = (int8_t)((qs[j] & 0x0F) - 8); w[j + 16] = (int8_t)((qs[j] >> 4) - 8); }
    } else if (qtype == QT_Q5_0) {
        const uint8_t *blk = row + b * 22;
        uint32_t qh;
        memcpy(&qh, blk + 2, 4);
        const uint8_t *qs = blk + 6;
        for (int j = 0; j < 16; j++) {
            w[j] = (int8_t)(((qs[j] & 0x0F) | (((qh >> j) & 1) << 4)) - 16);
            w[j + 16] = (int8_t)(((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - 16);
        }
    } else if (qtype == QT_Q4_K) {
        const uint8_t *qs = row + (b / 8) * 144 + 16 + ((b % 8) / 2) * 32;
        const int shift = (b % 2) * 4;
        for (int j = 0; j < 32; j++) w[j] = (int8_t)((qs[j] >> shift) & 0x0F);
    } else {  /* Q6_K: element r of a half of 128 takes ql's nibble (r < 64: low) and qh's 2 bits (r / 32) */
        const uint8_t *sb = row + (b / 8) * 210;
        const int t = b % 8, g = t / 4, r0 = (t % 4) * 32;
        const uint8_t *ql = sb + g * 64 + (r0 & 63), *qh = sb + 128 + g * 32;
        const int lshift = r0 >= 64 ? 4 : 0, hshift = 2 * (r0 / 32);
        for (int j = 0; j < 32; j++)
            w[j] = (int8_t)((((ql[j] >> lshift) & 0x0F) | (((qh[j] >> hshift) & 3) << 4)) - 32);
    }
}

/* The weight scale of block b: read from its fp16 header for the 32-weight types (cheaper than a table
   at one activation row), from the row's table for the K-quants (two a block for Q6_K). */
static inline __attribute__((always_inline)) float weight_scale(const uint8_t *row, const float *sc, int qtype, int b) {
    if (qtype == QT_Q4_0) return half_to_float(row + b * 18);
    if (qtype == QT_Q5_0) return half_to_float(row + b * 22);
    if (qtype == QT_Q8_0) return half_to_float(row + b * 34);
    return sc[b];
}

#if Q8_ISA
/* The same 32 weights in a register; with stored = 1, Q6_K's unsigned values as stored (w + 32) instead.
   t = b % 8, passed apart so that loops over a K-quant's super-block, unrolled, make it a constant. */
static inline __attribute__((always_inline)) __m256i unpack32_avx2(const uint8_t *row, int qtype, int b, int t,
                                                                   const int stored) {
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    if (qtype == QT_Q8_0) return _mm256_loadu_si256((const __m256i *)(row + b * 34 + 2));
    if (qtype == QT_Q4_0 || qtype == QT_Q5_0) {
        const uint8_t *qs = row + b * (qtype == QT_Q4_0 ? 18 : 22) + (qtype == QT_Q4_0 ? 2 : 6);
        const __m128i bytes = _mm_loadu_si128((const __m128i *)qs);
        const __m256i nib = _mm256_and_si256(
            _mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), low4);  /* elements 0-15 low, 16-31 high nibbles */
        if (qtype == QT_Q4_0) return _mm256_sub_epi8(nib, _mm256_set1_epi8(8));
        /* Q5_0: bit j of qh is the fifth bit of element j. Spread the 32 bits to bytes (byte j of the
           broadcast word holds bits 8*(j/8)..), test each byte's bit, then w = nib - 16 + 16 * bit,
           i.e. nib | 0xF0 where the bit is clear. */
        uint32_t qh;
        memcpy(&qh, row + b * 22 + 2, 4);
        const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32((int)qh),
            _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202, 0x0101010101010101, 0x0000000000000000));
        const __m256i bit = _mm256_set1_epi64x(0x8040201008040201);
        const __m256i set = _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
        return _mm256_or_si256(nib, _mm256_andnot_si256(set, _mm256_set1_epi8((char)0xF0)));
    }
    if (qtype == QT_Q4_K) {
        const __m256i q = _mm256_loadu_si256((const __m256i *)(row + (b / 8) * 144 + 16 + (t / 2) * 32));
        return (t % 2) ? _mm256_and_si256(_mm256_srli_epi16(q, 4), low4) : _mm256_and_si256(q, low4);
    }
    /* Q6_K */
    const uint8_t *sb = row + (b / 8) * 210;
    const int g = t / 4, r0 = (t % 4) * 32;
    __m256i lo = _mm256_loadu_si256((const __m256i *)(sb + g * 64 + (r0 & 63)));
    if (r0 >= 64) lo = _mm256_srli_epi16(lo, 4);
    lo = _mm256_and_si256(lo, low4);
    __m256i hi = _mm256_loadu_si256((const __m256i *)(sb + 128 + g * 32));
    switch (r0 / 32) {  /* shift counts must be constants */
        case 1: hi = _mm256_srli_epi16(hi, 2); break;
        case 2: hi = _mm256_srli_epi16(hi, 4); break;
        case 3: hi = _mm256_srli_epi16(hi, 6); break;
        default: break;
    }
    hi = _mm256_slli_epi16(_mm256_and_si256(hi, _mm256_set1_epi8(3)), 4);
    return stored ? _mm256_or_si256(lo, hi) : _mm256_sub_epi8(_mm256_or_si256(lo, hi), _mm256_set1_epi8(32));
}

/* The scale(s) of block b times the activation scale d. */
static inline __attribute__((always_inline)) __m256 packed_scale(const float *sc, int qtype, int b, float d) {
    if (qtype != QT_Q6_K) return _mm256_set1_ps(sc[b] * d);
    return _mm256_set_m128(_mm_set1_ps(sc[2 * b + 1] * d), _mm_set1_ps(sc[2 * b] * d));
}

/* 32 weights . 32 activations as q8_tile's dot32. Q4_K's weights are never negative, so the sign
   trick is the identity there (sign_epi8 zeroes x only where w is 0, whose products are 0 anyway). */
static inline __attribute__((always_inline)) __m256 packed_dot(int qtype, __m256i aw, __m256i w, __m256i xq) {
    if (qtype == QT_Q4_K)
        return _mm256_cvtepi32_ps(_mm256_madd_epi16(_mm256_maddubs_epi16(w, xq), _mm256_set1_epi16(1)));
    return dot32(aw, w, xq);
}

/* Q6_K's products from its stored values u = w + 32: maddubs(u, x) - maddubs(32, x) gives every int16 pair
   sum of w * x that the sign trick gives (u * x pairs reach 63 * 127 * 2, 32 * x pairs 32 * 254: no
   saturation), so the same bits, with one subtraction and a maddubs instead of a subtraction and two sign
   operations: ~12% faster at one activation row (measured; Q5_0 gained nothing from its own form). It
   costs a maddubs per activation row, so batches keep the sign trick. */
static inline __attribute__((always_inline)) __m256 stored_dot(__m256i u, __m256i xq) {
    const __m256i p16 = _mm256_sub_epi16(_mm256_maddubs_epi16(u, xq), _mm256_maddubs_epi16(_mm256_set1_epi8(32), xq));
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p16, _mm256_set1_epi16(1)));
}

/* Blocks b and b + 1 (t = b % 8) into the two accumulator chains, as q8_tile's loop body. */
static inline __attribute__((always_inline)) void packed_pair(
        const uint8_t *row, int qtype, const float *sc, const int8_t *xq, const float *dx, int K, int MT,
        int b, int t, __m256 *acc, __m256 *acc2) {
    const int nb32 = K / 32;
    float s[4];  /* the pair's scales laid out as the table's: packed_scale(s, qtype, 0 or 1, d) */
    if (qtype == QT_Q6_K) { s[0] = sc[2 * b]; s[1] = sc[2 * b + 1]; s[2] = sc[2 * b + 2]; s[3] = sc[2 * b + 3]; }
    else { s[0] = weight_scale(row, sc, qtype, b); s[1] = weight_scale(row, sc, qtype, b + 1); }
    if (MT == 1 && qtype == QT_Q6_K) {
        const __m256i u0 = unpack32_avx2(row, qtype, b, t, 1), u1 = unpack32_avx2(row, qtype, b + 1, t + 1, 1);
        acc[0] = _mm256_fmadd_ps(stored_dot(u0, _mm256_loadu_si256((const __m256i *)(xq + b * 32))),
                                 packed_scale(s, qtype, 0, dx[b]), acc[0]);
        acc2[0] = _mm256_fmadd_ps(stored_dot(u1, _mm256_loadu_si256((const __m256i *)(xq + b * 32 + 32))),
                                  packed_scale(s, qtype, 1, dx[b + 1]), acc2[0]);
        return;
    }
    const __m256i w0 = unpack32_avx2(row, qtype, b, t, 0), w1 = unpack32_avx2(row, qtype, b + 1, t + 1, 0);
    const __m256i a0 = qtype == QT_Q4_K ? w0 : _mm256_sign_epi8(w0, w0);
    const __m256i a1 = qtype == QT_Q4_K ? w1 : _mm256_sign_epi8(w1, w1);
    for (int m = 0; m < MT; m++) {
        const int8_t *xp = xq + (size_t)m * K + b * 32;
        const float *dp = dx + (size_t)m * nb32 + b;
        acc[m] = _mm256_fmadd_ps(packed_dot(qtype, a0, w0, _mm256_loadu_si256((const __m256i *)xp)),
                                 packed_scale(s, qtype, 0, dp[0]), acc[m]);
        acc2[m] = _mm256_fmadd_ps(packed_dot(qtype, a1, w1, _mm256_loadu_si256((const __m256i *)(xp + 32))),
                                  packed_scale(s, qtype, 1, dp[1]), acc2[m]);
    }
}

/* One weight row times MT int8 activation rows: q8_tile's arithmetic, with the weights unpacked here. */
static inline __attribute__((always_inline)) void packed_tile(
        const uint8_t *row, int qtype, const float *sc, const int8_t *xq, const float *dx, int K, int MT,
        float *out) {
    const int nb32 = K / 32;
    __m256 acc[TILE], acc2[TILE];
    for (int m = 0; m < MT; m++) acc[m] = acc2[m] = _mm256_setzero_ps();
    if (qtype == QT_Q4_K || qtype == QT_Q6_K) {  /* whole super-blocks of 8 blocks */
        for (int sb = 0; sb < nb32 / 8; sb++) {
#pragma GCC unroll 4
            for (int t = 0; t < 8; t += 2) packed_pair(row, qtype, sc, xq, dx, K, MT, sb * 8 + t, t, acc, acc2);
        }
    } else {
        int b = 0;
        for (; b + 1 < nb32; b += 2) packed_pair(row, qtype, sc, xq, dx, K, MT, b, 0, acc, acc2);
        if (b < nb32) {
            const __m256i w0 = unpack32_avx2(row, qtype, b, 0, 0);
            const __m256i a0 = _mm256_sign_epi8(w0, w0);
            for (int m = 0; m < MT; m++) {
                const int8_t *xp = xq + (size_t)m * K + b * 32;
                acc[m] = _mm256_fmadd_ps(dot32(a0, w0, _mm256_loadu_si256((const __m256i *)xp)),
                                         _mm256_set1_ps(weight_scale(row, sc, qtype, b) * dx[(size_t)m * nb32 + b]), acc[m]);
            }
        }
    }
    for (int m = 0; m < MT; m++) out[m] = hsum256(_mm256_add_ps(acc[m], acc2[m]));
}

#else

static inline void packed_tile(const uint8_t *row, int qtype, const float *sc, const int8_t *xq, const float *dx,
                               int K, int MT, float *out) {
    const int nb32 = K / 32;
    int8_t w[32];
    for (int m = 0; m < MT; m++) out[m] = 0.f;
    for (int b = 0; b < nb32; b++) {
        unpack32(row, qtype, b, w);
        const float s32 = weight_scale(row, sc, qtype, b), *s = qtype == QT_Q6_K ? sc + 2 * b : &s32;
        const int B = qtype == QT_Q6_K ? 16 : 32;
        for (int m = 0; m < MT; m++) {
            const int8_t *xp = xq + (size_t)m * K + b * 32;
            const float d = dx[(size_t)m * nb32 + b];
            for (int h = 0; h < 32; h += B) {
                int32_t t = 0;
                for (int j = 0; j < B; j++) t += (int32_t)w[h + j] * (int32_t)xp[h + j];
                out[m] += (float)t * (s[h / 16 * (B == 16)] * d);
            }
        }
    }
}
#endif

/* Output column o for all M rows: the weight products, then the Q4_K offsets times the float block sums.
   qtype is a constant in each caller below, so every type compiles to its own loops. */
static inline __attribute__((always_inline)) void packed_row_t(
        int o, const int8_t *xq, const float *dx, const float *xsum, int M, int K, const uint8_t *raw,
        const int qtype, float *y, long ldy) {
    const uint8_t *row = raw + (size_t)o * gguf_row_bytes(qtype, K);
    const int nb = K / 32;
    const int kq = qtype == QT_Q4_K || qtype == QT_Q6_K;
    float out[TILE], sc[kq ? 2 * nb : 1], offs[kq ? nb : 1];  /* K-quants: the row's scales and offsets, decoded once */
    if (kq) row_params(row, qtype, nb, sc, offs);
    for (int m0 = 0; m0 < M; m0 += TILE) {
        const int mt = M - m0 < TILE ? M - m0 : TILE;
        const int8_t *xm = xq + (size_t)m0 * K;
        const float *dm = dx + (size_t)m0 * nb;
#define PACKED(n) packed_tile(row, qtype, sc, xm, dm, K, n, out)
        DISPATCH_TILE(PACKED)
#undef PACKED
        if (qtype == QT_Q4_K) add_offsets(offs, xsum + (size_t)m0 * nb, nb, mt, out);
        for (int m = 0; m < mt; m++) y[(size_t)(m0 + m) * ldy + o] = out[m];
    }
}

#if Q8_ISA
static void b32_x8_rows(int o0, int o1, const int8_t *xq, const float *dx, int M, int K, const uint8_t *raw,
                        int qt, float *y, long ldy);
#endif

static void packed_rows(int o0, int o1, const int8_t *xq, const float *dx, const float *xsum, int M, int K,
                        const uint8_t *raw, int qtype, float *y, long ldy) {
#if Q8_ISA
    if (qtype & QT_X8) {  /* Q8_0 / Q5_0 / Q4_0 in the x8 layout */
        b32_x8_rows(o0, o1, xq, dx, M, K, raw, qtype & 0xFF, y, ldy);
        return;
    }
#endif
#define ROWS(T) for (int o = o0; o < o1; o++) packed_row_t(o, xq, dx, xsum, M, K, raw, T, y, ldy)
    switch (qtype) {
        case QT_Q8_0: ROWS(QT_Q8_0); break;
        case QT_Q5_0: ROWS(QT_Q5_0); break;
        case QT_Q4_0: ROWS(QT_Q4_0); break;
        case QT_Q4_K: ROWS(QT_Q4_K); break;
        default: ROWS(QT_Q6_K); break;
    }
#undef ROWS
}

/* ---------------------------------------------------------------- K-quants against Q8_K activations

   Q4_K and Q6_K rows multiply activations rounded to int8 per super-block of 256 with one float scale
   (llama.cpp's Q8_K: dk = max|x| / 127, xq = round(x / dk), ties to even), with the sums of every 16
   int8 values kept beside them. One activation scale per super-block means a super-block's products
   need no float work: the 6- or 8-bit sub-block scales multiply integer dot products (madd), Q4_K's
   mins multiply the activation sums and Q6_K's -32 does too, all exactly in int32. Each (weight row,
   activation row, super-block) gives one exact integer, so the float part of a row is fixed:

       acc = 0; for each super-block s in order:
           acc = fma(d_s * dk_s, isum_s, acc)            (Q4_K and Q6_K)
           acc = fma(-(dmin_s * dk_s), msum_s, acc)      (Q4_K only: the mins)

   and the result cannot depend on how rows are tiled, how many activation rows share a weight load,
   or which thread computes it: a row alone and the same row in a batch of any size give the same bits
   (integer sums are exact in any order). The plain C path below computes the same integers and the same
   fmas, so it gives the same bits too. Bounds: Q4_K's pairs 2 * 15 * 127, Q6_K's stored 0..63 pairs
   2 * 63 * 127 stay below the int16 limit of maddubs; a super-block's sum is below 2^28. */

/* x [M, K] -> xq int8 [M, K], dk [M, K/256], bsum int16 [M, K/16] (K % 256 == 0). */
static void quantize_rows_k(const float *x, int M, int K, int8_t *xq, float *dk, int16_t *bsum) {
    const int ns = K / 256;
    for (int m = 0; m < M; m++) {
        for (int s = 0; s < ns; s++) {
            const float *xp = x + (size_t)m * K + s * 256;
            int8_t *qp = xq + (size_t)m * K + s * 256;
            int16_t *bp = bsum + (size_t)m * (K / 16) + s * 16;
#if defined(__AVX2__)
            const __m256 sign = _mm256_set1_ps(-0.f);
            __m256 mx = _mm256_setzero_ps();
            for (int k = 0; k < 256; k += 8) mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, _mm256_loadu_ps(xp + k)));
            __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
            h = _mm_max_ps(h, _mm_movehl_ps(h, h));
            h = _mm_max_ss(h, _mm_movehdup_ps(h));
            const float amax = _mm_cvtss_f32(h);
            const __m256 id = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
            for (int k = 0; k < 256; k += 32) {
                __m256i q[4];
                for (int i = 0; i < 4; i++)
                    q[i] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(xp + k + 8 * i), id),
                                                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
                /* the sums of elements k..k+15 and k+16..k+31, exact in int32 */
                const __m256i s01 = _mm256_add_epi32(q[0], q[1]), s23 = _mm256_add_epi32(q[2], q[3]);
                const __m256i hs = _mm256_hadd_epi32(s01, s23);  /* [a01 a23 b01 b23 | a45 a67 b45 b67] */
                const __m128i h2 = _mm_add_epi32(_mm256_castsi256_si128(hs), _mm256_extracti128_si256(hs, 1));
                const __m128i h1 = _mm_hadd_epi32(h2, h2);
                bp[k / 16] = (int16_t)_mm_cvtsi128_si32(h1);
                bp[k / 16 + 1] = (int16_t)_mm_extract_epi32(h1, 1);
                const __m256i p16 = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
                _mm256_storeu_si256((__m256i *)(qp + k),
                                    _mm256_permutevar8x32_epi32(p16, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
            }
            dk[(size_t)m * ns + s] = amax / 127.f;
#else
            float amax = 0.f;
            for (int j = 0; j < 256; j++) amax = fmaxf(amax, fabsf(xp[j]));
            const float id = amax > 0.f ? 127.f / amax : 0.f;
            for (int g = 0; g < 16; g++) {
                int t = 0;
                for (int j = 0; j < 16; j++) { qp[g * 16 + j] = (int8_t)nearbyintf(xp[g * 16 + j] * id); t += qp[g * 16 + j]; }
                bp[g] = (int16_t)t;
            }
            dk[(size_t)m * ns + s] = amax / 127.f;
#endif
        }
    }
}

/* Q4_K: the 6-bit scales (sc[0..7]) and mins (mn[0..7]) of one super-block's 12 packed bytes. */
static inline void q4k_scales(const uint8_t *s12, uint8_t *sc, uint8_t *mn) {
    uint32_t u[3];
    memcpy(u, s12, 12);
    const uint32_t s_lo = u[0] & 0x3F3F3F3Fu, m_lo = u[1] & 0x3F3F3F3Fu;
    const uint32_t s_hi = (u[2] & 0x0F0F0F0Fu) | (((u[0] >> 6) & 0x03030303u) << 4);
    const uint32_t m_hi = ((u[2] >> 4) & 0x0F0F0F0Fu) | (((u[1] >> 6) & 0x03030303u) << 4);
    memcpy(sc, &s_lo, 4); memcpy(sc + 4, &s_hi, 4);
    memcpy(mn, &m_lo, 4); memcpy(mn + 4, &m_hi, 4);
}

#if Q8_ISA
/* acc + the pairwise products of int16 a and b, summed in pairs: one vpdpwssd where the machine has VNNI
   (AVX-512 VNNI with VL, or AVX-VNNI), madd + add otherwise. The same integers either way (no saturation,
   and these sums stay far below 2^31), so the same bits. Built with -march=native, so the path is the
   machine's; the VNNI lines are compile-checked only on the AVX2 machine these kernels were written on. */
#if defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define KQUANT_VNNI 1
static inline __attribute__((always_inline)) __m256i dpwssd(__m256i acc, __m256i a, __m256i b) {
    return _mm256_dpwssd_epi32(acc, a, b);
}
#elif defined(__AVXVNNI__)
#define KQUANT_VNNI 1
static inline __attribute__((always_inline)) __m256i dpwssd(__m256i acc, __m256i a, __m256i b) {
    return _mm256_dpwssd_avx_epi32(acc, a, b);
}
#else
#define KQUANT_VNNI 0
static inline __attribute__((always_inline)) __m256i dpwssd(__m256i acc, __m256i a, __m256i b) {
    return _mm256_add_epi32(acc, _mm256_madd_epi16(a, b));
}
#endif

static inline __attribute__((always_inline)) int hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_unpackhi_epi64(s, s));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 1));
    return _mm_cvtsi128_si32(s);
}

/* Lane m (< MT) = the sum of v[m]'s eight lanes: eight rows' super-block sums reduced together (a tree of
   hadds), ~7x fewer instructions than reducing each row alone. Exact: these are integers. */
static inline __attribute__((always_inline)) __m256i hsum8_epi32(const __m256i *v, int MT) {
    const __m256i z = _mm256_setzero_si256();
    const __m256i t0 = _mm256_hadd_epi32(v[0], MT > 1 ? v[1] : z), t1 = _mm256_hadd_epi32(MT > 2 ? v[2] : z, MT > 3 ? v[3] : z);
    const __m256i t2 = MT > 4 ? _mm256_hadd_epi32(v[4], MT > 5 ? v[5] : z) : z;
    const __m256i t3 = MT > 6 ? _mm256_hadd_epi32(v[6], MT > 7 ? v[7] : z) : z;
    const __m256i u0 = _mm256_hadd_epi32(t0, t1), u1 = _mm256_hadd_epi32(t2, t3);
    /* u0 = [rows 0-3: elements 0-3 | rows 0-3: elements 4-7], u1 the same for rows 4-7 */
    return _mm256_add_epi32(_mm256_permute2x128_si256(u0, u1, 0x20), _mm256_permute2x128_si256(u0, u1, 0x31));
}

/* The activation scales of super-block s for rows 0..MT-1 (row stride ns), lane m = row m. */
static inline __attribute__((always_inline)) __m256 row_scales(const float *dk, int ns, int s, int MT) {
    const __m256i idx = _mm256_mullo_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(ns));
    const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(MT), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_mask_i32gather_ps(_mm256_setzero_ps(), dk + s, idx, _mm256_castsi256_ps(valid), 4);
}

/* One Q4_K weight row times MT activation rows (Q8_K), into acc[m] by the fixed float steps above. */
static inline __attribute__((always_inline)) void q4k_tile(
        const uint8_t *row, const int8_t *xq, const float *dk, const int16_t *bsum, int K, int MT, float *out) {
    const int ns = K / 256;
    float acc[1] = {0.f};  /* MT == 1 */
    __m256 va = _mm256_setzero_ps();  /* MT > 1: row m's accumulator in lane m */
    const __m256i low4 = _mm256_set1_epi8(0x0F);
    for (int s = 0; s < ns; s++) {
        const uint8_t *sb = row + s * 144;
        uint8_t sc[8], mn[8];
        q4k_scales(sb + 4, sc, mn);
        __m256i ai[TILE];
        for (int m = 0; m < MT; m++) ai[m] = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {  /* 64 weights: 32 low nibbles (sub-block 2j), 32 high (2j + 1) */
            const __m256i q = _mm256_loadu_si256((const __m256i *)(sb + 16 + 32 * j));
            const __m256i w0 = _mm256_and_si256(q, low4), w1 = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
            const __m256i s0 = _mm256_set1_epi16(sc[2 * j]), s1 = _mm256_set1_epi16(sc[2 * j + 1]);
            for (int m = 0; m < MT; m++) {
                const int8_t *xp = xq + (size_t)m * K + s * 256 + 64 * j;
                ai[m] = dpwssd(ai[m], _mm256_maddubs_epi16(w0, _mm256_loadu_si256((const __m256i *)xp)), s0);
                ai[m] = dpwssd(ai[m], _mm256_maddubs_epi16(w1, _mm256_loadu_si256((const __m256i *)(xp + 32))), s1);
            }
        }
        /* the mins times the activation sums: sub-block b covers the 16-sums 2b and 2b + 1 */
        uint64_t mn8;
        memcpy(&mn8, mn, 8);
        const __m128i m8 = _mm_cvtsi64_si128((long long)mn8);
        const __m256i mins = _mm256_cvtepu8_epi16(_mm_unpacklo_epi8(m8, m8));
        const float d = half_to_float(sb), dmin = half_to_float(sb + 2);
        if (MT == 1) {
            const __m256i bs = _mm256_loadu_si256((const __m256i *)(bsum + s * 16));
            const int isum = hsum_epi32(ai[0]), msum = hsum_epi32(_mm256_madd_epi16(bs, mins));
            const float dy = dk[s];
            acc[0] = fmaf(d * dy, (float)isum, acc[0]);
            acc[0] = fmaf(-(dmin * dy), (float)msum, acc[0]);
        } else {  /* the same steps with row m in lane m */
            __m256i mv[TILE];
            for (int m = 0; m < MT; m++)
                mv[m] = _mm256_madd_epi16(_mm256_loadu_si256((const __m256i *)(bsum + (size_t)m * (K / 16) + s * 16)), mins);
            const __m256 dy = row_scales(dk, ns, s, MT);
            va = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(d), dy), _mm256_cvtepi32_ps(hsum8_epi32(ai, MT)), va);
            va = _mm256_fmadd_ps(_mm256_xor_ps(_mm256_mul_ps(_mm256_set1_ps(dmin), dy), _mm256_set1_ps(-0.f)),
                                 _mm256_cvtepi32_ps(hsum8_epi32(mv, MT)), va);
        }
    }
    if (MT == 1) out[0] = acc[0];
    else {
        float lanes[8];
        _mm256_storeu_ps(lanes, va);
        for (int m = 0; m < MT; m++) out[m] = lanes[m];
    }
}

/* Q6_K's stored values u = w + 32 (0..63) of four 32-byte groups: low nibbles of l0 and l1, then their high
   nibbles, each with two bits of hb (bits 0-1, 2-3, 4-5, 6-7) as bits 4-5. */
static inline __attribute__((always_inline)) void q6k_unpack4(__m256i l0, __m256i l1, __m256i hb, __m256i *u) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), low2 = _mm256_set1_epi8(3);
    u[0] = _mm256_or_si256(_mm256_and_si256(l0, low4), _mm256_slli_epi16(_mm256_and_si256(hb, low2), 4));
    u[1] = _mm256_or_si256(_mm256_and_si256(l1, low4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 2), low2), 4));
    u[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), low4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 4), low2), 4));
    u[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), low4),
                           _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(hb, 6), low2), 4));
}

/* One Q6_K weight row times MT activation rows (Q8_K). The stored values u = w + 32 (0..63) go into
   maddubs unsigned; the 32 * x they add back is taken out once a super-block from the 16-sums. */
static inline __attribute__((always_inline)) void q6k_tile(
        const uint8_t *row, const int8_t *xq, const float *dk, const int16_t *bsum, int K, int MT, float *out) {
    const int ns = K / 256;
    float acc[1] = {0.f};  /* MT == 1 */
    __m256 va = _mm256_setzero_ps();  /* MT > 1: row m's accumulator in lane m */
    for (int s = 0; s < ns; s++) {
        const uint8_t *sb = row + s * 210;
        const int8_t *sc = (const int8_t *)(sb + 192);
        __m256i ai[TILE];
        for (int m = 0; m < MT; m++) ai[m] = _mm256_setzero_si256();
        for (int g = 0; g < 2; g++) {  /* halves of 128: ql's 64 bytes give low nibbles then high, qh 2 bits each */
            const __m256i l0 = _mm256_loadu_si256((const __m256i *)(sb + 64 * g));
            const __m256i l1 = _mm256_loadu_si256((const __m256i *)(sb + 64 * g + 32));
            const __m256i hb = _mm256_loadu_si256((const __m256i *)(sb + 128 + 32 * g));
            __m256i u[4];
            q6k_unpack4(l0, l1, hb, u);
            for (int r = 0; r < 4; r++) {
                /* elements 0-15 of this block take scale 8g + 2r, elements 16-31 scale 8g + 2r + 1 */
                const __m256i s16 = _mm256_set_m128i(_mm_set1_epi16(sc[8 * g + 2 * r + 1]), _mm_set1_epi16(sc[8 * g + 2 * r]));
                for (int m = 0; m < MT; m++) {
                    const __m256i xv = _mm256_loadu_si256((const __m256i *)(xq + (size_t)m * K + s * 256 + 128 * g + 32 * r));
                    ai[m] = dpwssd(ai[m], _mm256_maddubs_epi16(u[r], xv), s16);
                }
            }
        }
        const __m256i sc16 = _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)sc));
        const float d = half_to_float(sb + 208);
        for (int m = 0; m < MT; m++) {
            const __m256i bs = _mm256_loadu_si256((const __m256i *)(bsum + (size_t)m * (K / 16) + s * 16));
            const __m256i corr = _mm256_slli_epi32(_mm256_madd_epi16(bs, sc16), 5);  /* 32 * sum scale * x */
            ai[m] = _mm256_sub_epi32(ai[m], corr);
        }
        if (MT == 1) acc[0] = fmaf(d * dk[s], (float)hsum_epi32(ai[0]), acc[0]);
        else  /* the same step with row m in lane m */
            va = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(d), row_scales(dk, ns, s, MT)),
                                 _mm256_cvtepi32_ps(hsum8_epi32(ai, MT)), va);
    }
    if (MT == 1) out[0] = acc[0];
    else {
        float lanes[8];
        _mm256_storeu_ps(lanes, va);
        for (int m = 0; m < MT; m++) out[m] = lanes[m];
    }
}

#else

/* Plain C: the same integers, the same fmas. */
static inline void q4k_tile(const uint8_t *row, const int8_t *xq, const float *dk, const int16_t *bsum, int K,
                            int MT, float *out) {
    const int ns = K / 256;
    for (int m = 0; m < MT; m++) {
        float acc = 0.f;
        for (int s = 0; s < ns; s++) {
            const uint8_t *sb = row + s * 144;
            uint8_t sc[8], mn[8];
            q4k_scales(sb + 4, sc, mn);
            const int8_t *xp = xq + (size_t)m * K + s * 256;
            const int16_t *bp = bsum + (size_t)m * (K / 16) + s * 16;
            int isum = 0, msum = 0;
            for (int b = 0; b < 8; b++) {
                const uint8_t *qs = sb + 16 + (b / 2) * 32;
                int t = 0;
                for (int j = 0; j < 32; j++) t += ((qs[j] >> (4 * (b % 2))) & 0x0F) * xp[b * 32 + j];
                isum += sc[b] * t;
                msum += mn[b] * (bp[2 * b] + bp[2 * b + 1]);
            }
            const float dy = dk[(size_t)m * ns + s];
            acc = fmaf(half_to_float(sb) * dy, (float)isum, acc);
            acc = fmaf(-(half_to_float(sb + 2) * dy), (float)msum, acc);
        }
        out[m] = acc;
    }
}

static inline void q6k_tile(const uint8_t *row, const int8_t *xq, const float *dk, const int16_t *bsum, int K,
                            int MT, float *out) {
    const int ns = K / 256;
    int8_t w[32];
    for (int m = 0; m < MT; m++) {
        float acc = 0.f;
        for (int s = 0; s < ns; s++) {
            const uint8_t *sb = row + s * 210;
            const int8_t *sc = (const int8_t *)(sb + 192), *xp = xq + (size_t)m * K + s * 256;
            int isum = 0;
            for (int b = 0; b < 8; b++) {
                unpack32(row, QT_Q6_K, s * 8 + b, w);
                for (int h = 0; h < 2; h++) {
                    int t = 0;
                    for (int j = 0; j < 16; j++) t += w[h * 16 + j] * xp[b * 32 + h * 16 + j];
                    isum += sc[2 * b + h] * t;
                }
            }
            (void)bsum;
            acc = fmaf(half_to_float(sb + 208) * dk[(size_t)m * ns + s], (float)isum, acc);
        }
        out[m] = acc;
    }
}
#endif

/* ---- The interleaved K-quant layout ("x8") ----
   In the file a row's super-blocks follow one another, so a kernel reduces each row on its own: a
   horizontal sum and the row's own scale decoding every super-block, and a maddubs plus a madd for every
   32 weights. As llama.cpp's CPU backend repacks Q4_K into block_q4_Kx8, groups of 8 rows are stored with
   their super-block s side by side: one 32-byte load holds 4 weights of each of the 8 rows, a vector lane
   is a row (no horizontal sums), the scales of 8 rows decode together, and a sub-block's int16 products
   are summed before its one madd. The same bytes rearranged (a group takes exactly its 8 file rows'
   bytes), computing the same integers and the same float steps as q4k_tile / q6k_tile: the same bits.

   Q4_K, one super-block of 8 rows (1152 bytes):
     [0, 16) d of rows 0..7 (fp16)   [16, 32) their dmin   [32, 128) scale word w (bytes 4w..4w+3) of row r at 32 + 32w + 4r
     [128, 1152) row r's qs[32j + 4c .. +3] at 128 + 32 (8j + c) + 4r                     (j < 4, c < 8)
   Q6_K (1680 bytes):
     [0, 16) d   [16, 144) scale i of row r at 16 + 8i + r
     [144, 1680) in the order the kernel reads them (a stream the prefetcher follows; three streams a
     super-block apart ran at half the speed from memory), for g < 2, c < 8, at 144 + 96 (8g + c):
       + 4r: row r's ql[64g + 4c .. +3]   + 32 + 4r: ql[64g + 32 + 4c .. +3]   + 64 + 4r: qh[32g + 4c .. +3] */

/* One group of 8 rows, file layout (rows rb bytes apart) <-> x8; inverse: x8 to file. */
static void x8_group(uint8_t *file, uint8_t *x8, int qt, int K, int inverse) {
    const long rb = gguf_row_bytes(qt, K);
    const int q4 = qt == QT_Q4_K, fsb = q4 ? 144 : 210, xsb = q4 ? 1152 : 1680;
#define MV(xo, fo, n) (inverse ? memcpy(f + (fo), g + (xo), (n)) : memcpy(g + (xo), f + (fo), (n)))
    for (int s = 0; s < K / 256; s++) {
        uint8_t *g = x8 + (size_t)s * xsb;
        for (int r = 0; r < 8; r++) {
            uint8_t *f = file + r * rb + (size_t)s * fsb;
            if (q4) {
                MV(2 * r, 0, 2);
                MV(16 + 2 * r, 2, 2);
                for (int w = 0; w < 3; w++) MV(32 + 32 * w + 4 * r, 4 + 4 * w, 4);
                for (int j = 0; j < 4; j++)
                    for (int c = 0; c < 8; c++) MV(128 + 32 * (8 * j + c) + 4 * r, 16 + 32 * j + 4 * c, 4);
            } else {
                MV(2 * r, 208, 2);
                for (int i = 0; i < 16; i++) MV(16 + 8 * i + r, 192 + i, 1);
                for (int gg = 0; gg < 2; gg++)
                    for (int c = 0; c < 8; c++) {
                        for (int p = 0; p < 2; p++) MV(144 + 96 * (8 * gg + c) + 32 * p + 4 * r, 64 * gg + 32 * p + 4 * c, 4);
                        MV(144 + 96 * (8 * gg + c) + 64 + 4 * r, 128 + 32 * gg + 4 * c, 4);
                    }
            }
        }
    }
#undef MV
}

/* The 32-weight types (Q8_0, Q5_0, Q4_0) in x8: a block of 8 rows takes exactly their 8 file blocks' bytes.
     [0, 16) d of rows 0..7 (fp16)
     Q8_0 (272 bytes): row r's qs[4c .. 4c + 3] at 16 + 32c + 4r (c < 8)
     Q4_0 (144): row r's qs[4c .. 4c + 3] at 16 + 32c + 4r (c < 4: low nibbles elements 4c.., high 16 + 4c..)
     Q5_0 (176): the fifth bits at [16, 48): byte 4r + k holds in bit c (c < 4) that of row r's element 4c + k
       and in bit 4 + c that of element 16 + 4c + k, so that a chunk's bits reach bit 4 of their bytes with one
       shift; qs as Q4_0's at 48 + 32c + 4r. */
static void x8_group_b32(uint8_t *file, uint8_t *x8, int qt, int K, int inverse) {
    const long rb = gguf_row_bytes(qt, K);
    const int fb = qt == QT_Q8_0 ? 34 : qt == QT_Q5_0 ? 22 : 18, xb = 8 * fb;
    const int fq = qt == QT_Q5_0 ? 6 : 2, xq = qt == QT_Q5_0 ? 48 : 16, chunks = qt == QT_Q8_0 ? 8 : 4;
#define MV(xo, fo, n) (inverse ? memcpy(f + (fo), g + (xo), (n)) : memcpy(g + (xo), f + (fo), (n)))
    for (int b = 0; b < K / 32; b++) {
        uint8_t *g = x8 + (size_t)b * xb;
        for (int r = 0; r < 8; r++) {
            uint8_t *f = file + r * rb + (size_t)b * fb;
            MV(2 * r, 0, 2);
            for (int c = 0; c < chunks; c++) MV(xq + 32 * c + 4 * r, fq + 4 * c, 4);
            if (qt != QT_Q5_0) continue;
            uint32_t qh = 0;
            if (!inverse) memcpy(&qh, f + 2, 4);
            for (int k = 0; k < 4; k++) {
                uint8_t *v = g + 16 + 4 * r + k;
                if (!inverse) *v = 0;
                for (int c = 0; c < 4; c++)
                    for (int h = 0; h < 2; h++) {  /* h = 1: the high half's element 16 + 4c + k */
                        const int bit = 16 * h + 4 * c + k, at = 4 * h + c;
                        if (inverse) qh |= (uint32_t)((*v >> at) & 1) << bit;
                        else *v |= (uint8_t)(((qh >> bit) & 1) << at);
                    }
            }
            if (inverse) memcpy(f + 2, &qh, 4);
        }
    }
#undef MV
}

/* 1 where the x8 kernels exist (AVX2): elsewhere weights stay in the file's layout. */
int gguf_x8_supported(void) { return Q8_ISA; }

/* One group of 8 rows of any x8 type. */
static void x8_group_any(uint8_t *file, uint8_t *x8, int qt, int K, int inverse) {
    if (qt == QT_Q4_K || qt == QT_Q6_K) x8_group(file, x8, qt, K, inverse);
    else x8_group_b32(file, x8, qt, K, inverse);
}

/* O rows of a matrix (O % 8 == 0; K % 256 == 0 for Q4_K / Q6_K, K % 32 for Q8_0 / Q5_0 / Q4_0) into the x8
   layout, or back (inverse). */
void gguf_interleave_x8(const uint8_t *src, int qtype, int O, int K, uint8_t *dst, int inverse, int nthreads) {
    const long gb = 8 * gguf_row_bytes(qtype, K);
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int g = 0; g < O / 8; g++) {
        uint8_t *a = (uint8_t *)src + (size_t)g * gb, *b = dst + (size_t)g * gb;
        if (inverse) x8_group_any(b, a, qtype & 0xFF, K, 1);
        else x8_group_any(a, b, qtype & 0xFF, K, 0);
    }
}

#if Q8_ISA
#define X8_MT 4  /* activation rows a tile: their accumulators stay in registers */

static inline __attribute__((always_inline)) __m256 fp16x8(const uint8_t *p) {
    float f[8];
    for (int r = 0; r < 8; r++) f[r] = half_to_float(p + 2 * r);
    return _mm256_loadu_ps(f);
}

/* lane r = bytes `lo` and `hi` of lane r's word as the int16 pair (lo, hi): madd with it scales the two
   int16 halves of a lane (lo == hi: one scale for both). */
static inline __attribute__((always_inline)) __m256i byte_pair(__m256i words, int lo, int hi) {
    const __m256i mask = _mm256_set1_epi32(0xFF);
    return _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(words, 8 * lo), mask),
                           _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(words, 8 * hi), mask), 16));
}

/* lane r = Q6_K scales i and j of row r (x8 layout: 8 rows' scale i at 16 + 8i) as the int16 pair (i, j). */
static inline __attribute__((always_inline)) __m256i scale_pair(const uint8_t *sb, int i, int j) {
    const __m256i a = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(sb + 16 + 8 * i)));
    const __m256i b = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)(sb + 16 + 8 * j)));
    return _mm256_or_si256(_mm256_and_si256(a, _mm256_set1_epi32(0xFFFF)), _mm256_slli_epi32(b, 16));
}

static inline __attribute__((always_inline)) __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

static inline __attribute__((always_inline)) __m256i pair16(int a, int b) {
    return _mm256_set1_epi32((int)(((uint32_t)(uint16_t)b << 16) | (uint16_t)a));
}

/* 8 Q4_K rows (one x8 group) times MT activation rows: acc[m] lane r = output (m, r). */
static inline __attribute__((always_inline)) void q4k_x8_tile(
        const uint8_t *grp, const int8_t *xq, const float *dk, const int16_t *bsum, int K, int MT, __m256 *acc) {
    const int ns = K / 256;
    const __m256i low4 = _mm256_set1_epi8(0x0F), m6 = _mm256_set1_epi32(0x3F3F3F3F);
    const __m256i m4 = _mm256_set1_epi32(0x0F0F0F0F), m2 = _mm256_set1_epi32(0x03030303);
    for (int m = 0; m < MT; m++) acc[m] = _mm256_setzero_ps();
    for (int s = 0; s < ns; s++) {
        const uint8_t *sb = grp + (size_t)s * 1152;
        /* q4k_scales for 8 rows at once: sl/sh the scales of sub-blocks 0-3/4-7, ml/mh the mins */
        const __m256i u0 = _mm256_loadu_si256((const __m256i *)(sb + 32));
        const __m256i u1 = _mm256_loadu_si256((const __m256i *)(sb + 64));
        const __m256i u2 = _mm256_loadu_si256((const __m256i *)(sb + 96));
        const __m256i sl = _mm256_and_si256(u0, m6), ml = _mm256_and_si256(u1, m6);
        const __m256i sh = _mm256_or_si256(_mm256_and_si256(u2, m4),
                                           _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u0, 6), m2), 4));
        const __m256i mh = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi32(u2, 4), m4),
                                           _mm256_slli_epi32(_mm256_and_si256(_mm256_srli_epi32(u1, 6), m2), 4));
        __m256i isum[X8_MT];
        for (int m = 0; m < MT; m++) isum[m] = _mm256_setzero_si256();
        for (int j = 0; j < 4; j++) {  /* sub-blocks 2j (low nibbles) and 2j + 1 (high) */
            const __m256i S = j < 2 ? sl : sh;
            const int b = (2 * j) % 4;
            const __m256i sa = byte_pair(S, b, b), sb2 = byte_pair(S, b + 1, b + 1);
            __m256i lo[X8_MT], hi[X8_MT];
            for (int m = 0; m < MT; m++) lo[m] = hi[m] = _mm256_setzero_si256();
            const uint8_t *qp = sb + 128 + 256 * j;
            for (int c = 0; c < 8; c++) {  /* 8 x 2 x 15 x 127 = 30480: the int16 sums cannot overflow */
                const __m256i w = _mm256_loadu_si256((const __m256i *)(qp + 32 * c));
                const __m256i wl = _mm256_and_si256(w, low4), wh = _mm256_and_si256(_mm256_srli_epi16(w, 4), low4);
                for (int m = 0; m < MT; m++) {
                    const int8_t *xp = xq + (size_t)m * K + s * 256 + 64 * j + 4 * c;
                    lo[m] = _mm256_add_epi16(lo[m], _mm256_maddubs_epi16(wl, bcast4(xp)));
                    hi[m] = _mm256_add_epi16(hi[m], _mm256_maddubs_epi16(wh, bcast4(xp + 32)));
                }
            }
            for (int m = 0; m < MT; m++)
                isum[m] = _mm256_add_epi32(isum[m], _mm256_add_epi32(_mm256_madd_epi16(lo[m], sa), _mm256_madd_epi16(hi[m], sb2)));
        }
        /* the mins times the activation sums: sub-block b covers the 16-sums 2b and 2b + 1 */
        __m256i mp[4];
        for (int p = 0; p < 4; p++)  /* lane r: (min of sub-block 2p, min of 2p + 1) as int16 */
            mp[p] = byte_pair(p < 2 ? ml : mh, (2 * p) % 4, (2 * p) % 4 + 1);
        const __m256 d8 = fp16x8(sb), dm8 = fp16x8(sb + 16);
        for (int m = 0; m < MT; m++) {
            const int16_t *bp = bsum + (size_t)m * (K / 16) + s * 16;
            __m256i ms = _mm256_setzero_si256();
            for (int p = 0; p < 4; p++)
                ms = _mm256_add_epi32(ms, _mm256_madd_epi16(mp[p], pair16(bp[4 * p] + bp[4 * p + 1], bp[4 * p + 2] + bp[4 * p + 3])));
            const __m256 dy = _mm256_set1_ps(dk[(size_t)m * ns + s]);
            acc[m] = _mm256_fmadd_ps(_mm256_mul_ps(d8, dy), _mm256_cvtepi32_ps(isum[m]), acc[m]);
            acc[m] = _mm256_fmadd_ps(_mm256_xor_ps(_mm256_mul_ps(dm8, dy), _mm256_set1_ps(-0.f)), _mm256_cvtepi32_ps(ms), acc[m]);
        }
    }
}

/* 8 Q6_K rows times MT activation rows. The stored values u = w + 32 go into maddubs unsigned (the 32 * x
   they add is taken out once a super-block from the 16-sums); 2 x 2 x 63 x 127 = 32004 fits int16, so
   the products of two 4-byte chunks are summed before a madd. */
static inline __attribute__((always_inline)) void q6k_x8_tile(
        const uint8_t *grp, const int8_t *xq, const float *dk, const int16_t *bsum, int K, int MT, __m256 *acc) {
    const int ns = K / 256;
    for (int m = 0; m < MT; m++) acc[m] = _mm256_setzero_ps();
    for (int s = 0; s < ns; s++) {
        const uint8_t *sb = grp + (size_t)s * 1680;
        __m256i isum[X8_MT];
        for (int m = 0; m < MT; m++) isum[m] = _mm256_setzero_si256();
        for (int g = 0; g < 2; g++) {
            const uint8_t *cp = sb + 144 + 96 * 8 * g;  /* chunk c: ql low half, ql high half, qh; 96 bytes */
            for (int c = 0; c < 8; c += 2) {  /* elements 4c .. 4c + 7 of the four 32-blocks of this half */
                __m256i a[X8_MT][4];
                for (int m = 0; m < MT; m++) for (int r = 0; r < 4; r++) a[m][r] = _mm256_setzero_si256();
                for (int cc = c; cc < c + 2; cc++) {
                    const __m256i l0 = _mm256_loadu_si256((const __m256i *)(cp + 96 * cc));
                    const __m256i l1 = _mm256_loadu_si256((const __m256i *)(cp + 96 * cc + 32));
                    const __m256i hb = _mm256_loadu_si256((const __m256i *)(cp + 96 * cc + 64));
                    __m256i u[4];
                    q6k_unpack4(l0, l1, hb, u);
                    for (int m = 0; m < MT; m++)
                        for (int r = 0; r < 4; r++)
                            a[m][r] = _mm256_add_epi16(a[m][r], _mm256_maddubs_epi16(
                                u[r], bcast4(xq + (size_t)m * K + s * 256 + 128 * g + 32 * r + 4 * cc)));
                }
                for (int r = 0; r < 4; r++) {  /* elements 0-15 of block r take scale 8g + 2r, 16-31 the next */
                    const int k = 8 * g + 2 * r + (c >= 4);
                    const __m256i sp = scale_pair(sb, k, k);
                    for (int m = 0; m < MT; m++) isum[m] = _mm256_add_epi32(isum[m], _mm256_madd_epi16(a[m][r], sp));
                }
            }
        }
        /* 32 * sum_i scale_i * (16-sum i), taken out of each row's sum */
        __m256i sp[8];
        for (int i = 0; i < 8; i++) sp[i] = scale_pair(sb, 2 * i, 2 * i + 1);
        const __m256 d8 = fp16x8(sb);
        for (int m = 0; m < MT; m++) {
            const int16_t *bp = bsum + (size_t)m * (K / 16) + s * 16;
            __m256i corr = _mm256_setzero_si256();
            for (int i = 0; i < 8; i++) corr = _mm256_add_epi32(corr, _mm256_madd_epi16(sp[i], pair16(bp[2 * i], bp[2 * i + 1])));
            const __m256i total = _mm256_sub_epi32(isum[m], _mm256_slli_epi32(corr, 5));
            acc[m] = _mm256_fmadd_ps(_mm256_mul_ps(d8, _mm256_set1_ps(dk[(size_t)m * ns + s])), _mm256_cvtepi32_ps(total), acc[m]);
        }
    }
}

/* Output rows o0..o1 (multiples of 8) of an x8 matrix for all M activation rows. */
static void kquant_x8_rows(int o0, int o1, const int8_t *xq, const float *dk, const int16_t *bsum, int M, int K,
                           const uint8_t *raw, int qt, float *y, long ldy) {
    const long gb = 8 * gguf_row_bytes(qt, K);
    const int ns = K / 256;
    /* Prefill: the activation rows in blocks that stay in L2 (~256 KB) while every group of this thread's
       share passes over them; all M rows at once would stream megabytes from L3 for each group. */
    int mb = (256 << 10) / K / X8_MT * X8_MT;
    if (mb < X8_MT) mb = X8_MT;
    for (int b0 = 0; b0 < M; b0 += mb) {
        const int b1 = b0 + mb < M ? b0 + mb : M;
        for (int g = o0 / 8; g < o1 / 8; g++)
            for (int m0 = b0; m0 < b1; m0 += X8_MT) {
                const int mt = b1 - m0 < X8_MT ? b1 - m0 : X8_MT;
                const uint8_t *grp = raw + (size_t)g * gb;
                const int8_t *xm = xq + (size_t)m0 * K;
                const float *dm = dk + (size_t)m0 * ns;
                const int16_t *bm = bsum + (size_t)m0 * (K / 16);
                __m256 acc[X8_MT];
#define X8(n) if (qt == QT_Q4_K) q4k_x8_tile(grp, xm, dm, bm, K, n, acc); else q6k_x8_tile(grp, xm, dm, bm, K, n, acc)
                switch (mt) { case 1: X8(1); break; case 2: X8(2); break; case 3: X8(3); break; default: X8(4); break; }
#undef X8
                for (int m = 0; m < mt; m++) _mm256_storeu_ps(y + (size_t)(m0 + m) * ldy + 8 * g, acc[m]);
            }
    }
}
#endif

#if Q8_ISA
static inline __attribute__((always_inline)) __m256 fp16x8_f16c(const uint8_t *p) {
#if defined(__F16C__)
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)p));
#else
    return fp16x8(p);
#endif
}

/* 8 Q5_0 / Q4_0 rows (one x8 group) times MT activation rows rounded per 32 (xq, dx; xs: each block's sum of
   xq). The stored values u = w + off (off 16 / 8) go into maddubs unsigned and off * sum(x) comes out once
   a block; 4 chunks' int16 sums fit (4 x 2 x 31 x 127 = 31496), so a block of a row pair is 8 maddubs, 2 madds
   and an exact int32, then one fma: acc = fma(d * dx, isum, acc) block by block, whatever the tiling. */
static inline __attribute__((always_inline)) void b32_x8_tile(
        const uint8_t *grp, const int qt, const int8_t *xq, const float *dx, const int32_t *xs, int K, int MT,
        __m256 *acc) {
    const int nb = K / 32, fb = qt == QT_Q5_0 ? 176 : 144, q0 = qt == QT_Q5_0 ? 48 : 16, off = qt == QT_Q5_0 ? 16 : 8;
    const __m256i low4 = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10), ones = _mm256_set1_epi16(1);
    for (int m = 0; m < MT; m++) acc[m] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = grp + (size_t)b * fb;
        const __m256i H = qt == QT_Q5_0 ? _mm256_loadu_si256((const __m256i *)(blk + 16)) : _mm256_setzero_si256();
        __m256i lo[X8_MT], hi[X8_MT];
        for (int m = 0; m < MT; m++) lo[m] = hi[m] = _mm256_setzero_si256();
#pragma GCC unroll 4
        for (int c = 0; c < 4; c++) {
            const __m256i q = _mm256_loadu_si256((const __m256i *)(blk + q0 + 32 * c));
            __m256i wl = _mm256_and_si256(q, low4), wh = _mm256_and_si256(_mm256_srli_epi16(q, 4), low4);
            if (qt == QT_Q5_0) {  /* bit c of H's bytes is the low element's fifth bit, bit 4 + c the high one's */
                wl = _mm256_or_si256(wl, _mm256_and_si256(_mm256_slli_epi16(H, 4 - c), bit4));
                wh = _mm256_or_si256(wh, _mm256_and_si256(_mm256_srli_epi16(H, c), bit4));
            }
            for (int m = 0; m < MT; m++) {
                const int8_t *xp = xq + (size_t)m * K + 32 * b + 4 * c;
                lo[m] = _mm256_add_epi16(lo[m], _mm256_maddubs_epi16(wl, bcast4(xp)));
                hi[m] = _mm256_add_epi16(hi[m], _mm256_maddubs_epi16(wh, bcast4(xp + 16)));
            }
        }
        const __m256 d8 = fp16x8_f16c(blk);
        for (int m = 0; m < MT; m++) {
            __m256i is = _mm256_add_epi32(_mm256_madd_epi16(lo[m], ones), _mm256_madd_epi16(hi[m], ones));
            is = _mm256_sub_epi32(is, _mm256_set1_epi32(off * xs[(size_t)m * nb + b]));
            acc[m] = _mm256_fmadd_ps(_mm256_mul_ps(d8, _mm256_set1_ps(dx[(size_t)m * nb + b])),
                                     _mm256_cvtepi32_ps(is), acc[m]);
        }
    }
}

/* 8 Q8_0 rows times MT activation rows: |w| times x carrying w's sign (a pair reaches 2 x 128 x 127, so
   every chunk needs its own madd), the block's exact int32, then the same fma as b32_x8_tile. */
static inline __attribute__((always_inline)) void q80_x8_tile(
        const uint8_t *grp, const int8_t *xq, const float *dx, int K, int MT, __m256 *acc) {
    const int nb = K / 32;
    const __m256i ones = _mm256_set1_epi16(1);
    for (int m = 0; m < MT; m++) acc[m] = _mm256_setzero_ps();
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = grp + (size_t)b * 272;
        __m256i is[X8_MT];
        for (int m = 0; m < MT; m++) is[m] = _mm256_setzero_si256();
#pragma GCC unroll 8
        for (int c = 0; c < 8; c++) {
            const __m256i w = _mm256_loadu_si256((const __m256i *)(blk + 16 + 32 * c)), a = _mm256_sign_epi8(w, w);
            for (int m = 0; m < MT; m++) {
                const __m256i x = _mm256_sign_epi8(bcast4(xq + (size_t)m * K + 32 * b + 4 * c), w);
                is[m] = _mm256_add_epi32(is[m], _mm256_madd_epi16(_mm256_maddubs_epi16(a, x), ones));
            }
        }
        const __m256 d8 = fp16x8_f16c(blk);
        for (int m = 0; m < MT; m++)
            acc[m] = _mm256_fmadd_ps(_mm256_mul_ps(d8, _mm256_set1_ps(dx[(size_t)m * nb + b])),
                                     _mm256_cvtepi32_ps(is[m]), acc[m]);
    }
}

/* Output rows o0..o1 (multiples of 8) of an x8 Q8_0 / Q5_0 / Q4_0 matrix for all M activation rows,
   in blocks of activation rows that stay in L2 (as kquant_x8_rows). */
static void b32_x8_rows(int o0, int o1, const int8_t *xq, const float *dx, int M, int K, const uint8_t *raw,
                        int qt, float *y, long ldy) {
    const long gb = 8 * gguf_row_bytes(qt, K);
    const int nb = K / 32;
    int mb = (256 << 10) / K / X8_MT * X8_MT;
    if (mb < X8_MT) mb = X8_MT;
    int32_t xs[qt == QT_Q8_0 ? 1 : (size_t)mb * nb];  /* each block's sum of xq (<= 32 KB + a little) */
    for (int b0 = 0; b0 < M; b0 += mb) {
        const int b1 = b0 + mb < M ? b0 + mb : M;
        if (qt != QT_Q8_0)
            for (int m = b0; m < b1; m++)
                for (int b = 0; b < nb; b++) {
                    const int8_t *xp = xq + (size_t)m * K + 32 * b;
                    int t = 0;
                    for (int j = 0; j < 32; j++) t += xp[j];
                    xs[(size_t)(m - b0) * nb + b] = t;
                }
        for (int g = o0 / 8; g < o1 / 8; g++)
            for (int m0 = b0; m0 < b1; m0 += X8_MT) {
                const int mt = b1 - m0 < X8_MT ? b1 - m0 : X8_MT;
                const uint8_t *grp = raw + (size_t)g * gb;
                const int8_t *xm = xq + (size_t)m0 * K;
                const float *dm = dx + (size_t)m0 * nb;
                const int32_t *sm = xs + (qt == QT_Q8_0 ? 0 : (size_t)(m0 - b0) * nb);
                __m256 acc[X8_MT];
#define B32(n) if (qt == QT_Q5_0) b32_x8_tile(grp, QT_Q5_0, xm, dm, sm, K, n, acc); \
               else if (qt == QT_Q4_0) b32_x8_tile(grp, QT_Q4_0, xm, dm, sm, K, n, acc); \
               else q80_x8_tile(grp, xm, dm, K, n, acc)
                switch (mt) { case 1: B32(1); break; case 2: B32(2); break; case 3: B32(3); break; default: B32(4); break; }
#undef B32
                for (int m = 0; m < mt; m++) _mm256_storeu_ps(y + (size_t)(m0 + m) * ldy + 8 * g, acc[m]);
            }
    }
}
#endif

/* Output column o of a K-quant matrix for all M activation rows (qtype a constant in each caller). */
static inline __attribute__((always_inline)) void kquant_row_t(
        int o, const int8_t *xq, const float *dk, const int16_t *bsum, int M, int K, const uint8_t *raw,
        const int qtype, float *y, long ldy) {
    const uint8_t *row = raw + (size_t)o * gguf_row_bytes(qtype, K);
    float out[TILE];
    for (int m0 = 0; m0 < M; m0 += TILE) {
        const int mt = M - m0 < TILE ? M - m0 : TILE;
        const int8_t *xm = xq + (size_t)m0 * K;
        const float *dm = dk + (size_t)m0 * (K / 256);
        const int16_t *bm = bsum + (size_t)m0 * (K / 16);
#define KQ(n) if (qtype == QT_Q4_K) q4k_tile(row, xm, dm, bm, K, n, out); else q6k_tile(row, xm, dm, bm, K, n, out)
        DISPATCH_TILE(KQ)
#undef KQ
        for (int m = 0; m < mt; m++) y[(size_t)(m0 + m) * ldy + o] = out[m];
    }
}

static void kquant_rows(int o0, int o1, const int8_t *xq, const float *dk, const int16_t *bsum, int M, int K,
                        const uint8_t *raw, int qtype, float *y, long ldy) {
#if Q8_ISA
    if (qtype & QT_X8) {
        kquant_x8_rows(o0, o1, xq, dk, bsum, M, K, raw, qtype & 0xFF, y, ldy);
        return;
    }
#endif
    if (qtype == QT_Q4_K)
        for (int o = o0; o < o1; o++) kquant_row_t(o, xq, dk, bsum, M, K, raw, QT_Q4_K, y, ldy);
    else
        for (int o = o0; o < o1; o++) kquant_row_t(o, xq, dk, bsum, M, K, raw, QT_Q6_K, y, ldy);
}

static inline int is_kquant(int qtype) { return (qtype & 0xFF) == QT_Q4_K || (qtype & 0xFF) == QT_Q6_K; }

/* 1 where the K-quant kernels were built with VNNI's vpdpwssd (for bench output). */
int gguf_kquant_vnni(void) {
#if Q8_ISA
    return KQUANT_VNNI;
#else
    return 0;
#endif
}

/* Activation rounding of the K-quant kernels (for tests and the PyTorch reference). */
void gguf_quantize_rows_k(const float *x, int M, int K, int8_t *xq, float *dk, int16_t *bsum) {
    quantize_rows_k(x, M, K, xq, dk, bsum);
}

/* y [M, O] = x [M, K] @ W.T for packed W (K % 32 == 0; K % 256 == 0 for the K-quants; the caller checks),
   activations rounded to int8 per 32 as blockint8_matmul_q8 does (per 256 for Q4_K and Q6_K: Q8_K, above). xsum: float sums of x per 32 (Q4_K
   only, else NULL). x's rows are ldx floats apart (K when contiguous; an MLP passes the gate half of gate_up
   as it is, saving a copy at the peak of prefill). Returns 0, or -1 when the activation buffers cannot be
   allocated. */
int gguf_matmul_q8(const float *x, const float *xsum, int M, int K, const uint8_t *raw, int qtype, int O,
                   float *y, int nthreads, long ldx) {
    if (is_kquant(qtype)) {  /* Q8_K activations (xsum unused) */
        int8_t *xq = malloc((size_t)M * K);
        float *dk = malloc((size_t)M * (K / 256) * sizeof(float));
        int16_t *bs = malloc((size_t)M * (K / 16) * sizeof(int16_t));
        if (!xq || !dk || !bs) { free(xq); free(dk); free(bs); return -1; }
#pragma omp parallel num_threads(nthreads)
        {
            /* each thread rounds a share of the rows (a 512-token prompt's are ~10% of the matmul alone) */
#pragma omp for schedule(static)
            for (int m = 0; m < M; m++)
                quantize_rows_k(x + (size_t)m * ldx, 1, K, xq + (size_t)m * K, dk + (size_t)m * (K / 256), bs + (size_t)m * (K / 16));
            int o0, o1;
            share(O, omp_get_thread_num(), omp_get_num_threads(), 8, &o0, &o1);
            kquant_rows(o0, o1, xq, dk, bs, M, K, raw, qtype, y, O);
        }
        free(xq); free(dk); free(bs);
        return 0;
    }
    int8_t *xq = malloc((size_t)M * K);
    float *dx = malloc((size_t)M * (K / 32) * sizeof(float));
    if (!xq || !dx) { free(xq); free(dx); return -1; }
    for (int m = 0; m < M; m++) quantize_rows(x + (size_t)m * ldx, 1, K, xq + (size_t)m * K, dx + (size_t)m * (K / 32));
#pragma omp parallel num_threads(nthreads)
    {
        int o0, o1;
        share(O, omp_get_thread_num(), omp_get_num_threads(), 8, &o0, &o1);
        packed_rows(o0, o1, xq, dx, xsum, M, K, raw, qtype, y, O);
    }
    free(xq);
    free(dx);
    return 0;
}

/* One row of W as float32 (q * scale + offset), as blocks.dequantize computes the BlockInt8 form (and
   gguf.quants.dequantize the file's blocks), bit for bit. */
static void dequantize_row(const uint8_t *row, int qtype, int K, float *dst) {
    const int nb = K / 32;
    float sc[2 * nb], offs[nb];
    row_params(row, qtype, nb, sc, offs);
    for (int b = 0; b < nb; b++) {
        const float s0 = qtype == QT_Q6_K ? sc[2 * b] : sc[b], s1 = qtype == QT_Q6_K ? sc[2 * b + 1] : s0;
        const float off = qtype == QT_Q4_K ? offs[b] : 0.f;
#if Q8_ISA
        const __m256i w = unpack32_avx2(row, qtype, b, b % 8, 0);
        const __m128i lo = _mm256_castsi256_si128(w), hi = _mm256_extracti128_si256(w, 1);
        const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
        for (int k = 0; k < 4; k++) {  /* 8 weights each: (float)q * scale (+ offset), as the scalar loop */
            __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[k])),
                                     _mm256_set1_ps(k < 2 ? s0 : s1));
            if (qtype == QT_Q4_K) v = _mm256_add_ps(v, _mm256_set1_ps(off));
            _mm256_storeu_ps(dst + b * 32 + k * 8, v);
        }
#else
        int8_t w[32];
        unpack32(row, qtype, b, w);
        for (int j = 0; j < 32; j++) {
            const float v = (float)w[j] * (j < 16 ? s0 : s1);
            dst[b * 32 + j] = qtype == QT_Q4_K ? v + off : v;
        }
#endif
    }
}

/* Rows of W as float32 out [O, K]. An x8 matrix goes back to the file's layout a group of 8 rows at a
   time, into each thread's small buffer (prefill dequantizes panels of ~1,000 rows: a panel-sized copy
   was 3.4 MB more at the 0.5B's peak). */
void gguf_dequantize(const uint8_t *raw, int qtype, int O, int K, float *out, int nthreads) {
    const long rb = gguf_row_bytes(qtype, K);
    if (qtype & QT_X8) {
#pragma omp parallel num_threads(nthreads)
        {
            uint8_t *file = malloc(8 * rb);
#pragma omp for schedule(static)
            for (int g = 0; g < O / 8; g++) {
                if (!file) {  /* out of memory for 8 rows: NaN, never stale values */
                    for (size_t i = 0; i < (size_t)8 * K; i++) out[(size_t)g * 8 * K + i] = NAN;
                    continue;
                }
                x8_group_any(file, (uint8_t *)raw + (size_t)g * 8 * rb, qtype & 0xFF, K, 1);
                for (int r = 0; r < 8; r++) dequantize_row(file + r * rb, qtype & 0xFF, K, out + ((size_t)g * 8 + r) * K);
            }
            free(file);
        }
        return;
    }
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int o = 0; o < O; o++) dequantize_row(raw + (size_t)o * rb, qtype, K, out + (size_t)o * K);
}
