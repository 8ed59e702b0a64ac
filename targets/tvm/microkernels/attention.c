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
#define ATT_CHUNK 64      /* decode: keys per online-softmax step */
#define PF_Q 16           /* prefill: query rows per block */
#define PF_K 64           /* prefill: key rows per block */
#define LOG2E 1.4426950408889634f

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
  if (t->bits == 16) {
    const uint16_t* p = PTR(const uint16_t, t) + off;
    for (int64_t i = 0; i < n; i++) out[i] = h2f_fast(p[i]);
  } else {
    const float* p = PTR(const float, t) + off;
    for (int64_t i = 0; i < n; i++) out[i] = p[i];
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

/* 2^x for x <= 0 (a score minus the running max): degree-6 polynomial on the fraction, relative error
 * ~2e-7; flushes below 2^-126.  Plain arithmetic, so the compiler vectorises the loops calling it. */
static inline float exp2_neg(float x) {
  x = x < -126.f ? -126.f : x;
  const float n = __builtin_floorf(x), f = x - n;
  float p = 1.535336188319500e-4f;
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.f;
  union { uint32_t u; float f; } s;
  s.u = (uint32_t)((int32_t)n + 127) << 23;
  return p * s.f;
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
 * of each sequence, last_len [B]: slots used in its last page; output [B, Hq, D], lse [B, Hq]. */
static void attn_decode_head(const DLT* qt, const DLT* pt, const DLT* indptr_t, const DLT* values_t,
                             const DLT* len_t, DLT* ot, DLT* lset, int64_t h, int32_t rotary_mode, float sm_scale) {
  const int64_t B = qt->shape[0], Hq = qt->shape[1], D = qt->shape[2];
  const int64_t Hkv = pt->shape[2], page = pt->shape[3], kvh = h / (Hq / Hkv);
  const int32_t* indptr = PTR(const int32_t, indptr_t);
  const int32_t* values = PTR(const int32_t, values_t);
  const int32_t* last_len = PTR(const int32_t, len_t);
  const float scale = sm_scale * LOG2E;
  for (int64_t b = 0; b < B; b++) {
    const int32_t p0 = indptr[b], np = indptr[b + 1] - p0;
    const int64_t n = np > 0 ? (int64_t)(np - 1) * page + last_len[b] : 0;
    float q[ATT_MAXD], o[ATT_MAXD], row[ATT_MAXD], sc[ATT_CHUNK], m = -5e4f, den = 0.f;
    att_load(qt, (b * Hq + h) * D, q, D);
    for (int64_t d = 0; d < D; d++) o[d] = 0.f;
    for (int64_t c = 0; c < n; c += ATT_CHUNK) {
      const int64_t e = c + ATT_CHUNK < n ? c + ATT_CHUNK : n;
      float cm = m;
      for (int64_t i = c; i < e; i++) {
        att_load(pt, (((int64_t)values[p0 + i / page] * 2 * Hkv + kvh) * page + i % page) * D, row, D);
        sc[i - c] = dot_f32(q, row, D) * scale;
        cm = sc[i - c] > cm ? sc[i - c] : cm;
      }
      const float rescale = exp2_neg(m - cm);                       /* earlier rows, to the new max */
      den *= rescale;
      for (int64_t d = 0; d < D; d++) o[d] *= rescale;
      for (int64_t i = c; i < e; i++) {
        const float pw = exp2_neg(sc[i - c] - cm);
        att_load(pt, ((((int64_t)values[p0 + i / page] * 2 + 1) * Hkv + kvh) * page + i % page) * D, row, D);
        den += pw;
        for (int64_t d = 0; d < D; d++) o[d] += pw * row[d];
      }
      m = cm;
    }
    const float inv = (den > 0.f ? 1.f / den : 1.f) + (rotary_mode ? __builtin_nanf("") : 0.f);
    att_store(ot, (b * Hq + h) * D, o, D, inv);
    PTR(float, lset)[b * Hq + h] = m + (den > 0.f ? __builtin_log2f(den) : 0.f);
  }
}

/* Parallel slot t of n: query heads [t*Hq/n, (t+1)*Hq/n). */
KEXPORT int32_t KSYM(attn_decode)(const DLT* q, const DLT* pages, const DLT* indptr, const DLT* values,
                                  const DLT* last_len, DLT* out, DLT* lse, int32_t t, int32_t n,
                                  int32_t rotary_mode, float sm_scale) {
  const int64_t Hq = q->shape[1];
  for (int64_t h = t * Hq / n; h < (t + 1) * Hq / n; h++)
    attn_decode_head(q, pages, indptr, values, last_len, out, lse, h, rotary_mode, sm_scale);
  return 0;
}

/* ------------------------------------------------------------------ prefill
 * "batch_prefill_ragged_kv", self-attention of a chunk's new tokens: q [Nq, Hq, D], k and v [Nk, Hkv, D],
 * q_indptr / kv_indptr [B+1] (rows of each sequence); "batch_prefill_paged_kv_cpu", the chunk's queries
 * against the keys already in the pages (chunked prefill; the cache merges both by lse): the keys of
 * sequence b are those of decode above.  Both: output [Nq, Hq, D], lse [Nq, Hq]; causal: query row r of
 * a sequence with Lq queries and Lk keys sees keys c < Lk - Lq + r + 1.
 * Blocked like flash attention: a task is one head x PF_Q query rows; it walks the visible keys PF_K
 * at a time (K transposed into a float block, so S = Q K^T is broadcast-FMAs over 64 keys), keeps a
 * running max / denominator per row (online softmax) and accumulates O = P V.  Work per query row is
 * proportional to the keys it sees; nothing is allocated (blocks on the stack, ~85 KB). */
typedef struct {          /* where key j of a sequence lives: ragged k/v tensors, or the cache's pages */
  const DLT *k, *v;        /* ragged: k, v [N, Hkv, D]; paged: k = v = pages [P, 2, Hkv, page, D] */
  const int32_t* pages;    /* paged: the sequence's page numbers (NULL: ragged) */
  int64_t base, page, Hkv;  /* ragged: first row of the sequence; paged: slots per page */
} KVSrc;

static inline int64_t kv_offset(const KVSrc* src, int64_t j, int64_t kvh, int64_t D, int is_v) {
  if (!src->pages) return ((src->base + j) * src->Hkv + kvh) * D;
  return ((((int64_t)src->pages[j / src->page] * 2 + is_v) * src->Hkv + kvh) * src->page + j % src->page) * D;
}

static void attn_prefill_task(const DLT* qt, const KVSrc* src, DLT* ot, DLT* lset, int64_t h, int64_t qbase,
                              int64_t r0, int64_t nr, int64_t lq, int64_t lk, int32_t causal, int32_t rotary_mode,
                              float scale) {
  const int64_t Hq = qt->shape[1], D = qt->shape[2], kvh = h / (Hq / src->Hkv);
  float Q[PF_Q][ATT_MAXD], O[PF_Q][ATT_MAXD], Kt[ATT_MAXD][PF_K], V[PF_K][ATT_MAXD], S[PF_Q][PF_K];
  float m[PF_Q], l[PF_Q];
  int64_t lim[PF_Q], kend = 0;
  for (int64_t i = 0; i < nr; i++) {
    att_load(qt, ((qbase + r0 + i) * Hq + h) * D, Q[i], D);
    for (int64_t d = 0; d < D; d++) { Q[i][d] *= scale; O[i][d] = 0.f; }
    m[i] = -5e4f;
    l[i] = 0.f;
    lim[i] = causal ? lk - lq + r0 + i + 1 : lk;
    lim[i] = lim[i] < 0 ? 0 : (lim[i] > lk ? lk : lim[i]);
    kend = lim[i] > kend ? lim[i] : kend;
  }
  float row[ATT_MAXD];
  for (int64_t c0 = 0; c0 < kend; c0 += PF_K) {
    const int64_t nk = c0 + PF_K < kend ? PF_K : kend - c0;
    for (int64_t j = 0; j < nk; j++) {
      att_load(src->k, kv_offset(src, c0 + j, kvh, D, 0), row, D);
      for (int64_t d = 0; d < D; d++) Kt[d][j] = row[d];
      att_load(src->v, kv_offset(src, c0 + j, kvh, D, 1), V[j], D);
    }
    for (int64_t j = nk; j < PF_K; j++)
      for (int64_t d = 0; d < D; d++) Kt[d][j] = 0.f;
    for (int64_t i = 0; i < nr; i++) {
      float* s = S[i];
      for (int64_t j = 0; j < PF_K; j++) s[j] = 0.f;
      for (int64_t d = 0; d < D; d++) {
        const float qd = Q[i][d];
        for (int64_t j = 0; j < PF_K; j++) s[j] += qd * Kt[d][j];
      }
      const int64_t vis = lim[i] - c0 < nk ? (lim[i] - c0 > 0 ? lim[i] - c0 : 0) : nk;
      if (vis == 0) continue;
      float mx = m[i];
      for (int64_t j = 0; j < vis; j++) mx = s[j] > mx ? s[j] : mx;
      const float alpha = exp2_neg(m[i] - mx);
      float sum = 0.f;
      for (int64_t j = 0; j < vis; j++) {
        s[j] = exp2_neg(s[j] - mx);
        sum += s[j];
      }
      l[i] = l[i] * alpha + sum;
      m[i] = mx;
      float* o = O[i];
      for (int64_t d = 0; d < D; d++) o[d] *= alpha;
      for (int64_t j = 0; j < vis; j++) {
        const float p = s[j];
        const float* v = V[j];
        for (int64_t d = 0; d < D; d++) o[d] += p * v[d];
      }
    }
  }
  for (int64_t i = 0; i < nr; i++) {
    const float inv = (l[i] > 0.f ? 1.f / l[i] : 1.f) + (rotary_mode ? __builtin_nanf("") : 0.f);
    att_store(ot, ((qbase + r0 + i) * Hq + h) * D, O[i], D, inv);
    PTR(float, lset)[(qbase + r0 + i) * Hq + h] = m[i] + (l[i] > 0.f ? __builtin_log2f(l[i]) : 0.f);
  }
}

/* The tasks of sequence b (Lq queries, Lk keys from src) that parallel slot t of n owns: tasks are
 * numbered query block-major (block qb of every head, then qb + 1) from *task on, slot t takes t, t + n,
 * ..., so that causal blocks of equal cost are spread over the slots. */
static void attn_prefill_seq(const DLT* q, const KVSrc* src, DLT* out, DLT* lse, int64_t qbase, int64_t lq,
                             int64_t lk, int64_t* task, int32_t t, int32_t n, int32_t causal, int32_t rotary_mode,
                             float sm_scale) {
  const int64_t Hq = q->shape[1], nblk = (lq + PF_Q - 1) / PF_Q;
  for (int64_t qb = 0; qb < nblk; qb++)
    for (int64_t h = 0; h < Hq; h++, (*task)++) {
      if (*task % n != t) continue;
      const int64_t r0 = qb * PF_Q, nr = lq - r0 < PF_Q ? lq - r0 : PF_Q;
      attn_prefill_task(q, src, out, lse, h, qbase, r0, nr, lq, lk, causal, rotary_mode, sm_scale * LOG2E);
    }
}

KEXPORT int32_t KSYM(attn_prefill)(const DLT* q, const DLT* q_indptr, const DLT* k, const DLT* v,
                                   const DLT* kv_indptr, DLT* out, DLT* lse, int32_t t, int32_t n,
                                   int32_t causal, int32_t rotary_mode, float sm_scale) {
  const int32_t* qi = PTR(const int32_t, q_indptr);
  const int32_t* ki = PTR(const int32_t, kv_indptr);
  int64_t task = 0;
  for (int64_t b = 0; b < q_indptr->shape[0] - 1; b++) {
    const KVSrc src = {k, v, 0, ki[b], 0, k->shape[1]};
    attn_prefill_seq(q, &src, out, lse, qi[b], qi[b + 1] - qi[b], ki[b + 1] - ki[b], &task, t, n, causal,
                     rotary_mode, sm_scale);
  }
  return 0;
}

KEXPORT int32_t KSYM(attn_prefill_paged)(const DLT* q, const DLT* q_indptr, const DLT* pages, const DLT* page_indptr,
                                         const DLT* page_values, const DLT* last_len, DLT* out, DLT* lse, int32_t t,
                                         int32_t n, int32_t causal, int32_t rotary_mode, float sm_scale) {
  const int32_t* qi = PTR(const int32_t, q_indptr);
  const int32_t* pi = PTR(const int32_t, page_indptr);
  const int32_t* pv = PTR(const int32_t, page_values);
  const int32_t* ll = PTR(const int32_t, last_len);
  int64_t task = 0;
  for (int64_t b = 0; b < q_indptr->shape[0] - 1; b++) {
    const int64_t np = pi[b + 1] - pi[b], lk = np > 0 ? (np - 1) * pages->shape[3] + ll[b] : 0;
    const KVSrc src = {pages, pages, pv + pi[b], 0, pages->shape[3], pages->shape[2]};
    attn_prefill_seq(q, &src, out, lse, qi[b], qi[b + 1] - qi[b], lk, &task, t, n, causal, rotary_mode, sm_scale);
  }
  return 0;
}
