/* Driver of bench/kernel_stream.py: the int4 decode GEMVs of a MiniCPM-2B-shaped model (40 layers of
 * wqkv 6912x2304, wo 2304x2304, w13 11520x2304, w2 2304x5760, then the tied head 122753x2304), every
 * matrix in its own memory so the weights stream from DRAM like a real decode step, one token, T
 * threads sharing rows through the kernels' atomic counter (as in the compiled model).  Also a plain
 * AVX-512/AVX2/scalar streaming read of as many bytes, for the ceiling.  Prints one JSON line.
 * `kernel_stream THREADS REPS read MiB`: only the STREAM-like read of MiB, GB/s of every repetition
 * (bench/decode_host.py's roofline).
 * `kernel_stream THREADS REPS attn DEPTH`: only the decode attention of one token at DEPTH keys over the
 * 40 layers' fp16 paged KV caches (36 heads x 64, pages of 16), the 64 parallel slots of the compiled
 * model split over the threads, then the merge loop (attention.c). */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "../targets/tvm/microkernels/common.h"   /* DLT (the kernels' DLTensor view) */
int32_t mcpm_k_q4_quant_act(const DLT*, DLT*, DLT*, DLT*);
int32_t mcpm_k_attn_decode(const DLT*, const DLT*, const DLT*, const DLT*, const DLT*, DLT*, float*, float*,
                           int32_t, int32_t, int32_t, float);
int32_t mcpm_k_attn_decode_merge(const DLT*, const DLT*, DLT*, float*, const float*, int32_t, int32_t, int32_t);
int32_t mcpm_k_q4_matmul_dyn(const DLT*, const DLT*, const DLT*, const DLT*, const DLT*, DLT*, DLT*, int32_t);

typedef struct { int64_t n, k, sq[2], ss[2]; uint8_t* qw; uint16_t* sc; } Mat;
static Mat mats[256];
static int nmats, nthreads;
static int8_t* xq;
static int32_t *nb, cnt;
static float *xd, *y, *x;
static pthread_barrier_t bar;
static volatile int which = -1;

static DLT t1(void* p, const int64_t* sh, int nd) {
  DLT t;
  memset(&t, 0, sizeof t);
  t.data = p; t.shape = sh; t.ndim = nd;
  return t;
}
static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

static void gemv(const Mat* M) {
  const int64_t ys[2] = {1, M->n}, xs[1] = {M->k}, ns[1] = {M->k / 8}, ds[1] = {M->k / 32}, cs[1] = {1};
  DLT a = t1(M->qw, M->sq, 2), b = t1(M->sc, M->ss, 2), c = t1(xq, xs, 1), d = t1(nb, ns, 1), e = t1(xd, ds, 1),
      f = t1(y, ys, 2), g = t1(&cnt, cs, 1);
  mcpm_k_q4_matmul_dyn(&a, &b, &c, &d, &e, &f, &g, 16);
}

static void* worker(void* arg) {
  (void)arg;
  for (;;) {
    pthread_barrier_wait(&bar);
    if (which < 0) return NULL;
    gemv(&mats[which]);
    pthread_barrier_wait(&bar);
  }
}

static void add(int64_t n, int64_t k) {
  Mat* M = &mats[nmats++];
  M->n = n; M->k = k; M->sq[0] = n; M->sq[1] = k / 8; M->ss[0] = n; M->ss[1] = k / 32;
  M->qw = aligned_alloc(64, (size_t)(n * k / 2 + 63) / 64 * 64);
  M->sc = aligned_alloc(64, (size_t)(n * k / 16 + 63) / 64 * 64);
  for (int64_t i = 0; i < n * k / 2; i++) M->qw[i] = (uint8_t)(i * 2654435761u >> 24);
  for (int64_t i = 0; i < n * k / 32; i++) M->sc[i] = 0x2000;   /* a small fp16 scale */
}

static double token(void) {   /* one decode step's GEMVs; seconds */
  double t0 = now();
  for (int i = 0; i < nmats; i++) {
    const int64_t xs[2] = {1, mats[i].k}, s1[1] = {mats[i].k}, s2[1] = {mats[i].k / 8}, s3[1] = {mats[i].k / 32};
    DLT X = t1(x, xs, 2), A = t1(xq, s1, 1), B = t1(nb, s2, 1), C = t1(xd, s3, 1);
    mcpm_k_q4_quant_act(&X, &A, &B, &C);
    cnt = 0;
    which = i;
    if (nthreads > 1) pthread_barrier_wait(&bar);
    gemv(&mats[i]);
    if (nthreads > 1) pthread_barrier_wait(&bar);
  }
  return now() - t0;
}

