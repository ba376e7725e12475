#include "proto_launch.cuh"
PROTO_DEFINE(proto_launch_tc_fp8, 2, 1)
