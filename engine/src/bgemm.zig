//! bf16 matrix products for float weights (f32, f16, bf16), when the engine is asked
//! for bf16 compute (`--dtype bfloat16`, as vLLM's CPU backend runs f16 models):
//! weights and activations rounded to bf16, products summed in f32 by AVX-512 BF16's
//! vdpbf16ps, twice the multiply-adds per instruction of f32 FMA.
//!
//! The weights are repacked once, at load, into 16-row groups (qgemm's layout, in pairs):
//! "pair" p of a group holds row r's weights 2p and 2p+1 at bytes 4r..4r+3, so one
//! vdpbf16ps multiplies 16 rows by two weights of a token (its two activations
//! broadcast) and the 16 sums of a token land in one vector. A packed matrix is two
//! bytes a weight: an f16 model's size, half an f32 model's.

const std = @import("std");
const assert = std.debug.assert;
const qgemm = @import("qgemm.zig");
const Prefetcher = qgemm.Prefetcher;
const hasX86 = qgemm.hasX86;

pub const has_bf16 = hasX86(.avx512bf16) and hasX86(.avx512vl);
const has_bf16_512 = has_bf16 and hasX86(.evex512);

const F16 = @Vector(16, f32);
const U16 = @Vector(16, u32);

/// acc[i] + a_lo[i] * b_lo[i] + a_hi[i] * b_hi[i], each u32 lane a pair of bf16 (low half first).
pub inline fn dpbf16(acc: F16, a: U16, b: U16) F16 {
    if (comptime has_bf16_512) {
        return asm ("vdpbf16ps %[b], %[a], %[acc]"
            : [acc] "=v" (-> F16),
            : [acc_in] "0" (acc),
              [a] "v" (a),
              [b] "v" (b),
        );
    }
    if (comptime has_bf16) {
        var halves: [2]@Vector(8, f32) = undefined;
        inline for (0..2) |h| {
            const mask = qgemm.lanes(8, 8 * h, 1);
            const acc_h: @Vector(8, f32) = @shuffle(f32, acc, undefined, mask);
            const a_h: @Vector(8, u32) = @shuffle(u32, a, undefined, mask);
            const b_h: @Vector(8, u32) = @shuffle(u32, b, undefined, mask);
            halves[h] = asm ("vdpbf16ps %[b], %[a], %[acc]"
                : [acc] "=v" (-> @Vector(8, f32)),
                : [acc_in] "0" (acc_h),
                  [a] "v" (a_h),
                  [b] "v" (b_h),
            );
        }
        return std.simd.join(halves[0], halves[1]);
    }
    return dpbf16Naive(acc, a, b);
}

/// The same without the instruction: widen both halves to f32 and multiply-add.
pub fn dpbf16Naive(acc: F16, a: U16, b: U16) F16 {
    const lo_mask: U16 = @splat(0xFFFF);
    const a_lo: F16 = @bitCast((a & lo_mask) << @splat(16));
    const b_lo: F16 = @bitCast((b & lo_mask) << @splat(16));
    const a_hi: F16 = @bitCast(a & ~lo_mask);
    const b_hi: F16 = @bitCast(b & ~lo_mask);
    return @mulAdd(F16, a_hi, b_hi, @mulAdd(F16, a_lo, b_lo, acc));
}

/// f32 to bf16, rounding to nearest even (NaNs are not produced by the model's math).
pub inline fn toBf16(comptime n: usize, x: @Vector(n, f32)) @Vector(n, u16) {
    const bits: @Vector(n, u32) = @bitCast(x);
    const rounded = bits + @as(@Vector(n, u32), @splat(0x7FFF)) + ((bits >> @splat(16)) & @as(@Vector(n, u32), @splat(1)));
    return @truncate(rounded >> @splat(16));
}

/// Tokens [begin, end) of x (tokens, cols) rounded to bf16 into out (tokens, cols).
pub fn convertActs(out: []u16, x: []const f32, begin: usize, end: usize, cols: usize) void {
    assert(cols % 16 == 0);
    var i = begin * cols;
    while (i < end * cols) : (i += 16) out[i..][0..16].* = toBf16(16, x[i..][0..16].*);
}

const group_rows = qgemm.group_rows;
const pair_bytes = 4 * group_rows;

/// Bytes of one packed 16-row group of a `cols`-wide matrix.
pub fn groupBytes(cols: usize) usize {
    return cols / 2 * pair_bytes;
}

/// Bytes of a (rows, cols) matrix packed.
pub fn packedBytes(rows: usize, cols: usize) usize {
    return (std.math.divCeil(usize, rows, group_rows) catch unreachable) * groupBytes(cols);
}

/// 16 consecutive weights of row `row` from element k, as bf16.
inline fn load16(comptime T: type, row: [*]align(1) const T, k: usize) @Vector(16, u16) {
    const chunk: @Vector(16, T) = row[k..][0..16].*;
    return switch (T) {
        u16 => chunk, // bf16 already
        f32 => toBf16(16, chunk),
        f16 => toBf16(16, @as(F16, @floatCast(chunk))),
        else => @compileError("not a float weight type"),
    };
}

