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
