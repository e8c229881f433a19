/* The FFT channel product of a Gabor layer with its kernel spectrum built where it is used, forward and
 * backward, for one floating type (see separable.c; uses spectrum_impl.h and separable_impl.h).
 *
 * Written by hand because no library has it. medexp.nn.fast.product's channel product is, per frequency f and
 * tile n (tiles of every batch item),
 *
 *     Y[f, n, o] = sum_i X[f, n, i] K[f, i, o]            (complex; K the spectrum of spectrum_impl.h).
 *
 * Materialised, K holds F cin cout complex numbers (48 -> 48 channels at 22^3: 107 MB) that are written,
 * read, and whose gradient is written and read again: the product is memory-bound while its arithmetic is
 * small. Here each block of K (BW output channels of one input channel, as in spectrum_impl.h) is computed
 * from the pairs' 1D transforms (`spectral_tables`, the transforms of spectrum_prepare) right where it is
 * used and dropped; nothing of the size of K is stored, forward or backward:
 *
 *     forward      Y = sum_i X K                                          units: f0 (P_1 (P_2/2+1) freqs each)
 *     input grad   dL/dX = sum_o G conj(K),   G = dL/dRe Y + i dL/dIm Y    units: f0
 *     kernel grad  dL/dK = sum_n G conj(X), reduced onto the pairs' numbers by gabor_spectrum_backward's
 *                  accumulation (spectrum_impl.h), fed straight from X and G   units: blocks
 *
 * Within a unit the loops run block by block over the unit's P_1 planes, so a block's last-axis transforms
 * (the bulk of its table) are read once per unit instead of once per plane.
 * Layouts: X and dL/dX (F, T, cin, re/im) interleaved; Y (F, T, cout, re/im) interleaved; G de-interleaved
 * and padded, (F, T, re/im, coutp), coutp = ceil(cout / BW) BW, zeros past cout; tr (blocks, SPEC_LEN).
 * Expects REAL, FN(name), BW and the macros of separable_impl.h and spectrum_impl.h.
 */

#include <string.h>

/* REALs of one block's transforms: 2 terms x (re, im) per frequency of every axis. */
long FN(spectral_table_length)(int d, const long *sizes) {
    long n = 0;
    for (int j = 0; j < d; j++) n += 4 * sizes[j];
    return n * BW;
}

/* Offsets of the axes' transforms in a block's table (units of BW), as SPEC_TABLES sets them. */
static void FN(spectral_offsets)(int d, const long *sizes, long *toff) {
    long total = 0;
    for (int j = 0; j < d; j++) toff[j] = total, total += 4 * sizes[j];
}

/* The transforms of blocks b0 <= block < b1 into tr + block SPEC_LEN; 0, or 1 when out of memory. */
int FN(spectral_tables)(const REAL *q, const REAL *e, REAL *tr, long pairs, long cin, long cout, int d, int k,
                        const long *sizes, long b0, long b1) {
    long toff[3];
    FN(work) w;
    REAL *base = WORKSPACE(&w, d, k), *tab = SPEC_TABLES(d, k, sizes, toff);
    if (!base || !tab) {
        free(base), free(tab);
        return 1;
    }
    const long len = FN(spectral_table_length)(d, sizes);
    FLUSH_DENORMALS_BEGIN
    for (long b = b0; b < b1; b++) {
        long i, o0;
        SPEC_PREPARE(q, e, pairs, cin, cout, d, k, sizes, toff, tab, b, &w, tr + b * len, &i, &o0);
    }
    FLUSH_DENORMALS_END
    free(base), free(tab);
    return 0;
}

/* Forward, f0 in [u0, u1): y (F, T, cout, 2) from x (F, T, cin, 2) and tr; 0, or 1 when out of memory. */
int FN(spectral_forward)(const REAL *tr, const REAL *x, REAL *y, long cin, long cout, long T, int d,
                         const long *sizes, long u0, long u1) {
    const long P1 = d == 3 ? sizes[1] : 1, H = sizes[d - 1] / 2 + 1, row = P1 * H; /* frequencies per f0 */
    const long nb = (cout + BW - 1) / BW, coutp = nb * BW, len = FN(spectral_table_length)(d, sizes);
    long toff[3];
    FN(spectral_offsets)(d, sizes, toff);
    REAL *acc = (REAL *)malloc(sizeof(REAL) * row * T * 2 * coutp); /* (f1 f2, n, re/im, coutp) */
    if (!acc) return 1;
    FLUSH_DENORMALS_BEGIN
    for (long f0 = u0; f0 < u1; f0++) {
        memset(acc, 0, sizeof(REAL) * row * T * 2 * coutp);
        const REAL *xs = x + f0 * row * T * cin * 2;
        for (long i = 0; i < cin; i++)
            for (long b = 0; b < nb; b++) {
                const REAL *spec = tr + (i * nb + b) * len;
                for (long f1 = 0; f1 < P1; f1++) {
                    REAL ur[2][BW], ui[2][BW], vr[2][BW], vi[2][BW];
                    SPEC_UV(spec, toff, sizes, d, f0, f1, (REAL)0.5, ur, ui, vr, vi);
                    for (long f2 = 0; f2 < H; f2++) {
                        REAL re[BW], im[BW];
                        SPEC_ENTRY(spec, toff, sizes, d, f2, ur, ui, vr, vi, re, im);
                        const long f = f1 * H + f2;
                        for (long n = 0; n < T; n++) {
                            const REAL xr = xs[((f * T + n) * cin + i) * 2], xi = xs[((f * T + n) * cin + i) * 2 + 1];
                            REAL *a = acc + (f * T + n) * 2 * coutp + b * BW;
#pragma omp simd
                            for (int l = 0; l < BW; l++)
                                a[l] += xr * re[l] - xi * im[l], a[coutp + l] += xr * im[l] + xi * re[l];
                        }
                    }
                }
            }
        REAL *ys = y + f0 * row * T * cout * 2;
        for (long fn = 0; fn < row * T; fn++)
            for (long o = 0; o < cout; o++)
                ys[(fn * cout + o) * 2] = acc[fn * 2 * coutp + o], ys[(fn * cout + o) * 2 + 1] = acc[(fn * 2 + 1) * coutp + o];
    }
    FLUSH_DENORMALS_END
    free(acc);
    return 0;
}

