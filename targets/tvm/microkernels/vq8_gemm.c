/* ------------------------------------------------------------------ int8 weight GEMM (vision encoder)
 * The q8 weights of docs/DESIGN.md (int8 [n_out, Kp], f16 scale per 32 inputs; Kp = k rounded up to 32,
 * zero columns) against many tokens at once (the vision encoder's ~1024 patches): a real GEMM, not one
 * GEMV per token.  Layouts private to this object:
 *   activations (vq8_quant_act): tokens in quads, Mp = m rounded up to 4 (zero tokens), per token quad
 *     and group 8 chunks of [4 tokens][4 inputs] (128 bytes), scales xd [quad][group][4 tokens].  AVX-512
 *     VNNI stores them offset to unsigned (x + 128) for vpdpbusd, others signed.
 *   weights: each task copies VQ8_ROWS rows into the same interleaved form on its stack ([row quad]
 *     [group][8 chunks][4 rows][4 inputs], scales as float), once per task, then sweeps all tokens
 *     (stack: VQ8_ROWS * Kp * 1.25 bytes, 173 KB for so400m's fc2; thread stacks are >= 1 MB).
 * Tile: 2 row quads x 4 tokens (NEON dotprod: sdot by lane, acc lane = row), 2 row quads x 4 token
 * quads (AVX-512 VNNI: lane = row * 4 + token; weight sums correct the +128 offset), 1 row quad x 2 token
 * quads (AVX2: |w| x sign(x, w)), 2 row quads x 4 tokens (Armv8.0 NEON: smull + sadalp), scalar
 * otherwise (e.g. AVX-512BW without VNNI).
 * Per group the int32 sums are scaled by s_w * d_x into float accumulators (the Q8_0 x Q8_0 maths). */
#define VQ8_ROWS 32

static inline int64_t vq8_idx(int64_t tq, int64_t g, int64_t G) { return (tq * G + g) * 128; }

static void vq8_quant_tokens(const float* x, int64_t m, int64_t k, int8_t* xq, float* xd, int64_t tq0, int64_t tq1) {
  const int64_t G = (k + 31) / 32;
  for (int64_t tq = tq0; tq < tq1; tq++)
    for (int t = 0; t < 4; t++) {
      const int64_t tok = tq * 4 + t;
      for (int64_t g = 0; g < G; g++) {
        float v[32];
        float amax = 0.f;
        for (int e = 0; e < 32; e++) {
          const int64_t c = g * 32 + e;
          v[e] = (tok < m && c < k) ? x[tok * k + c] : 0.f;
          amax = fabs_(v[e]) > amax ? fabs_(v[e]) : amax;
        }
        const float id = amax > 0.f ? 127.f / amax : 0.f;
        xd[(tq * G + g) * 4 + t] = amax / 127.f;
        int8_t* q = xq + vq8_idx(tq, g, G) + t * 4;
        for (int e = 0; e < 32; e++) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
          q[(e >> 2) * 16 + (e & 3)] = (int8_t)(uint8_t)(round_q(v[e] * id) + 128);
#else
          q[(e >> 2) * 16 + (e & 3)] = round_q(v[e] * id);
#endif
        }
      }
    }
}

/* x float32 [m, k] -> xq int8 [Mp*Kp], xd float32 [Mp*Kp/32]; parallel slot t of n takes a share of the quads. */
KEXPORT int32_t KSYM(vq8_quant_act)(const DLT* xt, DLT* xqt, DLT* xdt, int32_t t, int32_t n) {
  const int64_t m = xt->shape[0], k = xt->shape[1], TQ = (m + 3) / 4;
  vq8_quant_tokens(PTR(const float, xt), m, k, PTR(int8_t, xqt), PTR(float, xdt), t * TQ / n, (t + 1) * TQ / n);
  return 0;
}

