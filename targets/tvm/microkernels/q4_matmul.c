/* int4 (q4f16, docs/DESIGN.md) weight x int8 activation microkernels for the TVM CPU build.
 *
 * Compiled by targets/tvm/kernels.py with clang for the build target (--target/-mcpu/-march from the
 * TVM target) into an object linked into the exported model library; the TIR wrapper made by
 * kernels.py calls these with T.call_extern.  The ISA path is chosen at compile time from the
 * predefined feature macros: AVX-512 VNNI, AVX-512BW, AVX2 (x86), NEON with or without dotprod
 * (aarch64), portable C otherwise.
 *
 * Maths (like llama.cpp's Q4_0 x Q8_0): per token and group of 32 inputs the activations are
 * quantised symmetrically to int8, x ~= xq * d.  With the weight w = (q - 7) * s:
 *     sum_k w_k x_k  ~=  s * d * (sum_k q_k xq_k - 7 * sum_k xq_k)
 * q_k is 0..15 (unsigned), so a u8 x s8 dot product (vpdpbusd / pmaddubsw / sdot) gives the first
 * sum exactly; the second sum is precomputed once per token ("nb" below, already times -7).
 *
 * Activation layout (written by mcpm_q4_quant_act, read by the matmul): the groups are taken in
 * blocks of BLK groups (BLK = vector bytes / 16); inside a block first the even-indexed elements of
 * every group (16 per group), then the odd ones.  This matches the packed weight bytes, where byte i
 * of a group holds element 2i (low nibble) and 2i+1 (high nibble): low nibbles of BLK*16 weight bytes
 * line up with the first half of the block, high nibbles with the second.  Groups left over at the
 * end of a row (G % BLK) use blocks of one group.  nb holds one int32 per 8 inputs: -7 times the sum
 * of the 4 activation bytes of a 32-bit lane in each half.  aarch64 with dotprod / i8mm stores the
 * token quads of a multi-token call interleaved instead (QUAD_ACT, q4_neon.c).
 *
 * Files (one translation unit): common.h (ABI, symbols, helpers), this file (activation quantisation,
 * the x86 / portable GEMV, the exported q4 entry points), q4_neon.c (aarch64 GEMV and GEMM), q4_gemm.c
 * (x86 prefill GEMM), q8_matmul.c (int8 weights), vq8_gemm.c (vision int8 GEMM), attention.c and
 * attn_prefill.c (paged KV cache attention, float vectors from vecf.h), rope.c (its RoPE), kv_append.c
 * (its append).
 */
#include "common.h"

/* Rows walked per block of GEMM_TOK tokens by the prefill GEMMs (their activations stay in L2). */
#define GEMM_TOK 32

#if defined(__ARM_NEON) && defined(__aarch64__)
#define NB_BIAS 0x4B400000   /* added to nb once per group on aarch64, see q4_neon.c */
#else
#define NB_BIAS 0
#endif

/* One group in the one-group block layout, portable C. */
static inline float group_dot(const uint8_t* w, uint16_t s, const int8_t* xq, const int32_t* nb, float d) {
  int32_t acc = nb[0] + nb[1] + nb[2] + nb[3] - NB_BIAS;
  for (int i = 0; i < 16; i++) acc += (int32_t)(w[i] & 15) * xq[i] + (int32_t)(w[i] >> 4) * xq[16 + i];
  return h2f_fast(s) * d * (float)acc;
}


#include "q4_neon.c"        /* aarch64: GEMV, prefill GEMM, quad activation layout */

#if BLK == 1
/* Group j (32 inputs) of a block of nblk groups: its int8 values into the block layout, its scale. */
static inline void quant_group_c(const float* xg, int8_t* blk, int64_t nblk, int64_t j, float* d) {
  float amax = 0.f;
  for (int e = 0; e < 32; e++) amax = fabs_(xg[e]) > amax ? fabs_(xg[e]) : amax;
  const float id = amax > 0.f ? 127.f / amax : 0.f;
  *d = amax / 127.f;
  for (int e = 0; e < 32; e++) blk[(e & 1) * nblk * 16 + j * 16 + (e >> 1)] = round_q(xg[e] * id);
}

