/* The kernel spectrum of Gabor convolutions straight from the separable factors, and its gradient, for one
 * floating type (see separable.c; uses the block machinery of separable_impl.h).
 *
 * Written by hand because no library has it. medexp.nn.fast.fftconv convolves through the FFT with the kernel
 * spectrum K = conj(rfftn(W zero-padded to P_0 x .. x P_(d-1))), taps at positions 0..k-1; computed from the
 * k^d taps it costs a pruned DFT over all cout cin kernels, forward and backward. The Gabor kernel of a pair
 * is W[a, b, c] = sum_t Re(Z_t[a] Y_t[b] X_t[c]) (the factors of separable_impl.h, X_t including c_t), so
 * with the 1D transforms
 *
 *     T_j,t(f) = sum_a fac_j,t[a] e^{2 pi i f a / P_j}   (f < P_j, all signs: -f is P_j - f)
 *
 * and Re z = (z + conj z) / 2 the spectrum is four rank-1 terms per pair (3D; 2D drops Y):
 *
 *     K(f0, f1, f2) = 1/2 sum_t [ U_t(f0, f1) T_2,t(f2) + conj(V_t(f0, f1) T_2,t(-f2)) ],
 *     U_t = T_0,t(f0) T_1,t(f1),   V_t = T_0,t(-f0) T_1,t(-f1),
 *
 * for the P_0 P_1 (P_2 / 2 + 1) frequencies of rfftn: ~20 multiply-adds per entry instead of a pruned DFT.
 *
 * Layout: out (2, F, cin, cout), real parts then imaginary parts, F row-major over (f0, f1, f2) - what
 * the per-frequency GEMMs of medexp/nn/fast/product.py read. A block is BW pairs with the same input
 * channel i and consecutive output channels o (adjacent in out); block = i ceil(cout / BW) + o / BW.
 *
 * Backward, for g = dL/dRe K + i dL/dIm K (L = Re sum_f conj(g) K):
 *     L = 1/2 Re sum_t sum_f [ conj(g) U_t T_2,t(f2) + g V_t T_2,t(-f2) ],
 * so, with A+(f2) = sum_{f0,f1} conj(g) U_t, A-(f2) = sum g V_t, B+(f0,f1) = sum_{f2} conj(g) T_2,t(f2),
 * B-(f0,f1) = sum_{f2} g T_2,t(-f2), the coefficient of a factor's tap fac[a] in L = Re sum beta[a] fac[a] is
 *     last axis:  beta[c] = 1/2 sum_{f2} (A+(f2) w^{f2 c} + A-(f2) w^{-f2 c}),   w = e^{2 pi i / P_2},
 *     axis 0:     beta[a] = 1/2 sum_{f0} (C+(f0) w^{f0 a} + C-(f0) w^{-f0 a}),
 *                 C+(f0) = sum_{f1} B+(f0, f1) T_1,t(f1),  C-(f0) = sum_{f1} B-(f0, f1) T_1,t(-f1),
 *     axis 1:     the same with the roles of f0 and f1 exchanged,
 * and dL/dRe fac = Re beta, dL/dIm fac = -Im beta; FACTORS_BACKWARD takes these to dq.
 * Expects REAL, FN(name), BW and the macros of separable_impl.h.
 */

#define SPEC_TABLES FN(spectrum_tables)
#define SPEC_PREPARE FN(spectrum_prepare)
#define SPEC_BLOCK FN(spectrum_block)
#define SPEC_ALLOC FN(spectrum_alloc)
#define SPEC_UV FN(spectrum_uv)
#define SPEC_ENTRY FN(spectrum_entry)
#define SPEC_BACKWARD FN(spectrum_backward_core)
#define GROUP 8 /* blocks per group, see the forward */
/* the block's transforms: axis j, term t, frequency f, re/im */
#define TR(j, t, f, ri) ((toff[j] + ((t) * sizes[j] + (f)) * 2 + (ri)) * BW)

/* cos and sin of 2 pi f a / P_j for f < P_j, a < k, per axis: tab + toff[j] / BW .. laid out (f, a, cos/sin);
 * toff[j] (in units of BW entries) also places axis j's transforms in the block arrays. NULL if out of
 * memory. */
