//! CPU kernels: small pure functions, output first. Each has a naive twin in the
//! tests below that it is checked against.

const std = @import("std");
const assert = std.debug.assert;
const DType = @import("abi.zig").DType;
const quant = @import("quant.zig");
const qgemm = @import("qgemm.zig");
const bgemm = @import("bgemm.zig");
const fgemm = @import("fgemm.zig");
const Prefetcher = qgemm.Prefetcher;

pub const vec_len = 16;
const V = @Vector(vec_len, f32);

/// A 2-D weight matrix in its stored dtype: (rows, cols), row-major, not necessarily
/// aligned (`plain`), or packed at load into 16-row groups (see Layout).
pub const Matrix = struct {
    dtype: DType,
    data: [*]const u8,
    rows: usize,
    cols: usize,
    layout: Layout = .plain,

    pub const Layout = enum {
        plain,
        /// Q8_0/Q4_0/Q4_1/Q5_1/Q4_K/Q5_K/Q6_K for the integer products (qgemm.pack).
        int_groups,
        /// Float weights rounded to bf16 pairs for bf16 products (bgemm.pack).
        bf16_groups,
        /// Float weights in their own type, column by column, for f32 products (fgemm.pack).
        float_groups,
    };

    pub fn rowBytes(m: Matrix) usize {
        assert(m.layout == .plain);
        return m.cols / m.dtype.blockElems().? * m.dtype.blockBytes().?;
    }

    /// Row `row` widened to f32 (the embedding lookup): the type is picked once, not per element.
    pub fn readRow(m: Matrix, out: []f32, row: usize) void {
        assert(row < m.rows);
        assert(out.len == m.cols);
        if (m.layout != .plain) {
            // A packed row is spread over its group: weight by weight (one row a token).
            for (out, 0..) |*o, c| o.* = m.get(row, c);
            return;
        }
        const row_ptr = m.data + row * m.rowBytes();
        switch (m.dtype) {
            inline .f32, .f16, .bf16, .q8_0, .q4_0, .q4_1, .q5_1, .q4_k, .q5_k, .q6_k => |t| {
                const p: [*]align(1) const StorageType(t) = @ptrCast(row_ptr);
                for (out, 0..) |*o, c| o.* = loadScalar(StorageType(t), p, c);
            },
            else => unreachable,
        }
    }

    /// Element (row, col) widened to f32: for tests and one-off reads.
    pub fn get(m: Matrix, row: usize, col: usize) f32 {
        assert(row < m.rows);
        assert(col < m.cols);
        switch (m.layout) {
            .plain => {},
            .int_groups => return switch (m.dtype) {
                inline .q8_0, .q4_0, .q4_1, .q5_1, .q4_k, .q5_k, .q6_k => |t| qgemm.weightAt(StorageType(t), m.data, m.cols, row, col),
                else => unreachable,
            },
            .bf16_groups => return bgemm.weightAt(m.data, m.cols, row, col),
            .float_groups => return switch (m.dtype) {
                inline .f32, .f16, .bf16 => |t| fgemm.weightAt(StorageType(t), m.data, m.cols, row, col),
                else => unreachable,
            },
        }
        const row_ptr = m.data + row * m.rowBytes();
        return switch (m.dtype) {
            inline .f32, .f16, .bf16, .q8_0, .q4_0, .q4_1, .q5_1, .q4_k, .q5_k, .q6_k => |t| loadScalar(StorageType(t), @ptrCast(row_ptr), col),
            else => unreachable,
        };
    }
};

/// How a dtype is stored: the element type for floats (u16 for bf16), the block type for quantized ones.
pub fn StorageType(comptime dtype: DType) type {
    return switch (dtype) {
        .f32 => f32,
        .f16 => f16,
        .bf16 => u16,
        .q8_0 => quant.BlockQ8_0,
        .q4_0 => quant.BlockQ4_0,
        .q4_1 => quant.BlockQ4_1,
        .q5_1 => quant.BlockQ5_1,
        .q4_k => quant.BlockQ4_K,
        .q5_k => quant.BlockQ5_K,
        .q6_k => quant.BlockQ6_K,
        .q5_0 => quant.BlockQ5_0,
        .iq4_nl => quant.BlockIQ4_NL,
        .q3_k => quant.BlockQ3_K,
        _ => unreachable,
    };
}

pub fn bf16ToF32(bits: u16) f32 {
    return @bitCast(@as(u32, bits) << 16);
}

inline fn loadVec(comptime T: type, p: [*]align(1) const T, i: usize) V {
    return loadVecN(vec_len, T, p, i);
}

/// `lanes` weights from p[i..], widened to f32 (u16 means bf16).
inline fn loadVecN(comptime lanes: usize, comptime T: type, p: [*]align(1) const T, i: usize) @Vector(lanes, f32) {
    if (comptime quant.isBlock(T)) return quant.load(lanes, T, p, i);
    const chunk: @Vector(lanes, T) = p[i..][0..lanes].*;
    return switch (T) {
        f32 => chunk,
        f16 => @floatCast(chunk),
        u16 => @bitCast(@as(@Vector(lanes, u32), chunk) << @splat(16)),
        else => @compileError("unsupported weight element type"),
    };
}

inline fn loadScalar(comptime T: type, p: [*]align(1) const T, i: usize) f32 {
    if (comptime quant.isBlock(T)) return quant.scalar(T, p, i);
    return switch (T) {
        f32 => p[i],
        f16 => @floatCast(p[i]),
        u16 => bf16ToF32(p[i]),
        else => @compileError("unsupported weight element type"),
    };
}

/// dot(w[0..n], x[0..n]) with w in its stored type (u16 means bf16).
pub inline fn dot(comptime T: type, w: [*]align(1) const T, x: [*]const f32, n: usize) f32 {
    var acc0: V = @splat(0);
    var acc1: V = @splat(0);
    var i: usize = 0;
    while (i + 2 * vec_len <= n) : (i += 2 * vec_len) {
        acc0 = @mulAdd(V, loadVec(T, w, i), x[i..][0..vec_len].*, acc0);
        acc1 = @mulAdd(V, loadVec(T, w, i + vec_len), x[i + vec_len ..][0..vec_len].*, acc1);
    }
    if (i + vec_len <= n) {
        acc0 = @mulAdd(V, loadVec(T, w, i), x[i..][0..vec_len].*, acc0);
        i += vec_len;
    }
    var sum = @reduce(.Add, acc0 + acc1);
    while (i < n) : (i += 1) sum += loadScalar(T, w, i) * x[i];
    return sum;
}

