/* float32 and float64 instances of rows_impl.h, separable_impl.h, spectrum_impl.h and spectral_impl.h;
 * built and loaded by medexp/nn/fast/native.py. */

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* SEP_MVEC: the C library has vector variants of sin, cos and exp (glibc's libmvec, linked with -lmvec);
 * declaring them `omp declare simd` (and free of side effects, with -fno-builtin-sin.. so that the compiler
 * does not merge sin and cos into a complex sincos it cannot vectorise) lets the `omp simd` loops call them
 * on whole vectors. */
#if defined(SEP_MVEC)
#pragma omp declare simd notinbranch
float sinf(float) __attribute__((const));
#pragma omp declare simd notinbranch
float cosf(float) __attribute__((const));
#pragma omp declare simd notinbranch
float expf(float) __attribute__((const));
#pragma omp declare simd notinbranch
double sin(double) __attribute__((const));
#pragma omp declare simd notinbranch
double cos(double) __attribute__((const));
#pragma omp declare simd notinbranch
double exp(double) __attribute__((const));
#endif

/* layout flags of gabor_expand */
#define LAYOUT_CONTIGUOUS 1 /* (cout, cin, k..) instead of channels-last (cout, k.., cin) */
#define LAYOUT_STREAM 2     /* non-temporal stores (channels-last rows) */

/* non-temporal stores of one vector (STREAM_WIDTH bytes, aligned) from unaligned memory, where the CPU has
 * them; they are weakly ordered, so a call that made them completes them (STREAM_FENCE) before returning */
#if defined(__AVX512F__) || defined(__AVX__)
#include <immintrin.h>
#define STREAM_FENCE _mm_sfence();
#if defined(__AVX512F__)
#define STREAM_WIDTH 64
#define STREAM_F32(dst, src) _mm512_stream_ps(dst, _mm512_loadu_ps(src))
#define STREAM_F64(dst, src) _mm512_stream_pd(dst, _mm512_loadu_pd(src))
#else
#define STREAM_WIDTH 32
#define STREAM_F32(dst, src) _mm256_stream_ps(dst, _mm256_loadu_ps(src))
#define STREAM_F64(dst, src) _mm256_stream_pd(dst, _mm256_loadu_pd(src))
#endif
#else
#define STREAM_FENCE
#endif

/* Denormal floats (far taps of a narrow envelope, exp(-s r^2) below 1e-38) cost ~100 cycles per operation on
 * x86: the kernels flush them to zero (FTZ, DAZ) while they run and restore the caller's setting. */
#if defined(__SSE__)
#include <xmmintrin.h>
#define FLUSH_DENORMALS_BEGIN const unsigned int saved_csr = _mm_getcsr(); _mm_setcsr(saved_csr | 0x8040);
#define FLUSH_DENORMALS_END _mm_setcsr(saved_csr);
#else
#define FLUSH_DENORMALS_BEGIN
#define FLUSH_DENORMALS_END
#endif

#define BW 16 /* pairs per block: one AVX-512 register of floats */
#define PREFETCH 48 /* taps ahead that the backward prefetches */

#define REAL float
#define FN(name) name##_f32
#define SIN sinf
#define COS cosf
#define EXP expf
#include "rows_impl.h"
#include "separable_impl.h"
#include "spectrum_impl.h"
#include "spectral_impl.h"
#undef REAL
#undef FN
#undef SIN
#undef COS
#undef EXP

#define REAL double
#define FN(name) name##_f64
#define SIN sin
#define COS cos
#define EXP exp
#include "rows_impl.h"
#include "separable_impl.h"
#include "spectrum_impl.h"
#include "spectral_impl.h"
#undef REAL
#undef FN
#undef SIN
#undef COS
#undef EXP