static REAL *SPEC_TABLES(int d, int k, const long *sizes, long *toff) {
    long total = 0;
    for (int j = 0; j < d; j++) toff[j] = total, total += 4 * sizes[j]; /* 2 terms x (re, im) per frequency */
    REAL *tab = (REAL *)malloc(sizeof(REAL) * (total / 2) * k);         /* P_j k (cos, sin) per axis */
    if (!tab) return 0;
    REAL *p = tab;
    for (int j = 0; j < d; j++)
        for (long f = 0; f < sizes[j]; f++)
            for (int a = 0; a < k; a++) {
                const double angle = 6.283185307179586476925 * (double)((f * a) % sizes[j]) / (double)sizes[j];
                *p++ = (REAL)cos(angle), *p++ = (REAL)sin(angle);
            }
    return tab;
}

/* REALs per block beyond FN(work): the transforms (sum of 4 P_j BW) and, for the backward, A+- (2 terms x 2
 * signs x re/im per last-axis bin) and C+- for the leading axes. */
static long SPEC_BLOCK(int d, const long *sizes) {
    long n = 0;
    for (int j = 0; j < d; j++) n += 4 * sizes[j] + 8 * sizes[j];
    return n * BW;
}

/* scale U_t and scale V_t of both terms at (f0, f1) (3D; 2D: U_t = T_0,t(f0), V_t = T_0,t(-f0)). */
static void SPEC_UV(const REAL *spec, const long *toff, const long *sizes, int d, long f0, long f1, REAL scale,
                    REAL ur[2][BW], REAL ui[2][BW], REAL vr[2][BW], REAL vi[2][BW]) {
    const long m0 = f0 ? sizes[0] - f0 : 0, m1 = d == 3 && f1 ? sizes[1] - f1 : 0;
    for (int t = 0; t < 2; t++) {
        const REAL *a = spec + TR(0, t, f0, 0), *am = spec + TR(0, t, m0, 0);
        if (d == 3) {
            const REAL *b = spec + TR(1, t, f1, 0), *bm = spec + TR(1, t, m1, 0);
#pragma omp simd
            for (int l = 0; l < BW; l++) {
                ur[t][l] = (a[l] * b[l] - a[BW + l] * b[BW + l]) * scale;
                ui[t][l] = (a[l] * b[BW + l] + a[BW + l] * b[l]) * scale;
                vr[t][l] = (am[l] * bm[l] - am[BW + l] * bm[BW + l]) * scale;
                vi[t][l] = (am[l] * bm[BW + l] + am[BW + l] * bm[l]) * scale;
            }
        } else {
#pragma omp simd
            for (int l = 0; l < BW; l++)
                ur[t][l] = a[l] * scale, ui[t][l] = a[BW + l] * scale, vr[t][l] = am[l] * scale, vi[t][l] = am[BW + l] * scale;
        }
    }
}

/* The block's spectrum entries re + i im at (f0, f1, f2) from SPEC_UV's scaled U_t, V_t (the header's sum). */
static inline void SPEC_ENTRY(const REAL *spec, const long *toff, const long *sizes, int d, long f2,
                              REAL ur[2][BW], REAL ui[2][BW], REAL vr[2][BW], REAL vi[2][BW], REAL *re, REAL *im) {
    const long m2 = f2 ? sizes[d - 1] - f2 : 0;
    const REAL *x0 = spec + TR(d - 1, 0, f2, 0), *x1 = spec + TR(d - 1, 1, f2, 0);
    const REAL *y0 = spec + TR(d - 1, 0, m2, 0), *y1 = spec + TR(d - 1, 1, m2, 0);
#pragma omp simd
    for (int l = 0; l < BW; l++) {
        re[l] = ur[0][l] * x0[l] - ui[0][l] * x0[BW + l] + vr[0][l] * y0[l] - vi[0][l] * y0[BW + l]
              + ur[1][l] * x1[l] - ui[1][l] * x1[BW + l] + vr[1][l] * y1[l] - vi[1][l] * y1[BW + l];
        im[l] = ur[0][l] * x0[BW + l] + ui[0][l] * x0[l] - vr[0][l] * y0[BW + l] - vi[0][l] * y0[l]
              + ur[1][l] * x1[BW + l] + ui[1][l] * x1[l] - vr[1][l] * y1[BW + l] - vi[1][l] * y1[l];
    }
}

/* A call's arrays: the block workspace w (base), the DFT tables (tab, with toff) and GROUP blocks' transforms
 * and accumulators (specs). 0, or 1 when out of memory (then nothing stays allocated). */