#else
/* x86 (BLK 4 or 2): the same float operations as quant_group_c (so the same bytes) on one group, plus its 4
 * lanes of nb: even-indexed elements' int8 to ev[16], odd ones' to od[16], the scale to d. */
static inline void quant_group_x86(const float* xg, int8_t* ev, int8_t* od, int32_t* nb4, float* d) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 v[4];
  for (int i = 0; i < 4; i++) v[i] = _mm256_loadu_ps(xg + 8 * i);
  const __m256 m8 = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
  const __m256 id = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
  *d = amax / 127.f;
  __m256i q[4];
  for (int i = 0; i < 4; i++) {             /* round_q: v +- 0.5 truncated, clamped to +-127 */
    const __m256 s = _mm256_mul_ps(v[i], id);
    const __m256i r = _mm256_cvttps_epi32(_mm256_add_ps(s, _mm256_or_ps(_mm256_and_ps(s, sign), _mm256_set1_ps(0.5f))));
    q[i] = _mm256_max_epi32(_mm256_min_epi32(r, _mm256_set1_epi32(127)), _mm256_set1_epi32(-127));
  }
  /* lane l of nb covers elements 8l..8l+7 (four even, four odd): the sum of q[l] */
  const __m256i h = _mm256_hadd_epi32(_mm256_hadd_epi32(q[0], q[1]), _mm256_hadd_epi32(q[2], q[3]));
  const __m128i sums = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
  _mm_storeu_si128((__m128i*)nb4, _mm_mullo_epi32(sums, _mm_set1_epi32(-7)));
  /* bytes in element order, then evens | odds */
  const __m256i b = _mm256_permutevar8x32_epi32(
      _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3])),
      _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
  const __m256i eo = _mm256_permute4x64_epi64(
      _mm256_shuffle_epi8(b, _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,
                                              0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15)),
      0xd8);
  _mm_storeu_si128((__m128i*)ev, _mm256_castsi256_si128(eo));
  _mm_storeu_si128((__m128i*)od, _mm256_extracti128_si256(eo, 1));
}
#endif

/* 1 / sqrt(mean(x^2) + eps) of k floats: the RMSNorm factor. */
static inline float rms_inv(const float* x, int64_t k, float eps) {
  float s = 0.f;
  int64_t i = 0;
#ifdef VW
  vf acc = VSET1(0.f);
  for (; i + VW <= k; i += VW) acc = VFMA(VLOAD_F(x + i), VLOAD_F(x + i), acc);
  s = VSUM(acc);
#endif
  for (; i < k; i++) s += x[i] * x[i];
  return 1.f / __builtin_sqrtf(s / (float)k + eps);
}

/* Quantise m tokens of k inputs (row stride ld): xq int8[m*k], nb int32[m*k/8], xd float[m*k/32].  With
 * `up` (row stride ld too) the inputs are silu(x) * up, the SwiGLU of the MLP; with `nw` they are
 * RMSNorm(x) * nw (epsilon eps, over the k inputs of a token), a block's norm before wqkv or w13.  Either
 * is computed as the inputs are read. */
