//! The model's weights: files mapped read-only, and a view per tensor placed by
//! the manifest TypeScript sends. Every matrix is then repacked once into 16-row groups
//! for its products (see packAll): quantized ones for the integer products (qgemm),
//! float ones in their own type (fgemm: f16 and bf16 are widened inside the product, so
//! a decode step reads the file's bytes) or, with bf16 compute, in bf16 (bgemm). Packed
//! matrices are the file's size, and the mapping's pages are dropped as they are packed,
//! so the process holds each weight once.

const std = @import("std");
const assert = std.debug.assert;
const abi = @import("abi.zig");
const errors = @import("errors.zig");
const kernels = @import("kernels.zig");
const Matrix = kernels.Matrix;
const qgemm = @import("qgemm.zig");
const bgemm = @import("bgemm.zig");
const fgemm = @import("fgemm.zig");

pub const files_max = 256;
pub const layers_max = 512;

pub const Layer = struct {
    attn_norm: Matrix, // (1, hidden)
    wq: Matrix, // (heads * head_dim, hidden)
    wk: Matrix, // (kv_heads * head_dim, hidden)
    wv: Matrix, // (kv_heads * head_dim, hidden)
    wo: Matrix, // (hidden, heads * head_dim)
    ffn_norm: Matrix, // (1, hidden)
    w_gate: Matrix, // (intermediate, hidden)
    w_up: Matrix, // (intermediate, hidden)
    w_down: Matrix, // (hidden, intermediate)
    // Optional (Qwen 2): q, k and v biases side by side in f32, as one qkv row (zeros where absent).
    qkv_bias: ?[]f32 = null,
    // Optional (Qwen 3): RMSNorm weights over each q and k head, (1, head_dim).
    q_norm: ?Matrix = null,
    k_norm: ?Matrix = null,
    // Optional (Gemma): RMSNorm of the attention's and the MLP's outputs before each residual add.
    attn_post_norm: ?Matrix = null,
    ffn_post_norm: ?Matrix = null,
};

pub const Weights = struct {
    maps: [][]align(std.mem.page_size) const u8,
    packed_buffers: [][]align(std.mem.page_size) u8,
    norm_copies: [][]f32 = &.{}, // norm vectors with norm_weight_offset added, in f32
    token_embd: Matrix, // (vocab, hidden)
    layers: []Layer,
    output_norm: Matrix, // (1, hidden)
    output: Matrix, // (vocab, hidden): token_embd when tied

    pub fn deinit(w: *Weights, allocator: std.mem.Allocator) void {
        for (w.maps) |m| std.posix.munmap(m);
        allocator.free(w.maps);
        for (w.packed_buffers) |b| std.heap.page_allocator.free(b);
        allocator.free(w.packed_buffers);
        for (w.layers) |l| if (l.qkv_bias) |b| allocator.free(b);
        for (w.norm_copies) |c| allocator.free(c);
        allocator.free(w.norm_copies);
        allocator.free(w.layers);
        w.* = undefined;
    }
};

pub const LoadError = error{LoadFailed};

const Slot = struct { m: ?Matrix = null };

/// Maps the files, checks every tensor against the config and repacks the matrices the
/// packed products take (see packAll). On failure the
/// thread-local error message names the tensor and the problem, and `status` says its kind.
pub fn load(
    allocator: std.mem.Allocator,
    config: abi.ModelConfig,
    paths: []const [:0]const u8,
    tensors: []const abi.Tensor,
    bf16_products: bool,
    threads: usize,
    status: *abi.Status,
) !Weights {
    var w = try loadViews(allocator, config, paths, tensors, status);
    errdefer w.deinit(allocator);
    for (tensors) |t| if (t.file_index == dummy_file) {
        status.* = errors.fail(.unsupported, "random (dummy) weights are made by the CUDA backend; the CPU reads files", .{});
        return error.LoadFailed;
    };
    try packAll(allocator, &w, bf16_products, threads);
    return w;
}

pub const dummy_file = abi.file_dummy;

/// A dummy tensor's data: never read (the backend that takes dummy weights makes its own).
const no_data: [*]const u8 = @ptrFromInt(0x1000);