static int SPEC_ALLOC(FN(work) * w, int d, int k, const long *sizes, long *toff, long per_block, REAL **base,
                      REAL **tab, REAL **specs) {
    *base = WORKSPACE(w, d, k), *tab = SPEC_TABLES(d, k, sizes, toff);
    *specs = (REAL *)malloc(sizeof(REAL) * GROUP * per_block);
    if (*base && *tab && *specs) return 0;
    free(*base), free(*tab), free(*specs);
    return 1;
}

/* Loads block `block`'s pairs (input channel i, output channels o0 .. o0 + n - 1), builds their factors and
 * their 1D transforms T into spec; returns n. */
static int SPEC_PREPARE(const REAL *q, const REAL *e, long pairs, long cin, long cout, int d, int k,
                        const long *sizes, const long *toff, const REAL *tab, long block, FN(work) * w, REAL *spec,
                        long *i, long *o0) {
    const long blocks_per_i = (cout + BW - 1) / BW;
    *i = block / blocks_per_i, *o0 = (block % blocks_per_i) * BW;
    const int n = cout - *o0 < BW ? (int)(cout - *o0) : BW;
    const long p0 = *o0 * cin + *i;
    LOAD(q, 1 + 2 * d + 4, pairs, p0, cin, n, w->qs);
    LOAD(e, 1 + 4 * d, pairs, p0, cin, n, w->es);
    FACTORS(w->qs, w->es, w->phi, w->fac, d, k);
    const REAL *cs = tab;
    for (int j = 0; j < d; j++) {
        for (int t = 0; t < 2; t++)
            for (long f = 0; f < sizes[j]; f++) {
                REAL tr[BW] = {0}, ti[BW] = {0};
                for (int a = 0; a < k; a++) {
                    const REAL c = cs[(f * k + a) * 2], s = cs[(f * k + a) * 2 + 1];
                    const REAL *fr = w->fac + FAC(j, a, t, 0), *fi = fr + BW;
#pragma omp simd
                    for (int l = 0; l < BW; l++) tr[l] += fr[l] * c - fi[l] * s, ti[l] += fr[l] * s + fi[l] * c;
                }
                REAL *dst = spec + TR(j, t, f, 0);
                for (int l = 0; l < BW; l++) dst[l] = tr[l], dst[BW + l] = ti[l];
            }
        cs += sizes[j] * k * 2;
    }
    return n;
}

/* Forward: the spectrum entries of blocks b0 <= block < b1 into out (2, F, cin, cout); 0, or 1 when out of
 * memory. sizes: the FFT size per axis. Blocks go in groups of GROUP, frequency by frequency within a group,
 * so that the group's stores at one frequency are adjacent in out (one block at a time, every store would
 * open a new cache line and page). */
int FN(gabor_spectrum)(const REAL *q, const REAL *e, REAL *out, long pairs, long cin, long cout, int d, int k,
                       const long *sizes, long b0, long b1) {
    const long P0 = sizes[0], P1 = d == 3 ? sizes[1] : 1, H = sizes[d - 1] / 2 + 1;
    const long step = cin * cout, imag = P0 * P1 * H * step; /* between frequencies; to the imaginary parts */
    const long per_block = SPEC_BLOCK(d, sizes);
    long toff[3];
    FN(work) w;
    REAL *base, *tab, *specs;
    if (SPEC_ALLOC(&w, d, k, sizes, toff, per_block, &base, &tab, &specs)) return 1; /* the caller raises */
    FLUSH_DENORMALS_BEGIN
    for (long g0 = b0; g0 < b1; g0 += GROUP) {
        const int count = b1 - g0 < GROUP ? (int)(b1 - g0) : GROUP;
        long ii[GROUP], oo[GROUP];
        int nn[GROUP];
        for (int g = 0; g < count; g++)
            nn[g] = SPEC_PREPARE(q, e, pairs, cin, cout, d, k, sizes, toff, tab, g0 + g, &w, specs + g * per_block,
                                 &ii[g], &oo[g]);
        for (long f0 = 0; f0 < P0; f0++)
            for (long f1 = 0; f1 < P1; f1++)
                for (int g = 0; g < count; g++) {
                    const REAL *spec = specs + g * per_block;
                    const int n = nn[g];
                    /* 1/2 U_t and 1/2 V_t for both terms */
                    REAL ur[2][BW], ui[2][BW], vr[2][BW], vi[2][BW];
                    SPEC_UV(spec, toff, sizes, d, f0, f1, (REAL)0.5, ur, ui, vr, vi);
                    REAL *row = out + ((f0 * P1 + f1) * H * cin + ii[g]) * cout + oo[g];
                    for (long f2 = 0; f2 < H; f2++) {
                        REAL re[BW], im[BW];
                        SPEC_ENTRY(spec, toff, sizes, d, f2, ur, ui, vr, vi, re, im);
                        REAL *dst = row + f2 * step;
                        if (n == BW) {
#pragma omp simd
                            for (int l = 0; l < BW; l++) dst[l] = re[l], dst[imag + l] = im[l];
                        } else { /* masked stores: lanes past n belong to other blocks */
#pragma omp simd
                            for (int l = 0; l < BW; l++)
                                if (l < n) dst[l] = re[l], dst[imag + l] = im[l];
                        }
                    }
                }
    }
    FLUSH_DENORMALS_END
    free(base), free(tab), free(specs);
    return 0;
}