/// out[n, r] = x[n, :] . w[r, :] for r in [row_begin, row_end), every n < n_tokens.
/// out: (n_tokens, out_stride), x: (n_tokens, w.cols). Each weight row is read once
/// for all tokens, so a batch of sequences shares one pass over the weights.
/// acts: x in the forms packed weights take, where the caller made them.
pub fn matmulRows(out: []f32, out_stride: usize, x: []const f32, n_tokens: usize, w: Matrix, row_begin: usize, row_end: usize, acts: Acts) void {
    switch (w.dtype) {
        inline .f32, .f16, .bf16 => |t| switch (w.layout) {
            .float_groups => fgemm.matmulRows(StorageType(t), out, out_stride, x, n_tokens, w.data, w.cols, row_begin, row_end),
            // bf16 products: the caller rounded x to bf16.
            .bf16_groups => bgemm.matmulRows(out, out_stride, acts.bf16.?, n_tokens, w.data, w.cols, row_begin, row_end),
            .plain => matmulRowsTyped(StorageType(t), out, out_stride, x, n_tokens, w, row_begin, row_end),
            .int_groups => unreachable,
        },
        // Quantized weights are always packed (at load) and multiplied in integers: the
        // caller quantized x.
        inline .q8_0, .q4_0, .q4_1, .q5_1, .q4_k, .q5_k, .q6_k => |t| {
            assert(w.layout == .int_groups);
            qgemm.matmulRows(StorageType(t), out, out_stride, acts.q8.?, n_tokens, w.data, w.cols, row_begin, row_end);
        },
        else => unreachable, // packed as another type, or refused, at load
    }
}

/// A matmul's input in the forms its weights' fast paths take (null where not made).
pub const Acts = struct {
    /// Quantized to 8 bits: for packed (Q8_0, Q4_0, Q4_1, Q5_1, Q4_K, Q5_K, Q6_K) weights, which need it.
    q8: ?quant.QuantActs = null,
    /// Rounded to bf16 (tokens, cols): for packed float weights (bf16 products), which need it.
    bf16: ?[]const u16 = null,
};

fn matmulRowsTyped(comptime T: type, out: []f32, out_stride: usize, x: []const f32, n_tokens: usize, w: Matrix, row_begin: usize, row_end: usize) void {
    assert(row_end <= w.rows);
    assert(x.len >= n_tokens * w.cols);
    assert(out.len >= (n_tokens - 1) * out_stride + row_end or n_tokens == 0);
    comptime assert(!quant.isBlock(T)); // quantized weights take qgemm
    const base: [*]align(1) const T = @ptrCast(w.data);
    const cols = w.cols;
    const units = cols;
    var r = row_begin;
    // Tiles of 4 weight rows x 4 tokens: 8 vector loads feed 16 FMAs, and each weight
    // vector is widened once for four tokens. Used when there are tokens to share it
    // (prefill, batched decode); one token takes the per-row path below.
    if (n_tokens >= tile_tokens) {
        // Token blocks small enough to stay in L2 while every row tile of this chunk
        // passes over them; a row tile stays in L1 across its block.
        const block_tokens = std.mem.alignForward(usize, @max(tile_tokens, block_bytes / (cols * @sizeOf(f32))), tile_tokens);
        const tiled_end = row_begin + (row_end - row_begin) / tile_rows * tile_rows;
        var block: usize = 0;
        while (block < n_tokens) : (block += block_tokens) {
            const block_end = @min(n_tokens, block + block_tokens);
            var rt = row_begin;
            while (rt < tiled_end) : (rt += tile_rows) {
                var n = block;
                while (n + tile_tokens <= block_end) : (n += tile_tokens) {
                    const sums = tile4x4(T, base + rt * units, units, cols, x.ptr + n * cols);
                    inline for (0..tile_tokens) |j| {
                        inline for (0..tile_rows) |i| out[(n + j) * out_stride + rt + i] = sums[i][j];
                    }
                }
                while (n < block_end) : (n += 1) {
                    inline for (0..tile_rows) |i| out[n * out_stride + rt + i] = dot(T, base + (rt + i) * units, x.ptr + n * cols, cols);
                }
            }
        }
        r = tiled_end;
    }
    for (r..row_end) |row_index| {
        const row = base + row_index * units;
        var n: usize = 0;
        while (n + tokens_per_pass <= n_tokens) : (n += tokens_per_pass) {
            const sums = dot4(T, row, x.ptr + n * cols, cols);
            inline for (0..tokens_per_pass) |j| out[(n + j) * out_stride + row_index] = sums[j];
        }
        while (n < n_tokens) : (n += 1) out[n * out_stride + row_index] = dot(T, row, x.ptr + n * cols, cols);
    }
}

pub const tile_rows = 4;
pub const tile_tokens = 4;
const block_bytes = 128 * 1024; // of activations per token block: a share of a 1 MiB L2

/// sums[i][j] = w_i . x_j for 4 consecutive weight rows (stride `units`) and 4 tokens (stride cols).
/// Eight-wide vectors: 16 accumulators and 8 operands fit the 32 vector registers
/// without spilling, and every multiply-add is one fused instruction.
inline fn tile4x4(comptime T: type, w: [*]align(1) const T, units: usize, cols: usize, x: [*]const f32) [tile_rows][tile_tokens]f32 {
    const lanes = 8;
    const V8 = @Vector(lanes, f32);
    var acc: [tile_rows][tile_tokens]V8 = .{.{@as(V8, @splat(0))} ** tile_tokens} ** tile_rows;
    var k: usize = 0;
    while (k + lanes <= cols) : (k += lanes) {
        var wv: [tile_rows]V8 = undefined;
        inline for (0..tile_rows) |i| wv[i] = loadVecN(lanes, T, w + i * units, k);
        inline for (0..tile_tokens) |j| {
            const xv: V8 = x[j * cols + k ..][0..lanes].*;
            inline for (0..tile_rows) |i| acc[i][j] = @mulAdd(V8, wv[i], xv, acc[i][j]);
        }
    }
    var sums: [tile_rows][tile_tokens]f32 = undefined;
    inline for (0..tile_rows) |i| {
        inline for (0..tile_tokens) |j| sums[i][j] = @reduce(.Add, acc[i][j]);
    }
    while (k < cols) : (k += 1) {
        inline for (0..tile_rows) |i| {
            const wi = loadScalar(T, w + i * units, k);
            inline for (0..tile_tokens) |j| sums[i][j] += wi * x[j * cols + k];
        }
    }
    return sums;
}

const tokens_per_pass = 4;

/// dot(w, x_j) for four consecutive rows x_j of length n (stride n).
inline fn dot4(comptime T: type, w: [*]align(1) const T, x: [*]const f32, n: usize) [tokens_per_pass]f32 {
    var acc: [tokens_per_pass]V = .{@as(V, @splat(0))} ** tokens_per_pass;
    var i: usize = 0;
    while (i + vec_len <= n) : (i += vec_len) {
        const wv = loadVec(T, w, i);
        inline for (0..tokens_per_pass) |j| acc[j] = @mulAdd(V, wv, x[j * n + i ..][0..vec_len].*, acc[j]);
    }
    var sums: [tokens_per_pass]f32 = undefined;
    inline for (0..tokens_per_pass) |j| sums[j] = @reduce(.Add, acc[j]);
    while (i < n) : (i += 1) {
        const wi = loadScalar(T, w, i);
        inline for (0..tokens_per_pass) |j| sums[j] += wi * x[j * n + i];
    }
    return sums;
}

