// fused sparse decode kernels (v4 and v5) for __half (see mustafar_cuda.cuh)
#include "mustafar_cuda.cuh"
#include "sd_scatter.cuh"

namespace mustafar_cuda {
MUSTAFAR_DEFINE_SD_LAUNCHER(__half)
MUSTAFAR_DEFINE_SDS_LAUNCHER(__half)
}  // namespace mustafar_cuda