/// The files mapped and every tensor checked against the config, as views into the files (in
/// their stored types, plain rows): what a backend reads its weights from.
pub fn loadViews(
    allocator: std.mem.Allocator,
    config: abi.ModelConfig,
    paths: []const [:0]const u8,
    tensors: []const abi.Tensor,
    status: *abi.Status,
) !Weights {
    if (paths.len > files_max) {
        status.* = errors.fail(.invalid_argument, "expected at most {d} model files, got {d}", .{ files_max, paths.len });
        return error.LoadFailed;
    }
    const maps = try allocator.alloc([]align(std.mem.page_size) const u8, paths.len);
    var mapped: usize = 0;
    errdefer {
        for (maps[0..mapped]) |m| std.posix.munmap(m);
        allocator.free(maps);
    }
    for (paths, 0..) |path, i| {
        maps[i] = mapFile(path) catch |err| {
            status.* = errors.fail(.io, "cannot map model file '{s}': {s}", .{ path, @errorName(err) });
            return error.LoadFailed;
        };
        mapped += 1;
    }

    const layers = try allocator.alloc(Layer, config.num_layers);
    errdefer allocator.free(layers);
    const slots = try allocator.alloc(Slot, 3 + per_layer * @as(usize, config.num_layers) + 1);
    defer allocator.free(slots);
    @memset(slots, .{});

    for (tensors) |t| {
        const role: abi.Role = @enumFromInt(t.role);
        const index = slotIndex(role, t.layer, config.num_layers) orelse {
            status.* = errors.fail(.invalid_argument, "tensor role {d} layer {d} is not part of a Llama model with {d} layers", .{ t.role, t.layer, config.num_layers });
            return error.LoadFailed;
        };
        if (slots[index].m != null) {
            status.* = errors.fail(.invalid_argument, "tensor {s} (layer {d}) given twice", .{ roleName(role), t.layer });
            return error.LoadFailed;
        }
        slots[index].m = try checkTensor(t, role, config, maps, status);
    }

    const need = struct {
        fn get(s: []Slot, i: usize, role: abi.Role, layer: usize, st: *abi.Status) !Matrix {
            return s[i].m orelse {
                st.* = errors.fail(.invalid_argument, "missing tensor {s} (layer {d})", .{ roleName(role), layer });
                return error.LoadFailed;
            };
        }
    }.get;
    for (layers, 0..) |*layer, l| {
        const b = 3 + per_layer * l;
        layer.* = .{
            .attn_norm = try need(slots, b + 0, .attn_norm, l, status),
            .wq = try need(slots, b + 1, .attn_q, l, status),
            .wk = try need(slots, b + 2, .attn_k, l, status),
            .wv = try need(slots, b + 3, .attn_v, l, status),
            .wo = try need(slots, b + 4, .attn_out, l, status),
            .ffn_norm = try need(slots, b + 5, .ffn_norm, l, status),
            .w_gate = try need(slots, b + 6, .ffn_gate, l, status),
            .w_up = try need(slots, b + 7, .ffn_up, l, status),
            .w_down = try need(slots, b + 8, .ffn_down, l, status),
            .q_norm = slots[b + 12].m,
            .k_norm = slots[b + 13].m,
            .attn_post_norm = slots[b + 14].m,
            .ffn_post_norm = slots[b + 15].m,
        };
    }
    errdefer for (layers) |l| if (l.qkv_bias) |bias| allocator.free(bias);
    for (layers, 0..) |*layer, l| layer.qkv_bias = try qkvBias(allocator, config, slots[3 + per_layer * l + 9 ..][0..3]);
    const token_embd = try need(slots, 0, .token_embd, 0, status);
    const output_index = slots.len - 1;
    const output = slots[output_index].m orelse if (config.tie_word_embeddings != 0) token_embd else {
        status.* = errors.fail(.invalid_argument, "missing tensor output (lm_head) and the config does not tie word embeddings", .{});
        return error.LoadFailed;
    };
    var w = Weights{
        .maps = maps,
        .packed_buffers = &.{},
        .token_embd = token_embd,
        .layers = layers,
        .output_norm = try need(slots, 2, .output_norm, 0, status),
        .output = output,
    };
    errdefer {
        for (w.norm_copies) |c| allocator.free(c);
        allocator.free(w.norm_copies);
    }
    if (config.norm_weight_offset != 0) try offsetNorms(allocator, &w, config.norm_weight_offset);
    return w;
}

/// Whether a view is a dummy tensor's (no data behind it).
pub fn isDummy(m: Matrix) bool {
    return m.data == no_data;
}