/* rows [r0, r0 + nr) of qw/sc -> wb [quads][G][8][4][4], ws [quads][G][4] (float), wsum [quads][G][4] */
static void vq8_pack_rows(const int8_t* qw, const uint16_t* sc, int64_t n_out, int64_t Kp, int64_t r0, int64_t nr,
                          int8_t* wb, float* ws, int32_t* wsum) {
  const int64_t G = Kp / 32, RQ = (nr + 3) / 4;
  for (int64_t rq = 0; rq < RQ; rq++)
    for (int r = 0; r < 4; r++) {
      const int64_t row = r0 + rq * 4 + r;
      const int ok = row < r0 + nr && row < n_out;
      for (int64_t g = 0; g < G; g++) {
        int32_t s = 0;
        int8_t* dst = wb + vq8_idx(rq, g, G) + r * 4;
        for (int e = 0; e < 32; e++) {
          const int8_t v = ok ? qw[row * Kp + g * 32 + e] : 0;
          dst[(e >> 2) * 16 + (e & 3)] = v;
          s += v;
        }
        ws[(rq * G + g) * 4 + r] = ok ? h2f_fast(sc[row * G + g]) : 0.f;
        wsum[(rq * G + g) * 4 + r] = 128 * s;
      }
    }
}

/* y[t, row] for 4 tokens (quad tq) x 4 rows (quad rq), portable C over the interleaved layouts. */
static void vq8_tile_c(const int8_t* wb, const float* ws, const int32_t* wsum, const int8_t* xq, const float* xd,
                       int64_t G, float out[4][4]) {
  for (int t = 0; t < 4; t++)
    for (int r = 0; r < 4; r++) out[t][r] = 0.f;
  for (int64_t g = 0; g < G; g++) {
    const int8_t* w = wb + g * 128;
    const int8_t* x = xq + g * 128;
    for (int t = 0; t < 4; t++)
      for (int r = 0; r < 4; r++) {
        int32_t a = 0;
        for (int c = 0; c < 8; c++)
          for (int b = 0; b < 4; b++) {
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
            a += (int32_t)w[c * 16 + r * 4 + b] * (int32_t)(uint8_t)x[c * 16 + t * 4 + b];
#else
            a += (int32_t)w[c * 16 + r * 4 + b] * (int32_t)x[c * 16 + t * 4 + b];
#endif
          }
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
        a -= wsum[g * 4 + r];
#else
        (void)wsum;
#endif
        out[t][r] += ws[g * 4 + r] * xd[g * 4 + t] * (float)a;
      }
  }
}