static void q4_quant_act(const float* x, const float* up, const float* nw, float eps, int64_t ld, int64_t m,
                         int64_t k, int8_t* xq, int32_t* nb, float* xd) {
  const int64_t G = k / 32;
#ifdef QUAD_ACT
  const int64_t mq = m >= 4 ? m & ~(int64_t)3 : 0;
#endif
  for (int64_t t = 0; t < m; t++) {
    const float* xt = x + t * ld;
    int8_t* qt = xq + t * k;
    int32_t* nt = nb + t * (k / 8);
    float* dt = xd + t * G;
    const float inv = nw ? rms_inv(xt, k, eps) : 1.f;
    for (int64_t g0 = 0; g0 < G;) {
      const int64_t nblk = (g0 + BLK <= G) ? BLK : 1;
      const int64_t base = g0 * 32;
      int8_t blk[BLK * 32];
      int32_t nbl[BLK * 4];
      float d[BLK];
      for (int64_t j = 0; j < nblk; j++) {
        const float* xg = xt + (g0 + j) * 32;
        float sw[32];
        if (up) {
          const float* ug = up + t * ld + (g0 + j) * 32;
#ifdef VW
          for (int e = 0; e < 32; e += VW) VSTORE(sw + e, VMUL(silu_v(VLOAD_F(xg + e)), VLOAD_F(ug + e)));
#else
          for (int e = 0; e < 32; e++) sw[e] = silu(xg[e]) * ug[e];
#endif
          xg = sw;
        } else if (nw) {
          const float* wg = nw + (g0 + j) * 32;
#ifdef VW
          for (int e = 0; e < 32; e += VW) VSTORE(sw + e, VMUL(VMUL(VLOAD_F(xg + e), VSET1(inv)), VLOAD_F(wg + e)));
#else
          for (int e = 0; e < 32; e++) sw[e] = xg[e] * inv * wg[e];
#endif
          xg = sw;
        }
#if BLK == 4 || BLK == 2
        quant_group_x86(xg, blk + j * 16, blk + nblk * 16 + j * 16, nbl + j * 4, d + j);
#else
        quant_group_c(xg, blk, nblk, j, d + j);
#endif
      }
#if BLK == 1
      for (int64_t lane = 0; lane < nblk * 4; lane++) {
        int32_t s = 0;
        for (int b = 0; b < 4; b++) s += blk[lane * 4 + b] + blk[nblk * 16 + lane * 4 + b];
        nbl[lane] = -7 * s + (lane % 4 ? 0 : NB_BIAS);
      }
#endif
#ifdef QUAD_ACT
      if (t < mq) {                     /* BLK == 1 on aarch64: one group */
        const int64_t q = t >> 2;
        const int tt = (int)(t & 3);
        for (int b = 0; b < 32; b++) xq[q * 4 * k + g0 * 128 + quad_pos(tt, b)] = blk[b];
        const int32_t c = nbl[0] + nbl[1] + nbl[2] + nbl[3];   /* includes NB_BIAS once */
        nb[q * (k / 2) + g0 * 16 + quad_nb(tt, 0)] = nb[q * (k / 2) + g0 * 16 + quad_nb(tt, 1)] = c;
        xd[q * 4 * G + g0 * 4 + tt] = d[0];
#ifdef QUAD_D_PATTERN
        union { float f; int32_t i; } dv = {d[0]};
        for (int i = 0; i < 2; i++) nb[q * (k / 2) + g0 * 16 + QUAD_D_PATTERN + quad_nb(tt, i)] = dv.i;
#endif
        g0 += 1;
        continue;
      }
#endif
      for (int64_t i = 0; i < nblk * 32; i++) qt[base + i] = blk[i];
      for (int64_t i = 0; i < nblk * 4; i++) nt[base / 8 + i] = nbl[i];
      for (int64_t j = 0; j < nblk; j++) dt[g0 + j] = d[j];
      g0 += nblk;
    }
  }
}

/* x float32 [m, k] -> xq int8 [m*k], nb int32 [m*k/8], xd float32 [m*k/32] */
KEXPORT int32_t KSYM(q4_quant_act)(const DLT* x, DLT* xq, DLT* nb, DLT* xd) {
  q4_quant_act(PTR(const float, x), 0, 0, 0.f, x->shape[1], x->shape[0], x->shape[1], PTR(int8_t, xq),
               PTR(int32_t, nb), PTR(float, xd));
  return 0;
}

/* x float32 [m, k], w float32 [k] -> the same buffers for RMSNorm(x) * w */
KEXPORT int32_t KSYM(q4_quant_rmsnorm)(const DLT* x, const DLT* w, DLT* xq, DLT* nb, DLT* xd, float eps) {
  q4_quant_act(PTR(const float, x), 0, PTR(const float, w), eps, x->shape[1], x->shape[0], x->shape[1],
               PTR(int8_t, xq), PTR(int32_t, nb), PTR(float, xd));
  return 0;
}

/* h float32 [m, 2k] = gate;up -> the same buffers for silu(gate) * up [m, k] */
KEXPORT int32_t KSYM(q4_quant_swiglu)(const DLT* h, DLT* xq, DLT* nb, DLT* xd) {
  const int64_t k = h->shape[1] / 2;
  q4_quant_act(PTR(const float, h), PTR(const float, h) + k, 0, 0.f, 2 * k, h->shape[0], k, PTR(int8_t, xq),
               PTR(int32_t, nb), PTR(float, xd));
  return 0;
}

