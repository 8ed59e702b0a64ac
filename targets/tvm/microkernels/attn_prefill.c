/* Prefill attention kernels of the paged KV cache (TVM 0.27 TIRPagedKVCache, CPU), included by q4_matmul.c
 * after attention.c (its helpers and constants). */

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

/* One key block (keys c0 .. c0 + nk, in Kt transposed and V) into the rows' O, m, l: scores S = Q K^T,
 * online softmax per row (keys from lim[i] on are masked), O = O * alpha + P V.  Portable C: */
static void prefill_block_c(float Q[][ATT_MAXD], float O[][ATT_MAXD], float Kt[][PF_K], float V[][ATT_MAXD], float* m,
                            float* l, const int64_t* lim, int64_t nr, int64_t c0, int64_t nk, int64_t D) {
  float s[PF_K];
  for (int64_t i = 0; i < nr; i++) {
    const int64_t vis = lim[i] - c0 < nk ? (lim[i] - c0 > 0 ? lim[i] - c0 : 0) : nk;
    if (vis == 0) continue;
    for (int64_t j = 0; j < PF_K; j++) s[j] = 0.f;
    for (int64_t d = 0; d < D; d++) {
      const float qd = Q[i][d];
      for (int64_t j = 0; j < PF_K; j++) s[j] += qd * Kt[d][j];
    }
    float mx = m[i], sum = 0.f;
    for (int64_t j = 0; j < vis; j++) mx = s[j] > mx ? s[j] : mx;
    const float alpha = exp2_neg(m[i] - mx);
    for (int64_t j = 0; j < vis; j++) {
      s[j] = exp2_neg(s[j] - mx);
      sum += s[j];
    }
    l[i] = l[i] * alpha + sum;
    m[i] = mx;
    float* o = O[i];
    for (int64_t d = 0; d < D; d++) o[d] *= alpha;
    for (int64_t j = 0; j < vis; j++)
      for (int64_t d = 0; d < D; d++) o[d] += s[j] * V[j][d];
  }
}

#ifdef VW
#define PKV (PF_K / VW)                      /* vectors per score row */
#define PRB (PKV >= 16 ? 1 : 16 / PKV)       /* query rows per score tile (<= 16 accumulators) */
/* The same with D = NV x VW (compile-time): register tiles of PRB rows x PF_K keys for S, of 4 / 2 / 1 rows
 * x D for O; rows up to nr rounded to 4 are computed (the rows past nr are zero). */
