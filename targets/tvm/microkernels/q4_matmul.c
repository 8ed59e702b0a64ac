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

/* DLPack's DLTensor (stable C ABI). TVM passes one for each handle parameter of the TIR wrappers in
 * kernels.py: handle parameters (rather than buffer pointers) keep the wrappers free of pointer
 * expressions, which TVM 0.27's AttachGlobalSymbol cannot rewrite when a system-lib prefix is set. */
typedef struct {
  void* data;
  int32_t device_type, device_id;
  int32_t ndim;
  uint8_t code, bits;
  uint16_t lanes;
  const int64_t* shape;
  const int64_t* strides;
  uint64_t byte_offset;
} DLT;

#define PTR(T, t) ((T*)((char*)(t)->data + (t)->byte_offset))

/* Exported names: KSYM(x) = <MCPM_KPREFIX>x.  kernels.py sets the prefix to mcpm_k<hash of this source
 * and the compile flags>_, so two model libraries linked into one app never clash: equal hashes mean
 * identical code, and the symbols are weak (the linker keeps one copy) and hidden (a .so does not
 * export them). */
#ifndef MCPM_KPREFIX
#define MCPM_KPREFIX mcpm_k_
#endif
#define KCAT2(a, b) a##b
#define KCAT(a, b) KCAT2(a, b)
#define KSYM(name) KCAT(MCPM_KPREFIX, name)
#define KEXPORT __attribute__((weak, visibility("hidden")))

/* Decode streams the weights once per token, so two things decide its speed (bench/kernel_stream.py,
 * 2B-shaped decode GEMVs, bench/RESULTS.md):
 * - software prefetch PF_DIST bytes ahead (rows are contiguous, so it runs on into the next row), into
 *   L2 (locality 2) on x86: the hardware prefetcher alone left a core at 2/3 of its read bandwidth;
 * - tasks of at least TASK_BYTES of weights taken from the shared row counter: long sequential runs
 *   per thread (16-row tasks held 2 threads at 73% of a plain read, 256 KB tasks reach ~85%).
 * x86: 1 thread 9.8 -> 15 GB/s, 2 threads 16 -> 24 GB/s.  The aarch64 values are conventional ones,
 * smaller tasks for the 4-8 unequal cores of phones; not measured here (no phone). */
#if defined(__x86_64__)
#define PF_DIST 4096
#define PF_LOCALITY 2
#define TASK_BYTES 262144
#else
#define PF_DIST 512
#define PF_LOCALITY 3
#define TASK_BYTES 65536
#endif
#define PREFETCH(p) __builtin_prefetch((const char*)(p) + PF_DIST, 0, PF_LOCALITY)

/* Rows per task for weight rows of row_bytes: at least `chunk`, at least TASK_BYTES. */
static inline int32_t task_rows(int32_t chunk, int64_t row_bytes) {
  return chunk * row_bytes >= TASK_BYTES ? chunk : (int32_t)((TASK_BYTES + row_bytes - 1) / row_bytes);
}

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

/* half -> float in the hot loops: F16C / aarch64 fp16 conversion when the ISA has it. */
static inline float h2f_fast(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#elif defined(__ARM_NEON) && defined(__aarch64__)
  union { uint16_t u; __fp16 f; } v;
  v.u = h;
  return (float)v.f;
#else
  return h2f(h);
#endif
}

static inline float fabs_(float x) { return x < 0 ? -x : x; }

static inline int8_t round_q(float v) {
  int r = (int)(v < 0 ? v - 0.5f : v + 0.5f);
  return (int8_t)(r > 127 ? 127 : (r < -127 ? -127 : r));
}

/* Quantise m tokens of k inputs: xq int8[m*k], nb int32[m*k/8], xd float[m*k/32]. */
static void q4_quant_act(const float* x, int64_t m, int64_t k, int8_t* xq, int32_t* nb, float* xd) {
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
}

/* x float32 [m, k] -> xq int8 [m*k], nb int32 [m*k/8], xd float32 [m*k/32] */
KEXPORT int32_t KSYM(q4_quant_act)(const DLT* x, DLT* xq, DLT* nb, DLT* xd) {
  q4_quant_act(PTR(const float, x), x->shape[0], x->shape[1], PTR(int8_t, xq), PTR(int32_t, nb), PTR(float, xd));
  return 0;
}

