/* Separable generation of Gabor kernels and its gradient, for one floating type (see separable.c).
 *
 * Written by hand because no library has it. Every kernel of Wong & Moradi's eq. 2 (medexp.nn.gabor) is
 * the real part of two rank-1 complex tensors per channel pair (o, i) (terms t = cosine, sine):
 *
 *     W[o, i, a, b, c] = sum_t Re(c_t phi_0[a, t] phi_1[b, t] phi_2[c, t]),
 *     phi_j[a, t] = exp(-s r_a^2) e^{i w_jt r_a}
 *
 * r_a = a - k // 2 the tap offset, s = 1 / (2 sigma^2), w_jt = 2 pi u_j f_t (u the direction of x'), c_t the
 * term's complex amplitude (all per pair). These functions build the factors from the 1 + 2 d + 4 numbers of
 * a pair, multiply them out into its k^d taps and, backwards, reduce the taps' gradient onto those numbers:
 * one pass over the taps each way. medexp/nn/fast/generate.py holds the same computation in PyTorch
 * operations (fallback) and runs these functions on several threads, each on a range of blocks.
 *
 * Pairs are processed in blocks of BW pairs with the same o and consecutive i, every step vectorised across
 * the block (loops over the lane l < BW), which is also the order of the taps in memory:
 *   q    (1 + 2 d + 4, cout cin), one row per number: s, w_00, w_01, .., w_(d-1)1, Re c_0, Im c_0, Re c_1,
 *        Im c_1 (rows_impl.h computes q and e from eq. 2's parameters).
 *   e    (1 + 4 d, cout cin): exp(-s), cos w_00, sin w_00, .., sin w_(d-1)1, so the kernel itself needs only
 *        products.
 *   out  the (cout, cin, k, .., k) weight, taps row-major (3D: axes D, H, W = z, y, x; 2D has no middle
 *        axis, phi_1 = 1), in one of two memory layouts (grad in the same one):
 *        channels-last (cout, k^d, cin) when `contiguous` is 0: a block's 16 taps at one offset are
 *        adjacent, so the block writes and reads them straight;
 *        contiguous (cout, cin, k^d) otherwise (oneDNN's fastest layout for 7^3 kernels on the deepest,
 *        smallest volumes): the block goes through its (k^d, BW) tile, transposed on the way out (forward)
 *        or in (backward), one pair's k^d taps at a time.
 * Expects REAL (float or double), FN(name) and BW defined by the including file.
 */

#define WORKSPACE FN(workspace)
#define LOAD FN(load_rows)
#define FACTORS FN(factors)
#define PLANE FN(plane)
#define PREPARE FN(prepare_block)
#define FACTORS_BACKWARD FN(factors_backward)
#define PUT_ROW FN(put_row)
#define BLOCK_BACKWARD FN(block_backward)
#define VEC FN(vec)
/* offsets into the block's arrays: factor (axis j, tap a, term t, re/im ri) and plane entry (term t, m) */
#define FAC(j, a, t, ri) (((((j) * k + (a)) * 2 + (t)) * 2 + (ri)) * BW)
#define PL(t, m) (((t) * plane + (m)) * BW)
/* tap (a + j, m) of lane l: Re(Z_0 Y_0 + Z_1 Y_1), z = the factors at a, y = the plane at m (forward) */
#define TAP(z, j, l)                                                                                          \
    ((z)[(4 * (j) + 0) * BW + (l)] * yr0[l] - (z)[(4 * (j) + 1) * BW + (l)] * yi0[l] +                       \
     (z)[(4 * (j) + 2) * BW + (l)] * yr1[l] - (z)[(4 * (j) + 3) * BW + (l)] * yi1[l])

/* dst[l] = v[l] for the BW lanes of a row; with `stream`, as non-temporal stores where the CPU has them
 * (dst 64-byte aligned): a weight larger than the last-level cache would only pass through it, evicting what
 * the convolution reads next, and each line would be read from memory before it is overwritten. */
static inline void FN(put_row)(REAL *restrict dst, const REAL *restrict v, int stream) {
#if defined(STREAM_WIDTH)
    if (stream) {
        for (int j = 0; j < (int)(BW * sizeof(REAL)); j += STREAM_WIDTH) {
            if (sizeof(REAL) == 4)
                STREAM_F32((float *)dst + j / 4, (const float *)v + j / 4);
            else
                STREAM_F64((double *)dst + j / 8, (const double *)v + j / 8);
        }
        return;
    }
#endif
    (void)stream;
#pragma omp simd
    for (int l = 0; l < BW; l++) dst[l] = v[l];
}

