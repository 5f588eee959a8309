//! The CUDA backend: the host side of the GPU engine. It uploads the weights once, holds the
//! paged KV cache, activations and step buffers on the device (all allocated at start), and
//! runs a step as engine/cuda's kernels on one stream: embed; per layer [norm, qkv, RoPE, K/V
//! into the cache, attention, out, residual + norm, gate-up, act, down]; the final norm and
//! LM head for the sampled rows only; sampling on the device. Only token ids and asked-for
//! logprobs (and logits, when asked) come back. Decode-only steps replay CUDA graphs captured
//! at start, one per batch-size bucket.

const std = @import("std");
const assert = std.debug.assert;
const abi = @import("abi.zig");
const errors = @import("errors.zig");
const kernels = @import("kernels.zig");
const quant = @import("quant.zig");
const weights_mod = @import("weights.zig");
const batch_mod = @import("batch.zig");
const SeqState = @import("seq_state.zig").SeqState;
const fillRope = @import("cpu_backend.zig").fillRope;
const cu = @import("cuda_api.zig").cu;
const Matrix = kernels.Matrix;

pub const name = "cuda";

/// Devices this backend can use now; 0 leaves the reason in the thread's error message.
pub fn deviceCount() i32 {
    var n: i32 = 0;
    const status = cu.ifn_cu_device_count(&n);
    if (status != 0 or n == 0) {
        const why: []const u8 = if (status != 0) std.mem.span(cu.ifn_cu_error_string(status)) else "none visible";
        _ = errors.fail(.unsupported, "no CUDA device: {s}", .{why});
        return 0;
    }
    return n;
}

pub fn checkConfig(c: abi.EngineConfig) abi.Status {
    if (c.kv_cache_dtype != @intFromEnum(abi.DType.f32) and c.kv_cache_dtype != @intFromEnum(abi.DType.f16))
        return errors.fail(.unsupported, "KV cache dtype {d}: f32 (0) and f16 (1) are supported", .{c.kv_cache_dtype});
    const d = c.cuda.compute_dtype;
    if (d != @intFromEnum(abi.DType.f32) and d != @intFromEnum(abi.DType.bf16) and d != @intFromEnum(abi.DType.f16))
        return errors.fail(.unsupported, "CUDA compute dtype {d}: f32 (0, the weights' own), bf16 (30) or f16 (1)", .{d});
    if (!(c.cuda.memory_utilization >= 0 and c.cuda.memory_utilization <= 1))
        return errors.fail(.invalid_argument, "memory_utilization {d} not in [0, 1]", .{c.cuda.memory_utilization});
    return .ok;
}

/// Batch sizes whose decode steps have a CUDA graph (padded up to the next one).
const graph_buckets = [_]u32{ 1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 256, 320, 384, 448, 512 };
/// The decode attention's splits: a context is cut into at most this many, of at least 512 positions.
const decode_splits_max = 16;
/// Device memory kept free for the CUDA runtime, cuBLASLt and graphs beyond what we allocate.
const reserve_bytes: u64 = 512 << 20;

fn check(status: i32, comptime what: []const u8) abi.Status {
    if (status == 0) return .ok;
    return errors.fail(.internal, "CUDA: " ++ what ++ ": {s}", .{std.mem.span(cu.ifn_cu_error_string(status))});
}

/// One weight matrix on the device, as the GEMMs take it.
const DeviceMatrix = cu.ifn_cu_matrix;

/// A layer on the device. Matrices that read the same input and share a type are one
/// matrix (q|k|v, gate|up): one product instead of two or three.
const Layer = struct {
    attn_norm: [*]f32,
    ffn_norm: [*]f32,
    attn_post_norm: ?[*]f32,
    ffn_post_norm: ?[*]f32,
    q_norm: ?[*]f32,
    k_norm: ?[*]f32,
    qkv_bias: ?[*]f32,
    qkv: [3]?DeviceMatrix, // merged: qkv[0] holds all rows
    wo: DeviceMatrix,
    gate_up: [2]?DeviceMatrix,
    down: DeviceMatrix,
};

/// Where each array of a step's inputs sits, in bytes from the start of the block (the same
/// on the host, pinned, and on the device).
const Inputs = struct {
    token_ids: usize,
    positions: usize,
    slots: usize,
    seq_of_token: usize,
    decode_tokens: usize,
    tile_first: usize,
    tile_count: usize,
    block_tables: usize,
    sample_rows: usize,
    params: usize,
    bias_ids: usize,
    bias_values: usize,
    bytes: usize,

    fn init(t: usize, s: usize, max_blocks: usize, bias: usize) Inputs {
        var at: usize = 0;
        var in: Inputs = undefined;
        inline for (.{ .{ "token_ids", t * 4 }, .{ "positions", t * 4 }, .{ "slots", t * 4 }, .{ "seq_of_token", t * 4 }, .{ "decode_tokens", t * 4 }, .{ "tile_first", t * 4 }, .{ "tile_count", t * 4 }, .{ "block_tables", s * max_blocks * 4 }, .{ "sample_rows", s * 4 }, .{ "params", s * @sizeOf(abi.SamplingParams) }, .{ "bias_ids", bias * 4 }, .{ "bias_values", bias * 4 } }) |f| {
            @field(in, f[0]) = at;
            at = std.mem.alignForward(usize, at + f[1], 256);
        }
        in.bytes = at;
        return in;
    }
};

/// Where the sampler's outputs sit in their block (device and pinned host alike).
const Outputs = struct {
    tokens: usize,
    logprobs: usize,
    top_ids: usize,
    top_logprobs: usize,
    bytes: usize,

    fn init(s: usize) Outputs {
        const k = abi.top_logprobs_max;
        return .{ .tokens = 0, .logprobs = s * 4, .top_ids = 2 * s * 4, .top_logprobs = 2 * s * 4 + s * k * 4, .bytes = 2 * s * 4 + 2 * s * k * 4 };
    }
};

