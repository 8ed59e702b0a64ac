/* Attention kernels of the paged KV cache (TVM 0.27 TIRPagedKVCache, CPU), included by q4_matmul.c.
 *
 * They replace TVM's CPU kernels (serial over heads, scalar, one exp2 call per score; the ragged prefill
 * one computes every query against every key, masked or not) with the same arguments and results;
 * kernels.py's wrappers run them as parallel loops.  The cache dtype (q, k, v, output) is float32 or
 * float16 (read from the DLTensor), lse is float32; all arithmetic is float32.  Scores are in log2
 * units (x log2 e, exp2 below) and lse = max + log2(sum), what the cache's merge expects.  No sliding
 * window; RoPE must already be applied (the model's RopeMode.NORMAL): with rotary_mode 1 the output is
 * NaN, so that verification fails loudly. */

#define ATT_MAXD 128      /* head_dim limit (kernels.py only swaps kernels with head_dim <= this) */
#define ATT_CHUNK 64      /* decode: keys per online-softmax step (at most, within one page) */
#define ATT_PF_PAGES 4    /* decode, one head at a time: pages prefetched ahead */
#define ATT_PART_PAGES 4  /* decode split over the sequence: pages per part (at least) */
#define ATT_PF_HEADS 2    /* ... rows prefetched: those of the head this many on (4 KB on at MiniCPM-2B's shape) */
#define ATT_QMAX 8192     /* ... and its limit on heads x head_dim (all of q on the stack) */
#define PF_Q 16           /* prefill: query rows per block */
#define PF_K 64           /* prefill: key rows per block */

/* float -> IEEE half, round to nearest even (what TVM's cast does). */
static inline uint16_t f2h(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, 0);
#elif defined(__ARM_NEON) && defined(__aarch64__)
  union { __fp16 f; uint16_t u; } v;
  v.f = (__fp16)f;
  return v.u;
#else
  union { float f; uint32_t u; } v;
  v.f = f;
  const uint32_t x = v.u, sign = (x >> 16) & 0x8000u, ex = (x >> 23) & 0xffu;
  uint32_t m = x & 0x7fffffu;
  const int32_t e = (int32_t)ex - 127 + 15;
  if (ex == 0xffu) return (uint16_t)(sign | 0x7c00u | (m ? 0x200u : 0u));
  if (e >= 31) return (uint16_t)(sign | 0x7c00u);
  if (e <= 0) {                                   /* half subnormal (or zero) */
    if (e < -10) return (uint16_t)sign;
    m |= 0x800000u;
    const uint32_t sh = (uint32_t)(14 - e), rem = m & ((1u << sh) - 1u), half = 1u << (sh - 1u);
    uint32_t h = m >> sh;
    if (rem > half || (rem == half && (h & 1u))) h++;
    return (uint16_t)(sign | h);
  }
  uint32_t h = ((uint32_t)e << 10) | (m >> 13);
  const uint32_t rem = m & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;   /* a carry into the exponent is correct */
  return (uint16_t)(sign | h);
#endif
}

/* n values of a float32 or float16 tensor from element `off` on, as float. */
static inline void att_load(const DLT* t, int64_t off, float* out, int64_t n) {
  int64_t i = 0;
  if (t->bits == 16) {
    const uint16_t* p = PTR(const uint16_t, t) + off;
#ifdef VW
    for (; i + VW <= n; i += VW) VSTORE(out + i, VLOAD_H(p + i));
#endif
    for (; i < n; i++) out[i] = h2f_fast(p[i]);
  } else {
    const float* p = PTR(const float, t) + off;
    for (; i < n; i++) out[i] = p[i];
  }
}

static inline void att_store(DLT* t, int64_t off, const float* v, int64_t n, float scale) {
  if (t->bits == 16) {
    uint16_t* p = PTR(uint16_t, t) + off;
    for (int64_t i = 0; i < n; i++) p[i] = f2h(v[i] * scale);
  } else {
    float* p = PTR(float, t) + off;
    for (int64_t i = 0; i < n; i++) p[i] = v[i] * scale;
  }
}

static inline float dot_f32(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; j++) acc[j] += a[i + j] * b[i + j];
  float r = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
  for (; i < n; i++) r += a[i] * b[i];
  return r;
}

