// v6 fused sparse decode ("row" kernel, MHA) for __nv_bfloat16 (see sd_rows.cuh)
#include "mustafar_cuda.cuh"
#include "sd_rows.cuh"

namespace mustafar_cuda {
MUSTAFAR_DEFINE_SDR_LAUNCHER(__nv_bfloat16)
}  // namespace mustafar_cuda
