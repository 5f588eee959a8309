// The device runtime the host side calls: devices, memory, streams, graphs, and NVML's
// utilization (libnvidia-ml.so.1, opened at run time: a machine without it still runs).
#include <dlfcn.h>

#include "common.cuh"

extern "C" {
const char* ifn_cu_error_string(int32_t status) { return cudaGetErrorString((cudaError_t)status); }

int32_t ifn_cu_device_count(int32_t* count) {
  int n = 0;
  const cudaError_t e = cudaGetDeviceCount(&n);
  *count = e == cudaSuccess ? n : 0;
  return (int32_t)e;
}

int32_t ifn_cu_set_device(int32_t ordinal) { return (int32_t)cudaSetDevice(ordinal); }

int32_t ifn_cu_device_props(int32_t ordinal, int32_t* sms, int32_t* major, int32_t* minor, int32_t* smem_optin) {
  cudaError_t e = cudaDeviceGetAttribute(sms, cudaDevAttrMultiProcessorCount, ordinal);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(major, cudaDevAttrComputeCapabilityMajor, ordinal);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(minor, cudaDevAttrComputeCapabilityMinor, ordinal);
  if (e == cudaSuccess) e = cudaDeviceGetAttribute(smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, ordinal);
  return (int32_t)e;
}

int32_t ifn_cu_mem_info(uint64_t* free_bytes, uint64_t* total_bytes) {
  size_t f = 0, t = 0;
  const cudaError_t e = cudaMemGetInfo(&f, &t);
  *free_bytes = f;
  *total_bytes = t;
  return (int32_t)e;
}

int32_t ifn_cu_malloc(void** out, uint64_t bytes) { return (int32_t)cudaMalloc(out, bytes); }
int32_t ifn_cu_free(void* p) { return p ? (int32_t)cudaFree(p) : 0; }
int32_t ifn_cu_host_alloc(void** out, uint64_t bytes) { return (int32_t)cudaMallocHost(out, bytes); }
int32_t ifn_cu_host_free(void* p) { return p ? (int32_t)cudaFreeHost(p) : 0; }

int32_t ifn_cu_stream_create(ifn_cu_stream* out) {
  cudaStream_t s = nullptr;
  const cudaError_t e = cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking);
  *out = s;
  return (int32_t)e;
}
int32_t ifn_cu_stream_destroy(ifn_cu_stream s) { return (int32_t)cudaStreamDestroy((cudaStream_t)s); }
int32_t ifn_cu_stream_sync(ifn_cu_stream s) { return (int32_t)cudaStreamSynchronize((cudaStream_t)s); }

int32_t ifn_cu_copy(void* dst, const void* src, uint64_t bytes, ifn_cu_stream s) {
  if (bytes == 0) return 0;
  return (int32_t)cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, (cudaStream_t)s);
}

int32_t ifn_cu_memset(void* p, int32_t value, uint64_t bytes, ifn_cu_stream s) {
  if (bytes == 0) return 0;
  return (int32_t)cudaMemsetAsync(p, value, bytes, (cudaStream_t)s);
}

int32_t ifn_cu_graph_begin(ifn_cu_stream s) {
  return (int32_t)cudaStreamBeginCapture((cudaStream_t)s, cudaStreamCaptureModeThreadLocal);
}

int32_t ifn_cu_graph_end(ifn_cu_stream s, void** exec) {
  cudaGraph_t graph = nullptr;
  cudaError_t e = cudaStreamEndCapture((cudaStream_t)s, &graph);
  if (e != cudaSuccess) return (int32_t)e;
  cudaGraphExec_t instance = nullptr;
  e = cudaGraphInstantiate(&instance, graph, 0);
  cudaGraphDestroy(graph);
  *exec = instance;
  return (int32_t)e;
}

int32_t ifn_cu_graph_launch(void* exec, ifn_cu_stream s) {
  return (int32_t)cudaGraphLaunch((cudaGraphExec_t)exec, (cudaStream_t)s);
}

int32_t ifn_cu_graph_destroy(void* exec) { return exec ? (int32_t)cudaGraphExecDestroy((cudaGraphExec_t)exec) : 0; }
}

// ---- NVML, declared here (no NVML headers at build time) ----
namespace {
typedef struct nvmlDevice_st* nvmlDevice_t;
struct NvmlUtilization {
  unsigned gpu, memory;
};
struct NvmlMemory {
  unsigned long long total, free, used;
};
struct Nvml {
  bool tried = false, ok = false;
  int (*init)(void) = nullptr;
  int (*handle)(unsigned, nvmlDevice_t*) = nullptr;
  int (*utilization)(nvmlDevice_t, NvmlUtilization*) = nullptr;
  int (*memory)(nvmlDevice_t, NvmlMemory*) = nullptr;
};
Nvml nvml;

bool open_nvml() {
  if (nvml.tried) return nvml.ok;
  nvml.tried = true;
  void* lib = dlopen("libnvidia-ml.so.1", RTLD_NOW | RTLD_LOCAL);
  if (!lib) return false;
  nvml.init = reinterpret_cast<int (*)(void)>(dlsym(lib, "nvmlInit_v2"));
  nvml.handle = reinterpret_cast<int (*)(unsigned, nvmlDevice_t*)>(dlsym(lib, "nvmlDeviceGetHandleByIndex_v2"));
  nvml.utilization = reinterpret_cast<int (*)(nvmlDevice_t, NvmlUtilization*)>(dlsym(lib, "nvmlDeviceGetUtilizationRates"));
  nvml.memory = reinterpret_cast<int (*)(nvmlDevice_t, NvmlMemory*)>(dlsym(lib, "nvmlDeviceGetMemoryInfo"));
  nvml.ok = nvml.init && nvml.handle && nvml.utilization && nvml.memory && nvml.init() == 0;
  return nvml.ok;
}
}  // namespace

extern "C" int32_t ifn_cu_device_usage(int32_t ordinal, float* utilization, uint64_t* used_bytes,
                                       uint64_t* total_bytes) {
  *utilization = -1;
  size_t f = 0, t = 0;
  const cudaError_t e = cudaMemGetInfo(&f, &t);
  *used_bytes = t - f;
  *total_bytes = t;
  nvmlDevice_t dev = nullptr;
  NvmlUtilization u{};
  if (open_nvml() && nvml.handle((unsigned)ordinal, &dev) == 0 && nvml.utilization(dev, &u) == 0)
    *utilization = (float)u.gpu / 100.0f;
  return (int32_t)e;
}
