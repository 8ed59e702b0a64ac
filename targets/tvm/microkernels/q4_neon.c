/* aarch64 NEON int4 kernels, included by q4_matmul.c (same maths, see there): the decode GEMV and, with
 * dotprod or i8mm, the prefill GEMM.  bench/arm_kernels.py models their inner loops with llvm-mca.
 *
 * The weights keep the bundle's q4f16 row layout (exporter/quant.py), so one row's group gives one
 * int32x4 of partial sums per token (sdot lanes = 4-byte chunks of the row).  Costs are paid per 4 of them:
 *   decode   rows2_dot: 2 rows x 1 token, 4 groups per step.  Each row's 4 group vectors fold into one
 *            [g0..g3] with 3 pairwise adds, so the int->float conversion, the scale product and the fma
 *            happen once per 4 groups; the token's activation block is loaded once for both rows.
 *   prefill  the activations of whole token quads are stored interleaved (QUAD_ACT, written by
 *            q4_quant_act), so that one sdot by element multiplies a 4-byte weight chunk of a row with
 *            the same chunk of 4 tokens: the lanes are tokens and need no reduction.  Tile 4 rows x 8
 *            tokens (tile_sdot); with i8mm smmla on 2 rows x 2 tokens, the 2 rows zipped into 8-byte
 *            halves once per group and reused by 8 tokens (tile_mmla).  Tokens left over (m % 4) keep
 *            the per-token layout and take the decode GEMV.
 * The -7 offset (nb) enters as the int32 accumulator's initial value: a load, not a vector op.  nb also
 * carries NB_BIAS = 0x4B400000 once per group (the bits of the float 1.5 * 2^23): for |sum| < 2^22 (a
 * group's sum is < 2^17) the accumulated int32 read as a float is exactly 1.5 * 2^23 + sum, so one fsub
 * (any vector pipe) converts it, where scvtf takes 2 uops on the Neoverse V2 / Cortex-X3 class. */
#if defined(__ARM_NEON) && defined(__aarch64__)
#define HAVE_NEON_Q4 1
#define HAVE_ROWS2 1
#define NB_BIAS_F 12582912.f   /* NB_BIAS (q4_matmul.c) read as a float */

/* The float value of int32 sums that started at NB_BIAS. */
static inline float32x4_t unbias(int32x4_t a) { return vsubq_f32(vreinterpretq_f32_s32(a), vdupq_n_f32(NB_BIAS_F)); }

/* A copy of p the compiler cannot prove equal to p: keeps per-row loads of the same nb vector separate
 * loads (straight into each row's accumulator) instead of one load and vector moves. */
static inline const int32_t* launder(const int32_t* p) {
  __asm__ volatile("" : "+r"(p));
  return p;
}

/* The int32x4 of one row's group g (16 weight bytes) with one token's per-token activation group. */
static inline int32x4_t group_acc(int32x4_t a, uint8x16_t wb, int8x16_t xl, int8x16_t xh) {
  const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(wb, vdupq_n_u8(15)));
  const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(wb, 4));
#ifdef __ARM_FEATURE_DOTPROD
  return vdotq_s32(vdotq_s32(a, lo, xl), hi, xh);
#else
  int16x8_t p0 = vmull_s8(vget_low_s8(lo), vget_low_s8(xl));
  p0 = vmlal_s8(p0, vget_low_s8(hi), vget_low_s8(xh));
  int16x8_t p1 = vmull_s8(vget_high_s8(lo), vget_high_s8(xl));
  p1 = vmlal_s8(p1, vget_high_s8(hi), vget_high_s8(xh));
  return vpadalq_s16(vpadalq_s16(a, p0), p1);
#endif
}

/* NR (1 or 2) rows x one token, per-token activation layout: out[r] = row r . token. */
static inline __attribute__((always_inline)) void rows_dot_neon(int NR, const uint8_t* w, int64_t wstride,
                                                                const uint16_t* s, int64_t G, const int8_t* xq,
                                                                const int32_t* nb, const float* xd, float* out) {
  const int32_t* nbr[2];
  float32x4_t acc[2];
  for (int r = 0; r < NR; r++) {
    nbr[r] = NR > 1 ? launder(nb) : nb;
    acc[r] = vdupq_n_f32(0.f);
  }
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) {
    int8x16_t xl[4], xh[4];
    for (int j = 0; j < 4; j++) {
      xl[j] = vld1q_s8(xq + (g + j) * 32);
      xh[j] = vld1q_s8(xq + (g + j) * 32 + 16);
    }
    const float32x4_t d = vld1q_f32(xd + g);
    for (int r = 0; r < NR; r++) {
      const uint8_t* wr = w + r * wstride + g * 16;
      PREFETCH(wr);
      int32x4_t a[4];
      for (int j = 0; j < 4; j++) a[j] = group_acc(vld1q_s32(nbr[r] + (g + j) * 4), vld1q_u8(wr + j * 16), xl[j], xh[j]);
      const int32x4_t sum = vpaddq_s32(vpaddq_s32(a[0], a[1]), vpaddq_s32(a[2], a[3]));
      const float32x4_t sd = vmulq_f32(vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(s + r * G + g))), d);
      acc[r] = vfmaq_f32(acc[r], unbias(sum), sd);
    }
  }
  for (int r = 0; r < NR; r++) {
    float v = vaddvq_f32(acc[r]);
    for (int64_t gg = g; gg < G; gg++)
      v += group_dot(w + r * wstride + gg * 16, s[r * G + gg], xq + gg * 32, nb + gg * 4, xd[gg]);
    out[r] = v;
  }
}