/// out = x / sqrt(mean(x^2) + eps) * weight, as llama2.c computes it. out may be x (in place).
pub fn rmsnorm(out: []f32, x: []const f32, weight: Matrix, eps: f32) void {
    assert(out.len == x.len);
    assert(weight.rows * weight.cols == x.len);
    // As llama.cpp's rms_norm: squares in f32 summed in f64, the mean and the scale in f32
    // (its 8-bit activations round at the same points then). In vectors: a plain sum is one
    // chain of dependent adds (LLVM keeps its order), microseconds for a 2048-wide row.
    const H = @Vector(vec_len / 2, f32);
    const D = @Vector(vec_len / 2, f64);
    var acc: [4]D = .{@as(D, @splat(0))} ** 4;
    var i: usize = 0;
    while (i + 2 * vec_len <= x.len) : (i += 2 * vec_len) {
        inline for (&acc, 0..) |*a, k| {
            const v: H = x[i + k * vec_len / 2 ..][0 .. vec_len / 2].*;
            a.* += @as(D, @floatCast(v * v));
        }
    }
    var ss: f64 = @reduce(.Add, (acc[0] + acc[1]) + (acc[2] + acc[3]));
    for (x[i..]) |v| ss += v * v;
    const mean: f32 = @floatCast(ss / @as(f64, @floatFromInt(x.len)));
    const scale = 1.0 / @sqrt(mean + eps);
    switch (weight.dtype) {
        inline .f32, .f16, .bf16, .q8_0, .q4_0, .q4_1, .q5_1, .q4_k, .q5_k, .q6_k => |t| {
            const w: [*]align(1) const StorageType(t) = @ptrCast(weight.data);
            var j: usize = 0;
            if (t == .f32) {
                while (j + vec_len <= x.len) : (j += vec_len) {
                    const v: V = x[j..][0..vec_len].*;
                    const wv: V = w[j..][0..vec_len].*;
                    out[j..][0..vec_len].* = wv * (@as(V, @splat(scale)) * v);
                }
            }
            for (out[j..], x[j..], j..) |*o, v, k| o.* = loadScalar(StorageType(t), w, k) * (scale * v);
        },
        else => unreachable,
    }
}

/// Rotates one head vector in place by the precomputed (cos, sin) of its position.
/// interleaved: pairs (2i, 2i+1) as GGUF/llama2.c store q and k;
/// otherwise HF's rotate-half pairs (i, i + head_dim/2).
pub fn rope(head: []f32, cos: []const f32, sin: []const f32, interleaved: bool) void {
    const half = head.len / 2;
    assert(head.len % 2 == 0);
    assert(cos.len == half);
    assert(sin.len == half);
    for (0..half) |i| {
        const a = if (interleaved) 2 * i else i;
        const b = if (interleaved) 2 * i + 1 else i + half;
        const x0 = head[a];
        const x1 = head[b];
        head[a] = x0 * cos[i] - x1 * sin[i];
        head[b] = x0 * sin[i] + x1 * cos[i];
    }
}

/// exp of 16 lanes at once (Cephes' expf: x = n ln 2 + r, |r| <= ln 2 / 2, a degree-6
/// polynomial for e^r, then 2^n in the exponent bits), within 2 ulp of the true value.
/// Below -87.3 (where f32 goes denormal) it gives 0, so exp(-inf) = 0; above 88.3 it
/// saturates at e^88.3 (3e38), not inf.
pub inline fn expVec(x: V) V {
    const hi: V = @splat(88.3);
    const lo: V = @splat(-87.3);
    const xc = @max(@min(x, hi), lo);
    const n = @round(xc * @as(V, @splat(1.44269504088896341)));
    var r = @mulAdd(V, n, @splat(-0.693359375), xc);
    r = @mulAdd(V, n, @splat(2.12194440e-4), r);
    var p: V = @splat(1.9875691500e-4);
    inline for (.{ 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1 }) |c| p = @mulAdd(V, p, r, @splat(c));
    const y = @mulAdd(V, p * r, r, r + @as(V, @splat(1)));
    const scale: V = @bitCast((@as(@Vector(vec_len, i32), @intFromFloat(n)) + @as(@Vector(vec_len, i32), @splat(127))) << @splat(23));
    return @select(f32, x < lo, @as(V, @splat(0)), y * scale);
}

/// exp of one value through expVec (tails of vector loops: the same rounding).
pub inline fn expScalar(x: f32) f32 {
    return expVec(@splat(x))[0];
}

/// out[i] = exp((x[i] - max) * scale); returns their sum. out may be x.
pub fn expScaled(out: []f32, x: []const f32, max: f32, scale: f32) f32 {
    assert(out.len == x.len);
    // Summed lane by lane and reduced once: a float @reduce is an ordered chain of 16 adds,
    // which a vector a time made the slowest part of decode attention at depth.
    var acc: V = @splat(0);
    var i: usize = 0;
    while (i + vec_len <= x.len) : (i += vec_len) {
        const e = expVec((@as(V, x[i..][0..vec_len].*) - @as(V, @splat(max))) * @as(V, @splat(scale)));
        out[i..][0..vec_len].* = e;
        acc += e;
    }
    var sum = @reduce(.Add, acc);
    for (out[i..], x[i..]) |*o, v| {
        o.* = expScalar((v - max) * scale);
        sum += o.*;
    }
    return sum;
}

/// The largest value, NaNs aside (sampling, softmax). In vectors: a float max taken one
/// value after another is one dependent chain, ~25 us over a 32000-token vocabulary.
pub fn maxOf(xs: []const f32) f32 {
    var acc: [4]V = .{@as(V, @splat(-std.math.inf(f32)))} ** 4;
    var i: usize = 0;
    while (i + 4 * vec_len <= xs.len) : (i += 4 * vec_len) {
        inline for (&acc, 0..) |*a, k| a.* = @max(a.*, @as(V, xs[i + k * vec_len ..][0..vec_len].*));
    }
    var m = @reduce(.Max, @max(@max(acc[0], acc[1]), @max(acc[2], acc[3])));
    for (xs[i..]) |v| m = @max(m, v);
    return m;
}

pub fn softmax(x: []f32) void {
    assert(x.len > 0);
    const sum = expScaled(x, x, maxOf(x), 1);
    const inv: V = @splat(1 / sum);
    var i: usize = 0;
    while (i + vec_len <= x.len) : (i += vec_len) x[i..][0..vec_len].* = @as(V, x[i..][0..vec_len].*) * inv;
    for (x[i..]) |*v| v.* *= inv[0];
}

/// out = silu(gate) * up, elementwise.
pub fn siluMul(out: []f32, gate: []const f32, up: []const f32) void {
    assert(gate.len == up.len);
    assert(out.len == gate.len);
    var i: usize = 0;
    while (i + vec_len <= out.len) : (i += vec_len) {
        const g: V = gate[i..][0..vec_len].*;
        out[i..][0..vec_len].* = g / (@as(V, @splat(1)) + expVec(-g)) * @as(V, up[i..][0..vec_len].*);
    }
    for (out[i..], gate[i..], up[i..]) |*o, g, u| o.* = g / (1.0 + expScalar(-g)) * u;
}

/// How attention scores are made from q . k: the scale, an optional soft cap (Gemma 2), and
/// how many of the first positions are masked out (a sliding window's start within its block).
pub const ScoreShape = struct {
    scale: f32,
    softcap: f32 = 0,
    masked: usize = 0,

    pub fn plain(head_dim: usize) ScoreShape {
        return .{ .scale = 1.0 / @sqrt(@as(f32, @floatFromInt(head_dim))) };
    }
};

/// out = gelu(gate) * up, elementwise, GELU's tanh approximation (Gemma's gelu_pytorch_tanh).
pub fn geluMul(out: []f32, gate: []const f32, up: []const f32) void {
    assert(gate.len == up.len);
    assert(out.len == gate.len);
    const c: f32 = @sqrt(2.0 / std.math.pi);
    for (out, gate, up) |*o, g, u| o.* = 0.5 * g * (1 + std.math.tanh(c * (g + 0.044715 * g * g * g))) * u;
}

