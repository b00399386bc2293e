// MOLM_HOST_DEVICE marks the torch-free core helpers that the CUDA kernels compile for the GPU as well (nvcc); the
// CPU build and the CPU emulator of the kernels see plain functions.
#pragma once

#if defined(__CUDACC__)
#define MOLM_HOST_DEVICE __host__ __device__
#else
#define MOLM_HOST_DEVICE
#endif
