// A CUDA emulator for the host, so that the kernels in engine/cuda build with a C++
// compiler and run (slowly) where there is no GPU: CI and the CPU tests check them
// against the Zig kernels, and the CUDA backend runs end to end over them.
//
// A kernel launch runs its grid block after block on the calling thread. A block's threads
// are fibers with stacks of their own, switched cooperatively (x86-64 only): a thread runs
// until it reaches __syncthreads(), a warp-level exchange (__shfl_*_sync, __ballot_sync,
// __syncwarp) or its end. A barrier opens when every live thread of its scope waits at it; a
// block whose threads wait where none can open is a deadlock, reported and aborted (a
// divergent __syncthreads() on a GPU). Atomics are plain reads and writes: nothing runs
// between a fiber's switches. Streams run their work at once; a stream being captured
// records it into a graph instead, replayed by cudaGraphLaunch.
//
// Only what engine/cuda uses is here. Device memory is host memory.
#pragma once
#ifndef __x86_64__
#error "the CUDA emulator switches fibers with x86-64 code"
#endif

#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include <functional>
#include <utility>

#define IFN_EMULATE 1
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __restrict__ __restrict
#define __launch_bounds__(...)
#define __align__(n) alignas(n)
#define __grid_constant__
// One copy per block: blocks run one at a time on the launching thread, and every fiber of a
// block runs on that thread.
#define __shared__ static thread_local
#define __constant__ static

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

namespace ifn_emu {
extern thread_local dim3 block_idx;
extern thread_local dim3 block_dim;
extern thread_local dim3 grid_dim;
const dim3& thread_idx();
int lane_id();
void sync_block();
void sync_warp();
void* dynamic_shared();
// Each lane of the calling warp offers `bits`; returns the bits of lane `src(lane)`.
uint64_t exchange(uint64_t bits, int src);
uint32_t ballot(bool pred);
void launch(dim3 grid, dim3 block, size_t smem, void* stream, std::function<void()> body);
void report_error(const char* what);

template <class T>
uint64_t to_bits(T v) {
  static_assert(sizeof(T) <= 8, "shuffled values are at most 8 bytes");
  uint64_t b = 0;
  memcpy(&b, &v, sizeof(T));
  return b;
}
template <class T>
T from_bits(uint64_t b) {
  T v;
  memcpy(&v, &b, sizeof(T));
  return v;
}

// IFN_LAUNCH(kernel, grid, block, smem, stream)(args...): arguments are copied now, as a launch does.
struct Launch {
  dim3 grid, block;
  size_t smem;
  void* stream;
  template <class K, class... Args>
  void run(K kernel, Args... args) {
    launch(grid, block, smem, stream, [=]() { kernel(args...); });
  }
};
template <class K>
struct Bound {
  Launch l;
  K kernel;
  template <class... Args>
  void operator()(Args&&... args) {
    l.run(kernel, std::forward<Args>(args)...);
  }
};
template <class K>
Bound<K> bind(K kernel, dim3 g, dim3 b, size_t s, void* st) {
  return Bound<K>{Launch{g, b, s, st}, kernel};
}
}  // namespace ifn_emu

#define IFN_LAUNCH(kernel, grid, block, smem, stream) \
  ::ifn_emu::bind(kernel, dim3(grid), dim3(block), (smem), (void*)(stream))
#define IFN_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::ifn_emu::dynamic_shared())

#define threadIdx (::ifn_emu::thread_idx())
#define blockIdx (::ifn_emu::block_idx)
#define blockDim (::ifn_emu::block_dim)
#define gridDim (::ifn_emu::grid_dim)
#define warpSize 32
#define __syncthreads() ::ifn_emu::sync_block()
#define __syncwarp(...) ::ifn_emu::sync_warp()

// ---- warp exchanges (every live lane of the warp must take part, as on a GPU) ----
template <class T>
T __shfl_sync(unsigned, T v, int src, int width = 32) {
  int lane = ::ifn_emu::lane_id();
  int s = (lane / width) * width + (src % width);
  return ::ifn_emu::from_bits<T>(::ifn_emu::exchange(::ifn_emu::to_bits(v), s));
}
template <class T>
T __shfl_xor_sync(unsigned, T v, int mask, int width = 32) {
  int lane = ::ifn_emu::lane_id();
  int s = lane ^ mask;
  if (s / width != lane / width) s = lane;
  return ::ifn_emu::from_bits<T>(::ifn_emu::exchange(::ifn_emu::to_bits(v), s));
}
template <class T>
T __shfl_down_sync(unsigned, T v, unsigned delta, int width = 32) {
  int lane = ::ifn_emu::lane_id();
  int s = lane + (int)delta;
  if (s / width != lane / width) s = lane;
  return ::ifn_emu::from_bits<T>(::ifn_emu::exchange(::ifn_emu::to_bits(v), s));
}
template <class T>
T __shfl_up_sync(unsigned, T v, unsigned delta, int width = 32) {
  int lane = ::ifn_emu::lane_id();
  int s = lane - (int)delta;
  if (s < 0 || s / width != lane / width) s = lane;
  return ::ifn_emu::from_bits<T>(::ifn_emu::exchange(::ifn_emu::to_bits(v), s));
}
inline unsigned __ballot_sync(unsigned, int pred) { return ::ifn_emu::ballot(pred != 0); }
inline int __any_sync(unsigned m, int pred) { return __ballot_sync(m, pred) != 0; }
inline int __all_sync(unsigned m, int pred) { return __ballot_sync(m, !pred) == 0; }