/// Where the paged KV cache keeps each value. A layer's cache holds one run of block_size slots
/// per KV head and block, each head's runs in block order (head-major): K dimension-major (one
/// dimension of 16 slots is one vector, multiplied by a broadcast q element of each head of a
/// group, with no sum across lanes), V slot-major (a slot's head_dim values adjacent). A run is
/// what attention reads in one stream and asks memory for ahead of time; a sequence whose
/// blocks were handed out in order (a fresh pool's, a prompt's) reads each head's K and V as
/// one stream, which the hardware's prefetchers follow.
pub const KvLayout = struct {
    block_size: usize,
    head_dim: usize,
    num_kv_heads: usize,
    num_blocks: usize,

    /// Elements of one layer's cache.
    pub fn layerLen(l: KvLayout) usize {
        return l.num_blocks * l.num_kv_heads * l.block_size * l.head_dim;
    }

    /// Where KV head h's run in `block` starts, in elements.
    pub inline fn run(l: KvLayout, block: usize, h: usize) usize {
        return (h * l.num_blocks + block) * l.block_size * l.head_dim;
    }

    pub inline fn kIndex(l: KvLayout, slot: usize, h: usize, d: usize) usize {
        return l.run(slot / l.block_size, h) + d * l.block_size + slot % l.block_size;
    }

    pub inline fn vIndex(l: KvLayout, slot: usize, h: usize, d: usize) usize {
        return l.run(slot / l.block_size, h) + slot % l.block_size * l.head_dim + d;
    }
};

/// One token's K and V, (num_kv_heads, head_dim) each, into the cache at `slot`.
pub fn storeKv(comptime KV: type, l: KvLayout, k_cache: []KV, v_cache: []KV, slot: usize, k: []const f32, v: []const f32) void {
    for (0..l.num_kv_heads) |h| for (0..l.head_dim) |d| {
        k_cache[l.kIndex(slot, h, d)] = fromF32(KV, k[h * l.head_dim + d]);
        v_cache[l.vIndex(slot, h, d)] = fromF32(KV, v[h * l.head_dim + d]);
    };
}

inline fn fromF32(comptime KV: type, x: f32) KV {
    return if (KV == f32) x else @floatCast(x);
}

/// The `group` query heads that share one KV head (grouped-query attention), attending
/// over the first `context_len` positions of their sequence in the paged cache: every score,
/// the softmax of each head's row, then the weighted sum of V. Each K and V vector is read
/// once for the whole group.
///   q, out: (group, head_dim); scores: scratch, at least group * (context_len + vec_len).
pub fn attendGroup(
    comptime KV: type,
    out: []f32,
    q: []const f32,
    group: usize,
    k_cache: []const KV,
    v_cache: []const KV,
    layout: KvLayout,
    kv_head: usize,
    block_table: []const i32,
    context_len: usize,
    scores: []f32,
    shape: ScoreShape,
) void {
    assert(group >= 1);
    assert(q.len == group * layout.head_dim);
    assert(out.len == q.len);
    assert(context_len > shape.masked);
    const stride = context_len + vec_len; // a row's slack takes a last vector's stale lanes
    assert(scores.len >= group * stride);
    assert(block_table.len * layout.block_size >= context_len);
    scoreRows(KV, scores, stride, q, group, k_cache, layout, kv_head, block_table, context_len, shape.scale);
    for (0..group) |h| {
        const sh = scores[h * stride ..][0..context_len];
        if (shape.softcap != 0) for (sh) |*v| {
            v.* = shape.softcap * std.math.tanh(v.* / shape.softcap);
        };
        @memset(sh[0..shape.masked], -std.math.inf(f32));
        softmax(sh);
    }
    @memset(out, 0);
    addWeightedV(KV, out, scores, stride, group, v_cache, layout, kv_head, block_table, context_len);
}

/// The first position a query at `pos` attends to: pos + 1 - window with a sliding window
/// (0: none), else 0.
pub fn windowStart(pos: usize, window: usize) usize {
    return if (window > 0 and pos + 1 > window) pos + 1 - window else 0;
}

/// Most queries of one sequence a prefill tile takes (attendTile).
pub const tile_queries = 16;

/// Positions a tile's rows take at a time, rounded down to whole blocks (K and V for them stay
/// in L2 while every row of the tile passes over them); blocks may be at most this long.
pub const tile_chunk = 256;

/// A thread's working memory for attendTile: per row (query x head of the group) its running
/// max, its sum of exponentials and its weighted sum of V; and one query's scores over a chunk.
pub const TileScratch = struct {
    m: []f32, // (tile_queries * group)
    l: []f32, // (tile_queries * group)
    acc: []f32, // (tile_queries * group, head_dim)
    scores: []f32, // (group, tile_chunk + vec_len)
};

/// The `group` query heads of `n_q` consecutive positions first_pos .. of one sequence (a
/// prefill tile), attending causally (and, with a window, over the last `window` positions each)
/// with an online softmax, FlashAttention's scheme: the tile walks the sequence's K/V a chunk
/// of tile_chunk positions at a time, every query of the tile passing over a chunk while it is
/// in cache, and holds no score row of the whole context. Within a chunk a query's scores and
/// weighted sums of V run as attendGroup's do; the chunks are merged by their maxima. Row
/// r = i * group + h is query i's head h: q at q[i * q_stride + h * head_dim ..]; out at
/// out[i * out_stride + h * head_dim ..].
pub fn attendTile(
    comptime KV: type,
    out: []f32,
    out_stride: usize,
    q: []const f32,
    q_stride: usize,
    n_q: usize,
    group: usize,
    k_cache: []const KV,
    v_cache: []const KV,
    layout: KvLayout,
    kv_head: usize,
    block_table: []const i32,
    first_pos: usize,
    window: usize,
    shape: ScoreShape,
    work: TileScratch,
) void {
    const head_dim = layout.head_dim;
    const bs = layout.block_size;
    assert(n_q >= 1 and n_q <= tile_queries);
    assert(bs <= tile_chunk and work.scores.len >= group * (tile_chunk + vec_len));
    const chunk = tile_chunk / bs * bs; // whole blocks
    const stride = chunk + vec_len;
    const rows = n_q * group;
    const last_pos = first_pos + n_q - 1;
    @memset(work.m[0..rows], -std.math.inf(f32));
    @memset(work.l[0..rows], 0);
    @memset(work.acc[0 .. rows * head_dim], 0);
    var c0 = windowStart(first_pos, window) / chunk * chunk;
    while (c0 <= last_pos) : (c0 += chunk) {
        const table = block_table[c0 / bs ..];
        for (0..n_q) |i| {
            const pos = first_pos + i;
            const lo = windowStart(pos, window);
            if (c0 > pos or c0 + chunk <= lo) continue;
            const len = @min(chunk, pos + 1 - c0); // positions c0 .. c0 + len - 1
            const qi = q[i * q_stride ..][0 .. group * head_dim];
            scoreRows(KV, work.scores, stride, qi, group, k_cache, layout, kv_head, table, len, shape.scale);
            const acc = work.acc[i * group * head_dim ..][0 .. group * head_dim];
            for (0..group) |h| {
                const r = i * group + h;
                const sc = work.scores[h * stride ..][0..len];
                if (shape.softcap != 0) for (sc) |*v| {
                    v.* = shape.softcap * std.math.tanh(v.* / shape.softcap);
                };
                if (lo > c0) @memset(sc[0 .. lo - c0], -std.math.inf(f32));
                const m_new = @max(work.m[r], maxOf(sc));
                const correction = expScalar(work.m[r] - m_new); // 0 for the first chunk (m = -inf)
                work.l[r] = work.l[r] * correction + expScaled(sc, sc, m_new, 1);
                work.m[r] = m_new;
                for (acc[h * head_dim ..][0..head_dim]) |*a| a.* *= correction;
            }
            addWeightedV(KV, acc, work.scores, stride, group, v_cache, layout, kv_head, table, len);
        }
    }
    for (0..n_q) |i| for (0..group) |h| {
        const r = i * group + h;
        const inv = 1 / work.l[r];
        const o = out[i * out_stride + h * head_dim ..][0..head_dim];
        for (o, work.acc[r * head_dim ..][0..head_dim]) |*x, a| x.* = a * inv;
    };
}

