/* Shared by the microkernels (one translation unit, compiled from q4_matmul.c by targets/tvm/kernels.py):
 * ISA selection (BLK), the DLTensor ABI, exported-symbol naming, prefetch and task sizes, fp16 and int8
 * rounding helpers. */
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
static inline float h2f(uint16_t h) {
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

#define LOG2E 1.4426950408889634f

/* 2^x for x <= 0 (attention: a score minus the running max): degree-6 polynomial on the fraction, relative error
 * ~2e-7; flushes below 2^-126.  Plain arithmetic, so the compiler vectorises the loops calling it.  vecf.h's
 * exp2_neg_v evaluates the same polynomial (EXP2_C, highest power first) on vectors. */
static const float EXP2_C[7] = {1.535336188319500e-4f, 1.339887440266574e-3f, 9.618437357674640e-3f,
                                5.550332471162809e-2f, 2.402264791363012e-1f, 6.931472028550421e-1f, 1.f};
static inline float exp2_neg(float x) {
  x = x < -126.f ? -126.f : x;
  const float n = __builtin_floorf(x), f = x - n;
  float p = EXP2_C[0];
  for (int i = 1; i < 7; i++) p = p * f + EXP2_C[i];
  union { uint32_t u; float f; } s;
  s.u = (uint32_t)((int32_t)n + 127) << 23;
  return p * s.f;
}

/* silu(g) = g / (1 + e^-g), with e^-|g| from exp2_neg (no overflow for either sign). */
static inline float silu(float g) {
  const float z = exp2_neg(-fabs_(g) * LOG2E);
  return (g >= 0.f ? g : g * z) / (1.f + z);
}

static inline int8_t round_q(float v) {
  int r = (int)(v < 0 ? v - 0.5f : v + 0.5f);
  return (int8_t)(r > 127 ? 127 : (r < -127 ? -127 : r));
}

#include "vecf.h"   /* float vectors per ISA */