static inline float row_dot_neon(const uint8_t* w, const uint16_t* s, const int8_t* xq, const int32_t* nb,
                                 const float* xd, int64_t G) {
  float v;
  rows_dot_neon(1, w, 0, s, G, xq, nb, xd, &v);
  return v;
}

/* 2 consecutive rows (row stride wstride bytes, scales s + r * G) x one token (4 rows spill registers). */
static inline __attribute__((always_inline)) void rows2_dot(const uint8_t* w, int64_t wstride, const uint16_t* s,
                                                            int64_t G, const int8_t* xq, const int32_t* nb,
                                                            const float* xd, float out[2]) {
  rows_dot_neon(2, w, wstride, s, G, xq, nb, xd, out);
}

#if defined(__ARM_FEATURE_MATMUL_INT8) || defined(__ARM_FEATURE_DOTPROD)
/* Quad activation layout (tokens 4q..4q+3 of a call with m >= 4; the quad keeps its 4 * k bytes, k / 2 nb
 * ints and 4 * G scales).  Per group g, at xq + q * 4k + g * 128, byte b (0..31, per-token order: 16 even
 * elements then 16 odd) of token t goes to quad_pos(t, b):
 *   sdot: 8 vectors of [t0 b..b+3, t1, t2, t3], b = 4j  (vector j pairs with weight chunk j % 4, lo/hi)
 *   smmla: token pair p = t / 2 at 64 p, 4 vectors of [t 8 bytes, t+1 8 bytes] (8-byte halves of lo, hi)
 * nb at nb + q * k / 2 + g * 16 (16 words): the per-token -7 * sum + NB_BIAS as sdot accumulator [t0, t1,
 * t2, t3], for smmla as [t0, t0, t1, t1, t2, t2, t3, t3] followed by the float scales in smmla's pattern
 * [d_t0, d_t0, d_t1, d_t1, d_t2, ..] (words 8..15); scales also at xd + q * 4G + g * 4: [d_t0..d_t3]. */
#ifdef __ARM_FEATURE_MATMUL_INT8
#define QUAD_ACT 2
static inline int64_t quad_pos(int t, int b) { return (t >> 1) * 64 + (b >> 3) * 16 + (t & 1) * 8 + (b & 7); }
static inline int quad_nb(int t, int i) { return 2 * t + i; }    /* i < 2: the two lanes of token t */
#define QUAD_D_PATTERN 8                                          /* words 8..15: d in the same pattern */
#else
#define QUAD_ACT 1
static inline int64_t quad_pos(int t, int b) { return (b >> 2) * 16 + t * 4 + (b & 3); }
static inline int quad_nb(int t, int i) { return i ? 8 + t : t; } /* second copy unused (slots 8..11) */
#endif