/* beta[a] = 1/2 sum_{f < nf} (cp(f) w^{f a} + cm(f) w^{-f a}) for a < k, stored as (Re beta, -Im beta) into
 * the factor gradient dfac (see the header). cs: the axis' (cos, sin) table, (f, a) rows. */
static void FN(spectrum_taps_backward)(const REAL *cp, const REAL *cm, long nf, int k, const REAL *cs,
                                       REAL *dfac_t0, long tap_stride) {
    for (int a = 0; a < k; a++) {
        REAL br[BW] = {0}, bi[BW] = {0};
        for (long f = 0; f < nf; f++) {
            const REAL c = cs[(f * k + a) * 2], s = cs[(f * k + a) * 2 + 1];
            const REAL *p = cp + f * 2 * BW, *m = cm + f * 2 * BW;
#pragma omp simd
            for (int l = 0; l < BW; l++) {
                br[l] += (p[l] + m[l]) * c - (p[BW + l] - m[BW + l]) * s;
                bi[l] += (p[l] - m[l]) * s + (p[BW + l] + m[BW + l]) * c;
            }
        }
        REAL *dst = dfac_t0 + a * tap_stride;
        for (int l = 0; l < BW; l++) dst[l] = br[l] / 2, dst[BW + l] = -bi[l] / 2;
    }
}

/* Where the backward reads dL/dK: `grad` in the layout of the forward's out, or (grad NULL) formed per entry as
 * sum_n G conj(X) from x (F, T, cin, re/im) and gy (F, T, re/im, coutp), see spectral_impl.h. */
struct FN(spectrum_grad) {
    const REAL *grad, *x, *gy;
    long tiles, coutp;
};

/* Backward: dq of the pairs in blocks b0 <= block < b1 from dL/dK (read as `source` says), in groups of
 * `group` <= GROUP blocks (GROUP for a stored grad, like the forward; 1 when formed from X and G, which stay
 * in cache); 0, or 1 when out of memory. */
