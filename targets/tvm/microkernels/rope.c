/* RoPE of the paged KV cache's fused QKV (TVM 0.27 "fused_rope", RopeMode.NORMAL), included by
 * q4_matmul.c after attention.c (att_load / att_store).
 *
 * qkv [S, Hq + 2 Hkv, D] -> q [S, Hq, D] and k [S, Hkv, D] with their first `rot` dims rotated in
 * rotate-half pairs (i, i + rot/2), v [S, Hkv, D] copied; float32 or float16 (from the DLTensors).
 * TVM's TIR does the same float32 arithmetic (freq = pos / theta^(2i/rot), then cos and sin) for every
 * element of every head, one powf and one sincosf each: 4608 of each per layer and decoded token for MiniCPM-2B,
 * on one thread.  Here cos and sin are computed once per position and pair. */

KEXPORT int32_t KSYM(rope)(const DLT* qkv, const DLT* pos, DLT* q, DLT* k, DLT* v, int64_t apply, float theta,
                           int32_t rot, int32_t t, int32_t n) {
  const int64_t S = qkv->shape[0], H = qkv->shape[1], D = qkv->shape[2], Hq = q->shape[1], Hkv = k->shape[1];
  const int32_t* position = PTR(const int32_t, pos);
  const int r2 = rot / 2;
  float cs[ATT_MAXD / 2], sn[ATT_MAXD / 2], x[ATT_MAXD], y[ATT_MAXD];
  for (int64_t s = t * S / n; s < (t + 1) * S / n; s++) {   /* slot t of n: positions [t*S/n, (t+1)*S/n) */
    for (int i = 0; apply && i < r2; i++) {
      const float freq = (float)position[s] / __builtin_powf(theta, (float)(2 * i) / (float)rot);
      cs[i] = __builtin_cosf(freq);
      sn[i] = __builtin_sinf(freq);
    }
    for (int64_t h = 0; h < H; h++) {
      DLT* dst = h < Hq ? q : (h < Hq + Hkv ? k : v);
      const int64_t row = s * dst->shape[1] + (h < Hq ? h : (h < Hq + Hkv ? h - Hq : h - Hq - Hkv));
      att_load(qkv, (s * H + h) * D, x, D);
      if (apply && h < Hq + Hkv) {
        for (int i = 0; i < r2; i++) {
          y[i] = cs[i] * x[i] - sn[i] * x[i + r2];
          y[i + r2] = cs[i] * x[i + r2] + sn[i] * x[i];
        }
        for (int64_t d = rot; d < D; d++) y[d] = x[d];
        att_store(dst, row * D, y, D, 1.f);
      } else {
        att_store(dst, row * D, x, D, 1.f);
      }
    }
  }
  return 0;
}

/* A decode step's single position on the calling thread (1 if done; else 0 and the wrapper's parallel
 * loop runs `rope`): waking the pool costs more than 4608 rotations. */
KEXPORT int32_t KSYM(rope_one)(const DLT* qkv, const DLT* pos, DLT* q, DLT* k, DLT* v, int64_t apply, float theta,
                               int32_t rot) {
  if (qkv->shape[0] != 1) return 0;
  return KSYM(rope)(qkv, pos, q, k, v, apply, theta, rot, 0, 1), 1;
}
