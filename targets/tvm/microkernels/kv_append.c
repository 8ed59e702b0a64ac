/* The paged KV cache's append (TVM 0.27 "tir_kv_cache_transpose_append"), included by q4_matmul.c.
 *
 * Token s's k and v rows [Hkv, D] go to cache position p = position_map[s] (none when p is -1): page
 * p / P, slot p % P of pages [num_pages, 2 (k, v), Hkv, P, D].  Rows are copied whole, any element
 * type (float16 or float32, from the DLTensors).  TVM's TIR computes the page and slot per element
 * (4608 of each per layer and decoded token for MiniCPM-2B): 9 us a call, serial, at every layer. */

/* A row of bytes (a multiple of 2: float16 or float32) without a libc call (the object is freestanding). */
static inline void kv_row_copy(char* dst, const char* src, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 2) __builtin_memcpy(dst + i, src + i, 2);
}

KEXPORT int32_t KSYM(kv_append)(DLT* pages, const DLT* k, const DLT* v, const DLT* position_map) {
  const int64_t S = k->shape[0], H = k->shape[1], P = pages->shape[3];
  const int64_t row = k->shape[2] * ((k->bits + 7) / 8);
  const int32_t* pos = PTR(const int32_t, position_map);
  char* pg = PTR(char, pages);
  for (int64_t s = 0; s < S; s++) {
    if (pos[s] < 0) continue;
    char* slot = pg + ((int64_t)(pos[s] / P) * 2 * H * P + pos[s] % P) * row;   /* [page, 0, 0, slot] */
    for (int64_t h = 0; h < H; h++) {
      kv_row_copy(slot + h * P * row, PTR(const char, k) + (s * H + h) * row, row);
      kv_row_copy(slot + (H + h) * P * row, PTR(const char, v) + (s * H + h) * row, row);
    }
  }
  return 0;
}