pub const CudaBackend = struct {
    allocator: std.mem.Allocator,
    model: abi.ModelConfig,
    config: abi.EngineConfig,
    ordinal: i32,
    stream: cu.ifn_cu_stream,
    aux: cu.ifn_cu_stream, // sequence-state uploads, which may come while a step runs
    gemm: *cu.ifn_cu_gemm,
    gemm_note: [256]u8,
    owned: std.ArrayList(*anyopaque), // every device allocation, freed at deinit
    allocated_bytes: u64,
    weights_bytes: u64,
    used_before_bytes: u64, // on the device before we started (other processes)
    total_bytes: u64,

    embed: DeviceMatrix,
    output: DeviceMatrix,
    output_norm: [*]f32,
    layers: []Layer,
    rope_cos: [*]f32,
    rope_sin: [*]f32,
    rope_local_cos: ?[*]f32,
    rope_local_sin: ?[*]f32,
    score_scale: f32,

    k_cache: ?*anyopaque = null,
    v_cache: ?*anyopaque = null,
    kv_layer_bytes: u64 = 0,

    // Activations, (max_num_batched_tokens, ...) f32 unless said.
    x: [*]f32,
    xb: [*]f32,
    xb2: [*]f32,
    qkv: [*]f32,
    att: [*]f32,
    gate_up: [*]f32,
    h: [*]f32,
    xs: [*]f32, // (max_num_seqs, hidden): the sampled rows, final-normed
    logits: [*]f32, // (max_num_seqs, vocab)
    work: [*]f32, // (max_num_seqs, vocab): the sampler's
    attn_ws: [*]f32,
    split_len: u32,
    tile_queries: u32,

    inputs: Inputs,
    in_host: [*]u8,
    in_dev: [*]u8,
    outputs: Outputs,
    out_host: [*]u8,
    out_dev: [*]u8,
    masks_dev: [*]u32, // (max_num_seqs, mask_words)
    masks_host: [*]u32,
    counts: [*]u16, // (max_num_seqs, vocab): each sequence state's drawn tokens
    prompt_seen: [*]u32, // (max_num_seqs, mask_words)
    state_host: [*]i32, // a sequence state's tokens on their way up
    state_dev: [*]i32,
    graphs: [graph_buckets.len]?*anyopaque = .{null} ** graph_buckets.len,

    // The step being run.
    batch: *abi.Batch = undefined,

    pub fn kvCacheBytes(b: *const CudaBackend) u64 {
        return 2 * b.kv_layer_bytes * b.model.num_layers;
    }

    pub fn deviceInfo(b: *const CudaBackend) abi.DeviceInfo {
        var utilization: f32 = -1;
        var used: u64 = 0;
        var total: u64 = 0;
        _ = cu.ifn_cu_device_usage(b.ordinal, &utilization, &used, &total);
        return .{ .memory_total_bytes = total, .memory_used_bytes = used, .weights_bytes = b.weights_bytes, .utilization = utilization, .ordinal = @intCast(b.ordinal) };
    }

    /// Device memory, owned by the backend until deinit.
    fn alloc(b: *CudaBackend, comptime T: type, n: usize) ![*]T {
        var p: ?*anyopaque = null;
        const bytes = @max(1, n) * @sizeOf(T);
        if (cu.ifn_cu_malloc(&p, bytes) != 0) {
            _ = errors.fail(.out_of_memory, "CUDA: cannot allocate {d} MiB of device memory ({d} MiB held)", .{ bytes >> 20, b.allocated_bytes >> 20 });
            return error.LoadFailed;
        }
        try b.owned.append(p.?);
        b.allocated_bytes += bytes;
        return @ptrCast(@alignCast(p.?));
    }

    fn hostAlloc(comptime T: type, n: usize) ![*]T {
        var p: ?*anyopaque = null;
        if (cu.ifn_cu_host_alloc(&p, @max(1, n) * @sizeOf(T)) != 0) {
            _ = errors.fail(.out_of_memory, "CUDA: cannot allocate {d} MiB of pinned host memory", .{(n * @sizeOf(T)) >> 20});
            return error.LoadFailed;
        }
        return @ptrCast(@alignCast(p.?));
    }

    pub fn init(
        b: *CudaBackend,
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
        b.owned = std.ArrayList(*anyopaque).init(allocator);
        b.allocated_bytes = 0;
        b.graphs = .{null} ** graph_buckets.len;
        b.k_cache = null;
        b.v_cache = null;
        b.kv_layer_bytes = 0;
        errdefer b.freeDevice();
        b.initDevice() catch |err| {
            status.* = .unsupported;
            return err;
        };
        errdefer {
            _ = cu.ifn_cu_stream_destroy(b.stream);
            _ = cu.ifn_cu_stream_destroy(b.aux);
            cu.ifn_cu_gemm_destroy(b.gemm);
        }
        var host = try weights_mod.loadViews(allocator, model, paths, tensors, status);
        defer host.deinit(allocator);
        const before = b.allocated_bytes;
        b.uploadWeights(&host) catch |err| {
            status.* = switch (err) {
                error.Unsupported => .unsupported,
                error.LoadFailed, error.OutOfDevice => .out_of_memory,
                error.CudaFailed => .internal,
                error.OutOfMemory => return error.OutOfMemory,
            };
            return error.LoadFailed;
        };
        b.weights_bytes = b.allocated_bytes - before;
        b.initRope() catch {
            status.* = .out_of_memory;
            return error.LoadFailed;
        };
        b.initBuffers() catch {
            status.* = .out_of_memory;
            return error.LoadFailed;
        };
        b.score_scale = if (model.attn_scale != 0) model.attn_scale else 1 / @sqrt(@as(f32, @floatFromInt(model.head_dim)));
        b.model.rope_inv_freq = null;
    }

    fn initDevice(b: *CudaBackend) !void {
        const count = deviceCount();
        if (count <= 0) return error.LoadFailed;
        b.ordinal = @intCast(b.config.cuda.device_ordinal);
        if (b.ordinal >= count) {
            _ = errors.fail(.unsupported, "CUDA device {d} asked for; {d} visible", .{ b.ordinal, count });
            return error.LoadFailed;
        }
        if (check(cu.ifn_cu_set_device(b.ordinal), "set device") != .ok) return error.LoadFailed;
        var free: u64 = 0;
        if (check(cu.ifn_cu_mem_info(&free, &b.total_bytes), "memory info") != .ok) return error.LoadFailed;
        b.used_before_bytes = b.total_bytes - free;
        if (check(cu.ifn_cu_stream_create(&b.stream), "stream") != .ok) return error.LoadFailed;
        if (check(cu.ifn_cu_stream_create(&b.aux), "stream") != .ok) return error.LoadFailed;
        const m = b.model;
        const c = b.config;
        const q_dim = m.num_heads * m.head_dim;
        const widest = @max(@max(m.hidden_size, m.intermediate_size), q_dim);
        const tallest = @max(@max(m.vocab_size, 2 * m.intermediate_size), q_dim + 2 * m.num_kv_heads * m.head_dim);
        var gemm: ?*cu.ifn_cu_gemm = null;
        @memset(&b.gemm_note, 0);
        const tokens = @max(c.max_num_batched_tokens, c.max_num_seqs);
        if (check(cu.ifn_cu_gemm_create(&gemm, tokens, widest, tallest, &b.gemm_note, b.gemm_note.len), "GEMM workspace") != .ok) return error.LoadFailed;
        b.gemm = gemm.?;
        b.allocated_bytes += cu.ifn_cu_gemm_workspace_bytes(b.gemm);
    }

    fn freeDevice(b: *CudaBackend) void {
        for (b.graphs) |g| if (g) |exec| {
            _ = cu.ifn_cu_graph_destroy(exec);
        };
        for (b.owned.items) |p| _ = cu.ifn_cu_free(p);
        b.owned.deinit();
    }

    pub fn deinit(b: *CudaBackend) void {
        _ = cu.ifn_cu_stream_sync(b.stream);
        b.freeDevice();
        for ([_]*anyopaque{ b.in_host, b.out_host, b.masks_host, b.state_host }) |p| _ = cu.ifn_cu_host_free(p);
        cu.ifn_cu_gemm_destroy(b.gemm);
        _ = cu.ifn_cu_stream_destroy(b.stream);
        _ = cu.ifn_cu_stream_destroy(b.aux);
        b.allocator.free(b.layers);
        b.* = undefined;
    }

    // ---------------------------------------------------------------- weights

    /// The type a float matrix takes on the device: its own, or the one asked for.
    fn floatType(b: *const CudaBackend, dtype: abi.DType) abi.DType {
        const asked: abi.DType = @enumFromInt(b.config.cuda.compute_dtype);
        return if (asked == .f32) dtype else asked;
    }

    /// The type a matrix is held in on the device (the lossless rewrites the CPU makes too),
    /// or an error naming what the GPU engine cannot run.
    fn deviceType(b: *const CudaBackend, m: Matrix, role: []const u8) !abi.DType {
        return switch (m.dtype) {
            .f32, .f16, .bf16 => b.floatType(m.dtype),
            .q8_0, .q4_0, .q4_k, .q6_k => m.dtype,
            .q5_0, .iq4_nl => .q8_0,
            .q3_k => .q6_k,
            else => {
                _ = errors.fail(.unsupported, "the CUDA backend does not run {s} weights ({s}); it runs f32, f16, bf16, Q8_0, Q4_0, Q4_K, Q6_K (and Q5_0, IQ4_NL, Q3_K rewritten losslessly)", .{ @tagName(m.dtype), role });
                return error.Unsupported;
            },
        };
    }

    fn rowBytes(dtype: abi.DType, cols: usize) usize {
        return cols / dtype.blockElems().? * dtype.blockBytes().?;
    }

    /// Uploads `m` into `dst` as `to`: as it is, converted on the device, rewritten on the host,
    /// or made up (a dummy tensor's random values, from `seed`).
    fn uploadInto(b: *CudaBackend, dst: [*]u8, m: Matrix, to: abi.DType, seed: u64) !void {
        if (weights_mod.isDummy(m)) {
            if (!to.isFloat()) {
                _ = errors.fail(.unsupported, "dummy weights are float (f32, f16, bf16); got {s}", .{@tagName(to)});
                return error.Unsupported;
            }
            return b.ok(cu.ifn_cu_random_fill(dst, @intFromEnum(to), m.rows * m.cols, seed, 0, 0.02, b.stream), "random weights");
        }
        const src_bytes = m.rows * rowBytes(m.dtype, m.cols);
        if (m.dtype == to) return b.ok(cu.ifn_cu_copy(dst, m.data, src_bytes, b.stream), "weight upload");
        if (m.dtype.isFloat()) {
            // The file's bytes to a staging buffer, then converted in place on the device.
            var staging: ?*anyopaque = null;
            if (cu.ifn_cu_malloc(&staging, src_bytes) != 0) {
                _ = errors.fail(.out_of_memory, "CUDA: no room to stage a {d} MiB weight", .{src_bytes >> 20});
                return error.OutOfDevice;
            }
            defer _ = cu.ifn_cu_free(staging);
            try b.ok(cu.ifn_cu_copy(staging, m.data, src_bytes, b.stream), "weight upload");
            try b.ok(cu.ifn_cu_convert(dst, @intFromEnum(to), staging, @intFromEnum(m.dtype), m.rows, @intCast(m.cols), b.stream), "weight conversion");
            return b.ok(cu.ifn_cu_stream_sync(b.stream), "weight conversion");
        }
        // A quantized type rewritten losslessly (Q5_0, IQ4_NL as Q8_0; Q3_K as Q6_K), row by row.
        const row_out = rowBytes(to, m.cols);
        const buf = try b.allocator.alloc(u8, m.rows * row_out);
        defer b.allocator.free(buf);
        for (0..m.rows) |r| transcodeRow(m, r, buf[r * row_out ..][0..row_out]);
        try b.ok(cu.ifn_cu_copy(dst, buf.ptr, buf.len, b.stream), "weight upload");
        try b.ok(cu.ifn_cu_stream_sync(b.stream), "weight upload");
    }

    fn transcodeRow(m: Matrix, r: usize, out: []u8) void {
        const src = m.data + r * rowBytes(m.dtype, m.cols);
        switch (m.dtype) {
            inline .q5_0, .iq4_nl, .q3_k => |t| {
                const From = kernels.StorageType(t);
                const To = kernels.StorageType(comptime t.transcodedTo().?);
                const from: [*]align(1) const From = @ptrCast(src);
                const to: [*]align(1) To = @ptrCast(out.ptr);
                for (0..m.cols / comptime quant.unitElems(From)) |i| {
                    var block: To = undefined;
                    quant.transcode(From, To, &from[i], &block);
                    to[i] = block;
                }
            },
            else => unreachable,
        }
    }

    fn ok(b: *CudaBackend, status: i32, comptime what: []const u8) !void {
        _ = b;
        if (check(status, what) != .ok) return error.CudaFailed;
    }

    /// One or more matrices of the same input side by side (their rows one after another), as
    /// one device matrix when they share a type, else one each.
    fn uploadGroup(b: *CudaBackend, parts: []const Matrix, out: []?DeviceMatrix, role: []const u8, seed: u64) !void {
        assert(parts.len == out.len);
        var same = true;
        const t0 = try b.deviceType(parts[0], role);
        for (parts[1..]) |p| same = same and try b.deviceType(p, role) == t0 and p.cols == parts[0].cols;
        @memset(out, null);
        if (same) {
            var rows: usize = 0;
            for (parts) |p| rows += p.rows;
            const dst = try b.alloc(u8, rows * rowBytes(t0, parts[0].cols));
            var at: usize = 0;
            for (parts, 0..) |p, i| {
                try b.uploadInto(dst + at * rowBytes(t0, p.cols), p, t0, seed + i);
                at += p.rows;
            }
            out[0] = .{ .data = dst, .dtype = @intFromEnum(t0), .rows = @intCast(rows), .cols = @intCast(parts[0].cols), ._pad = 0 };
            return;
        }
        for (parts, 0..) |p, i| out[i] = try b.uploadMatrix(p, role, seed + i);
    }

    fn uploadMatrix(b: *CudaBackend, m: Matrix, role: []const u8, seed: u64) !DeviceMatrix {
        const t = try b.deviceType(m, role);
        const dst = try b.alloc(u8, m.rows * rowBytes(t, m.cols));
        try b.uploadInto(dst, m, t, seed);
        return .{ .data = dst, .dtype = @intFromEnum(t), .rows = @intCast(m.rows), .cols = @intCast(m.cols), ._pad = 0 };
    }

    /// A vector (norm weights, biases) in f32: dummy ones are ones (norms) already in the view.
    fn uploadVector(b: *CudaBackend, m: Matrix) ![*]f32 {
        const host = try b.allocator.alloc(f32, m.cols);
        defer b.allocator.free(host);
        if (weights_mod.isDummy(m)) @memset(host, 1) else m.readRow(host, 0);
        return b.uploadF32(host);
    }

    fn uploadF32(b: *CudaBackend, host: []const f32) ![*]f32 {
        const dst = try b.alloc(f32, host.len);
        try b.ok(cu.ifn_cu_copy(dst, host.ptr, host.len * 4, b.stream), "upload");
        try b.ok(cu.ifn_cu_stream_sync(b.stream), "upload");
        return dst;
    }

    fn uploadWeights(b: *CudaBackend, w: *const weights_mod.Weights) !void {
        b.embed = try b.uploadMatrix(w.token_embd, "token_embd", 1);
        const tied = w.output.data == w.token_embd.data;
        b.output = if (tied) b.embed else try b.uploadMatrix(w.output, "output", 2);
        b.output_norm = try b.uploadVector(w.output_norm);
        b.layers = try b.allocator.alloc(Layer, w.layers.len);
        errdefer b.allocator.free(b.layers);
        for (w.layers, b.layers, 0..) |l, *d, i| {
            const seed = 100 + 16 * @as(u64, i);
            d.attn_norm = try b.uploadVector(l.attn_norm);
            d.ffn_norm = try b.uploadVector(l.ffn_norm);
            d.attn_post_norm = if (l.attn_post_norm) |m| try b.uploadVector(m) else null;
            d.ffn_post_norm = if (l.ffn_post_norm) |m| try b.uploadVector(m) else null;
            d.q_norm = if (l.q_norm) |m| try b.uploadVector(m) else null;
            d.k_norm = if (l.k_norm) |m| try b.uploadVector(m) else null;
            d.qkv_bias = if (l.qkv_bias) |bias| try b.uploadF32(bias) else null;
            try b.uploadGroup(&.{ l.wq, l.wk, l.wv }, &d.qkv, "attn_qkv", seed);
            d.wo = try b.uploadMatrix(l.wo, "attn_out", seed + 4);
            try b.uploadGroup(&.{ l.w_gate, l.w_up }, &d.gate_up, "ffn_gate_up", seed + 5);
            d.down = try b.uploadMatrix(l.w_down, "ffn_down", seed + 7);
        }
    }

    fn initRope(b: *CudaBackend) !void {
        const m = b.model;
        const n = @as(usize, m.max_position) * (m.head_dim / 2);
        const cos = try b.allocator.alloc(f32, n);
        defer b.allocator.free(cos);
        const sin = try b.allocator.alloc(f32, n);
        defer b.allocator.free(sin);
        fillRope(cos, sin, m);
        b.rope_cos = try b.uploadF32(cos);
        b.rope_sin = try b.uploadF32(sin);
        b.rope_local_cos = null;
        b.rope_local_sin = null;
        if (m.rope_local_theta == 0) return;
        var local = m;
        local.rope_theta = m.rope_local_theta;
        local.rope_inv_freq = null;
        local.rope_attn_factor = 0;
        fillRope(cos, sin, local);
        b.rope_local_cos = try b.uploadF32(cos);
        b.rope_local_sin = try b.uploadF32(sin);
    }

    fn initBuffers(b: *CudaBackend) !void {
        const m = b.model;
        const c = b.config;
        const t: usize = c.max_num_batched_tokens;
        const s: usize = c.max_num_seqs;
        const q_dim = @as(usize, m.num_heads) * m.head_dim;
        const kv_dim = @as(usize, m.num_kv_heads) * m.head_dim;
        const vocab: usize = m.vocab_size;
        const words = (vocab + 31) / 32;
        b.x = try b.alloc(f32, t * m.hidden_size);
        b.xb = try b.alloc(f32, t * m.hidden_size);
        b.xb2 = try b.alloc(f32, t * m.hidden_size);
        b.qkv = try b.alloc(f32, t * (q_dim + 2 * kv_dim));
        b.att = try b.alloc(f32, t * q_dim);
        b.gate_up = try b.alloc(f32, t * 2 * @as(usize, m.intermediate_size));
        b.h = try b.alloc(f32, t * m.intermediate_size);
        b.xs = try b.alloc(f32, s * m.hidden_size);
        b.logits = try b.alloc(f32, s * vocab);
        b.work = try b.alloc(f32, s * vocab);
        // Decode splits: of at least 512 positions, at most decode_splits_max of them.
        const max_len = @as(usize, c.max_blocks_per_seq) * c.block_size;
        const per = std.math.divCeil(usize, max_len, decode_splits_max) catch unreachable;
        b.split_len = @intCast(@max(512, std.mem.alignForward(usize, per, 128)));
        b.attn_ws = try b.alloc(f32, t * m.num_heads * decode_splits_max * (m.head_dim + 2));
        b.tile_queries = cu.ifn_cu_prefill_tile_queries(m.num_heads, m.num_kv_heads);
        if (m.num_heads / m.num_kv_heads > 32) {
            _ = errors.fail(.unsupported, "the CUDA backend's attention takes up to 32 query heads a KV head; this model has {d}", .{m.num_heads / m.num_kv_heads});
            return error.Unsupported;
        }
        b.inputs = Inputs.init(t, s, c.max_blocks_per_seq, s * abi.logit_bias_max);
        b.in_host = try hostAlloc(u8, b.inputs.bytes);
        b.in_dev = try b.alloc(u8, b.inputs.bytes);
        b.outputs = Outputs.init(s);
        b.out_host = try hostAlloc(u8, b.outputs.bytes);
        b.out_dev = try b.alloc(u8, b.outputs.bytes);
        b.masks_host = try hostAlloc(u32, s * words);
        b.masks_dev = try b.alloc(u32, s * words);
        b.counts = try b.alloc(u16, s * vocab);
        b.prompt_seen = try b.alloc(u32, s * words);
        const capacity = @as(usize, c.max_blocks_per_seq) * c.block_size;
        b.state_host = try hostAlloc(i32, capacity);
        b.state_dev = try b.alloc(i32, capacity);
    }

    // ---------------------------------------------------------------- KV pool and graphs

    /// What the pool may take: the kv_cache_bytes asked for, or the share of the device's memory
    /// memory_utilization leaves after everything we hold (and a reserve for the runtime).
    pub fn kvBudgetBytes(b: *const CudaBackend) u64 {
        var free: u64 = 0;
        var total: u64 = 0;
        _ = cu.ifn_cu_mem_info(&free, &total);
        const room = if (free > reserve_bytes) free - reserve_bytes else 0;
        if (b.config.kv_cache_bytes != 0) return @min(b.config.kv_cache_bytes, room);
        const util: f64 = if (b.config.cuda.memory_utilization == 0) 0.9 else b.config.cuda.memory_utilization;
        const share: u64 = @intFromFloat(util * @as(f64, @floatFromInt(b.total_bytes)));
        const ours = b.allocated_bytes + reserve_bytes;
        return @min(if (share > ours) share - ours else 0, room);
    }

    pub fn allocKv(b: *CudaBackend, num_blocks: u32) !void {
        b.config.num_blocks = num_blocks;
        const elem: u64 = if (b.config.kv_cache_dtype == @intFromEnum(abi.DType.f16)) 2 else 4;
        b.kv_layer_bytes = @as(u64, num_blocks) * b.config.block_size * b.model.num_kv_heads * b.model.head_dim * elem;
        b.k_cache = @ptrCast(b.alloc(u8, b.kv_layer_bytes * b.model.num_layers) catch return error.OutOfMemory);
        b.v_cache = @ptrCast(b.alloc(u8, b.kv_layer_bytes * b.model.num_layers) catch return error.OutOfMemory);
        if (b.config.cuda.enforce_eager == 0) b.captureGraphs() catch return error.OutOfMemory;
    }

    /// One decode graph per bucket up to max_num_seqs, captured over an all-padding step.
    fn captureGraphs(b: *CudaBackend) !void {
        const s = b.config.max_num_seqs;
        for (graph_buckets, 0..) |n, i| {
            if (n > s or n > b.config.max_num_batched_tokens) break;
            b.fillPadding(0, n);
            try b.ok(b.uploadInputs(n, 0, n, 0), "graph inputs");
            try b.ok(cu.ifn_cu_graph_begin(b.stream), "graph capture");
            const launched = b.forward(n, 0, n, n);
            var exec: ?*anyopaque = null;
            const ended = cu.ifn_cu_graph_end(b.stream, &exec);
            if (launched != .ok) return error.CudaFailed;
            try b.ok(ended, "graph capture");
            b.graphs[i] = exec;
        }
    }

    /// The bucket a decode step of n sequences replays, if any.
    fn bucketFor(b: *const CudaBackend, n: u32) ?usize {
        for (graph_buckets, 0..) |size, i| if (size >= n) return if (b.graphs[i] != null) i else null;
        return null;
    }

    // ---------------------------------------------------------------- the step

    fn inSlice(b: *CudaBackend, comptime T: type, offset: usize, n: usize) []T {
        const p: [*]T = @ptrCast(@alignCast(b.in_host + offset));
        return p[0..n];
    }

    fn devPtr(b: *CudaBackend, comptime T: type, offset: usize) [*]T {
        return @ptrCast(@alignCast(b.in_dev + offset));
    }

    /// Decode rows from `from` to `to` as padding: a token that writes no K/V, attends to
    /// nothing, and samples a row nobody reads.
    fn fillPadding(b: *CudaBackend, from: u32, to: u32) void {
        const in = b.inputs;
        for (from..to) |t| {
            b.inSlice(i32, in.token_ids, to)[t] = 0;
            b.inSlice(i32, in.positions, to)[t] = 0;
            b.inSlice(i32, in.slots, to)[t] = -1;
            b.inSlice(i32, in.seq_of_token, to)[t] = 0;
            b.inSlice(i32, in.decode_tokens, to)[t] = -1;
            b.inSlice(i32, in.sample_rows, to)[t] = @intCast(t);
        }
    }

    /// Copies the step's inputs to the device: n tokens of num_seqs sequences, the sampled rows,
    /// the tiles.
    fn uploadInputs(b: *CudaBackend, n: u32, tiles: u32, num_seqs: u32, bias_len: u32) i32 {
        const in = b.inputs;
        const maxb: u64 = b.config.max_blocks_per_seq;
        const s: u64 = b.config.max_num_seqs;
        const parts = [_][2]u64{
            .{ in.token_ids, 4 * n },                        .{ in.positions, 4 * n },                  .{ in.slots, 4 * n },
            .{ in.seq_of_token, 4 * n },                     .{ in.decode_tokens, 4 * n },              .{ in.tile_first, 4 * tiles },
            .{ in.tile_count, 4 * tiles },                   .{ in.block_tables, 4 * maxb * num_seqs }, .{ in.sample_rows, 4 * s },
            .{ in.params, s * @sizeOf(abi.SamplingParams) }, .{ in.bias_ids, 4 * bias_len },            .{ in.bias_values, 4 * bias_len },
        };
        for (parts) |p| {
            const st = cu.ifn_cu_copy(b.in_dev + p[0], b.in_host + p[0], p[1], b.stream);
            if (st != 0) return st;
        }
        return 0;
    }

    fn matmul(b: *CudaBackend, out: [*]f32, ldo: u32, x: [*]const f32, ldx: u32, n: u32, mats: []const ?DeviceMatrix) abi.Status {
        var col: u32 = 0;
        for (mats) |m| {
            const w = m orelse continue;
            const st = check(cu.ifn_cu_matmul(b.gemm, out + col, ldo, x, ldx, n, &w, b.stream), "matmul");
            if (st != .ok) return st;
            col += w.rows;
        }
        return .ok;
    }

    fn isLocal(b: *const CudaBackend, l: usize) bool {
        const m = b.model;
        if (m.sliding_window == 0) return false;
        return m.sliding_window_pattern == 0 or (l + 1) % m.sliding_window_pattern != 0;
    }

    /// The forward pass over the step's inputs on the device: n tokens, `tiles` prefill tiles,
    /// `decodes` decode items, up to the logits of n_samples rows. Launches only (no host work,
    /// no synchronization): a graph captures it as it is.
    fn forward(b: *CudaBackend, n: u32, tiles: u32, decodes: u32, n_samples: u32) abi.Status {
        const m = b.model;
        const in = b.inputs;
        const hidden = m.hidden_size;
        const q_dim = m.num_heads * m.head_dim;
        const kv_dim = m.num_kv_heads * m.head_dim;
        const qkv_dim = q_dim + 2 * kv_dim;
        const ffn = m.intermediate_size;
        const s = b.stream;
        const eps = m.rms_norm_eps;
        var st = check(cu.ifn_cu_embed(b.x, &b.embed, b.devPtr(i32, in.token_ids), n, m.embedding_scale, s), "embed");
        if (st != .ok) return st;
        st = check(cu.ifn_cu_rmsnorm(b.xb, hidden, b.x, hidden, null, b.layers[0].attn_norm, n, hidden, eps, s), "norm");
        if (st != .ok) return st;
        for (b.layers, 0..) |l, li| {
            st = b.matmul(b.qkv, qkv_dim, b.xb, hidden, n, &l.qkv);
            if (st != .ok) return st;
            st = b.attention(li, l, n, tiles, decodes);
            if (st != .ok) return st;
            st = b.matmul(b.xb2, hidden, b.att, q_dim, n, &.{l.wo});
            if (st != .ok) return st;
            st = check(cu.ifn_cu_add_rmsnorm(b.x, b.xb2, l.attn_post_norm, b.xb, l.ffn_norm, n, hidden, eps, s), "residual");
            if (st != .ok) return st;
            st = b.matmul(b.gate_up, 2 * ffn, b.xb, hidden, n, &l.gate_up);
            if (st != .ok) return st;
            st = check(cu.ifn_cu_act_mul(b.h, b.gate_up, n, ffn, m.hidden_act, s), "activation");
            if (st != .ok) return st;
            st = b.matmul(b.xb2, hidden, b.h, ffn, n, &.{l.down});
            if (st != .ok) return st;
            // The residual, and the next layer's input norm with it.
            const next: ?[*]f32 = if (li + 1 < b.layers.len) b.layers[li + 1].attn_norm else null;
            st = check(cu.ifn_cu_add_rmsnorm(b.x, b.xb2, l.ffn_post_norm, b.xb, next, n, hidden, eps, s), "residual");
            if (st != .ok) return st;
        }
        if (n_samples == 0) return .ok;
        st = check(cu.ifn_cu_rmsnorm(b.xs, hidden, b.x, hidden, b.devPtr(i32, in.sample_rows), b.output_norm, n_samples, hidden, eps, s), "final norm");
        if (st != .ok) return st;
        return b.matmul(b.logits, m.vocab_size, b.xs, hidden, n_samples, &.{b.output});
    }

    /// RoPE and the K/V write of layer li, then its attention: decodes and prefill tiles.
    fn attention(b: *CudaBackend, li: usize, l: Layer, n: u32, tiles: u32, decodes: u32) abi.Status {
        const m = b.model;
        const in = b.inputs;
        const s = b.stream;
        const q_dim = m.num_heads * m.head_dim;
        const kv_dim = m.num_kv_heads * m.head_dim;
        const local = b.isLocal(li);
        const rope = cu.ifn_cu_rope_args{
            .num_heads = m.num_heads,
            .num_kv_heads = m.num_kv_heads,
            .head_dim = m.head_dim,
            .interleaved = m.rope_interleaved,
            .cos = if (local and b.rope_local_cos != null) b.rope_local_cos.? else b.rope_cos,
            .sin = if (local and b.rope_local_sin != null) b.rope_local_sin.? else b.rope_sin,
            .bias = l.qkv_bias,
            .q_norm = l.q_norm,
            .k_norm = l.k_norm,
            .eps = m.rms_norm_eps,
        };
        var st = check(cu.ifn_cu_rope(b.qkv, n, b.devPtr(i32, in.positions), &rope, s), "rope");
        if (st != .ok) return st;
        const k_layer: [*]u8 = @as([*]u8, @ptrCast(b.k_cache.?)) + li * b.kv_layer_bytes;
        const v_layer: [*]u8 = @as([*]u8, @ptrCast(b.v_cache.?)) + li * b.kv_layer_bytes;
        st = check(cu.ifn_cu_kv_write(k_layer, v_layer, b.config.kv_cache_dtype, b.qkv, q_dim + 2 * kv_dim, q_dim, q_dim + kv_dim, b.devPtr(i32, in.slots), n, m.num_kv_heads, m.head_dim, b.config.block_size, s), "KV write");
        if (st != .ok) return st;
        const args = cu.ifn_cu_attn_args{
            .q = b.qkv,
            .q_stride = q_dim + 2 * kv_dim,
            .out = b.att,
            .out_stride = q_dim,
            .k_cache = k_layer,
            .v_cache = v_layer,
            .kv_dtype = b.config.kv_cache_dtype,
            .block_tables = b.devPtr(i32, in.block_tables),
            .max_blocks_per_seq = b.config.max_blocks_per_seq,
            .seq_of_token = b.devPtr(i32, in.seq_of_token),
            .positions = b.devPtr(i32, in.positions),
            .num_heads = m.num_heads,
            .num_kv_heads = m.num_kv_heads,
            .head_dim = m.head_dim,
            .block_size = b.config.block_size,
            .scale = b.score_scale,
            .softcap = m.attn_softcap,
            .window = if (local) m.sliding_window else 0,
        };
        if (decodes > 0) {
            st = check(cu.ifn_cu_attention_decode(&args, b.devPtr(i32, in.decode_tokens), decodes, decode_splits_max, b.split_len, b.attn_ws, s), "decode attention");
            if (st != .ok) return st;
        }
        if (tiles > 0) return check(cu.ifn_cu_attention_prefill(&args, b.devPtr(i32, in.tile_first), b.devPtr(i32, in.tile_count), tiles, s), "prefill attention");
        return .ok;
    }

    /// The step's host-side arrays: tokens, the sequence of each, decode items and prefill tiles.
    /// Returns the tile count; decode items fill decode_tokens[0..decodes).
    fn fillInputs(b: *CudaBackend, bt: *const abi.Batch, decodes: *u32) u32 {
        const in = b.inputs;
        const n = bt.num_tokens;
        const t_cap = b.config.max_num_batched_tokens;
        @memcpy(b.inSlice(i32, in.token_ids, n), bt.token_ids[0..n]);
        @memcpy(b.inSlice(i32, in.positions, n), bt.positions[0..n]);
        @memcpy(b.inSlice(i32, in.slots, n), bt.slot_mapping[0..n]);
        const seq_of = b.inSlice(i32, in.seq_of_token, n);
        const dec = b.inSlice(i32, in.decode_tokens, t_cap);
        const first = b.inSlice(i32, in.tile_first, t_cap);
        const count = b.inSlice(i32, in.tile_count, t_cap);
        var tiles: u32 = 0;
        decodes.* = 0;
        for (0..bt.num_seqs) |seq| {
            const begin: u32 = @intCast(bt.query_start_loc[seq]);
            const end: u32 = @intCast(bt.query_start_loc[seq + 1]);
            for (begin..end) |t| seq_of[t] = @intCast(seq);
            if (end - begin == 1) {
                dec[decodes.*] = @intCast(begin);
                decodes.* += 1;
                continue;
            }
            var t = begin;
            while (t < end) : (t += b.tile_queries) {
                first[tiles] = @intCast(t);
                count[tiles] = @intCast(@min(b.tile_queries, end - t));
                tiles += 1;
            }
        }
        const maxb = b.config.max_blocks_per_seq;
        @memcpy(b.inSlice(i32, in.block_tables, bt.num_seqs * maxb), bt.block_tables[0 .. bt.num_seqs * maxb]);
        @memcpy(b.inSlice(i32, in.sample_rows, bt.num_samples), bt.sample_indices[0..bt.num_samples]);
        @memcpy(b.inSlice(abi.SamplingParams, in.params, bt.num_samples), bt.sampling[0..bt.num_samples]);
        return tiles;
    }

    /// How many logit-bias entries the step's rows use (the prefix of the batch's arrays).
    fn biasLen(bt: *const abi.Batch) u32 {
        var len: u32 = 0;
        for (bt.sampling[0..bt.num_samples]) |p| len = @max(len, @as(u32, @intCast(p.bias_offset + p.bias_count)));
        return len;
    }

    pub fn seqStateOpened(b: *CudaBackend, slot: u32, seq_state: *const SeqState) abi.Status {
        // The current device is a thread's own: this runs on the caller's thread.
        if (check(cu.ifn_cu_set_device(b.ordinal), "set device") != .ok) return .internal;
        const tokens = seq_state.history(slot);
        @memcpy(b.state_host[0..tokens.len], tokens);
        var st = check(cu.ifn_cu_copy(b.state_dev, b.state_host, tokens.len * 4, b.aux), "sequence state upload");
        if (st == .ok) st = check(cu.ifn_cu_seq_state_set(b.counts, b.prompt_seen, slot, b.model.vocab_size, b.state_dev, @intCast(tokens.len), seq_state.prompt_len[slot], b.aux), "sequence state");
        if (st == .ok) st = check(cu.ifn_cu_stream_sync(b.aux), "sequence state");
        return st;
    }

    /// The forward pass and sampling of a validated step.
    pub fn step(b: *CudaBackend, bt: *abi.Batch, seq_state: *SeqState) abi.Status {
        b.batch = bt;
        // Steps run on the engine thread (or a caller's): the current device is per thread.
        if (check(cu.ifn_cu_set_device(b.ordinal), "set device") != .ok) return .internal;
        var decodes: u32 = 0;
        const tiles = b.fillInputs(bt, &decodes);
        var n = bt.num_tokens;
        var n_logits = bt.num_samples;
        // A decode-only step replays its bucket's graph, padded up to the bucket's size.
        const bucket: ?usize = if (tiles == 0 and decodes == n and bt.num_samples == n) b.bucketFor(n) else null;
        if (bucket) |i| {
            const size = graph_buckets[i];
            b.fillPadding(n, size);
            n = size;
            n_logits = size;
        }
        var st = check(b.uploadInputs(n, tiles, bt.num_seqs, biasLen(bt)), "step inputs");
        if (st != .ok) return st;
        st = if (bucket) |i| check(cu.ifn_cu_graph_launch(b.graphs[i], b.stream), "graph launch") else b.forward(n, tiles, decodes, n_logits);
        if (st != .ok) return st;
        if (bt.num_samples == 0) return check(cu.ifn_cu_stream_sync(b.stream), "step");
        // The masks are waited for only now, while the forward pass runs on the device.
        st = batch_mod.awaitMasks(bt);
        if (st != .ok) return st;
        st = b.sample(bt);
        if (st != .ok) return st;
        for (0..bt.num_samples) |i| {
            const slot = bt.sampling[i].state_slot;
            if (slot >= 0) seq_state.append(@intCast(slot), bt.out_token_ids[i]);
        }
        return .ok;
    }

    /// Masks up, the sampler, its outputs (and the logits, when asked) down.
    fn sample(b: *CudaBackend, bt: *abi.Batch) abi.Status {
        const m = b.model;
        const ns = bt.num_samples;
        const words = bt.mask_words;
        var any_mask = false;
        for (bt.sampling[0..ns]) |p| any_mask = any_mask or p.use_mask == 1;
        if (any_mask) {
            @memcpy(b.masks_host[0 .. ns * words], bt.allowed_token_mask[0 .. ns * words]);
            const st = check(cu.ifn_cu_copy(b.masks_dev, b.masks_host, ns * words * 4, b.stream), "mask upload");
            if (st != .ok) return st;
        }
        const out = b.outputs;
        const args = cu.ifn_cu_sample_args{
            .logits = b.logits,
            .work = b.work,
            .n = ns,
            .vocab = m.vocab_size,
            .final_softcap = m.final_softcap,
            .mask_words = words,
            .params = @ptrCast(b.devPtr(u8, b.inputs.params)),
            .bias_ids = b.devPtr(i32, b.inputs.bias_ids),
            .bias_values = b.devPtr(f32, b.inputs.bias_values),
            .masks = b.masks_dev,
            .counts = b.counts,
            .prompt_seen = b.prompt_seen,
            .out_tokens = @ptrCast(@alignCast(b.out_dev + out.tokens)),
            .out_logprobs = @ptrCast(@alignCast(b.out_dev + out.logprobs)),
            .out_top_ids = @ptrCast(@alignCast(b.out_dev + out.top_ids)),
            .out_top_logprobs = @ptrCast(@alignCast(b.out_dev + out.top_logprobs)),
        };
        var st = check(cu.ifn_cu_sample(&args, b.stream), "sampling");
        if (st != .ok) return st;
        st = check(cu.ifn_cu_copy(b.out_host, b.out_dev, out.bytes, b.stream), "sampler outputs");
        if (st != .ok) return st;
        if (bt.return_logits != 0) {
            st = check(cu.ifn_cu_copy(bt.logits, b.logits, @as(u64, ns) * m.vocab_size * 4, b.stream), "logits");
            if (st != .ok) return st;
        }
        st = check(cu.ifn_cu_stream_sync(b.stream), "step");
        if (st != .ok) return st;
        const k = abi.top_logprobs_max;
        const host = b.out_host;
        @memcpy(bt.out_token_ids[0..ns], @as([*]const i32, @ptrCast(@alignCast(host + out.tokens)))[0..ns]);
        @memcpy(bt.out_logprobs[0..ns], @as([*]const f32, @ptrCast(@alignCast(host + out.logprobs)))[0..ns]);
        @memcpy(bt.out_top_ids[0 .. ns * k], @as([*]const i32, @ptrCast(@alignCast(host + out.top_ids)))[0 .. ns * k]);
        @memcpy(bt.out_top_logprobs[0 .. ns * k], @as([*]const f32, @ptrCast(@alignCast(host + out.top_logprobs)))[0 .. ns * k]);
        return .ok;
    }
};