/* ------------------------------------------------------------------ decode ("batch_decode_paged_kv_cpu")
 * Q [B, Hq, D], pages [P, 2, Hkv, page, D] (0 = K, 1 = V), page_indptr [B+1] and page_values: the pages
 * of each sequence, last_len [B]: slots used in its last page; output [B, Hq, D], lse [B, Hq].
 * A single sequence with a long context is split over its pages (attn_decode_part below); otherwise one
 * head at a time: its K (and V) rows of one page are contiguous (page x D values), the next page is a
 * page of every head away, out of the hardware prefetcher's reach, so the rows ATT_PF_PAGES pages ahead
 * are prefetched.  A span (<= ATT_CHUNK rows of one page) is scored and accumulated with q and o in
 * vector registers, rows converted from fp16 as they are loaded; its softmax runs on vectors of scores.
 * The vector path prefetches row by row as it consumes rows (K rows in the score loop, V rows in the PV
 * loop), so the misses overlap the arithmetic: prefetching a page's rows in one burst before the span
 * serialised the two (bench/kernel_stream.py, 40 layers at depth 1024: 1 thread 10.8 -> 14.5 GB/s,
 * 2 threads 17.7 -> 22.9 GB/s, medians of 3, bench/RESULTS.md). */
static inline void prefetch_lines(const char* p, int64_t bytes) {
  for (int64_t b = 0; b < bytes; b += 64) __builtin_prefetch(p + b, 0, PF_LOCALITY);
}

static inline void att_prefetch(const char* k, int64_t bytes, int64_t vstep) {   /* K rows and the V rows */
  prefetch_lines(k, bytes);
  prefetch_lines(k + vstep, bytes);
}

typedef struct { float m, den; } Softmax;   /* running max (log2 units) and denominator */

#ifdef VW
/* One span of `rows` keys k (row stride NV * VW values, fp16 if half) into o / sm: NV = D / VW is a
 * compile-time constant at each call, so q and o stay in registers.  kpf: the K rows ATT_PF_PAGES pages
 * ahead (their V rows vstep bytes on), prefetched as the span's rows are used, or 0. */
static inline __attribute__((always_inline)) void attn_span_vec(const float* q, float* o, Softmax* sm,
                                                                const void* k, const void* v, int64_t rows,
                                                                int half, float scale, const char* kpf,
                                                                int64_t vstep, const int NV) {
  vf qv[NV], ov[NV];
  const int64_t rb = NV * VW * (half ? 2 : 4);     /* bytes of a K (or V) row */
  float sc[ATT_CHUNK] __attribute__((aligned(64))), cm = sm->m;
  for (int j = 0; j < NV; j++) qv[j] = VLOAD_F(q + j * VW), ov[j] = VLOAD_F(o + j * VW);
#define KROW(i, j) (half ? VLOAD_H((const uint16_t*)k + ((i) * NV + (j)) * VW) : VLOAD_F((const float*)k + ((i) * NV + (j)) * VW))
  int64_t i = 0;
  for (; i + 4 <= rows; i += 4) {                  /* four keys, their sums reduced together */
    vf a0 = VSET1(0.f), a1 = a0, a2 = a0, a3 = a0;
    if (kpf) prefetch_lines(kpf + i * rb, 4 * rb);
    for (int j = 0; j < NV; j++) {
      a0 = VFMA(qv[j], KROW(i, j), a0);
      a1 = VFMA(qv[j], KROW(i + 1, j), a1);
      a2 = VFMA(qv[j], KROW(i + 2, j), a2);
      a3 = VFMA(qv[j], KROW(i + 3, j), a3);
    }
    STORE4(sc + i, VSUM4(a0, a1, a2, a3));
  }
  for (; i < rows; i++) {
    vf acc = VSET1(0.f);
    for (int j = 0; j < NV; j++) acc = VFMA(qv[j], KROW(i, j), acc);
    sc[i] = VSUM(acc);
  }
#undef KROW
  /* softmax of the span in vectors: lanes past `rows` score -1e30 (weight 2^-126, nothing next to the
   * max's 1 in the denominator) and are not used by the PV loop */
  const int64_t rv = (rows + VW - 1) / VW * VW;
  for (i = rows; i < rv; i++) sc[i] = -1e30f;
  vf mx = VSET1(cm);
  for (i = 0; i < rv; i += VW) {
    const vf s = VMUL(VLOAD_F(sc + i), VSET1(scale));
    VSTORE(sc + i, s);
    mx = VMAX(mx, s);
  }
  cm = VHMAX(mx);
  const float rescale = exp2_neg(sm->m - cm);
  vf dv = VSET1(0.f);
  for (i = 0; i < rv; i += VW) {
    const vf p = exp2_neg_v(VSUB(VLOAD_F(sc + i), VSET1(cm)));
    VSTORE(sc + i, p);
    dv = VADD(dv, p);
  }
  const float den = sm->den * rescale + VSUM(dv);
  for (int j = 0; j < NV; j++) ov[j] = VMUL(ov[j], VSET1(rescale));
  for (i = 0; i < rows; i++) {
    const vf pv = VSET1(sc[i]);
    if (kpf) prefetch_lines(kpf + vstep + i * rb, rb);
    for (int j = 0; j < NV; j++)
      ov[j] = VFMA(pv, half ? VLOAD_H((const uint16_t*)v + (i * NV + j) * VW) : VLOAD_F((const float*)v + (i * NV + j) * VW),
                   ov[j]);
  }
  for (int j = 0; j < NV; j++) VSTORE(o + j * VW, ov[j]);
  sm->m = cm;
  sm->den = den;
}
#endif