/* One group in the one-group block layout, portable C. */
static inline float group_dot(const uint8_t* w, uint16_t s, const int8_t* xq, const int32_t* nb, float d) {
  int32_t acc = nb[0] + nb[1] + nb[2] + nb[3];
  for (int i = 0; i < 16; i++) acc += (int32_t)(w[i] & 15) * xq[i] + (int32_t)(w[i] >> 4) * xq[16 + i];
  return h2f_fast(s) * d * (float)acc;
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
#elif defined(__ARM_NEON) && defined(__aarch64__)
  /* 4 groups (64 weight bytes, one prefetch) per iteration, one accumulator each: no loop-carried
   * chain through a single fmla, no per-group branches (bench/arm_kernels.py models this loop). */
  const uint8x16_t mask = vdupq_n_u8(15);
  float32x4_t acc[4] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f)};
  for (; g + 4 <= G; g += 4) {
    PREFETCH(w + g * 16);
    if (!(g & 31)) PREFETCH(s + g);
    const float32x4_t sd = vmulq_f32(vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(s + g))), vld1q_f32(xd + g));
    int32x4_t a[4];
    for (int j = 0; j < 4; j++) {
      const uint8x16_t wb = vld1q_u8(w + (g + j) * 16);
      const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(wb, mask));
      const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(wb, 4));
      const int8x16_t xl = vld1q_s8(xq + (g + j) * 32), xh = vld1q_s8(xq + (g + j) * 32 + 16);
      a[j] = vld1q_s32(nb + (g + j) * 4);
#ifdef __ARM_FEATURE_DOTPROD
      a[j] = vdotq_s32(vdotq_s32(a[j], lo, xl), hi, xh);
#else
      int16x8_t p0 = vmull_s8(vget_low_s8(lo), vget_low_s8(xl));
      p0 = vmlal_s8(p0, vget_low_s8(hi), vget_low_s8(xh));
      int16x8_t p1 = vmull_s8(vget_high_s8(lo), vget_high_s8(xl));
      p1 = vmlal_s8(p1, vget_high_s8(hi), vget_high_s8(xh));
      a[j] = vpadalq_s16(vpadalq_s16(a[j], p0), p1);
#endif
    }
    acc[0] = vfmaq_laneq_f32(acc[0], vcvtq_f32_s32(a[0]), sd, 0);
    acc[1] = vfmaq_laneq_f32(acc[1], vcvtq_f32_s32(a[1]), sd, 1);
    acc[2] = vfmaq_laneq_f32(acc[2], vcvtq_f32_s32(a[2]), sd, 2);
    acc[3] = vfmaq_laneq_f32(acc[3], vcvtq_f32_s32(a[3]), sd, 3);
  }
  r = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
#endif
  for (; g < G; g++) r += group_dot(w + g * 16, s[g], xq + g * 32, nb + g * 4, xd[g]);
  return r;
}

/* Four tokens against one weight row (prefill): the weight block is unpacked once for all four. */
#if BLK == 4 || (defined(__ARM_NEON) && defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD))
#define HAVE_DOT4 1
static inline void row_dot4(const uint8_t* w, const uint16_t* s, const int8_t* xq, const int32_t* nb,
                            const float* xd, int64_t G, int64_t k, float* out, int64_t ostride) {
  const int64_t W = k / 8;
  int64_t g = 0;
#if BLK == 4
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
#else
  const uint8x16_t mask = vdupq_n_u8(15);
  float32x4_t acc[4] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f), vdupq_n_f32(0.f)};
  for (; g < G; g++) {
    if (!(g & 3)) PREFETCH(w + g * 16);
    const uint8x16_t wb = vld1q_u8(w + g * 16);
    const int8x16_t lo = vreinterpretq_s8_u8(vandq_u8(wb, mask));
    const int8x16_t hi = vreinterpretq_s8_u8(vshrq_n_u8(wb, 4));
    union { uint16_t u; __fp16 f; } hs;
    hs.u = s[g];
    const float sg = (float)hs.f;
    for (int t = 0; t < 4; t++) {
      const int8_t* xt = xq + t * k + g * 32;
      int32x4_t a = vld1q_s32(nb + t * W + g * 4);
      a = vdotq_s32(a, lo, vld1q_s8(xt));
      a = vdotq_s32(a, hi, vld1q_s8(xt + 16));
      acc[t] = vfmaq_n_f32(acc[t], vcvtq_f32_s32(a), sg * xd[t * G + g]);
    }
  }
  for (int t = 0; t < 4; t++) out[t * ostride] = vaddvq_f32(acc[t]);
