// fused sparse decode kernels (v4 and v5) for __nv_bfloat16 (see mustafar_cuda.cuh)
#include "mustafar_cuda.cuh"
#include "sd_scatter.cuh"

namespace mustafar_cuda {
MUSTAFAR_DEFINE_SD_LAUNCHER(__nv_bfloat16)
MUSTAFAR_DEFINE_SDS_LAUNCHER(__nv_bfloat16)
}  // namespace mustafar_cuda