/* The same for any D (portable). */
static void attn_span(const float* q, float* o, Softmax* sm, const void* k, const void* v, int64_t rows, int half,
                      float scale, int64_t D, const char* kpf, int64_t vstep) {
#ifdef VW
  if (D == 2 * VW) { attn_span_vec(q, o, sm, k, v, rows, half, scale, kpf, vstep, 2); return; }
  if (D == 4 * VW) { attn_span_vec(q, o, sm, k, v, rows, half, scale, kpf, vstep, 4); return; }
  if (D == 8 * VW) { attn_span_vec(q, o, sm, k, v, rows, half, scale, kpf, vstep, 8); return; }
  if (D == 16 * VW) { attn_span_vec(q, o, sm, k, v, rows, half, scale, kpf, vstep, 16); return; }
#endif
  if (kpf) att_prefetch(kpf, rows * D * (half ? 2 : 4), vstep);
  float sc[ATT_CHUNK], row[ATT_MAXD], cm = sm->m;
  for (int64_t i = 0; i < rows; i++) {
    for (int64_t d = 0; d < D; d++) row[d] = half ? h2f_fast(((const uint16_t*)k)[i * D + d]) : ((const float*)k)[i * D + d];
    sc[i] = dot_f32(q, row, D) * scale;
    cm = sc[i] > cm ? sc[i] : cm;
  }
  const float rescale = exp2_neg(sm->m - cm);
  sm->den *= rescale;
  for (int64_t d = 0; d < D; d++) o[d] *= rescale;
  for (int64_t i = 0; i < rows; i++) {
    const float pw = exp2_neg(sc[i] - cm);
    sm->den += pw;
    for (int64_t d = 0; d < D; d++) o[d] += pw * (half ? h2f_fast(((const uint16_t*)v)[i * D + d]) : ((const float*)v)[i * D + d]);
  }
  sm->m = cm;
}

/* Row i of out (o / den) and lse[i] (max + log2 den); NaN with rotary_mode 1 (see the top). */
static inline void att_finish(DLT* ot, float* lse, int64_t i, const float* o, int64_t D, Softmax sm,
                              int32_t rotary_mode) {
  att_store(ot, i * D, o, D, (sm.den > 0.f ? 1.f / sm.den : 1.f) + (rotary_mode ? __builtin_nanf("") : 0.f));
  lse[i] = sm.m + (sm.den > 0.f ? __builtin_log2f(sm.den) : 0.f);
}

/* The K rows of KV head kvh in cache page pg (its V rows are Hkv * block further). */
static inline const char* att_rows(const char* base, int32_t pg, int64_t kvh, int64_t Hkv, int64_t block) {
  return base + ((int64_t)pg * 2 * Hkv + kvh) * block;
}

/* One page's `rows` keys (K rows at kp, V rows vstep on) into o / sm, in spans of at most ATT_CHUNK; kf: the
 * rows to prefetch meanwhile, or 0. */
