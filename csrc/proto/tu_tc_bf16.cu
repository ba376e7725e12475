#include "proto_launch.cuh"
PROTO_DEFINE(proto_launch_tc_bf16, 1, 1)
