/* DDF's fused forward and backward and DDF-Up's sub-pixel phases, in
   float32 (_f32) and float64 (_f64) (mmdyn/ops/accel/ddf_cpu.py). */
#include <stdlib.h>
#define DDF_T float
#define DDF_SUF _f32
#include "ddf_body.h"
#undef DDF_T
#undef DDF_SUF
#define DDF_T double
#define DDF_SUF _f64
#include "ddf_body.h"
