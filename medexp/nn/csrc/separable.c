/* float32 and float64 instances of separable_impl.h; built and loaded by medexp/nn/native.py. */

#include <math.h>
#include <stdlib.h>

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
#define PREFETCH 16 /* taps ahead */

#define REAL float
#define FN(name) name##_f32
#include "separable_impl.h"
#undef REAL
#undef FN

#define REAL double
#define FN(name) name##_f64
#include "separable_impl.h"
#undef REAL
#undef FN