static inline __attribute__((always_inline)) void prefill_block_vec(float Q[][ATT_MAXD], float O[][ATT_MAXD],
                                                                    float Kt[][PF_K], float V[][ATT_MAXD], float* m,
                                                                    float* l, const int64_t* lim, int64_t nr,
                                                                    int64_t c0, int64_t nk, const int NV) {
  const int ORB = NV <= 4 ? 4 : (NV <= 8 ? 2 : 1);
  const int64_t nrp = (nr + 3) & ~(int64_t)3;
  float S[PF_Q][PF_K], alpha[PF_Q];
  for (int64_t i0 = 0; i0 < nrp; i0 += PRB) {
    vf acc[PRB][PKV];
    for (int r = 0; r < PRB; r++)
      for (int c = 0; c < PKV; c++) acc[r][c] = VSET1(0.f);
    for (int d = 0; d < NV * VW; d++) {
      vf kv[PKV];
      for (int c = 0; c < PKV; c++) kv[c] = VLOAD_F(&Kt[d][c * VW]);
      for (int r = 0; r < PRB; r++) {
        const vf qb = VSET1(Q[i0 + r][d]);
        for (int c = 0; c < PKV; c++) acc[r][c] = VFMA(qb, kv[c], acc[r][c]);
      }
    }
    for (int r = 0; r < PRB; r++)
      for (int c = 0; c < PKV; c++) VSTORE(&S[i0 + r][c * VW], acc[r][c]);
  }
  for (int64_t i = 0; i < nrp; i++) {
    float* s = S[i];
    const int64_t vis = i >= nr ? 0 : (lim[i] - c0 < nk ? (lim[i] - c0 > 0 ? lim[i] - c0 : 0) : nk);
    float mx = m[i], sum = 0.f;
    for (int64_t j = 0; j < vis; j++) mx = s[j] > mx ? s[j] : mx;
    alpha[i] = vis ? exp2_neg(m[i] - mx) : 1.f;
    for (int64_t j = 0; j < nk; j++) {
      s[j] = j < vis ? exp2_neg(s[j] - mx) : 0.f;
      sum += s[j];
    }
    if (vis) {
      l[i] = l[i] * alpha[i] + sum;
      m[i] = mx;
    }
  }
  for (int64_t i0 = 0; i0 < nrp; i0 += ORB) {
    vf o[4][16];
    for (int r = 0; r < ORB; r++) {
      const vf a = VSET1(alpha[i0 + r]);
      for (int d = 0; d < NV; d++) o[r][d] = VMUL(VLOAD_F(&O[i0 + r][d * VW]), a);
    }
    for (int64_t j = 0; j < nk; j++) {
      vf v[16];
      for (int d = 0; d < NV; d++) v[d] = VLOAD_F(&V[j][d * VW]);
      for (int r = 0; r < ORB; r++) {
        const vf pb = VSET1(S[i0 + r][j]);
        for (int d = 0; d < NV; d++) o[r][d] = VFMA(pb, v[d], o[r][d]);
      }
    }
    for (int r = 0; r < ORB; r++)
      for (int d = 0; d < NV; d++) VSTORE(&O[i0 + r][d * VW], o[r][d]);
  }
}
#endif

static void prefill_block(float Q[][ATT_MAXD], float O[][ATT_MAXD], float Kt[][PF_K], float V[][ATT_MAXD], float* m,
                          float* l, const int64_t* lim, int64_t nr, int64_t c0, int64_t nk, int64_t D) {
#ifdef VW
  if (D == 2 * VW) { prefill_block_vec(Q, O, Kt, V, m, l, lim, nr, c0, nk, 2); return; }
  if (D == 4 * VW) { prefill_block_vec(Q, O, Kt, V, m, l, lim, nr, c0, nk, 4); return; }
  if (D == 8 * VW) { prefill_block_vec(Q, O, Kt, V, m, l, lim, nr, c0, nk, 8); return; }
  if (D == 16 * VW) { prefill_block_vec(Q, O, Kt, V, m, l, lim, nr, c0, nk, 16); return; }
#endif
  prefill_block_c(Q, O, Kt, V, m, l, lim, nr, c0, nk, D);
}

static void attn_prefill_task(const DLT* qt, const KVSrc* src, DLT* ot, DLT* lset, int64_t h, int64_t qbase,
                              int64_t r0, int64_t nr, int64_t lq, int64_t lk, int32_t causal, int32_t rotary_mode,
                              float scale) {
  const int64_t Hq = qt->shape[1], D = qt->shape[2], kvh = h / (Hq / src->Hkv);
  float Q[PF_Q][ATT_MAXD], O[PF_Q][ATT_MAXD], Kt[ATT_MAXD][PF_K], V[PF_K][ATT_MAXD];
  float m[PF_Q], l[PF_Q];
  int64_t lim[PF_Q], kend = 0;
  for (int64_t i = nr; i < PF_Q; i++)           /* rows past nr: zero (the vector blocks compute them) */
    for (int64_t d = 0; d < D; d++) Q[i][d] = O[i][d] = 0.f;
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
    prefill_block(Q, O, Kt, V, m, l, lim, nr, c0, nk, D);
  }
  for (int64_t i = 0; i < nr; i++)
    att_finish(ot, PTR(float, lset), (qbase + r0 + i) * Hq + h, O[i], D, (Softmax){m[i], l[i]}, rotary_mode);
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