/// Repacks every quantized matrix for the integer products (Q5_0 and IQ4_NL as Q8_0, Q3_K
/// as Q6_K, each weight exact), and every
/// float matrix (but an untied embedding, read a row at a time) for bf16 products with
/// `bf16_products`, else in its own type for f32 products; a tied output shares the
/// embedding's. `threads` threads pack
/// ranges of 16-row groups and drop the mapped pages they read as they go.
fn packAll(allocator: std.mem.Allocator, w: *Weights, bf16_products: bool, threads: usize) !void {
    var all = std.ArrayList(*Matrix).init(allocator);
    defer all.deinit();
    const tied = w.output.data == w.token_embd.data;
    try all.append(&w.token_embd);
    for (w.layers) |*l| {
        inline for (.{ "wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down" }) |name| try all.append(&@field(l, name));
    }
    if (!tied) try all.append(&w.output);

    // Which matrices, into what: buffers are made here, filled by the workers below.
    var jobs = std.ArrayList(PackJob).init(allocator);
    defer jobs.deinit();
    var buffers = std.ArrayList([]align(std.mem.page_size) u8).init(allocator);
    errdefer {
        for (buffers.items) |b| std.heap.page_allocator.free(b);
        buffers.deinit();
    }
    for (all.items) |m| {
        const float = m.dtype == .f32 or m.dtype == .f16 or m.dtype == .bf16;
        if (float and (m.cols % 16 != 0 or (m == &w.token_embd and !tied))) continue;
        const layout: Matrix.Layout = if (!float) .int_groups else if (bf16_products) .bf16_groups else .float_groups;
        // Q5_0, IQ4_NL and Q3_K are packed as the type that holds their values exactly.
        const packed_type = m.dtype.transcodedTo() orelse m.dtype;
        const bytes = switch (packed_type) {
            inline .q8_0, .q4_0, .q4_1, .q5_1, .q4_k, .q5_k, .q6_k => |t| qgemm.packedBytes(kernels.StorageType(t), m.rows, m.cols),
            inline .f32, .f16, .bf16 => |t| if (bf16_products) bgemm.packedBytes(m.rows, m.cols) else fgemm.packedBytes(kernels.StorageType(t), m.rows, m.cols),
            else => continue,
        };
        const buffer = try allocHugePages(bytes);
        try buffers.append(buffer);
        const groups = std.math.divCeil(usize, m.rows, qgemm.group_rows) catch unreachable;
        const chunk = 256; // groups a job: a big matrix is shared between threads
        var g: usize = 0;
        while (g < groups) : (g += chunk) try jobs.append(.{ .source = m.*, .layout = layout, .dst = buffer, .g_begin = g, .g_end = @min(groups, g + chunk) });
        m.* = .{ .dtype = packed_type, .data = buffer.ptr, .rows = m.rows, .cols = m.cols, .layout = layout };
    }

    var next = std.atomic.Value(usize).init(0);
    var helpers: [64]std.Thread = undefined;
    var spawned: usize = 0;
    while (spawned + 1 < @min(threads, helpers.len)) : (spawned += 1) {
        helpers[spawned] = std.Thread.spawn(.{}, packWorker, .{ jobs.items, &next }) catch break;
    }
    packWorker(jobs.items, &next);
    for (helpers[0..spawned]) |t| t.join();
    // Pages that straddled two jobs are dropped now that both are done (whole matrices,
    // from each one's first job).
    for (jobs.items) |j| if (j.g_begin == 0) dropPages(j.source.data, j.source.rows * j.source.rowBytes());
    if (tied) w.output = w.token_embd;
    w.packed_buffers = try buffers.toOwnedSlice();
}

/// 16-row groups [g_begin, g_end) of one matrix to pack.
const PackJob = struct { source: Matrix, layout: Matrix.Layout, dst: []u8, g_begin: usize, g_end: usize };

fn packWorker(jobs: []const PackJob, next: *std.atomic.Value(usize)) void {
    while (true) {
        const i = next.fetchAdd(1, .monotonic);
        if (i >= jobs.len) return;
        const j = jobs[i];
        const m = j.source;
        switch (m.dtype) {
            inline .q8_0, .q4_0, .q4_1, .q5_1, .q4_k, .q5_k, .q6_k, .q5_0, .iq4_nl, .q3_k => |t| {
                const to = comptime t.transcodedTo() orelse t;
                qgemm.packGroups(kernels.StorageType(to), kernels.StorageType(t), j.dst, m.data, m.rows, m.cols, j.g_begin, j.g_end);
            },
            inline .f32, .f16, .bf16 => |t| if (j.layout == .bf16_groups)
                bgemm.packGroups(kernels.StorageType(t), j.dst, m.data, m.rows, m.cols, j.g_begin, j.g_end)
            else
                fgemm.packGroups(kernels.StorageType(t), j.dst, m.data, m.rows, m.cols, j.g_begin, j.g_end),
            else => unreachable,
        }
        // The rows this job read, as far as whole pages go.
        const row_bytes = m.rowBytes();
        const first = j.g_begin * qgemm.group_rows;
        const end = @min(m.rows, j.g_end * qgemm.group_rows);
        dropPages(m.data + first * row_bytes, (end - first) * row_bytes);
    }
}

