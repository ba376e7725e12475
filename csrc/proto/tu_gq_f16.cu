#include "proto_launch.cuh"
PROTO_DEFINE(proto_launch_gq_f16, 0, 0)
