// The MLP's gate: act(gate) * up, SiLU or GELU's tanh approximation, over [gate | up] rows.
#include "common.cuh"

namespace {
__global__ void act_mul_kernel(float* out, const float* gate_up, uint64_t total, uint32_t ffn, uint32_t act) {
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (uint64_t)gridDim.x * blockDim.x) {
    const uint64_t t = i / ffn, j = i % ffn;
    const float g = gate_up[t * 2 * ffn + j], u = gate_up[t * 2 * ffn + ffn + j];
    float a;
    if (act == 0) {
      a = g / (1.0f + __expf(-g));
    } else {
      const float c = 0.7978845608028654f;  // sqrt(2 / pi)
      a = 0.5f * g * (1.0f + tanhf(c * (g + 0.044715f * g * g * g)));
    }
    out[i] = a * u;
  }
}
}  // namespace

extern "C" int32_t ifn_cu_act_mul(float* out, const float* gate_up, uint32_t n, uint32_t ffn, uint32_t act,
                                  ifn_cu_stream s) {
  const uint64_t total = (uint64_t)n * ffn;
  if (total == 0) return 0;
  const unsigned blocks = total / 256 + 1 < 65535 ? (unsigned)(total / 256 + 1) : 65535;
  IFN_LAUNCH(act_mul_kernel, blocks, 256, 0, s)(out, gate_up, total, ffn, act);
  return ifn_launched();
}