/// Page-allocator memory in huge pages where the kernel gives them (free it with
/// std.heap.page_allocator): a decode step streams every packed weight, and 4 KiB pages
/// cost TLB misses and stall the prefetchers; the KV cache uses it too.
pub fn allocHugePages(len: usize) ![]align(std.mem.page_size) u8 {
    const buffer = try std.heap.page_allocator.alignedAlloc(u8, std.mem.page_size, len);
    std.posix.madvise(buffer.ptr, buffer.len, std.posix.MADV.HUGEPAGE) catch {};
    return buffer;
}

/// Releases the whole pages of a mapped range (they are read again from the file if touched).
fn dropPages(data: [*]const u8, len: usize) void {
    const begin = std.mem.alignForward(usize, @intFromPtr(data), std.mem.page_size);
    const end = std.mem.alignBackward(usize, @intFromPtr(data) + len, std.mem.page_size);
    if (end <= begin) return;
    const pages: [*]align(std.mem.page_size) u8 = @ptrFromInt(begin);
    std.posix.madvise(pages, end - begin, std.posix.MADV.DONTNEED) catch {};
}

fn mapFile(path: [:0]const u8) ![]align(std.mem.page_size) const u8 {
    const file = try std.fs.cwd().openFileZ(path, .{});
    defer file.close();
    const size = (try file.stat()).size;
    if (size == 0) return error.EmptyFile;
    return std.posix.mmap(null, size, std.posix.PROT.READ, .{ .TYPE = .PRIVATE }, file.handle, 0);
}

/// Every norm vector as f32 with `offset` added (HF Gemma's x * (1 + w)): the norms then
/// compute as Llama's. The copies are the weights' own (freed with them).
fn offsetNorms(allocator: std.mem.Allocator, w: *Weights, offset: f32) !void {
    var norms = std.ArrayList(*Matrix).init(allocator);
    defer norms.deinit();
    try norms.append(&w.output_norm);
    for (w.layers) |*l| {
        try norms.appendSlice(&.{ &l.attn_norm, &l.ffn_norm });
        inline for (.{ "q_norm", "k_norm", "attn_post_norm", "ffn_post_norm" }) |name| {
            if (@field(l, name)) |*m| try norms.append(m);
        }
    }
    var copies = std.ArrayList([]f32).init(allocator);
    errdefer {
        for (copies.items) |c| allocator.free(c);
        copies.deinit();
    }
    for (norms.items) |m| {
        const copy = try allocator.alloc(f32, m.cols);
        try copies.append(copy);
        if (isDummy(m.*)) @memset(copy, 1 - offset) else m.readRow(copy, 0); // a dummy norm is all ones
        for (copy) |*v| v.* += offset;
        m.* = .{ .dtype = .f32, .data = @ptrCast(copy.ptr), .rows = 1, .cols = m.cols };
    }
    w.norm_copies = try copies.toOwnedSlice();
}

/// Slots a layer has: the nine Llama roles, then the optional ones (q/k/v bias, q/k norm,
/// post-attention and post-MLP norms).
const per_layer = 16;

/// slots: [token_embd, (unused), output_norm, layer 0 x14, layer 1 x14, ..., output]
fn slotIndex(role: abi.Role, layer: u32, num_layers: u32) ?usize {
    const per_layer_base: usize = 3 + per_layer * @as(usize, layer);
    return switch (role) {
        .token_embd => 0,
        .output_norm => 2,
        .output => 3 + per_layer * @as(usize, num_layers),
        .attn_norm, .attn_q, .attn_k, .attn_v, .attn_out, .ffn_norm, .ffn_gate, .ffn_up, .ffn_down => if (layer >= num_layers) null else per_layer_base + (@intFromEnum(role) - 1),
        .attn_q_bias, .attn_k_bias, .attn_v_bias, .attn_q_norm, .attn_k_norm, .attn_post_norm, .ffn_post_norm => if (layer >= num_layers) null else per_layer_base + 9 + (@intFromEnum(role) - @intFromEnum(abi.Role.attn_q_bias)),
        _ => null,
    };
}