static inline void vq8_store(float* y, int64_t m, int64_t n_out, int64_t tok0, int64_t row0, float v[4][4]) {
  for (int t = 0; t < 4; t++)
    if (tok0 + t < m)
      for (int r = 0; r < 4; r++)
        if (row0 + r < n_out) y[(tok0 + t) * n_out + row0 + r] = v[t][r];
}

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
/* 2 row quads x 4 token quads; accumulator lanes i = r * 4 + t. */
static void vq8_block_avx512(const int8_t* wb, const float* ws, const int32_t* wsum, const int8_t* xq,
                             const float* xd, int64_t G, float* y, int64_t m, int64_t n_out, int64_t tok0,
                             int64_t row0, int64_t wstride, int64_t xstride) {
  const __m512i ridx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  __m512 f[2][4];
  for (int a = 0; a < 2; a++)
    for (int b = 0; b < 4; b++) f[a][b] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    __m512i acc[2][4];
    for (int a = 0; a < 2; a++)
      for (int b = 0; b < 4; b++) acc[a][b] = _mm512_setzero_si512();
    for (int c = 0; c < 8; c++) {
      __m512i wv[2], xv[4];
      for (int a = 0; a < 2; a++)
        wv[a] = _mm512_permutexvar_epi32(ridx, _mm512_castsi128_si512(
            _mm_loadu_si128((const __m128i*)(wb + a * wstride + g * 128 + c * 16))));
      for (int b = 0; b < 4; b++)
        xv[b] = _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i*)(xq + b * xstride + g * 128 + c * 16)));
      for (int a = 0; a < 2; a++)
        for (int b = 0; b < 4; b++) acc[a][b] = _mm512_dpbusd_epi32(acc[a][b], xv[b], wv[a]);
    }
    for (int a = 0; a < 2; a++) {
      const int64_t wo = a * (wstride / 32);   /* float / int32 arrays: 4 per group per quad */
      const __m512 sv = _mm512_permutexvar_ps(ridx, _mm512_castps128_ps512(_mm_loadu_ps(ws + wo + g * 4)));
      const __m512i cv = _mm512_permutexvar_epi32(ridx, _mm512_castsi128_si512(
          _mm_loadu_si128((const __m128i*)(wsum + wo + g * 4))));
      for (int b = 0; b < 4; b++) {
        const __m512 dv = _mm512_broadcast_f32x4(_mm_loadu_ps(xd + b * (xstride / 32) + g * 4));
        f[a][b] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[a][b], cv)), _mm512_mul_ps(sv, dv), f[a][b]);
      }
    }
  }
  for (int a = 0; a < 2; a++)
    for (int b = 0; b < 4; b++) {
      float l[16], v[4][4];
      _mm512_storeu_ps(l, f[a][b]);
      for (int r = 0; r < 4; r++)
        for (int t = 0; t < 4; t++) v[t][r] = l[r * 4 + t];
      vq8_store(y, m, n_out, tok0 + b * 4, row0 + a * 4, v);
    }
}
#endif

#if !(defined(__AVX512VNNI__) && defined(__AVX512BW__)) && defined(__AVX2__) && defined(__FMA__)
#define VQ8_AVX2 1
/* 1 row quad x 2 token quads; two registers per row quad (rows 0-1, rows 2-3), lanes i = r * 4 + t.
 * s8 x s8 through the u8 x s8 instruction: |w| x sign(x, w) (pair sums <= 2 * 127 * 127, no saturation). */
static void vq8_block_avx2(const int8_t* wb, const float* ws, const int8_t* xq, const float* xd, int64_t G,
                           float* y, int64_t m, int64_t n_out, int64_t tok0, int64_t row0, int64_t xstride) {
  const __m256i lo_idx = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0), hi_idx = _mm256_set_epi32(3, 3, 3, 3, 2, 2, 2, 2);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 f[2][2];
  for (int h = 0; h < 2; h++)
    for (int b = 0; b < 2; b++) f[h][b] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    __m256i acc[2][2];
    for (int h = 0; h < 2; h++)
      for (int b = 0; b < 2; b++) acc[h][b] = _mm256_setzero_si256();
    for (int c = 0; c < 8; c++) {
      const __m256i w4 = _mm256_castsi128_si256(_mm_loadu_si128((const __m128i*)(wb + g * 128 + c * 16)));
      const __m256i wv[2] = {_mm256_permutevar8x32_epi32(w4, lo_idx), _mm256_permutevar8x32_epi32(w4, hi_idx)};
      for (int b = 0; b < 2; b++) {
        const __m256i xv =
            _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i*)(xq + b * xstride + g * 128 + c * 16)));
        for (int h = 0; h < 2; h++) {
          const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv[h], wv[h]), _mm256_sign_epi8(xv, wv[h]));
          acc[h][b] = _mm256_add_epi32(acc[h][b], _mm256_madd_epi16(p, ones));
        }
      }
    }
    const __m256 s4 = _mm256_castps128_ps256(_mm_loadu_ps(ws + g * 4));
    const __m256 sv[2] = {_mm256_permutevar8x32_ps(s4, lo_idx), _mm256_permutevar8x32_ps(s4, hi_idx)};
    for (int b = 0; b < 2; b++) {
      const __m256 dv = _mm256_broadcast_ps((const __m128*)(xd + b * (xstride / 32) + g * 4));
      for (int h = 0; h < 2; h++)
        f[h][b] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[h][b]), _mm256_mul_ps(sv[h], dv), f[h][b]);
    }
  }
  for (int b = 0; b < 2; b++) {
    float l[2][8], v[4][4];
    _mm256_storeu_ps(l[0], f[0][b]);
    _mm256_storeu_ps(l[1], f[1][b]);
    for (int r = 0; r < 4; r++)
      for (int t = 0; t < 4; t++) v[t][r] = l[r / 2][(r % 2) * 4 + t];
    vq8_store(y, m, n_out, tok0 + b * 4, row0, v);
  }
}
#endif

