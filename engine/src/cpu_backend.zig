//! The CPU backend: weights packed for the Zig kernels, the paged KV cache in host memory,
//! RoPE tables, the step's scratch, and the compute thread pool. Everything is allocated in
//! `init`; a step (forward.run) allocates nothing.

const std = @import("std");
const abi = @import("abi.zig");
const errors = @import("errors.zig");
const kernels = @import("kernels.zig");
const weights_mod = @import("weights.zig");
const ThreadPool = @import("thread_pool.zig").ThreadPool;
const SeqState = @import("seq_state.zig").SeqState;
const forward = @import("forward.zig");

pub const name = "cpu";

/// Devices this backend can run on: the host.
pub fn deviceCount() i32 {
    return 1;
}

/// The element type of a KV cache dtype.
pub fn KvType(comptime dtype: abi.DType) type {
    return switch (dtype) {
        .f32 => f32,
        .f16 => f16,
        else => @compileError("KV cache dtypes are f32 and f16"),
    };
}

pub fn checkConfig(c: abi.EngineConfig) abi.Status {
    if (c.cpu.num_threads == 0 or c.cpu.num_threads > 256) return errors.fail(.invalid_argument, "num_threads {d} not in [1, 256]", .{c.cpu.num_threads});
    if (c.kv_cache_dtype != @intFromEnum(abi.DType.f32) and c.kv_cache_dtype != @intFromEnum(abi.DType.f16))
        return errors.fail(.unsupported, "KV cache dtype {d}: f32 (0) and f16 (1) are supported", .{c.kv_cache_dtype});
    if (c.cpu.compute_dtype != @intFromEnum(abi.DType.f32) and c.cpu.compute_dtype != @intFromEnum(abi.DType.bf16))
        return errors.fail(.unsupported, "compute dtype {d}: f32 (0) and bf16 (30) are supported", .{c.cpu.compute_dtype});
    return .ok;
}