/// A layer's q, k and v biases as one f32 row over q, k and v (zeros for an absent one),
/// or null when it has none.
fn qkvBias(allocator: std.mem.Allocator, c: abi.ModelConfig, biases: []const Slot) !?[]f32 {
    if (biases[0].m == null and biases[1].m == null and biases[2].m == null) return null;
    const q_dim = @as(usize, c.num_heads) * c.head_dim;
    const kv_dim = @as(usize, c.num_kv_heads) * c.head_dim;
    const row = try allocator.alloc(f32, q_dim + 2 * kv_dim);
    var at: usize = 0;
    for (biases, [_]usize{ q_dim, kv_dim, kv_dim }) |b, len| {
        if (b.m != null and !isDummy(b.m.?)) b.m.?.readRow(row[at..][0..len], 0) else @memset(row[at..][0..len], 0);
        at += len;
    }
    return row;
}

pub fn roleName(role: abi.Role) []const u8 {
    return std.enums.tagName(abi.Role, role) orelse "unknown";
}

fn expectedShape(role: abi.Role, c: abi.ModelConfig) [2]u64 {
    const q_dim = @as(u64, c.num_heads) * c.head_dim;
    const kv_dim = @as(u64, c.num_kv_heads) * c.head_dim;
    return switch (role) {
        .token_embd, .output => .{ c.vocab_size, c.hidden_size },
        .attn_norm, .ffn_norm, .output_norm => .{ 1, c.hidden_size },
        .attn_q => .{ q_dim, c.hidden_size },
        .attn_k, .attn_v => .{ kv_dim, c.hidden_size },
        .attn_out => .{ c.hidden_size, q_dim },
        .ffn_gate, .ffn_up => .{ c.intermediate_size, c.hidden_size },
        .ffn_down => .{ c.hidden_size, c.intermediate_size },
        .attn_q_bias => .{ 1, q_dim },
        .attn_k_bias, .attn_v_bias => .{ 1, kv_dim },
        .attn_q_norm, .attn_k_norm => .{ 1, c.head_dim },
        .attn_post_norm, .ffn_post_norm => .{ 1, c.hidden_size },
        _ => unreachable,
    };
}

fn checkTensor(t: abi.Tensor, role: abi.Role, config: abi.ModelConfig, maps: []const []align(std.mem.page_size) const u8, status: *abi.Status) !Matrix {
    const dtype: abi.DType = @enumFromInt(t.dtype);
    const block_elems = dtype.blockElems() orelse {
        status.* = errors.fail(.unsupported, "tensor {s} (layer {d}) has dtype {d}, which this engine does not support (supported: f32, f16, bf16, q8_0, q4_0, q4_1, q5_0, q5_1, q4_k, q5_k, q6_k, q3_k, iq4_nl)", .{ roleName(role), t.layer, t.dtype });
        return error.LoadFailed;
    };
    const block_bytes = dtype.blockBytes().?;
    const want = expectedShape(role, config);
    if (t.rows != want[0] or t.cols != want[1]) {
        status.* = errors.fail(.shape, "tensor {s} (layer {d}) has shape ({d}, {d}); the config needs ({d}, {d})", .{ roleName(role), t.layer, t.rows, t.cols, want[0], want[1] });
        return error.LoadFailed;
    }
    if (t.cols % block_elems != 0) {
        status.* = errors.fail(.shape, "tensor {s} (layer {d}) has rows of {d} weights, not a whole number of {d}-weight blocks", .{ roleName(role), t.layer, t.cols, block_elems });
        return error.LoadFailed;
    }
    const want_bytes = t.rows * (t.cols / block_elems) * block_bytes;
    if (t.size_bytes != want_bytes) {
        status.* = errors.fail(.shape, "tensor {s} (layer {d}) holds {d} bytes, but ({d}, {d}) weights of dtype {d} need {d}", .{ roleName(role), t.layer, t.size_bytes, t.rows, t.cols, t.dtype, want_bytes });
        return error.LoadFailed;
    }
    if (t.file_index == dummy_file) return .{ .dtype = dtype, .data = no_data, .rows = t.rows, .cols = t.cols };
    if (t.file_index >= maps.len) {
        status.* = errors.fail(.invalid_argument, "tensor {s} (layer {d}) names file {d} of {d}", .{ roleName(role), t.layer, t.file_index, maps.len });
        return error.LoadFailed;
    }
    const file = maps[t.file_index];
    if (t.offset > file.len or t.size_bytes > file.len - t.offset) {
        status.* = errors.fail(.io, "tensor {s} (layer {d}) ends at byte {d}, past the end of its file ({d} bytes): the file is truncated", .{ roleName(role), t.layer, t.offset + t.size_bytes, file.len });
        return error.LoadFailed;
    }
    return .{ .dtype = dtype, .data = file.ptr + t.offset, .rows = t.rows, .cols = t.cols };
}
