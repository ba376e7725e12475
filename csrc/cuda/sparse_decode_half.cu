// fused sparse decode kernels for __half (see mustafar_cuda.cuh)
#include "mustafar_cuda.cuh"

namespace mustafar_cuda {
MUSTAFAR_DEFINE_SD_LAUNCHER(__half)
}  // namespace mustafar_cuda