// ---- atomics: nothing runs between a fiber's switches ----
template <class T>
T atomicAdd(T* p, T v) {
  T old = *p;
  *p = old + v;
  return old;
}
template <class T>
T atomicMax(T* p, T v) {
  T old = *p;
  if (v > old) *p = v;
  return old;
}
template <class T>
T atomicMin(T* p, T v) {
  T old = *p;
  if (v < old) *p = v;
  return old;
}
template <class T>
T atomicExch(T* p, T v) {
  T old = *p;
  *p = v;
  return old;
}
template <class T>
T atomicCAS(T* p, T compare, T v) {
  T old = *p;
  if (old == compare) *p = v;
  return old;
}
inline void __threadfence() {}
inline void __threadfence_block() {}

// ---- arithmetic ----
inline float __expf(float x) { return expf(x); }
inline float __logf(float x) { return logf(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __saturatef(float x) { return x < 0 ? 0 : x > 1 ? 1 : x; }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline unsigned __float_as_uint(float f) { return ::ifn_emu::from_bits<unsigned>(::ifn_emu::to_bits(f)); }
inline float __uint_as_float(unsigned u) { return ::ifn_emu::from_bits<float>(::ifn_emu::to_bits(u)); }
inline int __float_as_int(float f) { return ::ifn_emu::from_bits<int>(::ifn_emu::to_bits(f)); }
inline float __int_as_float(int i) { return ::ifn_emu::from_bits<float>(::ifn_emu::to_bits(i)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz((unsigned)x); }
template <class T>
T __ldg(const T* p) {
  return *p;
}

// ---- half and bfloat16: storage and conversions (round to nearest even) ----
struct __half {
  unsigned short x;
};
struct __nv_bfloat16 {
  unsigned short x;
};
inline __half __ushort_as_half(unsigned short b) { return __half{b}; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short b) { return __nv_bfloat16{b}; }
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 h) { return h.x; }
inline float __half2float(__half h) { return (float)__builtin_bit_cast(_Float16, h.x); }
inline __half __float2half_rn(float f) { return __half{__builtin_bit_cast(unsigned short, (_Float16)f)}; }
inline __half __float2half(float f) { return __float2half_rn(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return __uint_as_float((unsigned)h.x << 16); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{(unsigned short)((u >> 16) | 0x40)};  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return __nv_bfloat16{(unsigned short)(u >> 16)};
}
inline __nv_bfloat16 __float2bfloat16(float f) { return __float2bfloat16_rn(f); }

// ---- the runtime API, as much as engine/cuda/runtime.cu calls ----
typedef enum cudaError {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorMemoryAllocation = 2,
  cudaErrorInvalidDevice = 101,
  cudaErrorNoDevice = 100,
  cudaErrorNotSupported = 801,
  cudaErrorStreamCaptureInvalidated = 901,
  cudaErrorLaunchFailure = 719,
} cudaError_t;
typedef enum cudaMemcpyKind {
  cudaMemcpyHostToHost = 0,
  cudaMemcpyHostToDevice = 1,
  cudaMemcpyDeviceToHost = 2,
  cudaMemcpyDeviceToDevice = 3,
  cudaMemcpyDefault = 4,
} cudaMemcpyKind;
typedef enum cudaStreamCaptureMode {
  cudaStreamCaptureModeGlobal = 0,
  cudaStreamCaptureModeThreadLocal = 1,
  cudaStreamCaptureModeRelaxed = 2,
} cudaStreamCaptureMode;
typedef enum cudaDeviceAttr {
  cudaDevAttrMaxSharedMemoryPerBlock = 8,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
} cudaDeviceAttr;
typedef enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
} cudaFuncAttribute;
typedef struct CUstream_st* cudaStream_t;
typedef struct CUevent_st* cudaEvent_t;
typedef struct CUgraph_st* cudaGraph_t;
typedef struct CUgraphExec_st* cudaGraphExec_t;
#define cudaStreamNonBlocking 0x01
#define cudaEventDefault 0x00
#define cudaHostAllocDefault 0x00

extern "C" {
cudaError_t cudaGetDeviceCount(int* count);
cudaError_t cudaSetDevice(int device);
cudaError_t cudaGetDevice(int* device);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int device);
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes);
cudaError_t cudaMalloc(void** p, size_t bytes);
cudaError_t cudaFree(void* p);
cudaError_t cudaMallocHost(void** p, size_t bytes);
cudaError_t cudaFreeHost(void* p);
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind);
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind kind, cudaStream_t stream);
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream);
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned flags);
cudaError_t cudaStreamDestroy(cudaStream_t stream);
cudaError_t cudaStreamSynchronize(cudaStream_t stream);
cudaError_t cudaDeviceSynchronize(void);
cudaError_t cudaEventCreate(cudaEvent_t* event);
cudaError_t cudaEventDestroy(cudaEvent_t event);
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream);
cudaError_t cudaEventSynchronize(cudaEvent_t event);
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end);
cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode mode);
cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph);
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long flags);
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream);
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec);
cudaError_t cudaGraphDestroy(cudaGraph_t graph);
cudaError_t cudaGetLastError(void);
cudaError_t cudaPeekAtLastError(void);
const char* cudaGetErrorString(cudaError_t error);
}
template <class K>
cudaError_t cudaFuncSetAttribute(K, cudaFuncAttribute, int) {
  return cudaSuccess;
}