/// Blocks ahead whose runs attention asks memory for while it works on one: a block out of
/// order starts a new stream, which the hardware's prefetchers take a while to follow. A run's
/// lines are asked for a few at a time through the block's arithmetic (qgemm.Prefetcher), not
/// all at once, which would hold the core up until its line buffers drained.
const prefetch_blocks = 4;

/// Block bi of a walk over the first `len` positions of a block table: KV head kv_head's run in
/// it, its first position, how many positions it holds, and the run prefetch_blocks further on
/// to ask memory for meanwhile.
inline fn walkBlock(comptime KV: type, cache: []const KV, layout: KvLayout, kv_head: usize, table: []const i32, len: usize, bi: usize) struct { run: [*]const KV, p: usize, n: usize, ahead: Prefetcher } {
    const bs = layout.block_size;
    var ahead = Prefetcher{ .next = 0, .end = 0 };
    if ((bi + prefetch_blocks) * bs < len) {
        const run = cache[layout.run(@intCast(table[bi + prefetch_blocks]), kv_head)..][0 .. bs * layout.head_dim];
        const bytes = std.mem.sliceAsBytes(run);
        ahead = .{ .next = @intFromPtr(bytes.ptr), .end = @intFromPtr(bytes.ptr + bytes.len) };
    }
    return .{ .run = cache[layout.run(@intCast(table[bi]), kv_head)..].ptr, .p = bi * bs, .n = @min(bs, len - bi * bs), .ahead = ahead };
}

/// The lines of a prefetch the block's steps did not reach.
inline fn finishPrefetch(p: *Prefetcher) void {
    while (p.next < p.end) : (p.next += 64) @prefetch(@as([*]const u8, @ptrFromInt(p.next)), .{ .locality = 2 });
}

/// scores[h * stride + p] = scale * q_h . k[p] for the `group` heads of q (rows of head_dim) and
/// the positions p < len of a block table. Positions go 16 at a time where the block has 16
/// more slots: lanes past len hold stale slots, computed and left in the row's slack
/// (stride >= len + vec_len - 1).
fn scoreRows(comptime KV: type, scores: []f32, stride: usize, q: []const f32, group: usize, k_cache: []const KV, layout: KvLayout, kv_head: usize, table: []const i32, len: usize, scale: f32) void {
    const bs = layout.block_size;
    const hd = layout.head_dim;
    for (0..(len + bs - 1) / bs) |bi| {
        var blk = walkBlock(KV, k_cache, layout, kv_head, table, len, bi);
        const k = blk.run;
        const p = blk.p;
        const in_block = blk.n;
        const pf = &blk.ahead;
        var j: usize = 0;
        while (j < in_block and j + vec_len <= bs) : (j += vec_len) {
            const at = scores[p + j ..];
            var h: usize = 0;
            while (h + 8 <= group) : (h += 8) scoreHeads(8, KV, at[h * stride ..], stride, q[h * hd ..], k + j, bs, hd, scale, pf);
            while (h + 4 <= group) : (h += 4) scoreHeads(4, KV, at[h * stride ..], stride, q[h * hd ..], k + j, bs, hd, scale, pf);
            while (h + 2 <= group) : (h += 2) scoreHeads(2, KV, at[h * stride ..], stride, q[h * hd ..], k + j, bs, hd, scale, pf);
            if (h < group) scoreHeads(1, KV, at[h * stride ..], stride, q[h * hd ..], k + j, bs, hd, scale, pf);
        }
        finishPrefetch(pf);
        for (@min(j, in_block)..in_block) |s| for (0..group) |h| {
            var acc: f32 = 0;
            for (0..hd) |d| acc += q[h * hd + d] * loadScalar(KV, k, d * bs + s);
            scores[h * stride + p + s] = acc * scale;
        };
    }
}

/// Scores of nh heads for 16 slots of a run (k at the first slot; dimension d at k[d * bs]),
/// two sums a head (even and odd dimensions) so that 2 nh chains of products run at once.
inline fn scoreHeads(comptime nh: usize, comptime KV: type, out: []f32, stride: usize, q: []const f32, k: [*]const KV, bs: usize, hd: usize, scale: f32, pf: *Prefetcher) void {
    var acc: [2][nh]V = .{.{@as(V, @splat(0))} ** nh} ** 2;
    var d: usize = 0;
    while (d + 2 <= hd) : (d += 2) {
        pf.step();
        inline for (0..2) |e| {
            const kv = loadVec(KV, k, (d + e) * bs);
            inline for (0..nh) |i| acc[e][i] = @mulAdd(V, @splat(q[i * hd + d + e]), kv, acc[e][i]);
        }
    }
    if (d < hd) {
        const kv = loadVec(KV, k, d * bs);
        inline for (0..nh) |i| acc[0][i] = @mulAdd(V, @splat(q[i * hd + d]), kv, acc[0][i]);
    }
    inline for (0..nh) |i| out[i * stride ..][0..vec_len].* = (acc[0][i] + acc[1][i]) * @as(V, @splat(scale));
}

/// acc[h] += sum over p < len of w[h * stride + p] * v[p], for the `group` heads (acc rows of
/// head_dim) and the positions of a block table; a block's V run is read once for all heads.
fn addWeightedV(comptime KV: type, acc: []f32, w: []const f32, stride: usize, group: usize, v_cache: []const KV, layout: KvLayout, kv_head: usize, table: []const i32, len: usize) void {
    const bs = layout.block_size;
    const hd = layout.head_dim;
    for (0..(len + bs - 1) / bs) |bi| {
        var blk = walkBlock(KV, v_cache, layout, kv_head, table, len, bi);
        const pf = &blk.ahead;
        var h: usize = 0;
        while (h + 4 <= group) : (h += 4) weightedHeads(4, KV, acc[h * hd ..], w[h * stride + blk.p ..], stride, blk.run, blk.n, hd, pf);
        while (h + 2 <= group) : (h += 2) weightedHeads(2, KV, acc[h * hd ..], w[h * stride + blk.p ..], stride, blk.run, blk.n, hd, pf);
        if (h < group) weightedHeads(1, KV, acc[h * hd ..], w[h * stride + blk.p ..], stride, blk.run, blk.n, hd, pf);
        finishPrefetch(pf);
    }
}

