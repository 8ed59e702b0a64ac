/* Prefill GEMM: int4 (q4f16) weights x int8 activations for chunks of many tokens, included by
 * q4_matmul.c (same activation layout, same maths; see there).
 *
 * Decode reads each weight once per token, which is all a GEMV can do.  For a prefill chunk of m
 * tokens the per-row path (row_dot4: one row x 4 tokens) re-read every token's activations for every
 * weight row: m * k * 1.6 bytes per row (1.9 MB at m = 512, k = 2304), from L3, ~2 TB per 2B-shaped
 * pp512.  Here a task's rows are walked once per block of GEMM_TOK tokens (whose activations,
 * ~120 KB, stay in L2), in register tiles of GEMM_R rows x 4 tokens: each weight block is unpacked once
 * for 4 tokens and each activation block serves GEMM_R rows.
 *   AVX-512 VNNI: 16 rows x 16 tokens, one row per 32-bit lane (q4_gemm_vnni below), blocks of VN_TOK
 *                 tokens; the task's rows left over (< 16) take the 4-row tile
 *   AVX-512 (BW):  4 rows x 4 tokens, 4 groups (128 inputs) per step, 16 zmm accumulators
 *   others (AVX2, Armv8.0, C): 1 row x 1-4 tokens, with the same token blocking.
 * aarch64 with dotprod / i8mm has its own GEMM in q4_neon.c (quad activation layout). */
#if BLK == 4
#define GEMM_R 4
/* y[t, r] for rows w..w + 4 rows (row stride wstride bytes) x tokens xq..xq + 4 tokens. */
static inline void gemm_tile(const uint8_t* w, int64_t wstride, const uint16_t* s, int64_t G, const int8_t* xq,
                             const int32_t* nb, const float* xd, int64_t k, float* out, int64_t ostride) {
  const int64_t W = k / 8;
  const __m512i mask = _mm512_set1_epi8(0x0f);
  const __m512i idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
#ifndef __AVX512VNNI__
  const __m512i ones = _mm512_set1_epi16(1);
#endif
  __m512 acc[GEMM_R][4];
  for (int r = 0; r < GEMM_R; r++)
    for (int t = 0; t < 4; t++) acc[r][t] = _mm512_setzero_ps();
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) {
    __m512i lo[GEMM_R], hi[GEMM_R];
    __m512 sv[GEMM_R];
    for (int r = 0; r < GEMM_R; r++) {
      const __m512i wb = _mm512_loadu_si512((const void*)(w + r * wstride + g * 16));
      lo[r] = _mm512_and_si512(wb, mask);
      hi[r] = _mm512_and_si512(_mm512_srli_epi16(wb, 4), mask);
      sv[r] = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_cvtph_ps(
          _mm_loadl_epi64((const __m128i*)(s + r * G + g)))));
    }
    for (int t = 0; t < 4; t++) {
      const int8_t* xt = xq + t * k + g * 32;
      const __m512i xl = _mm512_loadu_si512((const void*)xt), xh = _mm512_loadu_si512((const void*)(xt + 64));
      const __m512i n = _mm512_loadu_si512((const void*)(nb + t * W + g * 4));
      const __m512 dv = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_loadu_ps(xd + t * G + g)));
      for (int r = 0; r < GEMM_R; r++) {
#ifdef __AVX512VNNI__
        const __m512i a = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(n, lo[r], xl), hi[r], xh);
#else
        const __m512i a = _mm512_add_epi32(n, _mm512_madd_epi16(_mm512_add_epi16(
            _mm512_maddubs_epi16(lo[r], xl), _mm512_maddubs_epi16(hi[r], xh)), ones));
#endif
        acc[r][t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(a), dv), sv[r], acc[r][t]);
      }
    }
  }
  for (int r = 0; r < GEMM_R; r++)
    for (int t = 0; t < 4; t++) {
      float v = _mm512_reduce_add_ps(acc[r][t]);
      for (int64_t gg = g; gg < G; gg++)
        v += group_dot(w + r * wstride + gg * 16, s[r * G + gg], xq + t * k + gg * 32, nb + t * W + gg * 4,
                       xd[t * G + gg]);
      out[t * ostride + r] = v;
    }
}
#endif