static int SPEC_BACKWARD(const REAL *q, const REAL *e, const struct FN(spectrum_grad) * source, REAL *dq,
                         long pairs, long cin, long cout, int d, int k, const long *sizes, long b0, long b1,
                         int group) {
    const long P0 = sizes[0], P1 = d == 3 ? sizes[1] : 1, PL_ = sizes[d - 1], H = PL_ / 2 + 1;
    const long step = cin * cout, imag = P0 * P1 * H * step;
    const REAL *grad = source->grad, *end = grad ? grad + 2 * imag : 0, *xs = source->x, *gy = source->gy;
    const long T = source->tiles, coutp = source->coutp;
    const int nq = 1 + 2 * d + 4;
    const long per_block = SPEC_BLOCK(d, sizes);
    long toff[3];
    FN(work) w;
    REAL *base, *tab, *specs;
    if (SPEC_ALLOC(&w, d, k, sizes, toff, per_block, &base, &tab, &specs)) return 1; /* the caller raises */
    long acc = 0; /* a block's A+-, C+- of axis 0 and (3D) axis 1 follow its transforms, each (term, f, re/im) */
    for (int j = 0; j < d; j++) acc += 4 * sizes[j];
    const long o_am = 4 * H * BW, o_c0p = 8 * H * BW, o_c0m = o_c0p + 4 * P0 * BW, o_c1p = o_c0m + 4 * P0 * BW;
    const long o_c1m = o_c1p + 4 * P1 * BW;
    const REAL *tabs[3] = {tab, tab + sizes[0] * k * 2, d == 3 ? tab + (sizes[0] + sizes[1]) * k * 2 : 0};
    FLUSH_DENORMALS_BEGIN
    for (long g0 = b0; g0 < b1; g0 += group) {
        const int count = b1 - g0 < group ? (int)(b1 - g0) : group;
        long ii[GROUP], oo[GROUP];
        int nn[GROUP];
        for (int g = 0; g < count; g++) {
            REAL *spec = specs + g * per_block;
            nn[g] = SPEC_PREPARE(q, e, pairs, cin, cout, d, k, sizes, toff, tab, g0 + g, &w, spec, &ii[g], &oo[g]);
            for (long x = 0; x < 8 * (H + P0 + P1) * BW; x++) spec[acc * BW + x] = 0;
        }
        for (long f0 = 0; f0 < P0; f0++)
            for (long f1 = 0; f1 < P1; f1++)
                for (int g = 0; g < count; g++) {
                    const REAL *spec = specs + g * per_block;
                    REAL *ap = specs + g * per_block + acc * BW, *am = ap + o_am;
                    const int n = nn[g];
                    REAL ur[2][BW], ui[2][BW], vr[2][BW], vi[2][BW];
                    SPEC_UV(spec, toff, sizes, d, f0, f1, (REAL)1, ur, ui, vr, vi);
                    REAL bpr[2][BW] = {{0}}, bpi[2][BW] = {{0}}, bmr[2][BW] = {{0}}, bmi[2][BW] = {{0}}; /* B+, B- */
                    /* grad: the rows two blocks ahead (or of the next (f0, f1)), prefetched: latency-bound otherwise */
                    const int ahead = (g + 2) % count;
                    const long f01 = f0 * P1 + f1 + (g + 2 >= count), f01_max = P0 * P1 - 1;
                    const long here = ((f0 * P1 + f1) * H * cin + ii[g]) * cout + oo[g];
                    const long there = ((f01 < f01_max ? f01 : f01_max) * H * cin + ii[ahead]) * cout + oo[ahead];
                    for (long f2 = 0; f2 < H; f2++) {
                        const long m2 = f2 ? PL_ - f2 : 0;
                        REAL gr[BW], gi[BW];
                        if (!grad) { /* sum_n G conj(X); G is zero past cout */
                            const long f = (f0 * P1 + f1) * H + f2;
                            for (int l = 0; l < BW; l++) gr[l] = 0, gi[l] = 0;
                            for (long t = 0; t < T; t++) {
                                const REAL xr = xs[((f * T + t) * cin + ii[g]) * 2], xi = xs[((f * T + t) * cin + ii[g]) * 2 + 1];
                                const REAL *yr = gy + (f * T + t) * 2 * coutp + oo[g], *yi = yr + coutp;
#pragma omp simd
                                for (int l = 0; l < BW; l++)
                                    gr[l] = gr[l] + yr[l] * xr + yi[l] * xi, gi[l] = gi[l] + yi[l] * xr - yr[l] * xi;
                            }
                        } else {
                            const REAL *src = grad + here + f2 * step, *next = grad + there + f2 * step;
                            __builtin_prefetch(next, 0), __builtin_prefetch(next + imag, 0);
                            if (n == BW || src + imag + BW <= end) { /* lanes past n read the next entries: unused */
                                for (int l = 0; l < BW; l++) gr[l] = src[l], gi[l] = src[imag + l];
                            } else {
                                for (int l = 0; l < BW; l++) gr[l] = l < n ? src[l] : 0, gi[l] = l < n ? src[imag + l] : 0;
                            }
                        }
                        for (int t = 0; t < 2; t++) {
                            const REAL *x = spec + TR(d - 1, t, f2, 0), *y = spec + TR(d - 1, t, m2, 0);
                            REAL *pp = ap + (t * H + f2) * 2 * BW, *mm = am + (t * H + f2) * 2 * BW;
#pragma omp simd
                            for (int l = 0; l < BW; l++) {
                                /* A+ += conj(g) U, A- += g V, B+ += conj(g) T(f2), B- += g T(-f2) */
                                pp[l] = pp[l] + gr[l] * ur[t][l] + gi[l] * ui[t][l], pp[BW + l] = pp[BW + l] + gr[l] * ui[t][l] - gi[l] * ur[t][l];
                                mm[l] = mm[l] + gr[l] * vr[t][l] - gi[l] * vi[t][l], mm[BW + l] = mm[BW + l] + gr[l] * vi[t][l] + gi[l] * vr[t][l];
                                bpr[t][l] = bpr[t][l] + gr[l] * x[l] + gi[l] * x[BW + l], bpi[t][l] = bpi[t][l] + gr[l] * x[BW + l] - gi[l] * x[l];
                                bmr[t][l] = bmr[t][l] + gr[l] * y[l] - gi[l] * y[BW + l], bmi[t][l] = bmi[t][l] + gr[l] * y[BW + l] + gi[l] * y[l];
                            }
                        }
                    }
                    const long m0 = f0 ? P0 - f0 : 0, m1 = f1 ? P1 - f1 : 0;
                    for (int t = 0; t < 2; t++) {
                        REAL *p0 = ap + o_c0p + (t * P0 + f0) * 2 * BW, *n0 = ap + o_c0m + (t * P0 + f0) * 2 * BW;
                        if (d == 2) { /* U = T_0(f0): C+(f0) = B+(f0), C-(f0) = B-(f0) */
                            for (int l = 0; l < BW; l++)
                                p0[l] = bpr[t][l], p0[BW + l] = bpi[t][l], n0[l] = bmr[t][l], n0[BW + l] = bmi[t][l];
                            continue;
                        }
                        const REAL *b = spec + TR(1, t, f1, 0), *bm = spec + TR(1, t, m1, 0);
                        const REAL *a = spec + TR(0, t, f0, 0), *amm = spec + TR(0, t, m0, 0);
                        REAL *p1 = ap + o_c1p + (t * P1 + f1) * 2 * BW, *n1 = ap + o_c1m + (t * P1 + f1) * 2 * BW;
#pragma omp simd
                        for (int l = 0; l < BW; l++) {
                            p0[l] += bpr[t][l] * b[l] - bpi[t][l] * b[BW + l], p0[BW + l] += bpr[t][l] * b[BW + l] + bpi[t][l] * b[l];
                            n0[l] += bmr[t][l] * bm[l] - bmi[t][l] * bm[BW + l], n0[BW + l] += bmr[t][l] * bm[BW + l] + bmi[t][l] * bm[l];
                            p1[l] += bpr[t][l] * a[l] - bpi[t][l] * a[BW + l], p1[BW + l] += bpr[t][l] * a[BW + l] + bpi[t][l] * a[l];
                            n1[l] += bmr[t][l] * amm[l] - bmi[t][l] * amm[BW + l], n1[BW + l] += bmr[t][l] * amm[BW + l] + bmi[t][l] * amm[l];
                        }
                    }
                }
        for (int g = 0; g < count; g++) {
            REAL *spec = specs + g * per_block, *ap = spec + acc * BW;
            long i, o0; /* the factors again (w holds the last block's) */
            const int n = SPEC_PREPARE(q, e, pairs, cin, cout, d, k, sizes, toff, tab, g0 + g, &w, spec, &i, &o0);
            /* the taps' coefficients: last axis from A+-, axis 0 from C+- (and axis 1 in 3D) */
            const long tap = 4 * BW; /* FAC(j, a + 1, t, 0) - FAC(j, a, t, 0) */
            for (int t = 0; t < 2; t++) {
                FN(spectrum_taps_backward)(ap + t * H * 2 * BW, ap + o_am + t * H * 2 * BW, H, k, tabs[d - 1],
                                           w.dfac + FAC(d - 1, 0, t, 0), tap);
                FN(spectrum_taps_backward)(ap + o_c0p + t * P0 * 2 * BW, ap + o_c0m + t * P0 * 2 * BW, P0, k, tabs[0],
                                           w.dfac + FAC(0, 0, t, 0), tap);
                if (d == 3)
                    FN(spectrum_taps_backward)(ap + o_c1p + t * P1 * 2 * BW, ap + o_c1m + t * P1 * 2 * BW, P1, k,
                                               tabs[1], w.dfac + FAC(1, 0, t, 0), tap);
            }
            FACTORS_BACKWARD(&w, d, k);
            for (int l = 0; l < n; l++)
                for (int c = 0; c < nq; c++) dq[c * pairs + (o0 + l) * cin + i] = w.dqs[c * BW + l];
        }
    }
    FLUSH_DENORMALS_END
    free(base), free(tab), free(specs);
    return 0;
}

/* Backward of gabor_spectrum: dq of the pairs in blocks b0 <= block < b1 from grad = dL/dK (layout of out). */
int FN(gabor_spectrum_backward)(const REAL *q, const REAL *e, const REAL *grad, REAL *dq, long pairs, long cin,
                                long cout, int d, int k, const long *sizes, long b0, long b1) {
    const struct FN(spectrum_grad) source = {grad, 0, 0, 0, 0};
    return SPEC_BACKWARD(q, e, &source, dq, pairs, cin, cout, d, k, sizes, b0, b1, GROUP);
}

