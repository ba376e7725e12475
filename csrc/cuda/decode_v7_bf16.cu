// v7 instantiations for bf16 models (decode_v7.cuh).
#include "decode_v7_inst.cuh"
MF_V7_INSTANTIATE(__nv_bfloat16)