/// acc rows of nh heads += the first n slots of a V run weighted by each head's w: 64
/// dimensions at a time in registers, each V vector loaded once for the nh heads.
inline fn weightedHeads(comptime nh: usize, comptime KV: type, acc: []f32, w: []const f32, stride: usize, v: [*]const KV, n: usize, hd: usize, pf: *Prefetcher) void {
    var d: usize = 0;
    while (d + 4 * vec_len <= hd) : (d += 4 * vec_len) weightedDims(4, nh, KV, acc, w, stride, v, n, hd, d, pf);
    while (d + vec_len <= hd) : (d += vec_len) weightedDims(1, nh, KV, acc, w, stride, v, n, hd, d, pf);
    while (d < hd) : (d += 1) for (0..nh) |i| {
        var a = acc[i * hd + d];
        for (0..n) |s| a += w[i * stride + s] * loadScalar(KV, v, s * hd + d);
        acc[i * hd + d] = a;
    };
}

inline fn weightedDims(comptime nv: usize, comptime nh: usize, comptime KV: type, acc: []f32, w: []const f32, stride: usize, v: [*]const KV, n: usize, hd: usize, d0: usize, pf: *Prefetcher) void {
    var r: [nh][nv]V = undefined;
    inline for (0..nh) |i| inline for (0..nv) |c| {
        r[i][c] = acc[i * hd + d0 + c * vec_len ..][0..vec_len].*;
    };
    for (0..n) |s| {
        pf.step();
        inline for (0..nv) |c| {
            const vv = loadVec(KV, v, s * hd + d0 + c * vec_len);
            inline for (0..nh) |i| r[i][c] = @mulAdd(V, @splat(w[i * stride + s]), vv, r[i][c]);
        }
    }
    inline for (0..nh) |i| inline for (0..nv) |c| {
        acc[i * hd + d0 + c * vec_len ..][0..vec_len].* = r[i][c];
    };
}

pub inline fn slotOf(block_table: []const i32, block_size: usize, position: usize) usize {
    const block: usize = @intCast(block_table[position / block_size]);
    return block * block_size + position % block_size;
}

// ---------------------------------------------------------------- tests

const testing = std.testing;

fn naiveDot(w: Matrix, row: usize, x: []const f32) f32 {
    var s: f64 = 0;
    for (0..w.cols) |c| s += @as(f64, w.get(row, c)) * x[c];
    return @floatCast(s);
}

fn fillRandom(rng: std.Random, xs: []f32) void {
    for (xs) |*x| x.* = rng.floatNorm(f32);
}

test "matmulRows matches a naive product for f32, f16 and bf16 at awkward widths" {
    var prng = std.Random.DefaultPrng.init(7);
    const rng = prng.random();
    inline for (.{ DType.f32, DType.f16, DType.bf16 }) |dtype| {
        for ([_]usize{ 1, 7, 16, 33, 172 }) |cols| {
            const rows = 9; // two tiles of four rows, then one row alone
            const n_tokens = 7; // one tile of four tokens, then three one at a time
            const T = switch (dtype) {
                .f32 => f32,
                .f16 => f16,
                else => u16,
            };
            var w_store: [rows * 172]T = undefined;
            for (w_store[0 .. rows * cols]) |*e| {
                const v = rng.floatNorm(f32);
                e.* = switch (T) {
                    f32 => v,
                    f16 => @floatCast(v),
                    else => @truncate(@as(u32, @bitCast(v)) >> 16),
                };
            }
            const w = Matrix{ .dtype = dtype, .data = @ptrCast(&w_store), .rows = rows, .cols = cols };
            var x: [n_tokens * 172]f32 = undefined;
            fillRandom(rng, &x);
            var out: [n_tokens * rows]f32 = undefined;
            matmulRows(&out, rows, &x, n_tokens, w, 0, rows, .{});
            for (0..n_tokens) |n| for (0..rows) |r| {
                const want = naiveDot(w, r, x[n * cols ..][0..cols]);
                try testing.expectApproxEqAbs(want, out[n * rows + r], 1e-4);
            };
        }
    }
}

test "matmulRows over packed quantized weights equals a plain dot over decoded weights and quantized activations" {
    var prng = std.Random.DefaultPrng.init(3);
    const rng = prng.random();
    const rows = 9;
    const cols = 512;
    const n_tokens = 6;
    var storage: [rows * (cols / 32) * 34 + rows * (cols / 256) * 210]u8 = undefined;
    var x: [n_tokens * cols]f32 = undefined;
    fillRandom(rng, &x);
    inline for (.{ DType.q8_0, DType.q4_0, DType.q4_1, DType.q5_1, DType.q4_k, DType.q5_k, DType.q6_k }) |dtype| {
        const w = Matrix{ .dtype = dtype, .data = @ptrCast(&storage), .rows = rows, .cols = cols };
        const bytes = storage[0 .. rows * w.rowBytes()];
        rng.bytes(bytes);
        // Keep every f16 scale small and finite: the byte at each scale's position.
        const unit_bytes = dtype.blockBytes().?;
        var off: usize = 0;
        while (off < bytes.len) : (off += unit_bytes) {
            const at: []const usize = switch (dtype) {
                .q6_k => &.{208},
                .q4_k, .q5_k, .q4_1, .q5_1 => &.{ 0, 2 },
                else => &.{0},
            };
            for (at) |a| std.mem.writeInt(u16, bytes[off + a ..][0..2], @bitCast(@as(f16, @floatCast(rng.float(f32) * 0.01))), .little);
        }
        var out: [n_tokens * rows]f32 = undefined;
        // Two tokens (decode) and six (a tile of four and two), with 8-bit activations.
        var q: [n_tokens * cols]i8 = undefined;
        var scale: [n_tokens * cols / 32]f32 = undefined;
        var sum: [n_tokens * cols / 32]f32 = undefined;
        var sum_lo: [n_tokens * cols / 32]f32 = undefined;
        const acts = quant.QuantActs{ .q = &q, .scale = &scale, .sum = &sum, .sum_lo = &sum_lo };
        acts.quantize(&x, 0, n_tokens, cols);
        var xq: [n_tokens * cols]f32 = undefined;
        for (&xq, q, 0..) |*v, qi, i| v.* = scale[i / 32] * @as(f32, @floatFromInt(qi));
        var packed_store: [qgemm.packedBytes(StorageType(dtype), rows, cols)]u8 align(64) = undefined;
        qgemm.pack(StorageType(dtype), &packed_store, w.data, rows, cols);
        const wp = Matrix{ .dtype = dtype, .data = &packed_store, .rows = rows, .cols = cols, .layout = .int_groups };
        inline for (.{ 2, n_tokens }) |tokens| {
            matmulRows(&out, rows, &x, tokens, wp, 0, rows, .{ .q8 = acts });
            for (0..tokens) |n| for (0..rows) |r| {
                const want = naiveDot(w, r, xq[n * cols ..][0..cols]);
                try testing.expectApproxEqAbs(want, out[n * rows + r], 1e-3 * (1 + @abs(want)));
                try testing.expectEqual(w.get(r, n), wp.get(r, n));
            };
        }
    }
}

