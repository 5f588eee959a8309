// What every kernel file shares: the CUDA headers (or the host emulator's), the launch
// macro, element conversions, and block-wide reductions.
#pragma once

#ifdef IFN_EMULATE
#include "emu/emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math.h>
#include <stdint.h>
#define IFN_LAUNCH(kernel, grid, block, smem, stream) kernel<<<(grid), (block), (smem), (cudaStream_t)(stream)>>>
#define IFN_DYNAMIC_SHARED(T, name)                  \
  extern __shared__ __align__(16) unsigned char ifn_dynamic_shared_[]; \
  T* name = reinterpret_cast<T*>(ifn_dynamic_shared_)
#endif

#include "../include/inferneo.h"
#include "ifn_cuda.h"

#define IFN_DTYPE(name) ((uint32_t)IFN_DTYPE_##name)

// The status a launcher returns: the launch's own error, if any (0 when it was accepted).
static inline int32_t ifn_launched(void) { return (int32_t)cudaGetLastError(); }

__device__ __forceinline__ float ifn_f16(uint16_t bits) { return __half2float(__ushort_as_half(bits)); }
__device__ __forceinline__ float ifn_bf16(uint16_t bits) { return __uint_as_float((uint32_t)bits << 16); }
__device__ __forceinline__ uint16_t ifn_to_f16(float f) { return __half_as_ushort(__float2half_rn(f)); }
__device__ __forceinline__ uint16_t ifn_to_bf16(float f) { return __bfloat16_as_ushort(__float2bfloat16_rn(f)); }

// Element i of a row stored as f32, f16 or bf16.
__device__ __forceinline__ float ifn_load_float(const void* row, uint32_t dtype, uint64_t i) {
  if (dtype == IFN_DTYPE(F32)) return static_cast<const float*>(row)[i];
  uint16_t bits = static_cast<const uint16_t*>(row)[i];
  return dtype == IFN_DTYPE(F16) ? ifn_f16(bits) : ifn_bf16(bits);
}

__device__ __forceinline__ void ifn_store_float(void* row, uint32_t dtype, uint64_t i, float v) {
  if (dtype == IFN_DTYPE(F32)) static_cast<float*>(row)[i] = v;
  else if (dtype == IFN_DTYPE(F16)) static_cast<uint16_t*>(row)[i] = ifn_to_f16(v);
  else static_cast<uint16_t*>(row)[i] = ifn_to_bf16(v);
}

__device__ __forceinline__ float ifn_warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float ifn_warp_max(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024); every thread gets it.
// `scratch` holds 32 floats of shared memory; the call begins and ends with a barrier.
__device__ __forceinline__ float ifn_block_sum(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  __syncthreads();
  v = ifn_warp_sum(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : 0.0f;
  v = ifn_warp_sum(v);
  __syncthreads();
  return v;
}

__device__ __forceinline__ float ifn_block_max(float v, float* scratch) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  __syncthreads();
  v = ifn_warp_max(v);
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < warps ? scratch[lane] : -INFINITY;
  v = ifn_warp_max(v);
  __syncthreads();
  return v;
}

static inline unsigned ifn_div_up(uint64_t a, uint64_t b) { return (unsigned)((a + b - 1) / b); }
