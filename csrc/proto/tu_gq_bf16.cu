#include "proto_launch.cuh"
PROTO_DEFINE(proto_launch_gq_bf16, 1, 0)