test "rmsnorm matches the definition" {
    const x = [_]f32{ 1, -2, 3, 0.5 };
    const wv = [_]f32{ 0.5, 1, 2, -1 };
    const w = Matrix{ .dtype = .f32, .data = @ptrCast(&wv), .rows = 1, .cols = 4 };
    var out: [4]f32 = undefined;
    rmsnorm(&out, &x, w, 1e-5);
    const ms: f64 = (1.0 + 4.0 + 9.0 + 0.25) / 4.0;
    for (out, x, wv) |o, xv, wv1| {
        try testing.expectApproxEqAbs(@as(f32, @floatCast(xv / @sqrt(ms + 1e-5) * wv1)), o, 1e-6);
    }
    // A row wide enough for the vector loops, with a tail: against the sum in f64.
    var prng = std.Random.DefaultPrng.init(3);
    const rng = prng.random();
    var xs: [2048 + 37]f32 = undefined;
    var ws: [xs.len]f32 = undefined;
    for (&xs, &ws) |*a, *b| {
        a.* = rng.floatNorm(f32) * 3;
        b.* = rng.floatNorm(f32);
    }
    var outs: [xs.len]f32 = undefined;
    rmsnorm(&outs, &xs, Matrix{ .dtype = .f32, .data = @ptrCast(&ws), .rows = 1, .cols = xs.len }, 1e-5);
    var sum: f64 = 0;
    for (xs) |v| sum += @as(f64, v) * v;
    const inv = 1.0 / @sqrt(sum / xs.len + 1e-5);
    for (outs, xs, ws) |o, xv, wv1| try testing.expectApproxEqAbs(xv * inv * wv1, o, 1e-5 * (1 + @abs(xv * inv * wv1)));
}

test "rope rotates the right pairs in both layouts" {
    const cos = [_]f32{ @cos(@as(f32, 0.3)), @cos(@as(f32, 0.1)) };
    const sin = [_]f32{ @sin(@as(f32, 0.3)), @sin(@as(f32, 0.1)) };
    // interleaved: (x0,x1) and (x2,x3) rotate; rotate-half: (x0,x2) and (x1,x3).
    var a = [_]f32{ 1, 2, 3, 4 };
    rope(&a, &cos, &sin, true);
    try testing.expectApproxEqAbs(1 * cos[0] - 2 * sin[0], a[0], 1e-6);
    try testing.expectApproxEqAbs(1 * sin[0] + 2 * cos[0], a[1], 1e-6);
    try testing.expectApproxEqAbs(3 * cos[1] - 4 * sin[1], a[2], 1e-6);
    var b = [_]f32{ 1, 2, 3, 4 };
    rope(&b, &cos, &sin, false);
    try testing.expectApproxEqAbs(1 * cos[0] - 3 * sin[0], b[0], 1e-6);
    try testing.expectApproxEqAbs(1 * sin[0] + 3 * cos[0], b[2], 1e-6);
    try testing.expectApproxEqAbs(2 * cos[1] - 4 * sin[1], b[1], 1e-6);
    // A rotation keeps the norm.
    try testing.expectApproxEqAbs(@as(f32, 30), a[0] * a[0] + a[1] * a[1] + a[2] * a[2] + a[3] * a[3], 1e-4);
}

test "attendGroup over a scattered block table equals dense attention, per head, in f32 and f16" {
    const allocator = testing.allocator;
    var prng = std.Random.DefaultPrng.init(11);
    const rng = prng.random();
    // (head_dim, block_size, context_len, group): blocks of four (one slot at a time) with a
    // 24-wide head; blocks of 16 (16 slots at a time, the last block partial) with 80 and 72
    // dimensions (tails in both sums) and groups of 3 (heads two, then one, at a time) and 8
    // (four at a time); blocks of 24 (a 16-slot vector and 8 single slots each).
    const configs = [_][4]usize{ .{ 24, 4, 10, 3 }, .{ 80, 16, 37, 3 }, .{ 72, 16, 40, 8 }, .{ 64, 24, 61, 5 } };
    for (configs) |config| {
        const head_dim, const block_size, const context_len, const group = config;
        const layout = KvLayout{ .block_size = block_size, .head_dim = head_dim, .num_kv_heads = 2, .num_blocks = 6 }; // use the second
        const k_cache = try allocator.alloc(f32, layout.layerLen());
        defer allocator.free(k_cache);
        const v_cache = try allocator.alloc(f32, layout.layerLen());
        defer allocator.free(v_cache);
        fillRandom(rng, k_cache);
        fillRandom(rng, v_cache);
        const block_table = [_]i32{ 5, 0, 3 };
        const q = try allocator.alloc(f32, group * head_dim);
        defer allocator.free(q);
        fillRandom(rng, q);
        const scores = try allocator.alloc(f32, group * (context_len + vec_len));
        defer allocator.free(scores);
        const out = try allocator.alloc(f32, group * head_dim);
        defer allocator.free(out);
        attendGroup(f32, out, q, group, k_cache, v_cache, layout, 1, &block_table, context_len, scores, ScoreShape.plain(head_dim));

        var want: [128]f64 = undefined;
        for (0..group) |h| {
            naiveAttend(want[0..head_dim], q[h * head_dim ..][0..head_dim], k_cache, v_cache, layout, 1, &block_table, context_len - 1, 0, ScoreShape.plain(head_dim));
            for (0..head_dim) |d| try testing.expectApproxEqAbs(@as(f32, @floatCast(want[d])), out[h * head_dim + d], 1e-5);
        }
        // The same over an f16 copy of the cache, within f16 rounding.
        const k16 = try allocator.alloc(f16, k_cache.len);
        defer allocator.free(k16);
        const v16 = try allocator.alloc(f16, v_cache.len);
        defer allocator.free(v16);
        for (k16, k_cache) |*d, x| d.* = @floatCast(x);
        for (v16, v_cache) |*d, x| d.* = @floatCast(x);
        const out16 = try allocator.alloc(f32, group * head_dim);
        defer allocator.free(out16);
        attendGroup(f16, out16, q, group, k16, v16, layout, 1, &block_table, context_len, scores, ScoreShape.plain(head_dim));
        for (out, out16) |a, b| try testing.expectApproxEqAbs(a, b, 1e-2);
    }
}

test "storeKv puts each value where KvLayout says, and nowhere else" {
    const layout = KvLayout{ .block_size = 4, .head_dim = 3, .num_kv_heads = 2, .num_blocks = 3 };
    var k_cache = [_]f16{0} ** (3 * 4 * 3 * 2);
    var v_cache = [_]f16{0} ** (3 * 4 * 3 * 2);
    const k = [_]f32{ 1, 2, 3, 4, 5, 6 };
    const v = [_]f32{ -1, -2, -3, -4, -5, -6 };
    storeKv(f16, layout, &k_cache, &v_cache, 9, &k, &v); // block 2, slot 1
    var seen: usize = 0;
    for (0..2) |h| for (0..3) |d| {
        try testing.expectEqual(@as(f16, @floatCast(k[h * 3 + d])), k_cache[layout.kIndex(9, h, d)]);
        try testing.expectEqual(@as(f16, @floatCast(v[h * 3 + d])), v_cache[layout.vIndex(9, h, d)]);
        // K dimension-major within the run: the next dimension is a block further on.
        try testing.expectEqual(layout.run(2, h) + d * 4 + 1, layout.kIndex(9, h, d));
        try testing.expectEqual(layout.run(2, h) + 3 + d, layout.vIndex(9, h, d));
        try testing.expectEqual(h * 3 * 4 * 3 + 2 * 4 * 3, layout.run(2, h)); // head-major
        seen += 1;
    };
    var nonzero: usize = 0;
    for (k_cache) |x| nonzero += @intFromBool(x != 0);
    for (v_cache) |x| nonzero += @intFromBool(x != 0);
    try testing.expectEqual(2 * seen, nonzero);
}

