// The emulator's scheduler, fibers and runtime API (see emu.h).
#include "emu.h"

#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

#include <vector>

// Switches fibers: pushes the callee-saved registers, saves the stack pointer to *from, loads
// `to` and pops what that fiber pushed (System V x86-64: rbx, rbp, r12-r15 are callee-saved).
extern "C" void ifn_emu_switch(void** from, void* to);
asm(R"(
  .text
  .globl ifn_emu_switch
  .type ifn_emu_switch,@function
ifn_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size ifn_emu_switch, .-ifn_emu_switch
)");

namespace ifn_emu {
thread_local dim3 block_idx;
thread_local dim3 block_dim;
thread_local dim3 grid_dim;

namespace {
constexpr size_t stack_bytes = 128 * 1024;
constexpr int threads_max = 1024;
constexpr size_t shared_bytes_max = 228 * 1024;

enum class Wait { none, block, warp, done };

struct Fiber {
  void* sp = nullptr;
  char* stack = nullptr;
  dim3 tid;
  int linear = 0;
  Wait wait = Wait::none;
};

// The block being run on this thread.
struct Block {
  Fiber fibers[threads_max];
  int count = 0;
  void* scheduler_sp = nullptr;
  Fiber* current = nullptr;
  const std::function<void()>* body = nullptr;
  uint64_t slots[threads_max];  // what each lane offers to a warp exchange
  alignas(16) unsigned char shared[shared_bytes_max];
};

thread_local Block* block = nullptr;

[[noreturn]] void fail(const char* what) {
  fprintf(stderr, "CUDA emulator: %s\n", what);
  abort();
}

void yield_to_scheduler(Wait w) {
  Fiber* f = block->current;
  f->wait = w;
  ifn_emu_switch(&f->sp, block->scheduler_sp);
}

// Where a fiber starts: its thread's part of the kernel, then back for good.
extern "C" void ifn_emu_fiber_entry() {
  (*block->body)();
  yield_to_scheduler(Wait::done);
  fail("a finished thread was resumed");
}

// A fresh stack that returns into ifn_emu_fiber_entry when first switched to.
void prepare(Fiber& f) {
  if (f.stack == nullptr) {
    void* p = mmap(nullptr, stack_bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) fail("cannot map a fiber stack");
    f.stack = static_cast<char*>(p);
  }
  // From the top: a fake return address for the entry (never used) at 8 mod 16, as a call
  // leaves it; the entry's address for `ret`; six registers for the pops.
  uintptr_t top = reinterpret_cast<uintptr_t>(f.stack + stack_bytes);
  uintptr_t fake_ret = (top - 16) & ~uintptr_t(15);
  fake_ret -= 8;
  void** sp = reinterpret_cast<void**>(fake_ret);
  sp[0] = nullptr;
  sp[-1] = reinterpret_cast<void*>(&ifn_emu_fiber_entry);
  for (int i = 2; i <= 7; i++) sp[-i] = nullptr;
  f.sp = sp - 7;
  f.wait = Wait::none;
}

// Opens the barriers every live thread of their scope waits at; false when none opens.
bool open_barriers() {
  Block& b = *block;
  bool all_at_block = true, any_live = false;
  for (int i = 0; i < b.count; i++) {
    if (b.fibers[i].wait == Wait::done) continue;
    any_live = true;
    if (b.fibers[i].wait != Wait::block) all_at_block = false;
  }
  if (!any_live) return false;
  bool opened = false;
  if (all_at_block) {
    for (int i = 0; i < b.count; i++)
      if (b.fibers[i].wait == Wait::block) b.fibers[i].wait = Wait::none;
    return true;
  }
  for (int w = 0; w * 32 < b.count; w++) {
    bool all = true, live = false;
    for (int i = w * 32; i < b.count && i < w * 32 + 32; i++) {
      Wait s = b.fibers[i].wait;
      if (s == Wait::done) continue;
      live = true;
      if (s != Wait::warp) all = false;
    }
    if (!live || !all) continue;
    for (int i = w * 32; i < b.count && i < w * 32 + 32; i++)
      if (b.fibers[i].wait == Wait::warp) b.fibers[i].wait = Wait::none;
    opened = true;
  }
  return opened;
}

void run_block(const std::function<void()>& body) {
  Block& b = *block;
  b.body = &body;
  for (int i = 0; i < b.count; i++) prepare(b.fibers[i]);
  for (;;) {
    bool ran = false;
    for (int i = 0; i < b.count; i++) {
      Fiber& f = b.fibers[i];
      if (f.wait != Wait::none) continue;
      b.current = &f;
      ifn_emu_switch(&b.scheduler_sp, f.sp);
      ran = true;
    }
    if (ran) continue;
    if (!open_barriers()) break;
  }
  for (int i = 0; i < b.count; i++)
    if (b.fibers[i].wait != Wait::done) fail("deadlock: threads wait at a barrier that cannot open");
  b.current = nullptr;
}

struct Recorded {
  std::vector<std::function<void()>> work;
};
thread_local Recorded* capturing = nullptr;  // the graph a stream on this thread records into
thread_local void* capturing_stream = nullptr;
thread_local cudaError_t last_error = cudaSuccess;

// Runs now, or records into the graph the stream is capturing.
void submit(void* stream, std::function<void()> work) {
  if (capturing != nullptr && stream == capturing_stream) capturing->work.push_back(std::move(work));
  else work();
}
}  // namespace

const dim3& thread_idx() {
  if (block == nullptr || block->current == nullptr) fail("threadIdx read outside a kernel");
  return block->current->tid;
}

int lane_id() { return block->current->linear % 32; }

void sync_block() { yield_to_scheduler(Wait::block); }
void sync_warp() { yield_to_scheduler(Wait::warp); }
void* dynamic_shared() { return block->shared; }

uint64_t exchange(uint64_t bits, int src) {
  Block& b = *block;
  int me = b.current->linear;
  int base = me - me % 32;
  b.slots[me] = bits;
  sync_warp();
  int from = base + src;
  uint64_t got = (from < b.count && b.fibers[from].wait != Wait::done) ? b.slots[from] : bits;
  sync_warp();
  return got;
}

uint32_t ballot(bool pred) {
  Block& b = *block;
  int me = b.current->linear;
  int base = me - me % 32;
  b.slots[me] = pred ? 1 : 0;
  sync_warp();
  uint32_t mask = 0;
  for (int i = 0; i < 32 && base + i < b.count; i++)
    if (b.fibers[base + i].wait != Wait::done && b.slots[base + i]) mask |= 1u << i;
  sync_warp();
  return mask;
}

void report_error(const char* what) { fail(what); }

void launch(dim3 grid, dim3 dims, size_t smem, void* stream, std::function<void()> body) {
  size_t threads = (size_t)dims.x * dims.y * dims.z;
  if (threads == 0 || threads > threads_max || smem > shared_bytes_max || grid.x == 0 || grid.y == 0 || grid.z == 0) {
    last_error = cudaErrorInvalidValue;
    return;
  }
  submit(stream, [=]() {
    if (block == nullptr) block = new Block();
    if (block->current != nullptr) fail("a kernel launched from inside a kernel");
    grid_dim = grid;
    block_dim = dims;
    block->count = (int)threads;
    for (int i = 0; i < block->count; i++) {
      Fiber& f = block->fibers[i];
      f.linear = i;
      f.tid = dim3(i % dims.x, (i / dims.x) % dims.y, i / (dims.x * dims.y));
    }
    for (unsigned z = 0; z < grid.z; z++)
      for (unsigned y = 0; y < grid.y; y++)
        for (unsigned x = 0; x < grid.x; x++) {
          block_idx = dim3(x, y, z);
          run_block(body);
        }
  });
}
}  // namespace ifn_emu