/* Dot product of one packed weight row (G groups) with one quantised token. */
static inline float row_dot(const uint8_t* w, const uint16_t* s, const int8_t* xq, const int32_t* nb,
                            const float* xd, int64_t G) {
  int64_t g = 0;
  float r = 0.f;
#if BLK == 4
  const __m512i mask = _mm512_set1_epi8(0x0f);
  const __m512i idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
#ifndef __AVX512VNNI__
  const __m512i ones = _mm512_set1_epi16(1);
#endif
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  for (; g + 8 <= G; g += 8) {
    PREFETCH(s + g);
    for (int h = 0; h < 2; h++) {
      const int64_t gg = g + 4 * h;
      PREFETCH(w + gg * 16);
      const __m512i wb = _mm512_loadu_si512((const void*)(w + gg * 16));
      const __m512i lo = _mm512_and_si512(wb, mask);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wb, 4), mask);
      const __m512i xl = _mm512_loadu_si512((const void*)(xq + gg * 32));
      const __m512i xh = _mm512_loadu_si512((const void*)(xq + gg * 32 + 64));
      __m512i a = _mm512_loadu_si512((const void*)(nb + gg * 4));
#ifdef __AVX512VNNI__
      a = _mm512_dpbusd_epi32(a, lo, xl);
      a = _mm512_dpbusd_epi32(a, hi, xh);
#else
      a = _mm512_add_epi32(a, _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(lo, xl),
                                                                  _mm512_maddubs_epi16(hi, xh)), ones));
#endif
      __m128 sf = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(s + gg)));
      sf = _mm_mul_ps(sf, _mm_loadu_ps(xd + gg));
      const __m512 sv = _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(sf));
      if (h == 0) acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), sv, acc0);
      else acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), sv, acc1);
    }
  }
  for (; g + 4 <= G; g += 4) {
    const __m512i wb = _mm512_loadu_si512((const void*)(w + g * 16));
    const __m512i lo = _mm512_and_si512(wb, mask);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wb, 4), mask);
    __m512i a = _mm512_loadu_si512((const void*)(nb + g * 4));
#ifdef __AVX512VNNI__
    a = _mm512_dpbusd_epi32(a, lo, _mm512_loadu_si512((const void*)(xq + g * 32)));
    a = _mm512_dpbusd_epi32(a, hi, _mm512_loadu_si512((const void*)(xq + g * 32 + 64)));
#else
    a = _mm512_add_epi32(a, _mm512_madd_epi16(_mm512_add_epi16(
        _mm512_maddubs_epi16(lo, _mm512_loadu_si512((const void*)(xq + g * 32))),
        _mm512_maddubs_epi16(hi, _mm512_loadu_si512((const void*)(xq + g * 32 + 64)))), ones));
#endif
    __m128 sf = _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(s + g))), _mm_loadu_ps(xd + g));
    acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(sf)), acc0);
  }
  r = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
#elif BLK == 2
  const __m256i mask = _mm256_set1_epi8(0x0f);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc = _mm256_setzero_ps();
  for (; g + 2 <= G; g += 2) {
    PREFETCH(w + g * 16);
    if (!(g & 31)) PREFETCH(s + g);
    const __m256i wb = _mm256_loadu_si256((const __m256i*)(w + g * 16));
    const __m256i lo = _mm256_and_si256(wb, mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wb, 4), mask);
    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)(xq + g * 32))),
                                       _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(xq + g * 32 + 32))));
    const __m256i a = _mm256_add_epi32(_mm256_madd_epi16(p, ones), _mm256_loadu_si256((const __m256i*)(nb + g * 4)));
    const __m256 sv = _mm256_set_m128(_mm_set1_ps(h2f_fast(s[g + 1]) * xd[g + 1]), _mm_set1_ps(h2f_fast(s[g]) * xd[g]));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), sv, acc);
  }
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  r = _mm_cvtss_f32(q);
#elif defined(HAVE_NEON_Q4)
  return row_dot_neon(w, s, xq, nb, xd, G);
#endif
  for (; g < G; g++) r += group_dot(w + g * 16, s[g], xq + g * 32, nb + g * 4, xd[g]);
  return r;
}

