#include "proto_launch.cuh"
PROTO_DEFINE(proto_launch_tc_f16, 0, 1)
