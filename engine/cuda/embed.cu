// Embedding gather: each token's row of the table, in any weight type, to f32.
#include "quant.cuh"

namespace {
__global__ void embed_kernel(float* out, const uint8_t* table, uint32_t dtype, uint32_t hidden,
                             const int32_t* token_ids, float scale) {
  const uint32_t t = blockIdx.x;
  const uint8_t* row = table + (uint64_t)token_ids[t] * ifn_row_bytes(dtype, hidden);
  float* o = out + (uint64_t)t * hidden;
  if (!ifn_is_quantized(dtype)) {
    for (uint32_t i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = ifn_load_float(row, dtype, i) * scale;
    return;
  }
  float group[32];
  for (uint32_t g = threadIdx.x; g < hidden / 32; g += blockDim.x) {
    ifn_dequant_group(row, dtype, g, group);
    for (int l = 0; l < 32; l++) o[g * 32 + l] = group[l] * scale;
  }
}
}  // namespace

extern "C" int32_t ifn_cu_embed(float* out, const ifn_cu_matrix* table, const int32_t* token_ids, uint32_t n,
                                float scale, ifn_cu_stream s) {
  if (n == 0) return 0;
  if (ifn_block_elems(table->dtype) == 0) return (int32_t)cudaErrorInvalidValue;
  IFN_LAUNCH(embed_kernel, n, 128, 0, s)(out, static_cast<const uint8_t*>(table->data), table->dtype, table->cols,
                                          token_ids, scale == 0 ? 1.0f : scale);
  return ifn_launched();
}