#if BLK == 4
/* Two adjacent weight rows against one token (decode): the activation loads are shared. */
#define HAVE_ROWS2 1
static inline void rows2_dot(const uint8_t* w, int64_t wstride, const uint16_t* s, int64_t G,
                             const int8_t* xq, const int32_t* nb, const float* xd, float* out) {
  const __m512i mask = _mm512_set1_epi8(0x0f);
  const __m512i idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
#ifndef __AVX512VNNI__
  const __m512i ones = _mm512_set1_epi16(1);
#endif
  __m512 acc[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  int64_t g = 0;
  for (; g + 4 <= G; g += 4) {
    const __m512i xl = _mm512_loadu_si512((const void*)(xq + g * 32));
    const __m512i xh = _mm512_loadu_si512((const void*)(xq + g * 32 + 64));
    const __m512i n = _mm512_loadu_si512((const void*)(nb + g * 4));
    const __m128 dx = _mm_loadu_ps(xd + g);
    for (int r = 0; r < 2; r++) {
      const uint8_t* wr = w + r * wstride + g * 16;
      PREFETCH(wr);
      if (!(g & 31)) PREFETCH(s + r * G + g);
      const __m512i wb = _mm512_loadu_si512((const void*)wr);
      const __m512i lo = _mm512_and_si512(wb, mask);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wb, 4), mask);
#ifdef __AVX512VNNI__
      const __m512i a = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(n, lo, xl), hi, xh);
#else
      const __m512i a = _mm512_add_epi32(n, _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(lo, xl),
                                                                              _mm512_maddubs_epi16(hi, xh)), ones));
#endif
      const __m128 sf = _mm_mul_ps(_mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(s + r * G + g))), dx);
      acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(sf)), acc[r]);
    }
  }
  for (int r = 0; r < 2; r++) {
    out[r] = _mm512_reduce_add_ps(acc[r]);
    for (int64_t gg = g; gg < G; gg++)
      out[r] += group_dot(w + r * wstride + gg * 16, s[r * G + gg], xq + gg * 32, nb + gg * 4, xd[gg]);
  }
}
#endif

/* Four tokens against one weight row (prefill): the weight block is unpacked once for all four. */
#if BLK == 4
#define HAVE_DOT4 1
static inline void row_dot4(const uint8_t* w, const uint16_t* s, const int8_t* xq, const int32_t* nb,
                            const float* xd, int64_t G, int64_t k, float* out, int64_t ostride) {
  const int64_t W = k / 8;
  int64_t g = 0;
  const __m512i mask = _mm512_set1_epi8(0x0f);
  const __m512i idx = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
#ifndef __AVX512VNNI__
  const __m512i ones = _mm512_set1_epi16(1);
#endif
  __m512 acc[4] = {_mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps(), _mm512_setzero_ps()};
  for (; g + 4 <= G; g += 4) {
    PREFETCH(w + g * 16);
    const __m512i wb = _mm512_loadu_si512((const void*)(w + g * 16));
    const __m512i lo = _mm512_and_si512(wb, mask);
    const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(wb, 4), mask);
    const __m128 sf = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i*)(s + g)));
    for (int t = 0; t < 4; t++) {
      const int8_t* xt = xq + t * k + g * 32;
      __m512i a = _mm512_loadu_si512((const void*)(nb + t * W + g * 4));
#ifdef __AVX512VNNI__
      a = _mm512_dpbusd_epi32(a, lo, _mm512_loadu_si512((const void*)xt));
      a = _mm512_dpbusd_epi32(a, hi, _mm512_loadu_si512((const void*)(xt + 64)));
#else
      a = _mm512_add_epi32(a, _mm512_madd_epi16(_mm512_add_epi16(
          _mm512_maddubs_epi16(lo, _mm512_loadu_si512((const void*)xt)),
          _mm512_maddubs_epi16(hi, _mm512_loadu_si512((const void*)(xt + 64)))), ones));
#endif
      const __m128 st = _mm_mul_ps(sf, _mm_loadu_ps(xd + t * G + g));
      acc[t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(st)), acc[t]);
    }
  }
  for (int t = 0; t < 4; t++) out[t * ostride] = _mm512_reduce_add_ps(acc[t]);
  for (; g < G; g++)
    for (int t = 0; t < 4; t++)
      out[t * ostride] += group_dot(w + g * 16, s[g], xq + t * k + g * 32, nb + t * W + g * 4, xd[t * G + g]);
}
#endif


