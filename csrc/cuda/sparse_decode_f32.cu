// fused sparse decode kernels for float (see mustafar_cuda.cuh)
#include "mustafar_cuda.cuh"

namespace mustafar_cuda {
MUSTAFAR_DEFINE_SD_LAUNCHER(float)
}  // namespace mustafar_cuda