// ---------------------------------------------------------------- runtime API

namespace {
// One emulated device, with as much memory as the tests want to think it has.
constexpr size_t device_bytes = size_t(8) << 30;
size_t allocated = 0;
}  // namespace

struct CUstream_st {};
struct CUevent_st {
  double ms = 0;
};
struct CUgraph_st {
  ifn_emu::Recorded recorded;
};
struct CUgraphExec_st {
  std::vector<std::function<void()>> work;
};

using ifn_emu::last_error;

static cudaError_t fail_with(cudaError_t e) { return last_error = e; }

extern "C" {
cudaError_t cudaGetDeviceCount(int* count) {
  *count = 1;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : fail_with(cudaErrorInvalidDevice); }
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = 4; break;
    case cudaDevAttrComputeCapabilityMajor: *value = 9; break;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; break;
    case cudaDevAttrMaxSharedMemoryPerBlock: *value = 48 * 1024; break;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = 227 * 1024; break;
    default: return fail_with(cudaErrorInvalidValue);
  }
  return cudaSuccess;
}
cudaError_t cudaMemGetInfo(size_t* free_bytes, size_t* total_bytes) {
  *total_bytes = device_bytes;
  *free_bytes = device_bytes > allocated ? device_bytes - allocated : 0;
  return cudaSuccess;
}
cudaError_t cudaMalloc(void** p, size_t bytes) {
  // Poisoned, as fresh device memory holds whatever was there: reads of unwritten memory show.
  *p = aligned_alloc(256, (bytes + 255) / 256 * 256);
  if (*p == nullptr) return fail_with(cudaErrorMemoryAllocation);
  memset(*p, 0xcd, bytes);
  allocated += bytes;
  return cudaSuccess;
}
cudaError_t cudaFree(void* p) {
  free(p);
  return cudaSuccess;
}
cudaError_t cudaMallocHost(void** p, size_t bytes) {
  *p = aligned_alloc(64, (bytes + 63) / 64 * 64);
  return *p == nullptr ? fail_with(cudaErrorMemoryAllocation) : cudaSuccess;
}
cudaError_t cudaFreeHost(void* p) {
  free(p);
  return cudaSuccess;
}
cudaError_t cudaMemcpy(void* dst, const void* src, size_t bytes, cudaMemcpyKind) {
  memmove(dst, src, bytes);
  return cudaSuccess;
}
cudaError_t cudaMemcpyAsync(void* dst, const void* src, size_t bytes, cudaMemcpyKind, cudaStream_t stream) {
  ifn_emu::submit(stream, [=]() { memmove(dst, src, bytes); });
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int value, size_t bytes, cudaStream_t stream) {
  ifn_emu::submit(stream, [=]() { memset(p, value, bytes); });
  return cudaSuccess;
}
cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned) {
  *stream = new CUstream_st();
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  delete stream;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t) { return cudaSuccess; }
cudaError_t cudaDeviceSynchronize(void) { return cudaSuccess; }
cudaError_t cudaEventCreate(cudaEvent_t* event) {
  *event = new CUevent_st();
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  delete event;
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  ifn_emu::submit(stream, [=]() {
    timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    event->ms = t.tv_sec * 1e3 + t.tv_nsec / 1e6;
  });
  return cudaSuccess;
}
cudaError_t cudaEventSynchronize(cudaEvent_t) { return cudaSuccess; }
cudaError_t cudaEventElapsedTime(float* ms, cudaEvent_t start, cudaEvent_t end) {
  *ms = (float)(end->ms - start->ms);
  return cudaSuccess;
}
cudaError_t cudaStreamBeginCapture(cudaStream_t stream, cudaStreamCaptureMode) {
  if (ifn_emu::capturing != nullptr) return fail_with(cudaErrorStreamCaptureInvalidated);
  ifn_emu::capturing = new ifn_emu::Recorded();
  ifn_emu::capturing_stream = stream;
  return cudaSuccess;
}
cudaError_t cudaStreamEndCapture(cudaStream_t stream, cudaGraph_t* graph) {
  if (ifn_emu::capturing == nullptr || ifn_emu::capturing_stream != stream)
    return fail_with(cudaErrorStreamCaptureInvalidated);
  *graph = new CUgraph_st();
  (*graph)->recorded = std::move(*ifn_emu::capturing);
  delete ifn_emu::capturing;
  ifn_emu::capturing = nullptr;
  ifn_emu::capturing_stream = nullptr;
  return cudaSuccess;
}
cudaError_t cudaGraphInstantiate(cudaGraphExec_t* exec, cudaGraph_t graph, unsigned long long) {
  *exec = new CUgraphExec_st();
  (*exec)->work = graph->recorded.work;
  return cudaSuccess;
}
cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
  for (auto& w : exec->work) ifn_emu::submit(stream, w);
  return cudaSuccess;
}
cudaError_t cudaGraphExecDestroy(cudaGraphExec_t exec) {
  delete exec;
  return cudaSuccess;
}
cudaError_t cudaGraphDestroy(cudaGraph_t graph) {
  delete graph;
  return cudaSuccess;
}
cudaError_t cudaGetLastError(void) {
  cudaError_t e = last_error;
  last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return last_error; }
const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorMemoryAllocation: return "out of memory";
    case cudaErrorInvalidDevice: return "invalid device ordinal";
    case cudaErrorNoDevice: return "no CUDA-capable device is detected";
    case cudaErrorStreamCaptureInvalidated: return "operation failed due to a previous error during capture";
    default: return "unknown error";
  }
}
}