/// Dense causal attention in f64 for query head h at position pos of a paged sequence: the
/// reference attendTile and attendGroup are held to (scores of one head, its window, soft cap).
fn naiveAttend(out: []f64, q: []const f32, k_cache: []const f32, v_cache: []const f32, layout: KvLayout, kv_head: usize, table: []const i32, pos: usize, window: usize, shape: ScoreShape) void {
    const head_dim = q.len;
    const lo = windowStart(pos, window);
    var w: [1024]f64 = undefined;
    var max: f64 = -std.math.inf(f64);
    for (lo..pos + 1) |p| {
        const slot = slotOf(table, layout.block_size, p);
        var sum: f64 = 0;
        for (0..head_dim) |d| sum += @as(f64, q[d]) * k_cache[layout.kIndex(slot, kv_head, d)];
        var score = sum * shape.scale;
        if (shape.softcap != 0) score = shape.softcap * std.math.tanh(score / shape.softcap);
        w[p] = score;
        max = @max(max, score);
    }
    var total: f64 = 0;
    for (lo..pos + 1) |p| {
        w[p] = @exp(w[p] - max);
        total += w[p];
    }
    @memset(out, 0);
    for (lo..pos + 1) |p| {
        const slot = slotOf(table, layout.block_size, p);
        for (0..head_dim) |d| out[d] += w[p] / total * v_cache[layout.vIndex(slot, kv_head, d)];
    }
}

test "attendTile (a prefill tile, online softmax) equals dense causal attention: windows, soft caps, scattered blocks" {
    const allocator = testing.allocator;
    var prng = std.Random.DefaultPrng.init(12);
    const rng = prng.random();
    // (head_dim, block_size, first_pos, n_q, window, softcap, group): a tile inside one block;
    // one across blocks deep in the context; partial blocks of 4 with a scalar tail; windows that
    // start inside a block and ones wider than the context; a soft cap; groups of 2 and 5.
    const configs = [_]struct { usize, usize, usize, usize, usize, f32, usize }{
        .{ 64, 16, 0, 16, 0, 0, 2 },   .{ 64, 16, 70, 16, 0, 0, 5 },   .{ 24, 4, 5, 7, 0, 0, 2 },
        .{ 72, 16, 40, 13, 20, 0, 2 }, .{ 64, 16, 33, 16, 8, 1.5, 5 }, .{ 64, 16, 3, 2, 100, 0, 2 },
        // Past one chunk of positions: several chunks, and a window across a chunk's edge.
        .{ 64, 16, 500, 16, 0, 0, 2 }, .{ 64, 16, 600, 9, 300, 0, 5 },
    };
    for (configs) |config| {
        const head_dim, const block_size, const first_pos, const n_q, const window, const softcap, const group = config;
        const layout = KvLayout{ .block_size = block_size, .head_dim = head_dim, .num_kv_heads = 2, .num_blocks = 48 }; // use the second
        const k_cache = try allocator.alloc(f32, layout.layerLen());
        defer allocator.free(k_cache);
        const v_cache = try allocator.alloc(f32, layout.layerLen());
        defer allocator.free(v_cache);
        fillRandom(rng, k_cache);
        fillRandom(rng, v_cache);
        var table: [48]i32 = undefined; // every block, scattered
        for (&table, 0..) |*b, i| b.* = @intCast((i * 29 + 7) % 48);
        const q_stride = group * head_dim + 8; // rows wider than the heads, as qkv rows are
        const q = try allocator.alloc(f32, n_q * q_stride);
        defer allocator.free(q);
        fillRandom(rng, q);
        const out = try allocator.alloc(f32, n_q * group * head_dim);
        defer allocator.free(out);
        const m = try allocator.alloc(f32, tile_queries * group);
        defer allocator.free(m);
        const l = try allocator.alloc(f32, tile_queries * group);
        defer allocator.free(l);
        const acc = try allocator.alloc(f32, tile_queries * group * head_dim);
        defer allocator.free(acc);
        const chunk_scores = try allocator.alloc(f32, group * (tile_chunk + vec_len));
        defer allocator.free(chunk_scores);
        var shape = ScoreShape.plain(head_dim);
        shape.softcap = softcap;
        attendTile(f32, out, group * head_dim, q, q_stride, n_q, group, k_cache, v_cache, layout, 1, &table, first_pos, window, shape, .{ .m = m, .l = l, .acc = acc, .scores = chunk_scores });
        var want: [128]f64 = undefined;
        for (0..n_q) |i| for (0..group) |h| {
            naiveAttend(want[0..head_dim], q[i * q_stride + h * head_dim ..][0..head_dim], k_cache, v_cache, layout, 1, &table, first_pos + i, window, shape);
            for (0..head_dim) |d| try testing.expectApproxEqAbs(want[d], out[(i * group + h) * head_dim + d], 2e-5);
        };
    }
}

test "expVec is within 2 ulp of exp, and 0 at -inf" {
    var prng = std.Random.DefaultPrng.init(13);
    const rng = prng.random();
    for (0..2000) |_| {
        var xs: [vec_len]f32 = undefined;
        for (&xs) |*x| x.* = (rng.float(f32) * 2 - 1) * 87;
        const got: [vec_len]f32 = expVec(xs);
        for (xs, got) |x, g| {
            const want = @exp(@as(f64, x));
            try testing.expectApproxEqRel(want, @as(f64, g), 2.5e-7);
        }
    }
    const edges: [vec_len]f32 = expVec(.{ -std.math.inf(f32), -100, -87.4, 0, 1, -1, 88, 100, 0.5, -0.5, 2, 3, 4, 5, 6, 7 });
    try testing.expectEqual(@as(f32, 0), edges[0]);
    try testing.expectEqual(@as(f32, 0), edges[1]);
    try testing.expectEqual(@as(f32, 0), edges[2]);
    try testing.expectEqual(@as(f32, 1), edges[3]);
    try testing.expect(std.math.isFinite(edges[7]) and edges[7] > 1e38);
}

test "siluMul and softmax" {
    var g: [3]f32 = undefined;
    siluMul(&g, &[_]f32{ -1, 0, 2 }, &[_]f32{ 2, 3, 0.5 });
    try testing.expectApproxEqAbs(@as(f32, -1.0 / (1.0 + @exp(@as(f32, 1.0))) * 2), g[0], 1e-6);
    try testing.expectEqual(@as(f32, 0), g[1]);
    try testing.expectApproxEqAbs(@as(f32, 2.0 / (1.0 + @exp(@as(f32, -2.0))) * 0.5), g[2], 1e-6);
    var s = [_]f32{ 1000, 1000, 1001 };
    softmax(&s);
    try testing.expectApproxEqAbs(@as(f32, 1), s[0] + s[1] + s[2], 1e-6);
    try testing.expect(s[2] > s[0]);
}
