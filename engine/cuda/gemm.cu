// Products of activations (f32 rows) with weight matrices: out[t, r] = x[t] . w[r].
//
// cuBLASLt (libcublasLt.so.13 or .12, opened at run time; its few prototypes are declared
// below, so the build needs no cuBLAS headers) for float weights, with the activations
// converted to the weights' type (f32 stays f32: CUBLAS_COMPUTE_32F, no TF32), and for
// quantized weights when many tokens share them (prefill: the weights expanded to bf16 a
// slice of rows at a time). Our kernels for the rest: a quantized matrix-vector product that
// reads the packed blocks (decode), a tiled f32 GEMM (no cuBLASLt, the emulator, shapes it
// refuses).
#include <dlfcn.h>
#include <stdio.h>
#include <string.h>

#include "quant.cuh"

namespace {
// ---------------------------------------------------------------- our kernels

// Tokens a quantized matrix-vector product takes at once; more go through a GEMM.
constexpr uint32_t kGemvTokensMax = 8;

constexpr int kBM = 64, kBN = 64, kBK = 16;

// out[t, r] for a 64 x 64 tile of (rows, tokens), 16 columns at a time through shared memory;
// each of 256 threads holds a 4 x 4 block of sums.
__global__ void gemm_kernel(float* out, uint32_t ldo, const float* x, uint32_t ldx, uint32_t n, const void* w,
                            uint32_t wtype, uint32_t m, uint32_t k) {
  __shared__ float ws[kBK][kBM + 1];
  __shared__ float xs[kBK][kBN + 1];
  const uint32_t r0 = blockIdx.x * kBM, t0 = blockIdx.y * kBN;
  const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
  float acc[4][4] = {};
  for (uint32_t k0 = 0; k0 < k; k0 += kBK) {
    for (int e = tid; e < kBM * kBK; e += 256) {
      const uint32_t r = e / kBK, c = e % kBK;
      const bool in = r0 + r < m && k0 + c < k;
      ws[c][r] = in ? ifn_load_float(static_cast<const uint8_t*>(w) + (uint64_t)(r0 + r) * ifn_row_bytes(wtype, k),
                                     wtype, k0 + c)
                    : 0.0f;
      const bool tin = t0 + r < n && k0 + c < k;
      xs[c][r] = tin ? x[(uint64_t)(t0 + r) * ldx + k0 + c] : 0.0f;
    }
    __syncthreads();
    for (int c = 0; c < kBK; c++) {
      float a[4], b[4];
      for (int i = 0; i < 4; i++) a[i] = ws[c][tx * 4 + i];
      for (int j = 0; j < 4; j++) b[j] = xs[c][ty * 4 + j];
      for (int i = 0; i < 4; i++)
        for (int j = 0; j < 4; j++) acc[i][j] += a[i] * b[j];
    }
    __syncthreads();
  }
  for (int j = 0; j < 4; j++) {
    const uint32_t t = t0 + ty * 4 + j;
    if (t >= n) continue;
    for (int i = 0; i < 4; i++) {
      const uint32_t r = r0 + tx * 4 + i;
      if (r < m) out[(uint64_t)t * ldo + r] = acc[i][j];
    }
  }
}

// One warp a row of a quantized matrix: its lanes walk the row's groups of 32, each group
// expanded once for up to kGemvTokensMax tokens.
__global__ void gemv_quant_kernel(float* out, uint32_t ldo, const float* x, uint32_t ldx, uint32_t n,
                                  const uint8_t* w, uint32_t wtype, uint32_t m, uint32_t k) {
  const uint32_t row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (row >= m) return;
  const int lane = threadIdx.x % 32;
  const uint8_t* wr = w + (uint64_t)row * ifn_row_bytes(wtype, k);
  float acc[kGemvTokensMax] = {};
  float vals[32];
  for (uint32_t g = lane; g < k / 32; g += 32) {
    ifn_dequant_group(wr, wtype, g, vals);
    for (uint32_t t = 0; t < n; t++) {
      const float* xt = x + (uint64_t)t * ldx + g * 32;
      float s = 0;
      for (int l = 0; l < 32; l++) s += vals[l] * xt[l];
      acc[t] += s;
    }
  }
  for (uint32_t t = 0; t < n; t++) {
    const float s = ifn_warp_sum(acc[t]);
    if (lane == 0) out[(uint64_t)t * ldo + row] = s;
  }
}

__global__ void to_half_kernel(uint16_t* out, uint32_t dtype, const float* x, uint32_t ldx, uint32_t n, uint32_t k) {
  const uint64_t total = (uint64_t)n * k;
  for (uint64_t i = (uint64_t)blockIdx.x * blockDim.x + threadIdx.x; i < total; i += (uint64_t)gridDim.x * blockDim.x) {
    const float v = x[(i / k) * ldx + i % k];
    out[i] = dtype == IFN_DTYPE(F16) ? ifn_to_f16(v) : ifn_to_bf16(v);
  }
}

unsigned grid_for(uint64_t total) { return (unsigned)(total / 256 + 1 < 65535 ? total / 256 + 1 : 65535); }

// ---------------------------------------------------------------- cuBLASLt, declared here

typedef struct LtContext* LtHandle;
typedef struct LtDesc* LtMatmulDesc;
typedef struct LtLayout* LtMatrixLayout;
typedef struct LtPref* LtPreference;
struct LtAlgo {
  uint64_t data[8];
};
struct LtHeuristic {
  LtAlgo algo;
  size_t workspace_bytes;
  int state;
  float waves;
  int reserved[4];
};
// The enumerators cuBLASLt takes (cublasLt.h, cublas_api.h and library_types.h).
enum : int {
  kCudaR32F = 0,
  kCudaR16F = 2,
  kCudaR16BF = 14,
  kComputeF32 = 68,
  kOpN = 0,
  kOpT = 1,
  kDescTransA = 3,
  kDescTransB = 4,
  kPrefMaxWorkspace = 1,
};

struct Lt {
  void* lib = nullptr;
  LtHandle handle = nullptr;
  int (*create)(LtHandle*) = nullptr;
  int (*destroy)(LtHandle) = nullptr;
  int (*desc_create)(LtMatmulDesc*, int, int) = nullptr;
  int (*desc_set)(LtMatmulDesc, int, const void*, size_t) = nullptr;
  int (*desc_destroy)(LtMatmulDesc) = nullptr;
  int (*layout_create)(LtMatrixLayout*, int, uint64_t, uint64_t, int64_t) = nullptr;
  int (*layout_destroy)(LtMatrixLayout) = nullptr;
  int (*pref_create)(LtPreference*) = nullptr;
  int (*pref_set)(LtPreference, int, const void*, size_t) = nullptr;
  int (*pref_destroy)(LtPreference) = nullptr;
  int (*heuristic)(LtHandle, LtMatmulDesc, LtMatrixLayout, LtMatrixLayout, LtMatrixLayout, LtMatrixLayout,
                   LtPreference, int, LtHeuristic*, int*) = nullptr;
  int (*matmul)(LtHandle, LtMatmulDesc, const void*, const void*, LtMatrixLayout, const void*, LtMatrixLayout,
                const void*, const void*, LtMatrixLayout, void*, LtMatrixLayout, const LtAlgo*, void*, size_t,
                cudaStream_t) = nullptr;
};

template <class F>
bool sym(void* lib, const char* name, F* out) {
  *out = reinterpret_cast<F>(dlsym(lib, name));
  return *out != nullptr;
}

bool open_lt(Lt* lt, char* note, uint32_t capacity) {
  const char* names[] = {"libcublasLt.so.13", "libcublasLt.so.12", "libcublasLt.so"};
  const char* found = nullptr;
  for (const char* name : names) {
    lt->lib = dlopen(name, RTLD_NOW | RTLD_LOCAL);
    if (lt->lib) {
      found = name;
      break;
    }
  }
  if (!lt->lib) {
    snprintf(note, capacity, "cuBLASLt not found (libcublasLt.so.13 or .12): GEMMs run on our kernels");
    return false;
  }
  void* l = lt->lib;
  const bool ok = sym(l, "cublasLtCreate", &lt->create) && sym(l, "cublasLtDestroy", &lt->destroy) &&
                  sym(l, "cublasLtMatmulDescCreate", &lt->desc_create) &&
                  sym(l, "cublasLtMatmulDescSetAttribute", &lt->desc_set) &&
                  sym(l, "cublasLtMatmulDescDestroy", &lt->desc_destroy) &&
                  sym(l, "cublasLtMatrixLayoutCreate", &lt->layout_create) &&
                  sym(l, "cublasLtMatrixLayoutDestroy", &lt->layout_destroy) &&
                  sym(l, "cublasLtMatmulPreferenceCreate", &lt->pref_create) &&
                  sym(l, "cublasLtMatmulPreferenceSetAttribute", &lt->pref_set) &&
                  sym(l, "cublasLtMatmulPreferenceDestroy", &lt->pref_destroy) &&
                  sym(l, "cublasLtMatmulAlgoGetHeuristic", &lt->heuristic) && sym(l, "cublasLtMatmul", &lt->matmul);
  if (!ok || lt->create(&lt->handle) != 0) {
    snprintf(note, capacity, "%s lacks a function or would not start: GEMMs run on our kernels", found);
    dlclose(lt->lib);
    lt->lib = nullptr;
    return false;
  }
  snprintf(note, capacity, "GEMMs through %s", found);
  return true;
}

// What cuBLASLt chose for one shape, found once (outside any graph capture) and kept.
struct Plan {
  uint32_t m, n, k, ldx, ldo, wtype;
  bool ok;
  LtAlgo algo;
  size_t workspace_bytes;
};
constexpr int kPlansMax = 512;
}  // namespace

