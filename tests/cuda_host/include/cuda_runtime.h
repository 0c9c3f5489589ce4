// Stand-in for the CUDA runtime header when csrc/cuda is compiled for the CPU (see ../cuda_host.h).
#pragma once
#include "../cuda_host.h"
