/* float32 and float64 instances of separable_impl.h; built and loaded by medexp/nn/native.py. */

#include <math.h>
#include <stdlib.h>

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