struct ifn_cu_gemm {
  Lt lt;
  bool fallback_only = false;
  uint16_t* acts = nullptr;  // activations converted to f16/bf16: (max_tokens, max_cols)
  void* expanded = nullptr;  // quantized weights expanded: (expand_rows, max_cols) bf16 (f32 without cuBLASLt)
  uint32_t expand_rows = 0;
  void* lt_workspace = nullptr;
  size_t lt_workspace_bytes = 0;
  uint64_t bytes = 0;
  Plan plans[kPlansMax];
  int num_plans = 0;
};

namespace {
int lt_type(uint32_t dtype) {
  return dtype == IFN_DTYPE(F16) ? kCudaR16F : dtype == IFN_DTYPE(BF16) ? kCudaR16BF : kCudaR32F;
}

// cuBLASLt's choice for out (m x n, ld ldo, f32) = w (m x k, of type wtype) times x^T (k x n,
// ld ldx, of the same type), in its column-major terms: D = op(A) B, A = w as (k x m) transposed.
const Plan* plan_for(ifn_cu_gemm* g, uint32_t m, uint32_t n, uint32_t k, uint32_t ldx, uint32_t ldo, uint32_t wtype) {
  for (int i = 0; i < g->num_plans; i++) {
    const Plan& p = g->plans[i];
    if (p.m == m && p.n == n && p.k == k && p.ldx == ldx && p.ldo == ldo && p.wtype == wtype) return &p;
  }
  if (g->num_plans == kPlansMax) return nullptr;
  Lt& lt = g->lt;
  Plan& p = g->plans[g->num_plans++];
  p = Plan{m, n, k, ldx, ldo, wtype, false, {}, 0};
  LtMatmulDesc desc = nullptr;
  LtMatrixLayout a = nullptr, b = nullptr, d = nullptr;
  LtPreference pref = nullptr;
  const int ta = kOpT, tb = kOpN;
  const uint64_t ws = g->lt_workspace_bytes;
  bool ok = lt.desc_create(&desc, kComputeF32, kCudaR32F) == 0 &&
            lt.desc_set(desc, kDescTransA, &ta, sizeof ta) == 0 && lt.desc_set(desc, kDescTransB, &tb, sizeof tb) == 0 &&
            lt.layout_create(&a, lt_type(wtype), k, m, k) == 0 && lt.layout_create(&b, lt_type(wtype), k, n, ldx) == 0 &&
            lt.layout_create(&d, kCudaR32F, m, n, ldo) == 0 && lt.pref_create(&pref) == 0 &&
            lt.pref_set(pref, kPrefMaxWorkspace, &ws, sizeof ws) == 0;
  int found = 0;
  LtHeuristic h{};
  if (ok) ok = lt.heuristic(lt.handle, desc, a, b, d, d, pref, 1, &h, &found) == 0 && found > 0 && h.state == 0;
  if (ok) {
    p.ok = true;
    p.algo = h.algo;
    p.workspace_bytes = h.workspace_bytes;
  }
  if (pref) lt.pref_destroy(pref);
  if (d) lt.layout_destroy(d);
  if (b) lt.layout_destroy(b);
  if (a) lt.layout_destroy(a);
  if (desc) lt.desc_destroy(desc);
  return &p;
}

// The product through cuBLASLt with x already in w's type; false if it has no plan for it.
bool lt_matmul(ifn_cu_gemm* g, float* out, uint32_t ldo, const void* x, uint32_t ldx, uint32_t n, const void* w,
               uint32_t wtype, uint32_t m, uint32_t k, cudaStream_t s) {
  const Plan* p = plan_for(g, m, n, k, ldx, ldo, wtype);
  if (p == nullptr || !p->ok) return false;
  Lt& lt = g->lt;
  LtMatmulDesc desc = nullptr;
  LtMatrixLayout a = nullptr, b = nullptr, d = nullptr;
  const int ta = kOpT, tb = kOpN;
  const float alpha = 1.0f, beta = 0.0f;
  bool ok = lt.desc_create(&desc, kComputeF32, kCudaR32F) == 0 &&
            lt.desc_set(desc, kDescTransA, &ta, sizeof ta) == 0 && lt.desc_set(desc, kDescTransB, &tb, sizeof tb) == 0 &&
            lt.layout_create(&a, lt_type(wtype), k, m, k) == 0 && lt.layout_create(&b, lt_type(wtype), k, n, ldx) == 0 &&
            lt.layout_create(&d, kCudaR32F, m, n, ldo) == 0;
  if (ok)
    ok = lt.matmul(lt.handle, desc, &alpha, w, a, x, b, &beta, out, d, out, d, &p->algo, g->lt_workspace,
                   p->workspace_bytes, s) == 0;
  if (d) lt.layout_destroy(d);
  if (b) lt.layout_destroy(b);
  if (a) lt.layout_destroy(a);
  if (desc) lt.desc_destroy(desc);
  return ok;
}

int32_t ours(float* out, uint32_t ldo, const float* x, uint32_t ldx, uint32_t n, const void* w, uint32_t wtype,
             uint32_t m, uint32_t k, cudaStream_t s) {
  if (ifn_is_quantized(wtype) && n <= kGemvTokensMax) {
    IFN_LAUNCH(gemv_quant_kernel, ifn_div_up(m, 8), 256, 0, s)(out, ldo, x, ldx, n, static_cast<const uint8_t*>(w),
                                                               wtype, m, k);
  } else {
    IFN_LAUNCH(gemm_kernel, dim3(ifn_div_up(m, kBM), ifn_div_up(n, kBN)), 256, 0, s)(out, ldo, x, ldx, n, w, wtype,
                                                                                  m, k);
  }
  return ifn_launched();
}

// Float weights: cuBLASLt with x converted to w's type (f32 as it is), else our GEMM.
int32_t float_matmul(ifn_cu_gemm* g, float* out, uint32_t ldo, const float* x, uint32_t ldx, uint32_t n,
                     const void* w, uint32_t wtype, uint32_t m, uint32_t k, cudaStream_t s) {
  if (g->lt.lib != nullptr && !g->fallback_only) {
    const void* xb = x;
    uint32_t ld = ldx;
    if (wtype != IFN_DTYPE(F32)) {
      IFN_LAUNCH(to_half_kernel, grid_for((uint64_t)n * k), 256, 0, s)(g->acts, wtype, x, ldx, n, k);
      const int32_t e = ifn_launched();
      if (e != 0) return e;
      xb = g->acts;
      ld = k;
    }
    if (lt_matmul(g, out, ldo, xb, ld, n, w, wtype, m, k, s)) return ifn_launched();
  }
  return ours(out, ldo, x, ldx, n, w, wtype, m, k, s);
}
}  // namespace

