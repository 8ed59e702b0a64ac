/* Activation-aware clipping search for group quantization (the hot loop of exporter/quant.py).
 *
 * For every group of 32 weights, try each clipping ratio r of `grid`: scale s = fp16(absmax * r / qdiv),
 * codes round(w / s) clamped to [qmin, qmax], error sum_k imp[k] * (s * code - w)^2; keep the scale with
 * the least error (the first one on ties). Same maths as quant._search_scales, the reference.
 */
#include <math.h>
#include <stdint.h>

#define GROUP 32

void qsearch(const float *w, const float *imp, int64_t rows, int64_t groups_per_row,
             const float *grid, int ngrid, float qmin, float qmax, float *best_scale) {
    for (int64_t r = 0; r < rows; ++r) {
        for (int64_t g = 0; g < groups_per_row; ++g) {
            const float *x = w + (r * groups_per_row + g) * GROUP;
            const float *m = imp + g * GROUP;
            float absmax = 0.f;
            for (int k = 0; k < GROUP; ++k) absmax = fmaxf(absmax, fabsf(x[k]));
            if (absmax < 1e-8f) absmax = 1e-8f;
            float best = INFINITY, best_s = absmax / -qmin;
            for (int i = 0; i < ngrid; ++i) {
                float s = (float)(_Float16)(absmax * grid[i] / -qmin);
                if (s < 1e-8f) s = 1e-8f;
                float err = 0.f;
                for (int k = 0; k < GROUP; ++k) {
                    float q = nearbyintf(x[k] / s);
                    q = q < qmin ? qmin : (q > qmax ? qmax : q);
                    float d = q * s - x[k];
                    err += d * d * m[k];
                }
                if (err < best) { best = err; best_s = s; }
            }
            best_scale[r * groups_per_row + g] = best_s;
        }
    }
}