/* BW lanes as one value (GCC / Clang vector extension): kept in vector registers, + and * lane-wise */
typedef REAL VEC __attribute__((vector_size(BW * sizeof(REAL))));

typedef struct {
    REAL *qs, *es, *phi, *fac, *dfac, *yr, *yi, *gr, *gi, *tile, *dqs;
} FN(work);

/* One malloc for a call's block arrays (sizes follow d and k); NULL if out of memory. */
static REAL *WORKSPACE(FN(work) * w, int d, int k) {
    const long plane = (d == 3 ? k : 1) * (long)k, nfac = (long)d * k * 4 * BW, npl = 2 * plane * BW;
    const long nq = 1 + 2 * d + 4, ne = 1 + 4 * d;
    REAL *base = (REAL *)malloc(sizeof(REAL) * ((2 * nq + ne) * BW + 3 * nfac + 4 * npl + k * plane * BW));
    if (!base) return 0;
    REAL *p = base;
    w->qs = p, p += nq * BW;
    w->dqs = p, p += nq * BW;
    w->es = p, p += ne * BW;
    w->phi = p, p += nfac;
    w->fac = p, p += nfac;
    w->dfac = p, p += nfac;
    w->yr = p, p += npl;
    w->yi = p, p += npl;
    w->gr = p, p += npl;
    w->gi = p, p += npl;
    w->tile = p; /* (k^d, BW): taps of a block that is not full */
    return base;
}

/* dst[c * BW + l] = src[c * pairs + p0 + l * step] for l < n (lanes `step` pairs apart); lanes past n repeat
 * the last pair (finite values). */
static void LOAD(const REAL *src, long cols, long pairs, long p0, long step, int n, REAL *dst) {
    for (long c = 0; c < cols; c++)
        for (int l = 0; l < BW; l++) dst[c * BW + l] = src[c * pairs + p0 + (l < n ? l : n - 1) * step];
}

/* phi from es, and fac = phi with the last axis multiplied by c_t. Only products: g(r) = exp(-s)^(r^2) by
 * g(r + 1) = g(r) exp(-s)^(2 r + 1), e^{i w r} by powers of e^{i w}; negative offsets mirror (g even,
 * e^{-i w r} the conjugate). */
static void FACTORS(const REAL *qs, const REAL *es, REAL *phi, REAL *fac, int d, int k) {
    const int h = k / 2;
    REAL env[BW], step[BW], rho2[BW], er[6][BW], ei[6][BW]; /* g(r); e^{i w r} per (axis, term) */
    for (int l = 0; l < BW; l++) env[l] = 1, step[l] = es[l], rho2[l] = es[l] * es[l];
    for (int jt = 0; jt < 2 * d; jt++)
        for (int l = 0; l < BW; l++) er[jt][l] = 1, ei[jt][l] = 0;
    for (int r = 0; r <= h; r++) {
        for (int jt = 0; jt < 2 * d; jt++) {
            const REAL *br = es + (1 + 2 * jt) * BW, *bi = br + BW; /* cos w, sin w */
            REAL *pos = phi + FAC(jt / 2, h + r, jt % 2, 0), *neg = phi + FAC(jt / 2, h - r, jt % 2, 0);
#pragma omp simd
            for (int l = 0; l < BW; l++) {
                const REAL pr = env[l] * er[jt][l], pi = env[l] * ei[jt][l];
                pos[l] = pr, pos[BW + l] = pi, neg[l] = pr, neg[BW + l] = -pi;
                const REAL nr = er[jt][l] * br[l] - ei[jt][l] * bi[l];
                ei[jt][l] = er[jt][l] * bi[l] + ei[jt][l] * br[l], er[jt][l] = nr;
            }
        }
        for (int l = 0; l < BW; l++) env[l] *= step[l], step[l] *= rho2[l];
    }
    for (long i = 0; i < (long)d * k * 4 * BW; i++) fac[i] = phi[i];
    const REAL *c = qs + (1 + 2 * d) * BW;
    for (int a = 0; a < k; a++)
        for (int t = 0; t < 2; t++) {
            const REAL *p = phi + FAC(d - 1, a, t, 0), *cr = c + t * 2 * BW, *ci = cr + BW;
            REAL *f = fac + FAC(d - 1, a, t, 0);
#pragma omp simd
            for (int l = 0; l < BW; l++)
                f[l] = cr[l] * p[l] - ci[l] * p[BW + l], f[BW + l] = cr[l] * p[BW + l] + ci[l] * p[l];
        }
}