typedef long long v8 __attribute__((vector_size(64)));   /* 64-byte loads: one zmm with AVX-512 */
static uint64_t read_sum(const uint64_t* p, size_t n) {
  const v8* v = (const v8*)p;
  v8 a = {0}, b = {0};
  for (size_t i = 0; i + 2 <= n / 8; i += 2) { a ^= v[i]; b ^= v[i + 1]; }
  a ^= b;
  return (uint64_t)(a[0] ^ a[1] ^ a[2] ^ a[3] ^ a[4] ^ a[5] ^ a[6] ^ a[7]);
}

typedef struct { const uint8_t* p; size_t n; uint64_t r; } ReadJob;
static void* reader(void* arg) { ReadJob* j = arg; j->r = read_sum((const uint64_t*)j->p, j->n / 8); return NULL; }

/* Read `n` bytes split over the threads `reps` times; each repetition's GB/s into gbs[]. */
static void read_runs(const uint8_t* buf, size_t n, int reps, double* gbs) {
  pthread_t th[64];
  for (int r = 0; r < reps; r++) {
    ReadJob jobs[64];
    double t0 = now();
    for (int t = 0; t < nthreads; t++) {
      jobs[t].p = buf + n / nthreads * t; jobs[t].n = n / nthreads / 64 * 64;
      pthread_create(&th[t], NULL, reader, &jobs[t]);
    }
    for (int t = 0; t < nthreads; t++) pthread_join(th[t], NULL);
    gbs[r] = n / (now() - t0) / 1e9;
  }
}

static uint8_t* filled(size_t n) {
  uint8_t* buf = aligned_alloc(64, n);
  memset(buf, 1, n);
  return buf;
}

/* ---- decode attention: one layer's tensors (KV pages, page table, q / output / lse) */
enum { AL = 40, AH = 36, AD = 64, APAGE = 16, ASLOTS = 64 };
typedef struct { DLT q, pages, indptr, values, len, out; float *lse, *ws; int64_t qs[3], ps[5], is[1], vs[1], ls[1], os[3]; } AttnLayer;
static AttnLayer* alayers;

static void* attn_worker(void* arg) {    /* thread j: slots [j*64/T, (j+1)*64/T) of every layer, both loops */
  const int j = (int)(intptr_t)arg;
  for (int l = 0; l < AL; l++) {
    AttnLayer* y = &alayers[l];
    for (int t = j * ASLOTS / nthreads; t < (j + 1) * ASLOTS / nthreads; t++)
      mcpm_k_attn_decode(&y->q, &y->pages, &y->indptr, &y->values, &y->len, &y->out, y->lse, y->ws, t, ASLOTS, 0,
                         0.125f);
    if (nthreads > 1) pthread_barrier_wait(&bar);
    for (int t = j * ASLOTS / nthreads; t < (j + 1) * ASLOTS / nthreads; t++)
      mcpm_k_attn_decode_merge(&y->q, &y->indptr, &y->out, y->lse, y->ws, t, ASLOTS, 0);
    if (nthreads > 1) pthread_barrier_wait(&bar);
  }
  return NULL;
}