#ifndef __ARM_FEATURE_MATMUL_INT8
/* NR (1 or 4) rows x NQ (1 or 2) token quads with sdot by element; out[t * ostride + r]. */
static inline __attribute__((always_inline)) void tile_sdot(int NR, int NQ, const uint8_t* w, int64_t wstride,
                                                            const uint16_t* s, int64_t G, const int8_t* xq,
                                                            const int32_t* nb, const float* xd, int64_t k,
                                                            float* out, int64_t ostride) {
  const uint8x16_t mask = vdupq_n_u8(15);
  const int32_t* nbr[4];
  float32x4_t acc[4][2];
  for (int r = 0; r < NR; r++) {
    nbr[r] = NR > 1 ? launder(nb) : nb;
    for (int q = 0; q < NQ; q++) acc[r][q] = vdupq_n_f32(0.f);
  }
  for (int64_t g = 0; g < G; g++) {
    int8x16_t lo[4], hi[4];
    float sr[4];
    for (int r = 0; r < NR; r++) {
      const uint8x16_t wb = vld1q_u8(w + r * wstride + g * 16);
      lo[r] = vreinterpretq_s8_u8(vandq_u8(wb, mask));
      hi[r] = vreinterpretq_s8_u8(vshrq_n_u8(wb, 4));
      sr[r] = h2f_fast(s[r * G + g]);
    }
    for (int q = 0; q < NQ; q++) {
      const int8_t* x = xq + q * 4 * k + g * 128;
      int32x4_t a[4];
      for (int r = 0; r < NR; r++) a[r] = vld1q_s32(nbr[r] + q * (k / 2) + g * 16);
#define SDOT_CHUNK(j, wv)                                                  \
      {                                                                    \
        const int8x16_t xv = vld1q_s8(x + (j) * 16);                       \
        for (int r = 0; r < NR; r++) a[r] = vdotq_laneq_s32(a[r], xv, wv[r], (j) & 3); \
      }
      SDOT_CHUNK(0, lo) SDOT_CHUNK(1, lo) SDOT_CHUNK(2, lo) SDOT_CHUNK(3, lo)
      SDOT_CHUNK(4, hi) SDOT_CHUNK(5, hi) SDOT_CHUNK(6, hi) SDOT_CHUNK(7, hi)
#undef SDOT_CHUNK
      const float32x4_t d = vld1q_f32(xd + q * 4 * G + g * 4);
      for (int r = 0; r < NR; r++) acc[r][q] = vfmaq_n_f32(acc[r][q], vmulq_f32(unbias(a[r]), d), sr[r]);
    }
  }
  for (int r = 0; r < NR; r++)
    for (int q = 0; q < NQ; q++)
      for (int t = 0; t < 4; t++) out[(q * 4 + t) * ostride + r] = acc[r][q][t];
}
#define GEMM_TILE(NR, NQ, w, ws, s, G, xq, nb, xd, k, o, os) tile_sdot(NR, NQ, w, ws, s, G, xq, nb, xd, k, o, os)
#else
#define ZIP1(a, b) vreinterpretq_s8_u64(vzip1q_u64(vreinterpretq_u64_s8(a), vreinterpretq_u64_s8(b)))
#define ZIP2(a, b) vreinterpretq_s8_u64(vzip2q_u64(vreinterpretq_u64_s8(a), vreinterpretq_u64_s8(b)))
/* One group of tile_mmla: sp[p] = the float scales [r, r', r, r'] of row pair p. */
static inline __attribute__((always_inline)) void mmla_group(int NP, int NT, const uint8_t* w, int64_t wstride,
                                                             int64_t rs, int64_t g, const int8_t* xq,
                                                             const int32_t* const* nbr, int64_t k,
                                                             const float32x4_t* sp, float32x4_t acc[2][4]) {
  const uint8x16_t mask = vdupq_n_u8(15);
  int8x16_t wv[2][4];
  for (int p = 0; p < NP; p++) {
    const uint8_t* w0 = w + 2 * p * wstride + g * 16;
    const uint8x16_t b0 = vld1q_u8(w0), b1 = vld1q_u8(w0 + rs);
    const int8x16_t lo0 = vreinterpretq_s8_u8(vandq_u8(b0, mask)), hi0 = vreinterpretq_s8_u8(vshrq_n_u8(b0, 4));
    const int8x16_t lo1 = vreinterpretq_s8_u8(vandq_u8(b1, mask)), hi1 = vreinterpretq_s8_u8(vshrq_n_u8(b1, 4));
    wv[p][0] = ZIP1(lo0, lo1);
    wv[p][1] = ZIP2(lo0, lo1);
    wv[p][2] = ZIP1(hi0, hi1);
    wv[p][3] = ZIP2(hi0, hi1);
  }
  for (int t = 0; t < NT; t++) {
    const int8_t* x = xq + (t >> 1) * 4 * k + g * 128 + (t & 1) * 64;
    const int64_t o = (t >> 1) * (k / 2) + g * 16 + (t & 1) * 4;
    int32x4_t a[2];
    for (int p = 0; p < NP; p++) a[p] = vld1q_s32(nbr[p] + o);
    for (int h = 0; h < 4; h++) {
      const int8x16_t xv = vld1q_s8(x + h * 16);
      for (int p = 0; p < NP; p++) a[p] = vmmlaq_s32(a[p], xv, wv[p][h]);
    }
    const float32x4_t d = vreinterpretq_f32_s32(vld1q_s32(nbr[0] + o + 8));   /* [d_t, d_t, d_t', d_t'] */
    for (int p = 0; p < NP; p++) acc[p][t] = vfmaq_f32(acc[p][t], vmulq_f32(unbias(a[p]), d), sp[p]);
  }
}