#endif
  for (; g < G; g++)
    for (int t = 0; t < 4; t++)
      out[t * ostride] += group_dot(w + g * 16, s[g], xq + t * k + g * 32, nb + t * W + g * 4, xd[t * G + g]);
}
#endif


/* Two weight rows x four tokens with the aarch64 int8 matrix multiply (i8mm, ARMv8.6+: smmla does a
 * 2x8 by 8x2 int8 product per instruction, twice the multiply-adds of sdot).  Prefill only.  Per group
 * and 8-input chunk, vzip of the 64-bit halves puts two rows (or two tokens) in one register; the
 * 2x2 int32 result is [t0 r0, t0 r1, t1 r0, t1 r1]. */
#if defined(__ARM_NEON) && defined(__aarch64__) && defined(__ARM_FEATURE_MATMUL_INT8)
#define HAVE_MMLA 1
#define ZIP1(a, b) vreinterpretq_s8_u64(vzip1q_u64(vreinterpretq_u64_s8(a), vreinterpretq_u64_s8(b)))
#define ZIP2(a, b) vreinterpretq_s8_u64(vzip2q_u64(vreinterpretq_u64_s8(a), vreinterpretq_u64_s8(b)))
static inline void rows2_dot4(const uint8_t* w, const uint16_t* s, const int8_t* xq, const int32_t* nb,
                              const float* xd, int64_t G, int64_t k, float* out, int64_t ostride) {
  const int64_t W = k / 8;
  const uint8x16_t mask = vdupq_n_u8(15);
  float32x4_t acc[2] = {vdupq_n_f32(0.f), vdupq_n_f32(0.f)};   /* token pairs (0,1) and (2,3) */
  for (int64_t g = 0; g < G; g++) {
    if (!(g & 3)) {
      PREFETCH(w + g * 16);
      PREFETCH(w + k / 2 + g * 16);
    }
    const uint8x16_t w0 = vld1q_u8(w + g * 16), w1 = vld1q_u8(w + k / 2 + g * 16);
    const int8x16_t lo0 = vreinterpretq_s8_u8(vandq_u8(w0, mask)), hi0 = vreinterpretq_s8_u8(vshrq_n_u8(w0, 4));
    const int8x16_t lo1 = vreinterpretq_s8_u8(vandq_u8(w1, mask)), hi1 = vreinterpretq_s8_u8(vshrq_n_u8(w1, 4));
    const int8x16_t b[4] = {ZIP1(lo0, lo1), ZIP2(lo0, lo1), ZIP1(hi0, hi1), ZIP2(hi0, hi1)};
    union { uint16_t u; __fp16 f; } h0, h1;
    h0.u = s[g];
    h1.u = s[G + g];
    const float s0 = (float)h0.f, s1 = (float)h1.f;
    for (int p = 0; p < 2; p++) {
      const int t0 = 2 * p, t1 = 2 * p + 1;
      const int8x16_t xl0 = vld1q_s8(xq + t0 * k + g * 32), xh0 = vld1q_s8(xq + t0 * k + g * 32 + 16);
      const int8x16_t xl1 = vld1q_s8(xq + t1 * k + g * 32), xh1 = vld1q_s8(xq + t1 * k + g * 32 + 16);
      const int32_t c0 = vaddvq_s32(vld1q_s32(nb + t0 * W + g * 4)), c1 = vaddvq_s32(vld1q_s32(nb + t1 * W + g * 4));
      int32x4_t a = vcombine_s32(vdup_n_s32(c0), vdup_n_s32(c1));
      a = vmmlaq_s32(a, ZIP1(xl0, xl1), b[0]);
      a = vmmlaq_s32(a, ZIP2(xl0, xl1), b[1]);
      a = vmmlaq_s32(a, ZIP1(xh0, xh1), b[2]);
      a = vmmlaq_s32(a, ZIP2(xh0, xh1), b[3]);
      const float d0 = xd[t0 * G + g], d1 = xd[t1 * G + g];
      const float32x4_t sd = {s0 * d0, s1 * d0, s0 * d1, s1 * d1};
      acc[p] = vfmaq_f32(acc[p], vcvtq_f32_s32(a), sd);
    }
  }
  for (int p = 0; p < 2; p++) {
    out[(2 * p) * ostride] = vgetq_lane_f32(acc[p], 0);
    out[(2 * p) * ostride + 1] = vgetq_lane_f32(acc[p], 1);
    out[(2 * p + 1) * ostride] = vgetq_lane_f32(acc[p], 2);
    out[(2 * p + 1) * ostride + 1] = vgetq_lane_f32(acc[p], 3);
  }
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
    q4_gemm_rows(qw, sc, xq, nb, xd, y, m, n_out, k, r0, r1);
    return 0;
  }
  for (int64_t r = r0; r < r1; r++)
    for (int64_t t = 0; t < m; t++)
      y[t * n_out + r] = row_dot((const uint8_t*)(qw + r * (k / 8)), sc + r * G, xq + t * k, nb + t * (k / 8),
                                 xd + t * G, G);
  return 0;
}