/// Packs a whole (rows, cols) matrix of T (f32, f16 or bf16 as u16) into dst (packedBytes long).
pub fn pack(comptime T: type, dst: []u8, w_data: [*]const u8, rows: usize, cols: usize) void {
    packGroups(T, dst, w_data, rows, cols, 0, std.math.divCeil(usize, rows, group_rows) catch unreachable);
}

/// Groups [g_begin, g_end) of pack's output (several threads may each take a range).
pub fn packGroups(comptime T: type, dst: []u8, w_data: [*]const u8, rows: usize, cols: usize, g_begin: usize, g_end: usize) void {
    assert(cols % 16 == 0);
    assert(dst.len >= packedBytes(rows, cols));
    @memset(dst[g_begin * groupBytes(cols) .. g_end * groupBytes(cols)], 0); // rows past the last pad the last group
    const base: [*]align(1) const T = @ptrCast(w_data);
    for (g_begin * group_rows..@min(rows, g_end * group_rows)) |row| {
        const group = dst[row / group_rows * groupBytes(cols) ..].ptr;
        const r = row % group_rows;
        var k: usize = 0;
        while (k < cols) : (k += 16) {
            const words: @Vector(8, u32) = @bitCast(load16(T, base + row * cols, k));
            inline for (0..8) |j| {
                const word: *align(1) u32 = @ptrCast(group + (k / 2 + j) * pair_bytes + 4 * r);
                word.* = words[j];
            }
        }
    }
}

/// Weight (row, col) of a packed matrix: for tests and one-off reads.
pub fn weightAt(data: [*]const u8, cols: usize, row: usize, col: usize) f32 {
    const at = data + row / group_rows * groupBytes(cols) + col / 2 * pair_bytes + 4 * (row % group_rows) + 2 * (col % 2);
    return @bitCast(@as(u32, std.mem.readInt(u16, at[0..2], .little)) << 16);
}

/// ng groups (consecutive) against tokens first..first + nt: out[g][t] holds the 16 sums
/// of group g for token t. ng * nt independent sums hide the instruction's latency.
inline fn tileBf16(comptime ng: usize, comptime nt: usize, groups: [*]const u8, group_bytes: usize, cols: usize, acts: []const u16, first: usize, prefetcher: *Prefetcher) [ng][nt]F16 {
    var acc: [ng][nt]F16 = .{.{@as(F16, @splat(0))} ** nt} ** ng;
    var x: [nt][*]align(1) const u32 = undefined;
    inline for (0..nt) |t| x[t] = @ptrCast(acts[(first + t) * cols ..].ptr);
    for (0..cols / 2) |p| {
        if (p % 8 == 0) prefetcher.step();
        var w: [ng]U16 = undefined;
        inline for (0..ng) |g| w[g] = @bitCast(groups[g * group_bytes + p * pair_bytes ..][0..pair_bytes].*);
        inline for (0..nt) |t| {
            const xv: U16 = @splat(x[t][p]);
            inline for (0..ng) |g| acc[g][t] = dpbf16(acc[g][t], w[g], xv);
        }
    }
    return acc;
}

/// out[n, r] = w[r] . x[n] in bf16 products, for r in [row_begin, row_end) and every
/// token n < n_tokens; w packed (pack), acts is x in bf16 (tokens, cols).
pub fn matmulRows(out: []f32, out_stride: usize, acts: []const u16, n_tokens: usize, data: [*]const u8, cols: usize, row_begin: usize, row_end: usize) void {
    assert(cols % 16 == 0);
    const Kernel = struct {
        acts: []const u16,
        cols: usize,
        group_bytes: usize,
        data: [*]const u8,

        pub const tokens_per_tile = 6;
        pub const stream_tokens = tokens_per_tile + 1;
        pub const min_groups_per_pass = 2;
        pub const interleaved_groups = 1;
        /// Fewer tokens, more groups at once: enough independent sums either way.
        pub fn groupsAtOnce(comptime nt: usize) usize {
            return if (nt <= 2) 4 else 2;
        }
        comptime {
            assert(groupsAtOnce(1) * group_rows == qgemm.stream_tile_rows);
        }
        pub inline fn tile(kernel: @This(), comptime ng: usize, comptime nt: usize, g: usize, first: usize, prefetcher: *Prefetcher) [ng][nt]F16 {
            return tileBf16(ng, nt, kernel.data + g * kernel.group_bytes, kernel.group_bytes, kernel.cols, kernel.acts, first, prefetcher);
        }
    };
    const gb = groupBytes(cols);
    qgemm.runTiles(Kernel, .{ .acts = acts, .cols = cols, .group_bytes = gb, .data = data }, out, out_stride, n_tokens, data, gb, row_begin, row_end);
}

// ---------------------------------------------------------------- tests

const testing = std.testing;

