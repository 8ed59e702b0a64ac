/* Float vectors for the attention kernels (attention.c, attn_prefill.c), one set per ISA path of common.h:
 * vf holds VW floats; VLOAD_H converts VW fp16 values (F16C / AVX-512 / aarch64 fcvtl); VSUM4 reduces four
 * vectors to [sum a, sum b, sum c, sum d]; exp2_neg_v and silu_v are common.h's exp2_neg and silu on every
 * lane.  No VW (portable C build): the kernels' scalar paths.  Included at the end of common.h. */
#if BLK == 4 || BLK == 2
/* x86: [sum a, sum b, sum c, sum d] of four 8-float vectors */
static inline __m128 sum4_256(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 x = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
}
#define STORE4(p, x) _mm_storeu_ps(p, x)
#endif

#if BLK == 4
typedef __m512 vf;
#define VW 16
#define VLOAD_H(p) _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(p)))
#define VLOAD_F(p) _mm512_loadu_ps(p)
#define VSTORE(p, v) _mm512_storeu_ps(p, v)
#define VFMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define VMUL(a, b) _mm512_mul_ps(a, b)
#define VSET1(x) _mm512_set1_ps(x)
#define VSUM(v) _mm512_reduce_add_ps(v)
#define VADD(a, b) _mm512_add_ps(a, b)
#define VSUB(a, b) _mm512_sub_ps(a, b)
#define VMAX(a, b) _mm512_max_ps(a, b)
#define VMIN(a, b) _mm512_min_ps(a, b)
#define VDIV(a, b) _mm512_div_ps(a, b)
#define VHMAX(v) _mm512_reduce_max_ps(v)
#define VFLOOR(x) _mm512_roundscale_ps(x, _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC)
#define VPOW2I(n) _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23))
static inline __m256 half_sum(__m512 v) {
  return _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
}
#define VSUM4(a, b, c, d) sum4_256(half_sum(a), half_sum(b), half_sum(c), half_sum(d))
#elif BLK == 2
typedef __m256 vf;
#define VW 8
#define VLOAD_H(p) _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(p)))
#define VLOAD_F(p) _mm256_loadu_ps(p)
#define VSTORE(p, v) _mm256_storeu_ps(p, v)
#define VFMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define VMUL(a, b) _mm256_mul_ps(a, b)
#define VSET1(x) _mm256_set1_ps(x)
#define VADD(a, b) _mm256_add_ps(a, b)
#define VSUB(a, b) _mm256_sub_ps(a, b)
#define VMAX(a, b) _mm256_max_ps(a, b)
#define VMIN(a, b) _mm256_min_ps(a, b)
#define VDIV(a, b) _mm256_div_ps(a, b)
#define VFLOOR(x) _mm256_floor_ps(x)
#define VPOW2I(n) _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23))
static inline float VHMAX(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_movehdup_ps(x)));
}
static inline float VSUM(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}
#define VSUM4(a, b, c, d) sum4_256(a, b, c, d)
#elif defined(__ARM_NEON) && defined(__aarch64__)
typedef float32x4_t vf;
#define VW 4
#define VLOAD_H(p) vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p)))
#define VLOAD_F(p) vld1q_f32(p)
#define VSTORE(p, v) vst1q_f32(p, v)
#define VFMA(a, b, c) vfmaq_f32(c, a, b)
#define VMUL(a, b) vmulq_f32(a, b)
#define VSET1(x) vdupq_n_f32(x)
#define VSUM(v) vaddvq_f32(v)
#define VADD(a, b) vaddq_f32(a, b)
#define VSUB(a, b) vsubq_f32(a, b)
#define VMAX(a, b) vmaxq_f32(a, b)
#define VMIN(a, b) vminq_f32(a, b)
#define VDIV(a, b) vdivq_f32(a, b)
#define VHMAX(v) vmaxvq_f32(v)
#define VFLOOR(x) vrndmq_f32(x)
#define VPOW2I(n) vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23))
#define VSUM4(a, b, c, d) vpaddq_f32(vpaddq_f32(a, b), vpaddq_f32(c, d))
#define STORE4(p, x) vst1q_f32(p, x)
#endif

#ifdef VW
static inline vf exp2_neg_v(vf x) {   /* exp2_neg on every lane */
  x = VMAX(x, VSET1(-126.f));
  const vf n = VFLOOR(x), f = VSUB(x, n);
  vf p = VSET1(EXP2_C[0]);
  for (int i = 1; i < 7; i++) p = VFMA(p, f, VSET1(EXP2_C[i]));
  return VMUL(p, VPOW2I(n));
}

static inline vf silu_v(vf g) {      /* silu of every lane, as common.h's silu */
  const vf zero = VSET1(0.f), z = exp2_neg_v(VMUL(VMAX(g, VSUB(zero, g)), VSET1(-LOG2E)));
  return VDIV(VFMA(VMIN(g, zero), z, VMAX(g, zero)), VADD(VSET1(1.f), z));
}
#endif