#if defined(__ARM_NEON) && defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
/* 2 row quads x 4 tokens; acc[a][t] lanes = the 4 rows of quad a. */
static void vq8_block_neon(const int8_t* wb, const float* ws, const int8_t* xq, const float* xd, int64_t G,
                           float* y, int64_t m, int64_t n_out, int64_t tok0, int64_t row0, int64_t wstride) {
  float32x4_t f[2][4];
  for (int a = 0; a < 2; a++)
    for (int t = 0; t < 4; t++) f[a][t] = vdupq_n_f32(0.f);
  for (int64_t g = 0; g < G; g++) {
    int32x4_t acc[2][4];
    for (int a = 0; a < 2; a++)
      for (int t = 0; t < 4; t++) acc[a][t] = vdupq_n_s32(0);
    for (int c = 0; c < 8; c++) {
      const int8x16_t xv = vld1q_s8(xq + g * 128 + c * 16);
      for (int a = 0; a < 2; a++) {
        const int8x16_t wv = vld1q_s8(wb + a * wstride + g * 128 + c * 16);
        acc[a][0] = vdotq_laneq_s32(acc[a][0], wv, xv, 0);
        acc[a][1] = vdotq_laneq_s32(acc[a][1], wv, xv, 1);
        acc[a][2] = vdotq_laneq_s32(acc[a][2], wv, xv, 2);
        acc[a][3] = vdotq_laneq_s32(acc[a][3], wv, xv, 3);
      }
    }
    const float32x4_t dv = vld1q_f32(xd + g * 4);
    for (int a = 0; a < 2; a++) {
      const float32x4_t sv = vld1q_f32(ws + a * (wstride / 32) + g * 4);
      f[a][0] = vfmaq_f32(f[a][0], vcvtq_f32_s32(acc[a][0]), vmulq_laneq_f32(sv, dv, 0));
      f[a][1] = vfmaq_f32(f[a][1], vcvtq_f32_s32(acc[a][1]), vmulq_laneq_f32(sv, dv, 1));
      f[a][2] = vfmaq_f32(f[a][2], vcvtq_f32_s32(acc[a][2]), vmulq_laneq_f32(sv, dv, 2));
      f[a][3] = vfmaq_f32(f[a][3], vcvtq_f32_s32(acc[a][3]), vmulq_laneq_f32(sv, dv, 3));
    }
  }
  for (int a = 0; a < 2; a++) {
    float v[4][4];
    for (int t = 0; t < 4; t++) vst1q_f32(v[t], f[a][t]);
    vq8_store(y, m, n_out, tok0, row0 + a * 4, v);
  }
}
#endif

#if defined(__ARM_NEON) && defined(__aarch64__) && !defined(__ARM_FEATURE_DOTPROD)
#define VQ8_NEON 1
/* Armv8.0 NEON (no sdot): 2 row quads x 4 tokens.  Per 4-input chunk the token's 4 bytes are broadcast,
 * smull gives [r0 b0..3, r1 b0..3] / [r2.., r3..] (|product| <= 127^2), sadalp adds byte pairs into int32
 * lanes [r b01, r b23]; one pairwise add per group folds them to the 4 row sums. */