/* yr + i yi at PL(t, m) = Y_t[b] X_t[c] for m = b k + c: the plane of the last two axes (2D: Y = 1). */
static void PLANE(const REAL *fac, int d, int k, REAL *yr, REAL *yi) {
    const int ky = d == 3 ? k : 1, plane = ky * k;
    for (int b = 0; b < ky; b++)
        for (int t = 0; t < 2; t++)
            for (int c = 0; c < k; c++) {
                const REAL *v = fac + FAC(d - 1, c, t, 0), *u = fac + FAC(1, b, t, 0);
                REAL *wr = yr + PL(t, b * k + c), *wi = yi + PL(t, b * k + c);
                if (d == 3) {
#pragma omp simd
                    for (int l = 0; l < BW; l++)
                        wr[l] = u[l] * v[l] - u[BW + l] * v[BW + l], wi[l] = u[l] * v[BW + l] + u[BW + l] * v[l];
                } else {
                    for (int l = 0; l < BW; l++) wr[l] = v[l], wi[l] = v[BW + l];
                }
            }
}

/* A block's pairs: output channel o, first input channel i0, first pair p0 = o cin + i0 and the number n of
 * its lanes that are pairs (BW but in the last block of a row); loads their q and e and builds their
 * factors and plane into w. Returns n. */
static int PREPARE(const REAL *q, const REAL *e, long pairs, long cin, int d, int k, long block, FN(work) * w,
                   long *o, long *i0, long *p0) {
    const long blocks_per_o = (cin + BW - 1) / BW;
    *o = block / blocks_per_o, *i0 = (block % blocks_per_o) * BW, *p0 = *o * cin + *i0;
    const int n = cin - *i0 < BW ? (int)(cin - *i0) : BW;
    LOAD(q, 1 + 2 * d + 4, pairs, *p0, 1, n, w->qs);
    LOAD(e, 1 + 4 * d, pairs, *p0, 1, n, w->es);
    FACTORS(w->qs, w->es, w->phi, w->fac, d, k);
    PLANE(w->fac, d, k, w->yr, w->yi);
    return n;
}

/* The factors' gradient (w->dfac: every axis, the last one with respect to c_t phi) -> w->dqs, by steps 2b
 * and 3 of the backward below: c off the last axis, then onto s and the frequencies. Overwrites the last
 * axis of w->dfac with dL/dphi. */
static void FACTORS_BACKWARD(FN(work) * w, int d, int k) {
    const int h = k / 2;
    REAL *dc = w->dqs + (1 + 2 * d) * BW; /* step 2b */
    for (int i = 0; i < 4 * BW; i++) dc[i] = 0;
    for (int a = 0; a < k; a++)
        for (int t = 0; t < 2; t++) {
            REAL *df = w->dfac + FAC(d - 1, a, t, 0), *dcr = dc + t * 2 * BW, *dci = dcr + BW;
            const REAL *ph = w->phi + FAC(d - 1, a, t, 0), *cr = w->qs + (1 + 2 * d + t * 2) * BW, *ci = cr + BW;
#pragma omp simd
            for (int l = 0; l < BW; l++) {
                const REAL fr = df[l], fi = df[BW + l];
                dcr[l] += fr * ph[l] + fi * ph[BW + l], dci[l] += fi * ph[l] - fr * ph[BW + l];
                df[l] = fr * cr[l] + fi * ci[l], df[BW + l] = fi * cr[l] - fr * ci[l];
            }
        }
    /* step 3 */
    REAL *ds = w->dqs;
    for (int l = 0; l < BW; l++) ds[l] = 0;
    for (int jt = 0; jt < 2 * d; jt++) {
        REAL *dw = w->dqs + (1 + jt) * BW;
        for (int l = 0; l < BW; l++) dw[l] = 0;
        for (int a = 0; a < k; a++) {
            const REAL *ph = w->phi + FAC(jt / 2, a, jt % 2, 0), *df = w->dfac + FAC(jt / 2, a, jt % 2, 0);
            const REAL r = a - h;
#pragma omp simd
            for (int l = 0; l < BW; l++) {
                ds[l] -= r * r * (df[l] * ph[l] + df[BW + l] * ph[BW + l]);
                dw[l] += r * (df[BW + l] * ph[l] - df[l] * ph[BW + l]);
            }
        }
    }
}