static inline void attn_page(const float* q, float* o, Softmax* sm, const char* kp, const char* kf, int64_t rows,
                             int64_t D, int64_t esz, float scale, int64_t vstep) {
  for (int64_t c = 0; c < rows; c += ATT_CHUNK)
    attn_span(q, o, sm, kp + c * D * esz, kp + vstep + c * D * esz, c + ATT_CHUNK < rows ? ATT_CHUNK : rows - c,
              esz == 2, scale, D, kf ? kf + c * D * esz : 0, vstep);
}

static void attn_decode_head(const DLT* qt, const DLT* pt, const DLT* indptr_t, const DLT* values_t,
                             const DLT* len_t, DLT* ot, float* lse, int64_t h, int32_t rotary_mode, float sm_scale) {
  const int64_t B = qt->shape[0], Hq = qt->shape[1], D = qt->shape[2];
  const int64_t Hkv = pt->shape[2], page = pt->shape[3], kvh = h / (Hq / Hkv), esz = pt->bits / 8;
  const int32_t* indptr = PTR(const int32_t, indptr_t);
  const int32_t* values = PTR(const int32_t, values_t);
  const int32_t* last_len = PTR(const int32_t, len_t);
  const char* base = PTR(const char, pt);
  const int64_t block = page * D * esz, vstep = Hkv * block;     /* one head's rows of a page; K -> V */
  const float scale = sm_scale * LOG2E;
  for (int64_t b = 0; b < B; b++) {
    const int32_t p0 = indptr[b], np = indptr[b + 1] - p0;
    float q[ATT_MAXD], o[ATT_MAXD];
    Softmax sm = {-5e4f, 0.f};
    att_load(qt, (b * Hq + h) * D, q, D);
    for (int64_t d = 0; d < D; d++) o[d] = 0.f;
    for (int32_t pi = 0; pi < np && pi < ATT_PF_PAGES; pi++)
      att_prefetch(att_rows(base, values[p0 + pi], kvh, Hkv, block), block, vstep);
    for (int32_t pi = 0; pi < np; pi++) {
      const char* kf = pi + ATT_PF_PAGES < np ? att_rows(base, values[p0 + pi + ATT_PF_PAGES], kvh, Hkv, block) : 0;
      attn_page(q, o, &sm, att_rows(base, values[p0 + pi], kvh, Hkv, block), kf, pi + 1 < np ? page : last_len[b], D,
                esz, scale, vstep);
    }
    att_finish(ot, lse, b * Hq + h, o, D, sm, rotary_mode);
  }
}

/* Split over the sequence (one sequence, at least 2 * ATT_PART_PAGES pages): P parts of consecutive
 * pages, each scored for every head, page by page.  A page's K rows of all heads are one contiguous run
 * (V the next), so a thread streams long runs that the hardware prefetcher follows, where one head at a
 * time reads a page of rows and jumps a page of every head on.  The rows ATT_PF_HEADS heads on (the
 * next page's first heads at the end of a page) are prefetched as the span uses its rows: the hardware
 * prefetcher alone ran this order at ~29 GB/s in some processes and ~15 in others (bench/kernel_stream.py,
 * 2 threads), with the prefetch it stays at 23-27 (bench/RESULTS.md).  Part p's unnormalised output,
 * running max and denominator go to ws + p * Hq * (D + 2), merged by attn_decode_merge.  Returns P, or
 * 0: one head per slot as attn_decode_head (batches, short contexts, or heads x head_dim over ATT_QMAX). */
static int64_t att_parts(const DLT* qt, const DLT* indptr_t, int32_t n) {
  if (qt->shape[0] != 1 || qt->shape[1] * qt->shape[2] > ATT_QMAX) return 0;
  const int32_t* indptr = PTR(const int32_t, indptr_t);
  const int64_t p = (indptr[1] - indptr[0]) / ATT_PART_PAGES;
  return p < 2 ? 0 : p > n ? n : p;
}