/* NR (1 or 4) rows x NQ (1 or 2) token quads with smmla on row pairs x token pairs (one row: paired with
 * itself); accumulator lanes [t r, t r', t' r, t' r']. */
static inline __attribute__((always_inline)) void tile_mmla(int NR, int NQ, const uint8_t* w, int64_t wstride,
                                                            const uint16_t* s, int64_t G, const int8_t* xq,
                                                            const int32_t* nb, const float* xd, int64_t k,
                                                            float* out, int64_t ostride) {
  (void)xd;                                       /* the scales come as a pattern in the nb block */
  const int NP = NR > 1 ? NR / 2 : 1, NT = 2 * NQ;
  const int64_t rs = NR > 1 ? wstride : 0, ss = NR > 1 ? G : 0;   /* second row of a pair */
  const int32_t* nbr[2];
  float32x4_t acc[2][4];
  for (int p = 0; p < NP; p++) {
    nbr[p] = NP > 1 ? launder(nb) : nb;
    for (int t = 0; t < NT; t++) acc[p][t] = vdupq_n_f32(0.f);
  }
  int64_t g = 0;
  for (; g < G; g++) {
    float32x4_t sp[2];
    for (int p = 0; p < NP; p++) {
      const float32x2_t s2 = {h2f_fast(s[2 * p * G + g]), h2f_fast(s[2 * p * G + ss + g])};
      sp[p] = vcombine_f32(s2, s2);
    }
    mmla_group(NP, NT, w, wstride, rs, g, xq, nbr, k, sp, acc);
  }
  for (int p = 0; p < NP; p++)
    for (int t = 0; t < NT; t++)
      for (int i = 0; i < 4; i++)
        if (NR > 1 || !(i & 1)) out[(2 * t + (i >> 1)) * ostride + 2 * p + (i & 1)] = acc[p][t][i];
}
#define GEMM_TILE(NR, NQ, w, ws, s, G, xq, nb, xd, k, o, os) tile_mmla(NR, NQ, w, ws, s, G, xq, nb, xd, k, o, os)
#endif

/* 4 rows x 8 tokens, the prefill tile (kept out of line for bench/arm_kernels.py). */
static void gemm_tile_neon(const uint8_t* w, int64_t wstride, const uint16_t* s, int64_t G, const int8_t* xq,
                           const int32_t* nb, const float* xd, int64_t k, float* out, int64_t ostride) {
  GEMM_TILE(4, 2, w, wstride, s, G, xq, nb, xd, k, out, ostride);
}

/* y[t, r] for tokens 0 <= t < m (m >= 4) and rows r0 <= r < r1, quad activation layout for the first
 * 4 * (m / 4) tokens; rows walked once per block of GEMM_TOK tokens (their activations stay in L2). */
#define GEMM_TOK 32
static void q4_gemm_rows_neon(const uint32_t* qw, const uint16_t* sc, const int8_t* xq, const int32_t* nb,
                              const float* xd, float* y, int64_t m, int64_t n_out, int64_t k, int64_t r0, int64_t r1) {
  const int64_t G = k / 32, W = k / 8, mq = m & ~(int64_t)3;
  for (int64_t t0 = 0; t0 < mq; t0 += GEMM_TOK) {
    const int64_t t1 = t0 + GEMM_TOK < mq ? t0 + GEMM_TOK : mq;
    for (int64_t r = r0; r < r1;) {
      const int nr = r + 4 <= r1 ? 4 : 1;
      const uint8_t* w = (const uint8_t*)(qw + r * W);
      for (int64_t t = t0; t < t1;) {
        const int nq = t + 8 <= t1 ? 2 : 1;
        const int8_t* x = xq + t * k;
        const int32_t* n = nb + t * W;
        const float* d = xd + t * G;
        float* o = y + t * n_out + r;
        if (nr == 4 && nq == 2) gemm_tile_neon(w, k / 2, sc + r * G, G, x, n, d, k, o, n_out);
        else if (nr == 4) GEMM_TILE(4, 1, w, k / 2, sc + r * G, G, x, n, d, k, o, n_out);
        else if (nq == 2) GEMM_TILE(1, 2, w, k / 2, sc + r * G, G, x, n, d, k, o, n_out);
        else GEMM_TILE(1, 1, w, k / 2, sc + r * G, G, x, n, d, k, o, n_out);
        t += 4 * nq;
      }
      r += nr;
    }
  }
  for (int64_t r = r0; r < r1; r++)
    for (int64_t t = mq; t < m; t++)
      y[t * n_out + r] = row_dot_neon((const uint8_t*)(qw + r * W), sc + r * G, xq + t * k, nb + t * W, xd + t * G, G);
}
#endif /* dotprod or i8mm */
#endif /* aarch64 */