/* Forward: the taps of blocks b0 <= block < b1 (block = o * ceil(cin / BW) + i / BW) into out; 0, or 1 when
 * out of memory. layout: LAYOUT_CONTIGUOUS or not (channels-last), | LAYOUT_STREAM for non-temporal stores
 * of the channels-last rows (used when 64-byte aligned). */
int FN(gabor_expand)(const REAL *q, const REAL *e, REAL *out, long pairs, long cin, int d, int k, int layout,
                     long b0, long b1) {
    const int plane = (d == 3 ? k : 1) * k, taps = k * plane, contiguous = layout & LAYOUT_CONTIGUOUS;
    const int aligned = cin * sizeof(REAL) % 64 == 0 && (unsigned long)out % 64 == 0;
    FN(work) w;
    REAL *base = WORKSPACE(&w, d, k);
    if (!base) return 1; /* out of memory: the caller raises */
    FLUSH_DENORMALS_BEGIN
    for (long block = b0; block < b1; block++) {
        long o, i0, p0;
        const int n = PREPARE(q, e, pairs, cin, d, k, block, &w, &o, &i0, &p0);
        /* a full channels-last block writes straight into out (stride cin between taps), others into the tile */
        const int direct = n == BW && !contiguous, stream = direct && aligned && (layout & LAYOUT_STREAM);
        REAL *dst = direct ? out + o * taps * cin + i0 : w.tile;
        const long stride = direct ? cin : BW, next = plane * stride; /* next: the same m one row of a on */
        int a = 0;
        for (; a + 4 <= k; a += 4) /* four rows of the first axis per load of the plane (register blocking) */
            for (int m = 0; m < plane; m++) {
                const REAL *restrict yr0 = w.yr + PL(0, m), *restrict yi0 = w.yi + PL(0, m);
                const REAL *restrict yr1 = w.yr + PL(1, m), *restrict yi1 = w.yi + PL(1, m);
                const REAL *restrict z = w.fac + FAC(0, a, 0, 0); /* rows (a + j, t, re/im) of BW */
                REAL *row = dst + (a * plane + m) * stride, v0[BW], v1[BW], v2[BW], v3[BW];
#pragma omp simd
                for (int l = 0; l < BW; l++)
                    v0[l] = TAP(z, 0, l), v1[l] = TAP(z, 1, l), v2[l] = TAP(z, 2, l), v3[l] = TAP(z, 3, l);
                PUT_ROW(row, v0, stream), PUT_ROW(row + next, v1, stream);
                PUT_ROW(row + 2 * next, v2, stream), PUT_ROW(row + 3 * next, v3, stream);
            }
        for (; a < k; a++)
            for (int m = 0; m < plane; m++) {
                const REAL *restrict yr0 = w.yr + PL(0, m), *restrict yi0 = w.yi + PL(0, m);
                const REAL *restrict yr1 = w.yr + PL(1, m), *restrict yi1 = w.yi + PL(1, m);
                const REAL *restrict z = w.fac + FAC(0, a, 0, 0);
                REAL v0[BW];
#pragma omp simd
                for (int l = 0; l < BW; l++) v0[l] = TAP(z, 0, l);
                PUT_ROW(dst + (a * plane + m) * stride, v0, stream);
            }
        if (contiguous)
            for (int l = 0; l < n; l++) {
                REAL *row = out + (p0 + l) * taps; /* pair p0 + l's taps */
                for (int tap = 0; tap < taps; tap++) row[tap] = w.tile[tap * BW + l];
            }
        else if (n < BW)
            for (int tap = 0; tap < taps; tap++)
                for (int l = 0; l < n; l++) out[(o * taps + tap) * cin + i0 + l] = w.tile[tap * BW + l];
    }
    STREAM_FENCE
    FLUSH_DENORMALS_END
    free(base);
    return 0;
}