static void vq8_block_neon8(const int8_t* wb, const float* ws, const int8_t* xq, const float* xd, int64_t G,
                            float* y, int64_t m, int64_t n_out, int64_t tok0, int64_t row0, int64_t wstride) {
  float32x4_t f[2][4];
  for (int a = 0; a < 2; a++)
    for (int t = 0; t < 4; t++) f[a][t] = vdupq_n_f32(0.f);
  for (int64_t g = 0; g < G; g++) {
    int32x4_t lo[2][4], hi[2][4];
    for (int a = 0; a < 2; a++)
      for (int t = 0; t < 4; t++) lo[a][t] = hi[a][t] = vdupq_n_s32(0);
    for (int c = 0; c < 8; c++) {
      const int32x4_t x4 = vreinterpretq_s32_s8(vld1q_s8(xq + g * 128 + c * 16));
      const int8x16_t w0 = vld1q_s8(wb + g * 128 + c * 16), w1 = vld1q_s8(wb + wstride + g * 128 + c * 16);
      int8x16_t xb[4];
      xb[0] = vreinterpretq_s8_s32(vdupq_laneq_s32(x4, 0));
      xb[1] = vreinterpretq_s8_s32(vdupq_laneq_s32(x4, 1));
      xb[2] = vreinterpretq_s8_s32(vdupq_laneq_s32(x4, 2));
      xb[3] = vreinterpretq_s8_s32(vdupq_laneq_s32(x4, 3));
      for (int t = 0; t < 4; t++) {
        lo[0][t] = vpadalq_s16(lo[0][t], vmull_s8(vget_low_s8(w0), vget_low_s8(xb[t])));
        hi[0][t] = vpadalq_s16(hi[0][t], vmull_high_s8(w0, xb[t]));
        lo[1][t] = vpadalq_s16(lo[1][t], vmull_s8(vget_low_s8(w1), vget_low_s8(xb[t])));
        hi[1][t] = vpadalq_s16(hi[1][t], vmull_high_s8(w1, xb[t]));
      }
    }
    const float32x4_t dv = vld1q_f32(xd + g * 4);
    for (int a = 0; a < 2; a++) {
      const float32x4_t sv = vld1q_f32(ws + a * (wstride / 32) + g * 4);
      f[a][0] = vfmaq_f32(f[a][0], vcvtq_f32_s32(vpaddq_s32(lo[a][0], hi[a][0])), vmulq_laneq_f32(sv, dv, 0));
      f[a][1] = vfmaq_f32(f[a][1], vcvtq_f32_s32(vpaddq_s32(lo[a][1], hi[a][1])), vmulq_laneq_f32(sv, dv, 1));
      f[a][2] = vfmaq_f32(f[a][2], vcvtq_f32_s32(vpaddq_s32(lo[a][2], hi[a][2])), vmulq_laneq_f32(sv, dv, 2));
      f[a][3] = vfmaq_f32(f[a][3], vcvtq_f32_s32(vpaddq_s32(lo[a][3], hi[a][3])), vmulq_laneq_f32(sv, dv, 3));
    }
  }
  for (int a = 0; a < 2; a++) {
    float v[4][4];
    for (int t = 0; t < 4; t++) vst1q_f32(v[t], f[a][t]);
    vq8_store(y, m, n_out, tok0, row0 + a * 4, v);
  }
}
#endif