static int attn_main(int64_t depth, int reps) {
  const int64_t np = (depth + APAGE - 1) / APAGE;
  alayers = calloc(AL, sizeof(AttnLayer));
  for (int l = 0; l < AL; l++) {
    AttnLayer* y = &alayers[l];
    const int64_t n = np * 2 * AH * APAGE * AD;
    uint16_t* pg = aligned_alloc(64, n * 2);
    for (int64_t i = 0; i < n; i++) pg[i] = 0x3c00 ^ (uint16_t)((i * 2654435761u) >> 22 & 0x3ff);   /* ~[1, 2) */
    uint16_t* q = malloc(AH * AD * 2);
    for (int i = 0; i < AH * AD; i++) q[i] = 0x3000 + (i % 97);
    int32_t *ip = malloc(8), *vals = malloc(np * 4), *len = malloc(4);
    ip[0] = 0, ip[1] = (int32_t)np, len[0] = (int32_t)(depth - (np - 1) * APAGE);
    for (int64_t i = 0; i < np; i++) vals[i] = (int32_t)i;
    y->qs[0] = 1, y->qs[1] = AH, y->qs[2] = AD;
    y->ps[0] = np, y->ps[1] = 2, y->ps[2] = AH, y->ps[3] = APAGE, y->ps[4] = AD;
    y->is[0] = 2, y->vs[0] = np, y->ls[0] = 1, y->os[0] = 1, y->os[1] = AH, y->os[2] = AD;
    y->q = t1(q, y->qs, 3), y->pages = t1(pg, y->ps, 5), y->indptr = t1(ip, y->is, 1);
    y->values = t1(vals, y->vs, 1), y->len = t1(len, y->ls, 1);
    y->out = t1(malloc(AH * AD * 2), y->os, 3), y->lse = malloc(AH * 4), y->ws = malloc(ASLOTS * AH * (AD + 2) * 4);
    y->q.bits = y->pages.bits = y->out.bits = 16, y->indptr.bits = y->values.bits = y->len.bits = 32;
  }
  pthread_barrier_init(&bar, NULL, nthreads);
  double best = 1e9;
  for (int r = 0; r <= reps; r++) {        /* the first one pages the caches in */
    pthread_t th[64];
    const double t0 = now();
    for (int t = 0; t < nthreads; t++) pthread_create(&th[t], NULL, attn_worker, (void*)(intptr_t)t);
    for (int t = 0; t < nthreads; t++) pthread_join(th[t], NULL);
    const double s = now() - t0;
    if (r > 0 && s < best) best = s;
  }
  const double bytes = (double)AL * 2 * AH * depth * AD * 2;
  printf("{\"threads\": %d, \"depth\": %lld, \"attn_s\": %.5f, \"attn_gb_s\": %.2f}\n", nthreads, (long long)depth,
         best, bytes / best / 1e9);
  return 0;
}

int main(int argc, char** argv) {
  nthreads = argc > 1 ? atoi(argv[1]) : 2;
  const int reps = argc > 2 ? atoi(argv[2]) : 5;
  double gbs[256];
  if (argc > 4 && !strcmp(argv[3], "attn")) return attn_main(atoll(argv[4]), reps);
  if (argc > 4 && !strcmp(argv[3], "read")) {      /* STREAM-like read only: `read MiB` */
    const size_t n = (size_t)atoll(argv[4]) << 20;
    read_runs(filled(n), n, reps < 256 ? reps : 256, gbs);
    printf("{\"threads\": %d, \"bytes\": %zu, \"read_gb_s\": [", nthreads, n);
    for (int r = 0; r < reps && r < 256; r++) printf("%s%.2f", r ? ", " : "", gbs[r]);
    printf("]}\n");
    return 0;
  }
  const int64_t H = 2304, I = 5760, V = 122753;
  for (int l = 0; l < 40; l++) { add(3 * H, H); add(H, H); add(2 * I, H); add(H, I); }
  add(V, H);
  double bytes = 0;
  for (int i = 0; i < nmats; i++) bytes += mats[i].n * mats[i].k / 2 + mats[i].n * mats[i].k / 16;
  xq = aligned_alloc(64, I * 2); nb = aligned_alloc(64, I); xd = aligned_alloc(64, I);
  y = aligned_alloc(64, (V * 4 + 63) / 64 * 64); x = malloc(I * 4);
  for (int i = 0; i < I; i++) x[i] = (float)((i * 7919) % 17) - 8.f;
  pthread_barrier_init(&bar, NULL, nthreads);
  pthread_t th[64];
  for (int t = 1; t < nthreads; t++) pthread_create(&th[t], NULL, worker, NULL);
  double best = 1e9;
  token();                                       /* warm-up: page in */
  for (int r = 0; r < reps; r++) { double s = token(); best = s < best ? s : best; }
  which = -1;
  if (nthreads > 1) pthread_barrier_wait(&bar);
  /* ceiling: the same number of bytes read once, split over the threads, from one big buffer */
  const size_t n = (size_t)bytes / 64 * 64;
  read_runs(filled(n), n, reps, gbs);
  double rbest = 1e9;
  for (int r = 0; r < reps; r++) rbest = n / gbs[r] / 1e9 < rbest ? n / gbs[r] / 1e9 : rbest;
  printf("{\"threads\": %d, \"bytes\": %.0f, \"gemv_s\": %.5f, \"gemv_gb_s\": %.2f, \"gemv_tok_s\": %.2f, "
         "\"read_gb_s\": %.2f, \"gemv_pct_of_read\": %.1f}\n", nthreads, bytes, best, bytes / best / 1e9,
         1 / best, bytes / rbest / 1e9, 100 * rbest / best);
  return 0;
}