/* A block's dq from its taps' gradient G (rows of BW lanes, `stride` apart), in three steps; the block's
 * factors and plane are in w (PREPARE), and lanes l < n are written to dq[c * pairs + p0 + l]:
 * 1. onto the first axis and the plane (YX = the plane):
 *      dL/dRe Z_t[a] = sum_m G[a, m] Re YX_t[m],   dL/dIm Z_t[a] = -sum_m G[a, m] Im YX_t[m],
 *      dL/dRe YX_t[m] = sum_a G[a, m] Re Z_t[a],   dL/dIm YX_t[m] = -sum_a G[a, m] Im Z_t[a];
 * 2. onto the other axes by the product rule: for w = u v and gw = dL/dRe w + i dL/dIm w,
 *      dL/du = gw conj(v) (as re + i im), and likewise dL/dv = gw conj(u); the same rule gives
 *      dL/dphi = dF conj(c) and dL/dc_t = sum_a dF[a, t] conj(phi[a, t]) on the last axis;
 * 3. onto s and w with dphi/ds = -r^2 phi, dphi/dw = i r phi:
 *      dL/ds = -sum r_a^2 Re(dphi conj(phi)),  dL/dw_jt = sum_a r_a Im(dphi conj(phi)). */
static void BLOCK_BACKWARD(FN(work) * w, const REAL *src, long stride, int d, int k, REAL *dq, long pairs,
                           long p0, int n) {
    const int plane = (d == 3 ? k : 1) * k, nq = 1 + 2 * d + 4;
    /* step 1 */
    for (long i = 0; i < 2L * plane * BW; i++) w->gr[i] = w->gi[i] = 0;
    for (int a = 0; a < k; a++) {
        const REAL *zr0 = w->fac + FAC(0, a, 0, 0), *zi0 = zr0 + BW, *zr1 = zi0 + BW, *zi1 = zr1 + BW;
        REAL s0r[BW] = {0}, s0i[BW] = {0}, s1r[BW] = {0}, s1i[BW] = {0};
        for (int m = 0; m < plane; m++) {
            const REAL *g = src + (a * plane + m) * stride;
            __builtin_prefetch(g + PREFETCH * stride, 0); /* taps are a cache line apart */
            const REAL *yr0 = w->yr + PL(0, m), *yi0 = w->yi + PL(0, m);
            const REAL *yr1 = w->yr + PL(1, m), *yi1 = w->yi + PL(1, m);
            REAL *gr0 = w->gr + PL(0, m), *gi0 = w->gi + PL(0, m), *gr1 = w->gr + PL(1, m), *gi1 = w->gi + PL(1, m);
#pragma omp simd
            for (int l = 0; l < BW; l++) {
                s0r[l] += g[l] * yr0[l], s0i[l] += g[l] * yi0[l];
                s1r[l] += g[l] * yr1[l], s1i[l] += g[l] * yi1[l];
                gr0[l] += g[l] * zr0[l], gi0[l] -= g[l] * zi0[l];
                gr1[l] += g[l] * zr1[l], gi1[l] -= g[l] * zi1[l];
            }
        }
        REAL *dz = w->dfac + FAC(0, a, 0, 0);
        for (int l = 0; l < BW; l++)
            dz[l] = s0r[l], dz[BW + l] = -s0i[l], dz[2 * BW + l] = s1r[l], dz[3 * BW + l] = -s1i[l];
    }
    /* step 2: the plane onto its axes (the middle one only in 3D); then step 2b (c off the last axis) and 3 */
    for (int c = 0; c < k; c++)
        for (int t = 0; t < 2; t++)
            for (int l = 0; l < 2 * BW; l++) w->dfac[FAC(d - 1, c, t, 0) + l] = 0;
    for (int b = 0; b < (d == 3 ? k : 1); b++)
        for (int t = 0; t < 2; t++) {
            const REAL *u = d == 3 ? w->fac + FAC(1, b, t, 0) : 0;
            REAL dur[BW] = {0}, dui[BW] = {0};
            for (int c = 0; c < k; c++) {
                const REAL *v = w->fac + FAC(d - 1, c, t, 0), *wr = w->gr + PL(t, b * k + c);
                const REAL *wi = w->gi + PL(t, b * k + c);
                REAL *dv = w->dfac + FAC(d - 1, c, t, 0);
                if (d == 3) {
#pragma omp simd
                    for (int l = 0; l < BW; l++) {
                        dur[l] += wr[l] * v[l] + wi[l] * v[BW + l], dui[l] += wi[l] * v[l] - wr[l] * v[BW + l];
                        dv[l] += wr[l] * u[l] + wi[l] * u[BW + l], dv[BW + l] += wi[l] * u[l] - wr[l] * u[BW + l];
                    }
                } else {
                    for (int l = 0; l < BW; l++) dv[l] += wr[l], dv[BW + l] += wi[l];
                }
            }
            if (d == 3) {
                REAL *du = w->dfac + FAC(1, b, t, 0);
                for (int l = 0; l < BW; l++) du[l] = dur[l], du[BW + l] = dui[l];
            }
        }
    FACTORS_BACKWARD(w, d, k);
    for (int l = 0; l < n; l++)
        for (int c = 0; c < nq; c++) dq[c * pairs + p0 + l] = w->dqs[c * BW + l];
}