/* rows [r0, r1) of y [m, n_out] = x qw^T (rows <= VQ8_ROWS) */
static void vq8_rows(const int8_t* qw, const uint16_t* sc, const int8_t* xq, const float* xd, float* y,
                     int64_t m, int64_t n_out, int64_t Kp, int64_t r0, int64_t r1) {
  const int64_t G = Kp / 32, RQ = (r1 - r0 + 3) / 4, TQ = (m + 3) / 4;
  int8_t wb[VQ8_ROWS * Kp];
  float ws[VQ8_ROWS * G];
  int32_t wsum[VQ8_ROWS * G];
  vq8_pack_rows(qw, sc, n_out, Kp, r0, r1 - r0, wb, ws, wsum);
  const int64_t wstride = G * 128;                   /* bytes per row quad (= per token quad) */
  int64_t tq = 0;
#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
  for (; tq + 4 <= TQ; tq += 4) {
    int64_t rq = 0;
    for (; rq + 2 <= RQ; rq += 2)
      vq8_block_avx512(wb + rq * wstride, ws + rq * G * 4, wsum + rq * G * 4, xq + tq * wstride, xd + tq * G * 4, G,
                       y, m, n_out, tq * 4, r0 + rq * 4, wstride, wstride);
    for (; rq < RQ; rq++)
      for (int64_t b = 0; b < 4; b++) {
        float v[4][4];
        vq8_tile_c(wb + rq * wstride, ws + rq * G * 4, wsum + rq * G * 4, xq + (tq + b) * wstride,
                   xd + (tq + b) * G * 4, G, v);
        vq8_store(y, m, n_out, (tq + b) * 4, r0 + rq * 4, v);
      }
  }
#elif defined(VQ8_AVX2)
  for (; tq + 2 <= TQ; tq += 2)
    for (int64_t rq = 0; rq < RQ; rq++)
      vq8_block_avx2(wb + rq * wstride, ws + rq * G * 4, xq + tq * wstride, xd + tq * G * 4, G, y, m, n_out, tq * 4,
                     r0 + rq * 4, wstride);
#elif defined(__ARM_NEON) && defined(__aarch64__)
  for (; tq < TQ; tq++) {
    int64_t rq = 0;
    for (; rq + 2 <= RQ; rq += 2)
#ifdef VQ8_NEON
      vq8_block_neon8(wb + rq * wstride, ws + rq * G * 4, xq + tq * wstride, xd + tq * G * 4, G, y, m, n_out,
                      tq * 4, r0 + rq * 4, wstride);
#else
      vq8_block_neon(wb + rq * wstride, ws + rq * G * 4, xq + tq * wstride, xd + tq * G * 4, G, y, m, n_out,
                     tq * 4, r0 + rq * 4, wstride);
#endif
    for (; rq < RQ; rq++) {
      float v[4][4];
      vq8_tile_c(wb + rq * wstride, ws + rq * G * 4, wsum + rq * G * 4, xq + tq * wstride, xd + tq * G * 4, G, v);
      vq8_store(y, m, n_out, tq * 4, r0 + rq * 4, v);
    }
  }
#endif
  for (; tq < TQ; tq++)
    for (int64_t rq = 0; rq < RQ; rq++) {
      float v[4][4];
      vq8_tile_c(wb + rq * wstride, ws + rq * G * 4, wsum + rq * G * 4, xq + tq * wstride, xd + tq * G * 4, G, v);
      vq8_store(y, m, n_out, tq * 4, r0 + rq * 4, v);
    }
}

/* qw int8 [n_out, Kp], sc f16 [n_out, Kp/32], activations of vq8_quant_act, y float32 [m, n_out]; tasks of
 * VQ8_ROWS rows from the atomic counter (zeroed by counter_reset). */
KEXPORT int32_t KSYM(vq8_matmul_dyn)(const DLT* qwt, const DLT* sct, const DLT* xqt, const DLT* xdt, DLT* yt,
                                     DLT* cnt) {
  const int64_t m = yt->shape[0], n_out = yt->shape[1], Kp = qwt->shape[1];
  for (;;) {
    const int32_t r0 = __atomic_fetch_add(PTR(int32_t, cnt), VQ8_ROWS, __ATOMIC_RELAXED);
    if (r0 >= n_out) return 0;
    vq8_rows(PTR(const int8_t, qwt), PTR(const uint16_t, sct), PTR(const int8_t, xqt), PTR(const float, xdt),
             PTR(float, yt), m, n_out, Kp, r0, r0 + VQ8_ROWS < n_out ? r0 + VQ8_ROWS : n_out);
  }
}
