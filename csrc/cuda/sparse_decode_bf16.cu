// fused sparse decode kernels for __nv_bfloat16 (see mustafar_cuda.cuh)
#include "mustafar_cuda.cuh"

namespace mustafar_cuda {
MUSTAFAR_DEFINE_SD_LAUNCHER(__nv_bfloat16)
}  // namespace mustafar_cuda