/* Backward: dq of the pairs in blocks b0 <= block < b1 from grad = dL/dW (layout of out), by BLOCK_BACKWARD;
 * full channels-last blocks read grad in place, the others through the tile. */
int FN(gabor_expand_backward)(const REAL *q, const REAL *e, const REAL *grad, REAL *dq, long pairs, long cin,
                              int d, int k, int contiguous, long b0, long b1) {
    const int plane = (d == 3 ? k : 1) * k, taps = k * plane;
    FN(work) w;
    REAL *base = WORKSPACE(&w, d, k);
    if (!base) return 1; /* out of memory: the caller raises */
    FLUSH_DENORMALS_BEGIN
    for (long block = b0; block < b1; block++) {
        long o, i0, p0;
        const int n = PREPARE(q, e, pairs, cin, d, k, block, &w, &o, &i0, &p0);
        const REAL *src = grad + o * taps * cin + i0;
        long stride = cin;
        if (contiguous) { /* the block's rows of taps, transposed into the tile; zeros past n */
            for (int l = 0; l < n; l++) {
                const REAL *row = grad + (p0 + l) * taps;
                for (int tap = 0; tap < taps; tap++) w.tile[tap * BW + l] = row[tap];
            }
            for (int tap = 0; tap < taps; tap++)
                for (int l = n; l < BW; l++) w.tile[tap * BW + l] = 0;
            src = w.tile, stride = BW;
        } else if (n < BW) { /* a partial block: copy its lanes into the tile, zeros past n */
            for (int tap = 0; tap < taps; tap++)
                for (int l = 0; l < BW; l++) w.tile[tap * BW + l] = l < n ? src[tap * cin + l] : 0;
            src = w.tile, stride = BW;
        }
        BLOCK_BACKWARD(&w, src, stride, d, k, dq, pairs, p0, n);
    }
    FLUSH_DENORMALS_END
    free(base);
    return 0;
}

/* The parameters' gradient of a 'same' convolution y = W * x + bias on a small volume, without storing
 * dL/dW: per block, its taps' gradient
 *     G[o, i, r] = sum_n sum_v gy[n, v, o] x[n, v + r, i]     (v and v + r inside the volume)
 * is formed in the tile (x and gy of the volume fit in L1 / L2 here) and reduced onto dq by BLOCK_BACKWARD.
 * Cheaper than materialising dL/dW when the volume is small: sum over taps of the valid v is 16^3 = 4096
 * per block and sample on 4^3 voxels (7^3 taps), against 343 taps read and written from memory.
 * x (batch, *sizes, cin) and gy (batch, *sizes, cout) are channels-last; k is the reach (taps per axis) of
 * the kernel, odd. 0, or 1 when out of memory. */
/* acc[c] = sum over samples s and the rows (va, vb) that offsets (ra, rb) keep inside the volume of
 * sum_vc g[s, va, vb, vc] x[s, va + ra, vb + rb, vc + c - h], for the k offsets c - h of the last axis (xs
 * laid out zero-padded by h at both ends of that axis). Products that would read the padding are skipped;
 * inlined with constant k and nc, the loops unroll, those tests vanish and the k accumulators stay in
 * vector registers. */
