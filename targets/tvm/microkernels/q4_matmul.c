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
 * of the 4 activation bytes of a 32-bit lane in each half.
 */
#include <stdint.h>

#if defined(__AVX512BW__) && defined(__AVX512F__)
#include <immintrin.h>
#define BLK 4
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define BLK 2
#elif defined(__ARM_NEON) && defined(__aarch64__)
#include <arm_neon.h>
#define BLK 1
#else
#define BLK 1
#endif

/* IEEE half -> float, portable (used for tails and the portable path). */
static float h2f(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu, bits;
  if (exp == 0) {
    if (man == 0) {
      bits = sign;
    } else { /* subnormal: renormalise */
      exp = 127 - 15 + 1;
      while (!(man & 0x400u)) { man <<= 1; exp--; }
      bits = sign | (exp << 23) | ((man & 0x3ffu) << 13);
    }
  } else if (exp == 31) {
    bits = sign | 0x7f800000u | (man << 13);
  } else {
    bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
  }
  union { uint32_t u; float f; } v;
  v.u = bits;
  return v.f;
}

static inline float fabs_(float x) { return x < 0 ? -x : x; }

static inline int8_t round_q(float v) {
  int r = (int)(v < 0 ? v - 0.5f : v + 0.5f);
  return (int8_t)(r > 127 ? 127 : (r < -127 ? -127 : r));
}

/* Quantise m tokens of k inputs: xq int8[m*k], nb int32[m*k/8], xd float[m*k/32]. */
int32_t mcpm_q4_quant_act(const float* x, int64_t m, int64_t k, int8_t* xq, int32_t* nb, float* xd) {
  const int64_t G = k / 32;
  for (int64_t t = 0; t < m; t++) {
    const float* xt = x + t * k;
    int8_t* qt = xq + t * k;
    int32_t* nt = nb + t * (k / 8);
    float* dt = xd + t * G;
    for (int64_t g0 = 0; g0 < G;) {
      const int64_t nblk = (g0 + BLK <= G) ? BLK : 1;
      const int64_t base = g0 * 32;
      for (int64_t j = 0; j < nblk; j++) {
        const float* xg = xt + (g0 + j) * 32;
        float amax = 0.f;
        for (int e = 0; e < 32; e++) amax = fabs_(xg[e]) > amax ? fabs_(xg[e]) : amax;
        const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
        dt[g0 + j] = d;
        for (int e = 0; e < 32; e++) {
          const int64_t pos = base + (e & 1) * nblk * 16 + j * 16 + (e >> 1);
          qt[pos] = round_q(xg[e] * id);
        }
      }
      for (int64_t lane = 0; lane < nblk * 4; lane++) {
        int32_t s = 0;
        for (int b = 0; b < 4; b++) s += qt[base + lane * 4 + b] + qt[base + nblk * 16 + lane * 4 + b];
        nt[base / 8 + lane] = -7 * s;
      }
      g0 += nblk;
    }
  }
  return 0;
}

/* One group in the one-group block layout, portable C. */
static inline float group_dot(const uint8_t* w, uint16_t s, const int8_t* xq, const int32_t* nb, float d) {
  int32_t acc = nb[0] + nb[1] + nb[2] + nb[3];
  for (int i = 0; i < 16; i++) acc += (int32_t)(w[i] & 15) * xq[i] + (int32_t)(w[i] >> 4) * xq[16 + i];
  return h2f(s) * d * (float)acc;
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
    for (int h = 0; h < 2; h++) {
      const int64_t gg = g + 4 * h;
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
    const __m256i wb = _mm256_loadu_si256((const __m256i*)(w + g * 16));
    const __m256i lo = _mm256_and_si256(wb, mask);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(wb, 4), mask);
    const __m256i p = _mm256_add_epi16(_mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i*)(xq + g * 32))),
                                       _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i*)(xq + g * 32 + 32))));
    const __m256i a = _mm256_add_epi32(_mm256_madd_epi16(p, ones), _mm256_loadu_si256((const __m256i*)(nb + g * 4)));
    const __m256 sv = _mm256_set_m128(_mm_set1_ps(h2f(s[g + 1]) * xd[g + 1]), _mm_set1_ps(h2f(s[g]) * xd[g]));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(a), sv, acc);
  }
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  r = _mm_cvtss_f32(q);
#elif defined(__ARM_NEON) && defined(__aarch64__)
  const uint8x16_t mask = vdupq_n_u8(15);
  float32x4_t acc0 = vdupq_n_f32(0.f), acc1 = vdupq_n_f32(0.f);
  for (; g < G; g++) {
    const uint8x16_t wb = vld1q_u8(w + g * 16);
    const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(wb, mask));
    const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(wb, 4));
    const int8x16_t xl = vld1q_s8(xq + g * 32), xh = vld1q_s8(xq + g * 32 + 16);
    int32x4_t a = vld1q_s32(nb + g * 4);
#ifdef __ARM_FEATURE_DOTPROD
    a = vdotq_s32(a, lo, xl);
    a = vdotq_s32(a, hi, xh);
#else
    int16x8_t p0 = vmull_s8(vget_low_s8(lo), vget_low_s8(xl));
    p0 = vmlal_s8(p0, vget_low_s8(hi), vget_low_s8(xh));
    int16x8_t p1 = vmull_s8(vget_high_s8(lo), vget_high_s8(xl));
    p1 = vmlal_s8(p1, vget_high_s8(hi), vget_high_s8(xh));
    a = vpadalq_s16(vpadalq_s16(a, p0), p1);
#endif
    union { uint16_t u; __fp16 f; } hs;
    hs.u = s[g];
    const float sd = (float)hs.f * xd[g];
    if (g & 1) acc1 = vfmaq_n_f32(acc1, vcvtq_f32_s32(a), sd);
    else acc0 = vfmaq_n_f32(acc0, vcvtq_f32_s32(a), sd);
  }
  r = vaddvq_f32(vaddq_f32(acc0, acc1));
#endif
  for (; g < G; g++) r += group_dot(w + g * 16, s[g], xq + g * 32, nb + g * 4, xd[g]);
  return r;
}

/* y[t, r] for tokens t < m and weight rows r0 <= r < r1 of qw uint32[n_out, k/8], sc f16[n_out, k/32]. */
int32_t mcpm_q4_matmul_rows(const uint32_t* qw, const uint16_t* sc, const int8_t* xq, const int32_t* nb,
                            const float* xd, float* y, int64_t m, int64_t k, int64_t n_out, int32_t r0,
                            int32_t r1) {
  /* r0/r1 are int32: TVM's parallel-loop lowering passes the task range as i32 (an int64 parameter
   * would read undefined upper bits on aarch64). */
  const int64_t G = k / 32;
  for (int64_t r = r0; r < r1; r++) {
    const uint8_t* w = (const uint8_t*)(qw + r * (k / 8));
    const uint16_t* s = sc + r * G;
    for (int64_t t = 0; t < m; t++)
      y[t * n_out + r] = row_dot(w, s, xq + t * k, nb + t * (k / 8), xd + t * G, G);
  }
  return 0;
}