static void attn_decode_part(const DLT* qt, const DLT* pt, const DLT* indptr_t, const DLT* values_t,
                             const DLT* len_t, float* ws, int64_t part, int64_t P, float sm_scale) {
  const int64_t Hq = qt->shape[1], D = qt->shape[2];
  const int64_t Hkv = pt->shape[2], page = pt->shape[3], gq = Hq / Hkv, esz = pt->bits / 8;
  const int32_t* values = PTR(const int32_t, values_t) + PTR(const int32_t, indptr_t)[0];
  const int64_t np = PTR(const int32_t, indptr_t)[1] - PTR(const int32_t, indptr_t)[0];
  const char* base = PTR(const char, pt);
  const int64_t block = page * D * esz, vstep = Hkv * block;
  float q[ATT_QMAX] __attribute__((aligned(64)));
  float* o = ws + part * Hq * (D + 2);
  Softmax* sm = (Softmax*)(o + Hq * D);
  att_load(qt, 0, q, Hq * D);
  for (int64_t i = 0; i < Hq * D; i++) o[i] = 0.f;
  for (int64_t h = 0; h < Hq; h++) sm[h].m = -5e4f, sm[h].den = 0.f;
  for (int64_t pi = part * np / P; pi < (part + 1) * np / P; pi++) {
    const int64_t rows = pi + 1 < np ? page : PTR(const int32_t, len_t)[0];
    for (int64_t h = 0; h < Hq; h++) {
      const int64_t hf = (h + ATT_PF_HEADS) % Hq, pf = h + ATT_PF_HEADS < Hq ? pi : pi + 1;   /* prefetched */
      const char* kf = pf < np ? att_rows(base, values[pf], hf / gq, Hkv, block) : 0;
      attn_page(q + h * D, o + h * D, &sm[h], att_rows(base, values[pi], h / gq, Hkv, block), kf, rows, D, esz,
                sm_scale * LOG2E, vstep);
    }
  }
}

/* Decode, the first of kv_kernels.decode_attention_func's two parallel loops.  Parallel slot t of n:
 * parts [t*P/n, (t+1)*P/n) of the split, or else query heads [t*Hq/n, (t+1)*Hq/n) straight to out / lse
 * (float32 [B, Hq]).  ws: n * Hq * (D + 2) floats. */
KEXPORT int32_t KSYM(attn_decode)(const DLT* q, const DLT* pages, const DLT* indptr, const DLT* values,
                                  const DLT* last_len, DLT* out, float* lse, float* ws, int32_t t, int32_t n,
                                  int32_t rotary_mode, float sm_scale) {
  const int64_t P = att_parts(q, indptr, n), Hq = q->shape[1];
  for (int64_t p = t * P / n; p < (t + 1) * P / n; p++) attn_decode_part(q, pages, indptr, values, last_len, ws, p, P, sm_scale);
  if (!P)
    for (int64_t h = t * Hq / n; h < (t + 1) * Hq / n; h++)
      attn_decode_head(q, pages, indptr, values, last_len, out, lse, h, rotary_mode, sm_scale);
  return 0;
}

/* The number of parts attn_decode splits into (0: none), for the wrapper: it runs the merge loop only
 * after a split. */
KEXPORT int32_t KSYM(attn_decode_parts)(const DLT* q, const DLT* indptr, int32_t n) {
  return (int32_t)att_parts(q, indptr, n);
}

/* The second loop: slot t merges the parts of query heads [t*Hq/n, (t+1)*Hq/n) into out / lse. */
KEXPORT int32_t KSYM(attn_decode_merge)(const DLT* q, const DLT* indptr, DLT* out, float* lse, const float* ws,
                                        int32_t t, int32_t n, int32_t rotary_mode) {
  const int64_t P = att_parts(q, indptr, n), Hq = q->shape[1], D = q->shape[2];
  if (!P) return 0;
  for (int64_t h = t * Hq / n; h < (t + 1) * Hq / n; h++) {
    float m = -5e4f, den = 0.f, o[ATT_MAXD];
    for (int64_t p = 0; p < P; p++) {
      const float pm = ((const Softmax*)(ws + p * Hq * (D + 2) + Hq * D))[h].m;
      m = pm > m ? pm : m;
    }
    for (int64_t d = 0; d < D; d++) o[d] = 0.f;
    for (int64_t p = 0; p < P; p++) {
      const float* po = ws + p * Hq * (D + 2);
      const Softmax sm = ((const Softmax*)(po + Hq * D))[h];
      const float w = exp2_neg(sm.m - m);
      den += sm.den * w;
      for (int64_t d = 0; d < D; d++) o[d] += w * po[h * D + d];
    }
    att_finish(out, lse, h, o, D, (Softmax){m, den}, rotary_mode);
  }
  return 0;
}
