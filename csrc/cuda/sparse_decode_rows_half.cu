// v6 fused sparse decode ("row" kernel, MHA) for __half (see sd_rows.cuh)
#include "mustafar_cuda.cuh"
#include "sd_rows.cuh"

namespace mustafar_cuda {
MUSTAFAR_DEFINE_SDR_LAUNCHER(__half)
}  // namespace mustafar_cuda