#if defined(__AVX512VNNI__) && BLK == 4
/* AVX-512 VNNI: 16 rows x T tokens, one row per 32-bit lane.  The tile above reduces 4 lanes per group
 * at the end and pays a float multiply-add per row x token x 4 groups; here the weight bytes of a group
 * are transposed once (16 rows x 4 dwords -> 4 vectors of one dword per row, 8 unpacks) and serve T
 * tokens, each token's activation dword is a broadcast operand of vpdpbusd, and a group costs 8 vpdpbusd
 * + 1 convert + 1 multiply-add per token for all 16 rows (registers: 8 weight vectors + T <= 16
 * accumulators).  svt: the 16 rows' scales as float, group-major; nbs: per token and group, -7 x the
 * sum of its activations (the four nb lanes of the group added). */
#define VN_TOK 64        /* tokens per block: activations (<= 64 x 5760 bytes) + a task's rows stay in L2 */
#define VN_MAXG 1024     /* groups per row (k <= 32768): nbs and svt live on the stack (<= 320 KB) */

static inline __attribute__((always_inline)) void vnni_tile(const uint8_t* w, int64_t wstride, const float* svt,
                                                            int64_t G, const int8_t* xq, const int32_t* nbs,
                                                            const float* xd, int64_t k, float* y, int64_t n_out,
                                                            const int T) {
  const int64_t G4 = G & ~(int64_t)3;
  const __m512i mask = _mm512_set1_epi8(0x0f);
  __m512 acc[16];
  for (int t = 0; t < T; t++) acc[t] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; g++) {
    const uint8_t* wg = w + g * 16;
#define ROWS4(r) _mm512_inserti32x4(_mm512_inserti32x4(_mm512_inserti32x4(_mm512_castsi128_si512(            \
        _mm_loadu_si128((const __m128i*)(wg + (r) * wstride))), _mm_loadu_si128((const __m128i*)(wg + ((r) + 4) * wstride)), 1), \
        _mm_loadu_si128((const __m128i*)(wg + ((r) + 8) * wstride)), 2), _mm_loadu_si128((const __m128i*)(wg + ((r) + 12) * wstride)), 3)
    const __m512i a = ROWS4(0), b = ROWS4(1), c = ROWS4(2), d = ROWS4(3);
#undef ROWS4
    const __m512i t0 = _mm512_unpacklo_epi32(a, b), t1 = _mm512_unpackhi_epi32(a, b);
    const __m512i t2 = _mm512_unpacklo_epi32(c, d), t3 = _mm512_unpackhi_epi32(c, d);
    const __m512i dw[4] = {_mm512_unpacklo_epi64(t0, t2), _mm512_unpackhi_epi64(t0, t2),
                           _mm512_unpacklo_epi64(t1, t3), _mm512_unpackhi_epi64(t1, t3)};
    __m512i lo[4], hi[4];
    for (int j = 0; j < 4; j++) {
      lo[j] = _mm512_and_si512(dw[j], mask);
      hi[j] = _mm512_and_si512(_mm512_srli_epi16(dw[j], 4), mask);
    }
    const __m512 sv = _mm512_loadu_ps(svt + g * 16);
    const int64_t xe = g < G4 ? (g >> 2) * 128 + (g & 3) * 16 : g * 32, xo = xe + (g < G4 ? 64 : 16);
    for (int t = 0; t < T; t++) {
      const int8_t* xt = xq + t * k;
      __m512i ai = _mm512_set1_epi32(nbs[t * G + g]);
      for (int j = 0; j < 4; j++) {
        int32_t e, o;
        __builtin_memcpy(&e, xt + xe + 4 * j, 4);
        __builtin_memcpy(&o, xt + xo + 4 * j, 4);
        ai = _mm512_dpbusd_epi32(ai, lo[j], _mm512_set1_epi32(e));
        ai = _mm512_dpbusd_epi32(ai, hi[j], _mm512_set1_epi32(o));
      }
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(ai), _mm512_mul_ps(sv, _mm512_set1_ps(xd[t * G + g])), acc[t]);
    }
  }
  for (int t = 0; t < T; t++) _mm512_storeu_ps(y + t * n_out, acc[t]);
}