/* ------------------------------------------------------------------ int8 weights (q4f16_e8 head)
 * w = q8 * s, q8 int8 [n_out, k] in natural order, s f16 per 32-group.  Activations are quantised the
 * same way but kept in natural order (mcpm_q8_quant_act); s8 x s8 dot products (x86: |w| x sign(x, w)
 * through the u8 x s8 instructions; aarch64: sdot). */
KEXPORT int32_t KSYM(q8_quant_act)(const DLT* xt, DLT* xqt, DLT* xdt) {
  const float* x = PTR(const float, xt);
  int8_t* xq = PTR(int8_t, xqt);
  float* xd = PTR(float, xdt);
  const int64_t m = xt->shape[0], k = xt->shape[1];
  for (int64_t i = 0; i < m * (k / 32); i++) {
    const float* xg = x + i * 32;
    float amax = 0.f;
    for (int e = 0; e < 32; e++) amax = fabs_(xg[e]) > amax ? fabs_(xg[e]) : amax;
    const float id = amax > 0.f ? 127.f / amax : 0.f;
    xd[i] = amax / 127.f;
    for (int e = 0; e < 32; e++) xq[i * 32 + e] = round_q(xg[e] * id);
  }
  return 0;
}

static inline float q8_group(const int8_t* w, uint16_t s, const int8_t* x, float d) {
  int32_t acc = 0;
  for (int i = 0; i < 32; i++) acc += (int32_t)w[i] * x[i];
  return h2f_fast(s) * d * (float)acc;
}

static inline float q8_row_dot(const int8_t* w, const uint16_t* s, const int8_t* xq, const float* xd, int64_t G) {
  int64_t g = 0;
  float r = 0.f;
#if BLK == 4
  __m512 acc = _mm512_setzero_ps();
#ifndef __AVX512VNNI__
  const __m512i ones = _mm512_set1_epi16(1);
#endif
  for (; g + 2 <= G; g += 2) {
    PREFETCH(w + g * 32);
    const __m512i wv = _mm512_loadu_si512((const void*)(w + g * 32));
    const __m512i xv = _mm512_loadu_si512((const void*)(xq + g * 32));
    const __m512i aw = _mm512_abs_epi8(wv);
    const __m512i sx = _mm512_mask_sub_epi8(xv, _mm512_movepi8_mask(wv), _mm512_setzero_si512(), xv);
#ifdef __AVX512VNNI__
    const __m512i a = _mm512_dpbusd_epi32(_mm512_setzero_si512(), aw, sx);
#else
    const __m512i a = _mm512_madd_epi16(_mm512_maddubs_epi16(aw, sx), ones);
#endif
    const __m512 sv = _mm512_mask_blend_ps((__mmask16)0xff00, _mm512_set1_ps(h2f_fast(s[g]) * xd[g]),
                                           _mm512_set1_ps(h2f_fast(s[g + 1]) * xd[g + 1]));
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), sv, acc);
  }
  r = _mm512_reduce_add_ps(acc);
