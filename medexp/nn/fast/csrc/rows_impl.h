/* Eq. 2's parameters -> the rows q, e that separable_impl.h expands, and the gradient back, for one floating
 * type (see separable.c). Written by hand for the same reason as separable_impl.h; the PyTorch reference is
 * medexp.nn.fast.generate.rows_torch.
 *
 * Per channel pair, with sigma > 0, the direction u of x' and the complex amplitudes of both terms:
 *   3D: u = (sin ty, -cos ty sin tz, cos ty cos tz) along (D, H, W);   2D: u = (sin theta, cos theta) along (H, W)
 *   q = (s, w_00, w_01, .., w_(d-1)1, Re c_0, Im c_0, Re c_1, Im c_1),  s = 1 / (2 sigma^2),  w_jt = 2 pi u_j f_t,
 *       stored one row per number, (1 + 2 d + 4, pairs), so the per-pair loops read and write contiguously;
 *       c_0 = a_re e^{i psi} (cosine term),  c_1 = -i a_im e^{i psi} (sine term);
 *   e = (exp(-s), cos w_00, sin w_00, .., cos w_(d-1)1, sin w_(d-1)1).
 * Loops run over pairs with `omp simd`, so with the C library's vector math (libmvec, SEP_MVEC) the sines,
 * cosines and exponentials are computed 16 pairs at a time. In 2D `ty` is theta and `tz` is unused.
 * Expects REAL, FN(name), SIN, COS and EXP defined by the including file.
 */

/* Forward for pairs p0 <= p < p1, for a constant d (inlined twice below, so the loop has no branches and
 * vectorises). */
static inline __attribute__((always_inline)) void FN(rows_d)(const REAL *sigma, const REAL *ty, const REAL *tz,
                                                             const REAL *a_re, const REAL *a_im, const REAL *f_re,
                                                             const REAL *f_im, const REAL *psi, REAL *q, REAL *e,
                                                             long pairs, long p0, long p1, const int d) {
    const REAL two_pi = (REAL)6.283185307179586476925;
#pragma omp simd
    for (long p = p0; p < p1; p++) {
        const REAL s = 1 / (2 * sigma[p] * sigma[p]), cp = COS(psi[p]), sp = SIN(psi[p]);
        const REAL cy = COS(ty[p]), sy = SIN(ty[p]);
        const REAL cz = d == 3 ? COS(tz[p]) : 0, sz = d == 3 ? SIN(tz[p]) : 0;
        /* u along the axes; in 2D (sin theta, cos theta), the last entry unused */
        const REAL u0 = sy, u1 = d == 3 ? -cy * sz : cy, u2 = cy * cz;
        const REAL g0 = two_pi * f_re[p], g1 = two_pi * f_im[p];
        const REAL w00 = u0 * g0, w01 = u0 * g1, w10 = u1 * g0, w11 = u1 * g1, w20 = u2 * g0, w21 = u2 * g1;
        q[p] = s, q[1 * pairs + p] = w00, q[2 * pairs + p] = w01, q[3 * pairs + p] = w10, q[4 * pairs + p] = w11;
        e[p] = EXP(-s), e[1 * pairs + p] = COS(w00), e[2 * pairs + p] = SIN(w00), e[3 * pairs + p] = COS(w01);
        e[4 * pairs + p] = SIN(w01), e[5 * pairs + p] = COS(w10), e[6 * pairs + p] = SIN(w10), e[7 * pairs + p] = COS(w11);
        e[8 * pairs + p] = SIN(w11);
        if (d == 3) {
            q[5 * pairs + p] = w20, q[6 * pairs + p] = w21;
            e[9 * pairs + p] = COS(w20), e[10 * pairs + p] = SIN(w20), e[11 * pairs + p] = COS(w21), e[12 * pairs + p] = SIN(w21);
        }
        const long c = (1 + 2 * d) * pairs + p;
        q[c] = a_re[p] * cp, q[c + pairs] = a_re[p] * sp, q[c + 2 * pairs] = a_im[p] * sp;
        q[c + 3 * pairs] = -a_im[p] * cp;
    }
}

int FN(gabor_rows)(const REAL *sigma, const REAL *ty, const REAL *tz, const REAL *a_re, const REAL *a_im,
                    const REAL *f_re, const REAL *f_im, const REAL *psi, REAL *q, REAL *e, long pairs, int d,
                    long p0, long p1) {
    if (d == 3)
        FN(rows_d)(sigma, ty, tz, a_re, a_im, f_re, f_im, psi, q, e, pairs, p0, p1, 3);
    else
        FN(rows_d)(sigma, ty, tz, a_re, a_im, f_re, f_im, psi, q, e, pairs, p0, p1, 2);
    return 0;
}

