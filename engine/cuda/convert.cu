// Weights into the type the products take (f32, f16 or bf16), and random weights for
// --load-format dummy (no files needed for a benchmark of a given shape).
#include "quant.cuh"

namespace {
__global__ void convert_kernel(void* out, uint32_t out_dtype, const uint8_t* in, uint32_t in_dtype, uint64_t rows,
                               uint32_t cols) {
  const uint64_t row_bytes = ifn_row_bytes(in_dtype, cols);
  const bool quantized = ifn_is_quantized(in_dtype);
  const uint64_t per_row = quantized ? cols / 32 : cols;  // groups of 32, or elements
  const uint64_t total = rows * per_row;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (uint64_t)gridDim.x * blockDim.x) {
    const uint64_t r = i / per_row, c = i % per_row;
    const uint8_t* row = in + r * row_bytes;
    if (!quantized) {
      ifn_store_float(out, out_dtype, r * cols + c, ifn_load_float(row, in_dtype, c));
      continue;
    }
    float group[32];
    ifn_dequant_group(row, in_dtype, (uint32_t)c, group);
    for (int l = 0; l < 32; l++) ifn_store_float(out, out_dtype, r * cols + c * 32 + l, group[l]);
  }
}

__device__ __forceinline__ uint64_t splitmix64(uint64_t x) {
  uint64_t z = x + 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

__global__ void random_fill_kernel(void* out, uint32_t dtype, uint64_t n, uint64_t seed, float mean, float std) {
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (uint64_t)gridDim.x * blockDim.x) {
    // Box-Muller over two uniforms from the element's own hash.
    const uint64_t bits = splitmix64(seed ^ splitmix64(i));
    const float u1 = ((float)(bits >> 40) + 1.0f) / 16777217.0f;
    const float u2 = (float)((bits >> 16) & 0xFFFFFF) / 16777216.0f;
    const float z = sqrtf(-2.0f * logf(u1)) * cosf(6.283185307f * u2);
    ifn_store_float(out, dtype, i, mean + std * z);
  }
}

unsigned grid_for(uint64_t total) { return (unsigned)(total / 256 + 1 < 65535 ? total / 256 + 1 : 65535); }
}  // namespace

extern "C" int32_t ifn_cu_convert(void* out, uint32_t out_dtype, const void* in, uint32_t in_dtype, uint64_t rows,
                                  uint32_t cols, ifn_cu_stream s) {
  if (ifn_block_elems(in_dtype) == 0 || ifn_is_quantized(out_dtype) || cols % ifn_block_elems(in_dtype) != 0)
    return (int32_t)cudaErrorInvalidValue;
  const uint64_t total = rows * (ifn_is_quantized(in_dtype) ? cols / 32 : cols);
  if (total == 0) return 0;
  IFN_LAUNCH(convert_kernel, grid_for(total), 256, 0, s)(out, out_dtype, static_cast<const uint8_t*>(in), in_dtype,
                                                         rows, cols);
  return ifn_launched();
}

extern "C" int32_t ifn_cu_random_fill(void* out, uint32_t dtype, uint64_t n, uint64_t seed, float mean, float std,
                                      ifn_cu_stream s) {
  if (ifn_block_elems(dtype) != 1) return (int32_t)cudaErrorInvalidValue;
  if (n == 0) return 0;
  IFN_LAUNCH(random_fill_kernel, grid_for(n), 256, 0, s)(out, dtype, n, seed, mean, std);
  return ifn_launched();
}