extern "C" {
int32_t ifn_cu_gemm_create(ifn_cu_gemm** out, uint32_t max_tokens, uint32_t max_cols, uint32_t max_rows, char* note,
                           uint32_t note_capacity) {
  ifn_cu_gemm* g = new ifn_cu_gemm();
  *out = nullptr;
  const bool lt = open_lt(&g->lt, note, note_capacity);
  // Prefill of quantized weights expands them a slice of rows at a time.
  g->expand_rows = max_rows < 16384 ? max_rows : 16384;
  const uint64_t acts = (uint64_t)max_tokens * max_cols * sizeof(uint16_t);
  const uint64_t expanded = (uint64_t)g->expand_rows * max_cols * (lt ? 2 : 4);
  g->lt_workspace_bytes = lt ? (size_t)32 << 20 : 0;
  cudaError_t e = cudaMalloc(reinterpret_cast<void**>(&g->acts), acts);
  if (e == cudaSuccess) e = cudaMalloc(&g->expanded, expanded);
  if (e == cudaSuccess && lt) e = cudaMalloc(&g->lt_workspace, g->lt_workspace_bytes);
  g->bytes = acts + expanded + g->lt_workspace_bytes;
  if (e != cudaSuccess) {
    ifn_cu_gemm_destroy(g);
    return (int32_t)e;
  }
  *out = g;
  return 0;
}

void ifn_cu_gemm_destroy(ifn_cu_gemm* g) {
  if (!g) return;
  cudaFree(g->acts);
  cudaFree(g->expanded);
  cudaFree(g->lt_workspace);
  if (g->lt.lib) {
    g->lt.destroy(g->lt.handle);
    dlclose(g->lt.lib);
  }
  delete g;
}

uint64_t ifn_cu_gemm_workspace_bytes(const ifn_cu_gemm* g) { return g->bytes; }

void ifn_cu_gemm_force_fallback(ifn_cu_gemm* g, int32_t on) { g->fallback_only = on != 0; }

int32_t ifn_cu_matmul(ifn_cu_gemm* g, float* out, uint32_t out_stride, const float* x, uint32_t x_stride, uint32_t n,
                      const ifn_cu_matrix* w, ifn_cu_stream stream) {
  cudaStream_t s = (cudaStream_t)stream;
  const uint32_t m = w->rows, k = w->cols, t = w->dtype;
  if (n == 0 || m == 0) return 0;
  if (ifn_block_elems(t) == 0 || k % ifn_block_elems(t) != 0) return (int32_t)cudaErrorInvalidValue;
  if (!ifn_is_quantized(t)) return float_matmul(g, out, out_stride, x, x_stride, n, w->data, t, m, k, s);
  if (n <= kGemvTokensMax) return ours(out, out_stride, x, x_stride, n, w->data, t, m, k, s);
  // Many tokens: the weights expanded, a slice of rows at a time, then a float product.
  const bool lt = g->lt.lib != nullptr && !g->fallback_only;
  const uint32_t expanded_type = lt ? IFN_DTYPE(BF16) : IFN_DTYPE(F32);
  for (uint32_t r0 = 0; r0 < m; r0 += g->expand_rows) {
    const uint32_t rows = m - r0 < g->expand_rows ? m - r0 : g->expand_rows;
    const uint8_t* slice = static_cast<const uint8_t*>(w->data) + (uint64_t)r0 * ifn_row_bytes(t, k);
    int32_t e = ifn_cu_convert(g->expanded, expanded_type, slice, t, rows, k, stream);
    if (e == 0) e = float_matmul(g, out + r0, out_stride, x, x_stride, n, g->expanded, expanded_type, rows, k, s);
    if (e != 0) return e;
  }
  return 0;
}
}