pub const CpuBackend = struct {
    allocator: std.mem.Allocator,
    model: abi.ModelConfig,
    config: abi.EngineConfig,
    weights: weights_mod.Weights,
    threads: ThreadPool,

    // Paged KV cache in kv_dtype (f32 or f16), layer after layer, each laid out as kvLayout() says.
    kv_dtype: abi.DType,
    k_cache: []u8,
    v_cache: []u8,
    rope_cos: []f32, // (max_position, head_dim / 2)
    rope_sin: []f32, // (max_position, head_dim / 2)
    rope_local_cos: []f32 = &.{}, // the same for local layers with their own base (Gemma 3), else empty
    rope_local_sin: []f32 = &.{},
    score_shape: kernels.ScoreShape, // how q . k becomes a score: scale and soft cap
    scratch: forward.Scratch,

    // The step being run (set by `step` for forward.run).
    batch: *abi.Batch = undefined,
    seq_state: *SeqState = undefined,

    pub fn kvLayout(e: *const CpuBackend) kernels.KvLayout {
        return .{ .block_size = e.config.block_size, .head_dim = e.model.head_dim, .num_kv_heads = e.model.num_kv_heads, .num_blocks = e.config.num_blocks };
    }

    /// Layer `layer` of a cache, as elements.
    pub fn kvLayer(e: *const CpuBackend, comptime T: type, cache: []u8, layer: usize) []T {
        const elems = e.kvLayout().layerLen();
        const all: [*]T = @ptrCast(@alignCast(cache.ptr));
        return all[layer * elems ..][0..elems];
    }

    /// Whether layer l attends over a sliding window (local) rather than the whole context.
    pub fn isLocal(e: *const CpuBackend, l: usize) bool {
        const m = e.model;
        if (m.sliding_window == 0) return false;
        return m.sliding_window_pattern == 0 or (l + 1) % m.sliding_window_pattern != 0;
    }

    /// The pool's byte budget: what the caller gave (there is no device to ask).
    pub fn kvBudgetBytes(e: *const CpuBackend) u64 {
        return e.config.kv_cache_bytes;
    }

    pub fn kvCacheBytes(e: *const CpuBackend) u64 {
        return @as(u64, e.k_cache.len + e.v_cache.len);
    }

    pub fn deviceInfo(e: *const CpuBackend) abi.DeviceInfo {
        _ = e;
        return .{ .memory_total_bytes = 0, .memory_used_bytes = 0, .weights_bytes = 0, .utilization = -1, .ordinal = 0 };
    }

    pub fn init(
        b: *CpuBackend,
        allocator: std.mem.Allocator,
        model: abi.ModelConfig,
        config: abi.EngineConfig,
        paths: []const [:0]const u8,
        tensors: []const abi.Tensor,
        status: *abi.Status,
    ) (error{ LoadFailed, OutOfMemory } || std.Thread.SpawnError)!void {
        b.* = undefined;
        b.allocator = allocator;
        b.model = model;
        b.config = config;
        b.batch = undefined;
        b.seq_state = undefined;
        const bf16 = config.cpu.compute_dtype == @intFromEnum(abi.DType.bf16);
        b.weights = try weights_mod.load(allocator, model, paths, tensors, bf16, config.cpu.num_threads, status);
        errdefer b.weights.deinit(allocator);
        b.kv_dtype = @enumFromInt(config.kv_cache_dtype);
        b.k_cache = &.{};
        b.v_cache = &.{};
        try b.initRope(model);
        errdefer b.deinitRope();
        b.score_shape = .{
            .scale = if (model.attn_scale != 0) model.attn_scale else kernels.ScoreShape.plain(model.head_dim).scale,
            .softcap = model.attn_softcap,
        };
        b.scratch = try forward.Scratch.init(allocator, model, config);
        errdefer b.scratch.deinit(allocator);
        try b.threads.init(allocator, config.cpu.num_threads);
        b.model.rope_inv_freq = null; // the caller's array is only valid during create
    }

    /// The KV pool's memory, once the engine has sized it.
    pub fn allocKv(b: *CpuBackend, num_blocks: u32) !void {
        std.debug.assert(b.k_cache.len == 0);
        b.config.num_blocks = num_blocks;
        const kv_elem_bytes: usize = if (b.kv_dtype == .f16) 2 else 4;
        const bytes = b.model.num_layers * b.kvLayout().layerLen() * kv_elem_bytes;
        // The page allocator maps lazily, so an unused pool costs address space, not memory.
        // Huge pages where the kernel gives them: a new block's first write then faults once
        // per 2 MiB rather than once per 4 KiB (a fault costs microseconds in a VM, and a
        // decode step writes a few pages per layer), and attention's reads miss the TLB less.
        const k = try weights_mod.allocHugePages(bytes);
        errdefer std.heap.page_allocator.free(k);
        b.v_cache = try weights_mod.allocHugePages(bytes);
        b.k_cache = k;
    }

    fn initRope(b: *CpuBackend, model: abi.ModelConfig) !void {
        const allocator = b.allocator;
        const half = model.head_dim / 2;
        const n = @as(usize, model.max_position) * half;
        b.rope_cos = try allocator.alloc(f32, n);
        errdefer allocator.free(b.rope_cos);
        b.rope_sin = try allocator.alloc(f32, n);
        errdefer allocator.free(b.rope_sin);
        fillRope(b.rope_cos, b.rope_sin, model);
        b.rope_local_cos = &.{};
        b.rope_local_sin = &.{};
        if (model.rope_local_theta == 0) return;
        b.rope_local_cos = try allocator.alloc(f32, n);
        errdefer allocator.free(b.rope_local_cos);
        b.rope_local_sin = try allocator.alloc(f32, n);
        var local = model;
        local.rope_theta = model.rope_local_theta;
        local.rope_inv_freq = null;
        local.rope_attn_factor = 0;
        fillRope(b.rope_local_cos, b.rope_local_sin, local);
    }

    fn deinitRope(b: *CpuBackend) void {
        b.allocator.free(b.rope_cos);
        b.allocator.free(b.rope_sin);
        b.allocator.free(b.rope_local_cos);
        b.allocator.free(b.rope_local_sin);
    }

    pub fn deinit(b: *CpuBackend) void {
        const allocator = b.allocator;
        b.threads.deinit(allocator);
        b.scratch.deinit(allocator);
        b.deinitRope();
        if (b.k_cache.len > 0) std.heap.page_allocator.free(b.k_cache);
        if (b.v_cache.len > 0) std.heap.page_allocator.free(b.v_cache);
        b.weights.deinit(allocator);
        b.* = undefined;
    }

    /// A sequence state was opened: the CPU's sampler reads it from the engine's SeqState.
    pub fn seqStateOpened(b: *CpuBackend, slot: u32, seq_state: *const SeqState) abi.Status {
        _ = b;
        _ = slot;
        _ = seq_state;
        return .ok;
    }

    /// The forward pass and sampling of a validated step.
    pub fn step(b: *CpuBackend, batch: *abi.Batch, seq_state: *SeqState) abi.Status {
        b.batch = batch;
        b.seq_state = seq_state;
        return forward.run(b);
    }
};

/// cos/sin of pos * theta^(-2i / head_dim), for every position and pair.
pub fn fillRope(cos: []f32, sin: []f32, m: abi.ModelConfig) void {
    const half = m.head_dim / 2;
    const scale: f64 = if (m.rope_attn_factor == 0) 1 else m.rope_attn_factor;
    for (0..half) |i| {
        const exponent = @as(f64, @floatFromInt(2 * i)) / @as(f64, @floatFromInt(m.head_dim));
        const freq = if (m.rope_inv_freq) |f| f[i] else 1.0 / std.math.pow(f64, m.rope_theta, exponent);
        for (0..m.max_position) |pos| {
            const angle = @as(f64, @floatFromInt(pos)) * freq;
            cos[pos * half + i] = @floatCast(@cos(angle) * scale);
            sin[pos * half + i] = @floatCast(@sin(angle) * scale);
        }
    }
}