#include "q4_gemm.c"       /* the prefill GEMM: q4_gemm_rows */

/* y[t, r] for all tokens t and weight rows r0 <= r < r1: qw uint32 [n_out, k/8], sc f16 [n_out, k/32],
 * the quantised activations of mcpm_q4_quant_act, y float32 [m, n_out].  r0/r1 are int32: TVM's
 * parallel-loop lowering passes the task range as i32.  Four tokens or more: the GEMM of q4_gemm.c. */
KEXPORT int32_t KSYM(q4_matmul_rows)(const DLT* qwt, const DLT* sct, const DLT* xqt, const DLT* nbt, const DLT* xdt,
                            DLT* yt, int32_t r0, int32_t r1) {
  const uint32_t* qw = PTR(const uint32_t, qwt);
  const uint16_t* sc = PTR(const uint16_t, sct);
  const int8_t* xq = PTR(const int8_t, xqt);
  const int32_t* nb = PTR(const int32_t, nbt);
  const float* xd = PTR(const float, xdt);
  float* y = PTR(float, yt);
  const int64_t m = yt->shape[0], n_out = yt->shape[1], k = qwt->shape[1] * 8;
  const int64_t G = k / 32;
  if (m >= 4) {
#ifdef QUAD_ACT
    q4_gemm_rows_neon(qw, sc, xq, nb, xd, y, m, n_out, k, r0, r1);
#else
    q4_gemm_rows(qw, sc, xq, nb, xd, y, m, n_out, k, r0, r1);
#endif
    return 0;
  }
  int64_t r = r0;
#ifdef HAVE_ROWS2                 /* AVX-512 (above) or NEON (q4_neon.c): two rows share the activation loads */
  for (; r + 2 <= r1; r += 2)
    for (int64_t t = 0; t < m; t++) {
      float v[2];
      rows2_dot((const uint8_t*)(qw + r * (k / 8)), k / 2, sc + r * G, G, xq + t * k, nb + t * (k / 8), xd + t * G, v);
      y[t * n_out + r] = v[0];
      y[t * n_out + r + 1] = v[1];
    }
#endif
  for (; r < r1; r++)
    for (int64_t t = 0; t < m; t++)
      y[t * n_out + r] = row_dot((const uint8_t*)(qw + r * (k / 8)), sc + r * G, xq + t * k, nb + t * (k / 8),
                                 xd + t * G, G);
  return 0;
}

/* ------------------------------------------------------------------ dynamic row scheduling
 * The TIR wrapper zeroes a fresh counter, then every parallel task grabs chunks of `chunk` rows with an
 * atomic add until all rows are done: a descheduled or slow thread (shared cores, big.LITTLE phones)
 * does not hold the others up the way a static split of the rows would. */
KEXPORT int32_t KSYM(counter_reset)(DLT* c) {
  __atomic_store_n(PTR(int32_t, c), 0, __ATOMIC_RELAXED);
  return 0;
}

KEXPORT int32_t KSYM(q4_matmul_dyn)(const DLT* qw, const DLT* sc, const DLT* xq, const DLT* nb, const DLT* xd, DLT* y,
                           DLT* cnt, int32_t chunk) {
  const int32_t n_out = (int32_t)y->shape[1];
  chunk = task_rows(chunk, qw->shape[1] * 4);
  for (;;) {
    const int32_t r0 = __atomic_fetch_add(PTR(int32_t, cnt), chunk, __ATOMIC_RELAXED);
    if (r0 >= n_out) return 0;
    KSYM(q4_matmul_rows)(qw, sc, xq, nb, xd, y, r0, r0 + chunk < n_out ? r0 + chunk : n_out);
  }
}

#include "q8_matmul.c"      /* int8 weights (q4f16_e8 head) */
#include "vq8_gemm.c"       /* int8 weight GEMM (vision encoder) */
#include "attention.c"      /* decode attention of the paged KV cache */
#include "attn_prefill.c"   /* its ragged and paged prefill attention */
#include "rope.c"           /* its RoPE of the fused QKV */
#include "kv_append.c"      /* its append of new k and v rows */