static inline __attribute__((always_inline)) void FN(correlate)(VEC *acc, const int k, const REAL *gs,
                                                                const REAL *xs, long batch, long na, long nb,
                                                                long nc, long ra, long rb) {
    const long ncp = nc + 2 * (k / 2), a0 = ra < 0 ? -ra : 0, a1 = ra > 0 ? na - ra : na;
    const long b0 = rb < 0 ? -rb : 0, b1 = rb > 0 ? nb - rb : nb;
    for (int c = 0; c < k; c++) acc[c] = (VEC){0};
    for (long s = 0; s < batch; s++)
        for (long va = a0; va < a1; va++)
            for (long vb = b0; vb < b1; vb++) {
                const REAL *g = gs + ((s * na + va) * nb + vb) * nc;
                const REAL *xr = xs + ((s * na + va + ra) * nb + vb + rb) * ncp * BW;
#pragma GCC unroll 8
                for (long vc = 0; vc < nc; vc++)
#pragma GCC unroll 7
                    for (int c = 0; c < k; c++) {
                        if (vc + c < k / 2 || vc + c >= nc + k / 2) continue; /* padding: known when unrolled */
                        VEC xv;
                        memcpy(&xv, xr + (vc + c) * BW, sizeof xv);
                        acc[c] += g[vc] * xv;
                    }
            }
}

int FN(gabor_conv_backward)(const REAL *q, const REAL *e, const REAL *x, const REAL *gy, REAL *dq, long pairs,
                            long cin, long cout, int d, int k, const long *sizes, long batch, long b0, long b1) {
    /* axes A (first), B (middle, 3D only: else one tap on one voxel), C (last); tap = (a kb + b) k + c */
    const int kb = d == 3 ? k : 1, h = k / 2, hb = kb / 2;
    const long na = sizes[0], nb = d == 3 ? sizes[1] : 1, nc = sizes[d - 1], rows = batch * na * nb;
    const long ncp = nc + 2 * h; /* the last axis zero-padded by h at both ends */
    FN(work) w;
    VEC *acc = (VEC *)aligned_alloc(sizeof(VEC), sizeof(VEC) * k); /* VEC is aligned to its size */
    REAL *base = WORKSPACE(&w, d, k), *xs = (REAL *)malloc(sizeof(REAL) * rows * (ncp * BW + nc));
    if (!base || !xs || !acc) {
        free(base), free(xs), free(acc);
        return 1; /* out of memory: the caller raises */
    }
    REAL *gs = xs + rows * ncp * BW; /* gy of the block's o, (batch, na, nb, nc) */
    FLUSH_DENORMALS_BEGIN
    for (long block = b0; block < b1; block++) {
        long o, i0, p0;
        const int n = PREPARE(q, e, pairs, cin, d, k, block, &w, &o, &i0, &p0);
        for (long row = 0; row < rows; row++) /* x of the block's lanes, zeros past n and in the padding */
            for (long vc = -h; vc < nc + h; vc++) {
                REAL *dst = xs + (row * ncp + vc + h) * BW;
                const REAL *src = x + (row * nc + vc) * cin + i0;
                const int inside = vc >= 0 && vc < nc;
                for (int l = 0; l < BW; l++) dst[l] = inside && l < n ? src[l] : 0;
                if (inside) gs[row * nc + vc] = gy[(row * nc + vc) * cout + o];
            }
        for (int a = 0; a < k; a++)
            for (int b = 0; b < kb; b++) {
                VEC local[7];
                const long ra = a - h, rb = b - hb; /* the taps' offsets on the first two axes */
                /* the paper's 7 taps on rows of 8, 6 and 4 voxels, and their reach 3 on rows of 2, with constant
                 * sizes: accumulators in registers, the loops unrolled and the padding skipped at compile time */
#define CORRELATE_AS(K, NC) FN(correlate)(local, K, gs, xs, batch, na, nb, NC, ra, rb)
                if (k == 7 && nc == 8)
                    CORRELATE_AS(7, 8);
                else if (k == 7 && nc == 6)
                    CORRELATE_AS(7, 6);
                else if (k == 7 && nc == 4)
                    CORRELATE_AS(7, 4);
                else if (k == 7)
                    CORRELATE_AS(7, nc);
                else if (k == 3 && nc == 2)
                    CORRELATE_AS(3, 2);
                else if (k == 3)
                    CORRELATE_AS(3, nc);
                else
                    FN(correlate)(acc, k, gs, xs, batch, na, nb, nc, ra, rb);
#undef CORRELATE_AS
                memcpy(w.tile + (a * kb + b) * k * BW, k == 7 || k == 3 ? local : acc, sizeof(VEC) * k);
            }
        BLOCK_BACKWARD(&w, w.tile, BW, d, k, dq, pairs, p0, n);
    }
    FLUSH_DENORMALS_END
    free(base), free(xs), free(acc);
    return 0;
}