/* Backward: the parameters' gradients (d_ty .. d_psi, d_sigma) from dq = dL/dq, for pairs p0 <= p < p1:
 *   dL/dsigma = -dL/ds / sigma^3;  dL/df_t = 2 pi sum_j u_j dL/dw_jt;  dL/du_j = 2 pi (f_re dL/dw_j0 + f_im dL/dw_j1)
 *   onto the angles through du/dty = (cos ty, sin ty sin tz, -sin ty cos tz), du/dtz = (0, -cos ty cos tz,
 *   -cos ty sin tz) (2D: du/dtheta = (cos theta, -sin theta));
 *   dL/da_re = cos psi dL/dRe c_0 + sin psi dL/dIm c_0,  dL/da_im = sin psi dL/dRe c_1 - cos psi dL/dIm c_1,
 *   dL/dpsi = a_re (cos psi dL/dIm c_0 - sin psi dL/dRe c_0) + a_im (cos psi dL/dRe c_1 + sin psi dL/dIm c_1). */
static inline __attribute__((always_inline)) void FN(rows_backward_d)(
    const REAL *sigma, const REAL *ty, const REAL *tz, const REAL *a_re, const REAL *a_im, const REAL *f_re,
    const REAL *f_im, const REAL *psi, const REAL *dq, REAL *d_sigma, REAL *d_ty, REAL *d_tz, REAL *d_a_re,
    REAL *d_a_im, REAL *d_f_re, REAL *d_f_im, REAL *d_psi, long pairs, long p0, long p1, const int d) {
    const REAL two_pi = (REAL)6.283185307179586476925;
#pragma omp simd
    for (long p = p0; p < p1; p++) {
        const REAL *g = dq + p, *gc = g + (1 + 2 * d) * pairs; /* g[c * pairs]: dL/dq row c */
        const REAL cp = COS(psi[p]), sp = SIN(psi[p]);
        const REAL cy = COS(ty[p]), sy = SIN(ty[p]);
        const REAL cz = d == 3 ? COS(tz[p]) : 0, sz = d == 3 ? SIN(tz[p]) : 0;
        const REAL u0 = sy, u1 = d == 3 ? -cy * sz : cy, u2 = cy * cz;
        const REAL g20 = d == 3 ? g[5 * pairs] : 0, g21 = d == 3 ? g[6 * pairs] : 0;
        d_sigma[p] = -g[0] / (sigma[p] * sigma[p] * sigma[p]);
        d_f_re[p] = two_pi * (u0 * g[1 * pairs] + u1 * g[3 * pairs] + u2 * g20);
        d_f_im[p] = two_pi * (u0 * g[2 * pairs] + u1 * g[4 * pairs] + u2 * g21);
        const REAL du0 = two_pi * (f_re[p] * g[1 * pairs] + f_im[p] * g[2 * pairs]), du1 = two_pi * (f_re[p] * g[3 * pairs] + f_im[p] * g[4 * pairs]);
        const REAL du2 = two_pi * (f_re[p] * g20 + f_im[p] * g21);
        if (d == 3) {
            d_ty[p] = du0 * cy + du1 * sy * sz - du2 * sy * cz;
            d_tz[p] = -du1 * cy * cz - du2 * cy * sz;
        } else {
            d_ty[p] = du0 * cy - du1 * sy;
        }
        d_a_re[p] = cp * gc[0] + sp * gc[1 * pairs];
        d_a_im[p] = sp * gc[2 * pairs] - cp * gc[3 * pairs];
        d_psi[p] = a_re[p] * (cp * gc[1 * pairs] - sp * gc[0]) + a_im[p] * (cp * gc[2 * pairs] + sp * gc[3 * pairs]);
    }
}

int FN(gabor_rows_backward)(const REAL *sigma, const REAL *ty, const REAL *tz, const REAL *a_re,
                             const REAL *a_im, const REAL *f_re, const REAL *f_im, const REAL *psi, const REAL *dq,
                             REAL *d_sigma, REAL *d_ty, REAL *d_tz, REAL *d_a_re, REAL *d_a_im, REAL *d_f_re,
                             REAL *d_f_im, REAL *d_psi, long pairs, int d, long p0, long p1) {
    if (d == 3)
        FN(rows_backward_d)(sigma, ty, tz, a_re, a_im, f_re, f_im, psi, dq, d_sigma, d_ty, d_tz, d_a_re, d_a_im,
                            d_f_re, d_f_im, d_psi, pairs, p0, p1, 3);
    else
        FN(rows_backward_d)(sigma, ty, tz, a_re, a_im, f_re, f_im, psi, dq, d_sigma, d_ty, d_tz, d_a_re, d_a_im,
                            d_f_re, d_f_im, d_psi, pairs, p0, p1, 2);
    return 0;
}