/* Input gradient, f0 in [u0, u1): gx (F, T, cin, 2) = sum_o G conj(K) from g (F, T, 2, coutp); 0, or 1 when
 * out of memory. */
int FN(spectral_backward_input)(const REAL *tr, const REAL *g, REAL *gx, long cin, long cout, long T, int d,
                                const long *sizes, long u0, long u1) {
    const long P1 = d == 3 ? sizes[1] : 1, H = sizes[d - 1] / 2 + 1, row = P1 * H;
    const long nb = (cout + BW - 1) / BW, coutp = nb * BW, len = FN(spectral_table_length)(d, sizes);
    long toff[3];
    FN(spectral_offsets)(d, sizes, toff);
    REAL *acc = (REAL *)malloc(sizeof(REAL) * row * T * 2 * BW); /* (f1 f2, n, re/im, lane): one input channel */
    if (!acc) return 1;
    FLUSH_DENORMALS_BEGIN
    for (long f0 = u0; f0 < u1; f0++) {
        const REAL *gs = g + f0 * row * T * 2 * coutp;
        REAL *gxs = gx + f0 * row * T * cin * 2;
        for (long i = 0; i < cin; i++) {
            memset(acc, 0, sizeof(REAL) * row * T * 2 * BW);
            for (long b = 0; b < nb; b++) {
                const REAL *spec = tr + (i * nb + b) * len;
                for (long f1 = 0; f1 < P1; f1++) {
                    REAL ur[2][BW], ui[2][BW], vr[2][BW], vi[2][BW];
                    SPEC_UV(spec, toff, sizes, d, f0, f1, (REAL)0.5, ur, ui, vr, vi);
                    for (long f2 = 0; f2 < H; f2++) {
                        REAL re[BW], im[BW];
                        SPEC_ENTRY(spec, toff, sizes, d, f2, ur, ui, vr, vi, re, im);
                        const long f = f1 * H + f2;
                        for (long n = 0; n < T; n++) {
                            const REAL *gr = gs + (f * T + n) * 2 * coutp + b * BW, *gi = gr + coutp;
                            REAL *a = acc + (f * T + n) * 2 * BW;
#pragma omp simd
                            for (int l = 0; l < BW; l++)
                                a[l] += gr[l] * re[l] + gi[l] * im[l], a[BW + l] += gi[l] * re[l] - gr[l] * im[l];
                        }
                    }
                }
            }
            for (long fn = 0; fn < row * T; fn++) {
                REAL sr = 0, si = 0;
                for (int l = 0; l < BW; l++) sr += acc[fn * 2 * BW + l], si += acc[(fn * 2 + 1) * BW + l];
                gxs[(fn * cin + i) * 2] = sr, gxs[(fn * cin + i) * 2 + 1] = si;
            }
        }
    }
    FLUSH_DENORMALS_END
    free(acc);
    return 0;
}

/* Kernel gradient, blocks b0 <= block < b1: dq of their pairs from x (F, T, cin, 2) and g (F, T, 2, coutp),
 * dL/dK = sum_n G conj(X) formed per entry inside spectrum_impl.h's backward; 0, or 1 when out of memory. */
int FN(spectral_backward_kernel)(const REAL *q, const REAL *e, const REAL *x, const REAL *g, REAL *dq, long pairs,
                                 long cin, long cout, long T, int d, int k, const long *sizes, long b0, long b1) {
    const struct FN(spectrum_grad) source = {0, x, g, T, (cout + BW - 1) / BW * BW};
    return SPEC_BACKWARD(q, e, &source, dq, pairs, cin, cout, d, k, sizes, b0, b1, 1);
}

#undef SPEC_TABLES
#undef SPEC_PREPARE
#undef SPEC_BLOCK
#undef SPEC_ALLOC
#undef SPEC_UV
#undef SPEC_ENTRY
#undef SPEC_BACKWARD
#undef GROUP
#undef TR
/* the block machinery of separable_impl.h, used here too */
#undef WORKSPACE
#undef LOAD
#undef FACTORS
#undef PLANE
#undef PREPARE
#undef FACTORS_BACKWARD
#undef PUT_ROW
#undef BLOCK_BACKWARD
#undef VEC
#undef FAC
#undef PL
#undef TAP