/* y[t, r] for tokens 0 <= t < m, rows r0 <= r < r1, (r1 - r0) a multiple of 16. */
static void q4_gemm_vnni(const uint32_t* qw, const uint16_t* sc, const int8_t* xq, const int32_t* nb, const float* xd,
                         float* y, int64_t m, int64_t n_out, int64_t k, int64_t r0, int64_t r1) {
  const int64_t G = k / 32, W = k / 8;
  int32_t nbs[VN_TOK * G];
  float svt[16 * G];
  for (int64_t t0 = 0; t0 < m; t0 += VN_TOK) {
    const int64_t t1 = t0 + VN_TOK < m ? t0 + VN_TOK : m;
    for (int64_t t = t0; t < t1; t++)
      for (int64_t g = 0; g < G; g++) {
        const int32_t* n4 = nb + t * W + g * 4;
        nbs[(t - t0) * G + g] = n4[0] + n4[1] + n4[2] + n4[3];
      }
    for (int64_t r = r0; r < r1; r += 16) {
      for (int64_t i = 0; i < 16; i++)
        for (int64_t g = 0; g < G; g++) svt[g * 16 + i] = h2f_fast(sc[(r + i) * G + g]);
      const uint8_t* w = (const uint8_t*)(qw + r * W);
      int64_t t = t0;
#define TILE(T) vnni_tile(w, k / 2, svt, G, xq + t * k, nbs + (t - t0) * G, xd + t * G, k, y + t * n_out + r, n_out, T)
      for (; t + 16 <= t1; t += 16) TILE(16);
      if (t + 8 <= t1) { TILE(8); t += 8; }
      if (t + 4 <= t1) { TILE(4); t += 4; }
      for (; t < t1; t++) TILE(1);
#undef TILE
    }
  }
}
#endif

#ifndef QUAD_ACT
/* y[t, r] for tokens 0 <= t < m and rows r0 <= r < r1 (m >= 4). */
static void q4_gemm_rows(const uint32_t* qw, const uint16_t* sc, const int8_t* xq, const int32_t* nb, const float* xd,
                         float* y, int64_t m, int64_t n_out, int64_t k, int64_t r0, int64_t r1) {
  const int64_t G = k / 32, W = k / 8;
#ifdef VN_TOK
  if (G <= VN_MAXG && r1 - r0 >= 16) {      /* whole 16-row tiles by the VNNI GEMM, the rest below */
    const int64_t r16 = r0 + (r1 - r0) / 16 * 16;
    q4_gemm_vnni(qw, sc, xq, nb, xd, y, m, n_out, k, r0, r16);
    r0 = r16;
  }
#endif
  for (int64_t t0 = 0; t0 < m; t0 += GEMM_TOK) {
    const int64_t t1 = t0 + GEMM_TOK < m ? t0 + GEMM_TOK : m;
    int64_t r = r0;
#ifdef GEMM_R
    for (; r + GEMM_R <= r1; r += GEMM_R) {
      int64_t t = t0;
      for (; t + 4 <= t1; t += 4)
        gemm_tile((const uint8_t*)(qw + r * W), k / 2, sc + r * G, G, xq + t * k, nb + t * W, xd + t * G, k,
                  y + t * n_out + r, n_out);
      for (; t < t1; t++)
        for (int64_t i = r; i < r + GEMM_R; i++)
          y[t * n_out + i] = row_dot((const uint8_t*)(qw + i * W), sc + i * G, xq + t * k, nb + t * W, xd + t * G, G);
    }
#endif
    for (; r < r1; r++) {
      const uint8_t* w = (const uint8_t*)(qw + r * W);
      int64_t t = t0;
#ifdef HAVE_DOT4
      for (; t + 4 <= t1; t += 4)
        row_dot4(w, sc + r * G, xq + t * k, nb + t * W, xd + t * G, G, k, y + t * n_out + r, n_out);
#endif
      for (; t < t1; t++) y[t * n_out + r] = row_dot(w, sc + r * G, xq + t * k, nb + t * W, xd + t * G, G);
    }
  }
}
#endif
