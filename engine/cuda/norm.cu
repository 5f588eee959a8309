// RMSNorm, alone and fused with the residual add that precedes it. One block a row.
#include "common.cuh"

namespace {
constexpr int kThreads = 256;

__device__ float row_inv_rms(const float* x, uint32_t dim, float eps, float* scratch) {
  float ss = 0;
  for (uint32_t i = threadIdx.x; i < dim; i += blockDim.x) ss += x[i] * x[i];
  ss = ifn_block_sum(ss, scratch);
  return rsqrtf(ss / (float)dim + eps);
}

__global__ void rmsnorm_kernel(float* out, uint32_t out_stride, const float* x, uint32_t x_stride,
                               const int32_t* rows, const float* w, uint32_t dim, float eps) {
  __shared__ float scratch[32];
  const uint32_t i = blockIdx.x;
  const float* xr = x + (uint64_t)(rows ? rows[i] : i) * x_stride;
  float* o = out + (uint64_t)i * out_stride;
  const float inv = row_inv_rms(xr, dim, eps, scratch);
  for (uint32_t k = threadIdx.x; k < dim; k += blockDim.x) o[k] = xr[k] * inv * w[k];
}

__global__ void add_rmsnorm_kernel(float* x, float* d, const float* post_w, float* out, const float* norm_w,
                                   uint32_t dim, float eps) {
  __shared__ float scratch[32];
  const uint64_t base = (uint64_t)blockIdx.x * dim;
  float* xr = x + base;
  float* dr = d + base;
  if (post_w) {
    const float inv = row_inv_rms(dr, dim, eps, scratch);
    for (uint32_t k = threadIdx.x; k < dim; k += blockDim.x) dr[k] = dr[k] * inv * post_w[k];
    __syncthreads();
  }
  for (uint32_t k = threadIdx.x; k < dim; k += blockDim.x) xr[k] += dr[k];
  if (!norm_w) return;
  __syncthreads();
  const float inv = row_inv_rms(xr, dim, eps, scratch);
  for (uint32_t k = threadIdx.x; k < dim; k += blockDim.x) out[base + k] = xr[k] * inv * norm_w[k];
}
}  // namespace

extern "C" int32_t ifn_cu_rmsnorm(float* out, uint32_t out_stride, const float* x, uint32_t x_stride,
                                  const int32_t* rows, const float* w, uint32_t n, uint32_t dim, float eps,
                                  ifn_cu_stream s) {
  if (n == 0) return 0;
  IFN_LAUNCH(rmsnorm_kernel, n, kThreads, 0, s)(out, out_stride, x, x_stride, rows, w, dim, eps);
  return ifn_launched();
}

extern "C" int32_t ifn_cu_add_rmsnorm(float* x, float* d, const float* post_w, float* out, const float* norm_w,
                                      uint32_t n, uint32_t dim, float eps, ifn_cu_stream s) {
  if (n == 0) return 0;
  IFN_LAUNCH(add_rmsnorm_kernel, n, kThreads, 0, s)(x, d, post_w, out, norm_w, dim, eps);
  return ifn_launched();
}