#elif BLK == 2
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc = _mm256_setzero_ps();
  for (; g < G; g++) {
    PREFETCH(w + g * 32);
    const __m256i wv = _mm256_loadu_si256((const __m256i*)(w + g * 32));
    const __m256i xv = _mm256_loadu_si256((const __m256i*)(xq + g * 32));
    const __m256i p = _mm256_maddubs_epi16(_mm256_sign_epi8(wv, wv), _mm256_sign_epi8(xv, wv));
    acc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_madd_epi16(p, ones)), _mm256_set1_ps(h2f_fast(s[g]) * xd[g]), acc);
  }
  __m128 q = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  q = _mm_add_ps(q, _mm_movehl_ps(q, q));
  q = _mm_add_ss(q, _mm_movehdup_ps(q));
  r = _mm_cvtss_f32(q);
#elif defined(__ARM_NEON) && defined(__aarch64__)
  float32x4_t acc = vdupq_n_f32(0.f);
  for (; g < G; g++) {
    if (!(g & 1)) PREFETCH(w + g * 32);
    const int8x16_t w0 = vld1q_s8(w + g * 32), w1 = vld1q_s8(w + g * 32 + 16);
    const int8x16_t x0 = vld1q_s8(xq + g * 32), x1 = vld1q_s8(xq + g * 32 + 16);
#ifdef __ARM_FEATURE_DOTPROD
    const int32x4_t a = vdotq_s32(vdotq_s32(vdupq_n_s32(0), w0, x0), w1, x1);
#else
    int32x4_t a = vpaddlq_s16(vmull_s8(vget_low_s8(w0), vget_low_s8(x0)));
    a = vpadalq_s16(a, vmull_s8(vget_high_s8(w0), vget_high_s8(x0)));
    a = vpadalq_s16(a, vmull_s8(vget_low_s8(w1), vget_low_s8(x1)));
    a = vpadalq_s16(a, vmull_s8(vget_high_s8(w1), vget_high_s8(x1)));
#endif
    union { uint16_t u; __fp16 f; } hs;
    hs.u = s[g];
    acc = vfmaq_n_f32(acc, vcvtq_f32_s32(a), (float)hs.f * xd[g]);
  }
  r = vaddvq_f32(acc);
#endif
  for (; g < G; g++) r += q8_group(w + g * 32, s[g], xq + g * 32, xd[g]);
  return r;
}

KEXPORT int32_t KSYM(q8_matmul_rows)(const DLT* qwt, const DLT* sct, const DLT* xqt, const DLT* xdt, DLT* yt,
                            int32_t r0, int32_t r1) {
  const int8_t* qw = PTR(const int8_t, qwt);
  const uint16_t* sc = PTR(const uint16_t, sct);
  const int8_t* xq = PTR(const int8_t, xqt);
  const float* xd = PTR(const float, xdt);
  float* y = PTR(float, yt);
  const int64_t m = yt->shape[0], n_out = yt->shape[1], k = qwt->shape[1];
  const int64_t G = k / 32;
  for (int64_t r = r0; r < r1; r++)
    for (int64_t t = 0; t < m; t++)
      y[t * n_out + r] = q8_row_dot(qw + r * k, sc + r * G, xq + t * k, xd + t * G, G);
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

KEXPORT int32_t KSYM(q8_matmul_dyn)(const DLT* qw, const DLT* sc, const DLT* xq, const DLT* xd, DLT* y, DLT* cnt,
                           int32_t chunk) {
  const int32_t n_out = (int32_t)y->shape[1];
  chunk = task_rows(chunk, qw->shape[1]);
  for (;;) {
    const int32_t r0 = __atomic_fetch_add(PTR(int32_t, cnt), chunk, __ATOMIC_RELAXED);
    if (r0 >= n_out) return 0;
    KSYM(q8_matmul_rows)(qw, sc, xq, xd, y, r0, r0 + chunk < n_out ? r0 + chunk : n_out);
  }
}

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

/* ------------------------------------------------------------------ further kernels, same translation unit
 * (kernels.py compiles this file; the others share its DLTensor, symbol and fp16 helpers). */
#include "attention.c"   /* decode + prefill attention of the paged KV cache */
