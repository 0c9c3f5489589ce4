// Stand-in for CUDA's math_constants.h (the constants csrc/cuda uses).
#pragma once
#define CUDART_INF_F __builtin_inff()
#define CUDART_NAN_F __builtin_nanf("")