fn bf16Value(bits: u16) f64 {
    return @as(f32, @bitCast(@as(u32, bits) << 16));
}

test "vdpbf16ps equals the widened multiply-add" {
    var prng = std.Random.DefaultPrng.init(8);
    const rng = prng.random();
    for (0..50) |_| {
        var a: [32]f32 = undefined;
        var b: [32]f32 = undefined;
        var acc: [16]f32 = undefined;
        for (&a) |*v| v.* = rng.floatNorm(f32);
        for (&b) |*v| v.* = rng.floatNorm(f32);
        for (&acc) |*v| v.* = rng.floatNorm(f32);
        const ab: U16 = @bitCast(toBf16(32, a));
        const bb: U16 = @bitCast(toBf16(32, b));
        const got: [16]f32 = dpbf16(acc, ab, bb);
        const naive: [16]f32 = dpbf16Naive(acc, ab, bb);
        const abits: [32]u16 = toBf16(32, a);
        const bbits: [32]u16 = toBf16(32, b);
        for (0..16) |i| {
            const want = acc[i] + bf16Value(abits[2 * i]) * bf16Value(bbits[2 * i]) + bf16Value(abits[2 * i + 1]) * bf16Value(bbits[2 * i + 1]);
            // The instruction rounds its sum once or twice (and flushes denormals): f32 tolerance.
            try testing.expectApproxEqAbs(@as(f32, @floatCast(want)), got[i], 1e-5 * (1 + @abs(@as(f32, @floatCast(want)))));
            try testing.expectApproxEqAbs(@as(f32, @floatCast(want)), naive[i], 1e-5 * (1 + @abs(@as(f32, @floatCast(want)))));
        }
    }
    // Rounding to nearest even.
    try testing.expectEqual(@as(u16, 0x3F80), toBf16(1, @as(@Vector(1, f32), @splat(@bitCast(@as(u32, 0x3F808000)))))[0]);
    try testing.expectEqual(@as(u16, 0x3F82), toBf16(1, @as(@Vector(1, f32), @splat(@bitCast(@as(u32, 0x3F818000)))))[0]);
    try testing.expectEqual(@as(u16, 0x3F81), toBf16(1, @as(@Vector(1, f32), @splat(@bitCast(@as(u32, 0x3F808001)))))[0]);
}

test "bf16 GEMM equals a plain sum over bf16-rounded weights and activations" {
    var prng = std.Random.DefaultPrng.init(23);
    const rng = prng.random();
    const cols = 96;
    const rows = 16 * 4 + 5; // four full groups (one tile of four at few tokens) and a partial one
    const max_tokens = 13; // two tiles of six tokens and one left
    var x: [max_tokens * cols]f32 = undefined;
    for (&x) |*v| v.* = rng.floatNorm(f32);
    var acts: [max_tokens * cols]u16 = undefined;
    convertActs(&acts, &x, 0, max_tokens, cols);
    var w32: [rows * cols]f32 = undefined;
    for (&w32) |*v| v.* = rng.floatNorm(f32) * 0.1;
    var w16: [rows * cols]f16 = undefined;
    for (&w16, w32) |*h, v| h.* = @floatCast(v);
    var packed_w: [packedBytes(rows, cols)]u8 align(64) = undefined;
    inline for (.{ f32, f16 }) |T| {
        const w: []const T = if (T == f32) &w32 else &w16;
        pack(T, &packed_w, @ptrCast(w.ptr), rows, cols);
        for (0..rows) |r| for (0..cols) |k| {
            const wk = toBf16(1, @as(@Vector(1, f32), @splat(@as(f32, @floatCast(w[r * cols + k])))))[0];
            try testing.expectEqual(@as(f32, @floatCast(bf16Value(wk))), weightAt(&packed_w, cols, r, k));
        };
        for ([_]usize{ 1, 2, 4, 7, 13 }) |n_tokens| {
            const stride = rows + 3;
            var out: [max_tokens * (rows + 3)]f32 = undefined;
            @memset(&out, std.math.nan(f32));
            matmulRows(&out, stride, &acts, n_tokens, &packed_w, cols, 2, rows);
            for (0..n_tokens) |n| {
                for (0..rows) |r| {
                    const got = out[n * stride + r];
                    if (r < 2) {
                        try testing.expect(std.math.isNan(got));
                        continue;
                    }
                    var want: f64 = 0;
                    var magnitude: f64 = 0;
                    for (0..cols) |k| {
                        const wk = toBf16(1, @as(@Vector(1, f32), @splat(@as(f32, @floatCast(w[r * cols + k])))))[0];
                        const term = bf16Value(wk) * bf16Value(acts[n * cols + k]);
                        want += term;
                        magnitude += @abs(term);
                    }
                    try testing.expectApproxEqAbs(@as(f32, @floatCast(want)), got, @as(f32, @floatCast(1e-5 * magnitude + 1e-6)));
                }
                try testing.expect(std.math.isNan(out[n * stride + rows]));
            }
        }
    }
}
