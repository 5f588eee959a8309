//! f32 matrix products for float weights (f32, f16, bf16) packed at load without
//! rounding: the default precision (`--dtype auto`), exact to f32 rounding.
//!
//! A 16-row group stores, for each column k, the 16 rows' weights at k in the file's own
//! type (16 x 2 or 4 bytes), so the packed matrix is the file's size. One widening load
//! and one FMA against the token's x[k] broadcast then advance 16 rows by one column: the
//! 16 sums of a token land in one vector, with no horizontal sum, and a decode streams
//! several groups at once (as qgemm and bgemm do).

const std = @import("std");
const assert = std.debug.assert;
const qgemm = @import("qgemm.zig");
const Prefetcher = qgemm.Prefetcher;

const group_rows = qgemm.group_rows;
const F16 = @Vector(16, f32);

/// Bytes of one packed 16-row group of a `cols`-wide matrix of T (f32, f16, or u16 for bf16).
pub fn groupBytes(comptime T: type, cols: usize) usize {
    return cols * group_rows * @sizeOf(T);
}

/// Bytes of a (rows, cols) matrix packed.
pub fn packedBytes(comptime T: type, rows: usize, cols: usize) usize {
    return (std.math.divCeil(usize, rows, group_rows) catch unreachable) * groupBytes(T, cols);
}

/// Packs a whole (rows, cols) matrix of T into dst (packedBytes long).
pub fn pack(comptime T: type, dst: []u8, w_data: [*]const u8, rows: usize, cols: usize) void {
    packGroups(T, dst, w_data, rows, cols, 0, std.math.divCeil(usize, rows, group_rows) catch unreachable);
}

/// Groups [g_begin, g_end) of pack's output (several threads may each take a range).
pub fn packGroups(comptime T: type, dst: []u8, w_data: [*]const u8, rows: usize, cols: usize, g_begin: usize, g_end: usize) void {
    assert(dst.len >= packedBytes(T, rows, cols));
    const gb = groupBytes(T, cols);
    @memset(dst[g_begin * gb .. g_end * gb], 0); // rows past the last pad the last group
    const base: [*]align(1) const T = @ptrCast(w_data);
    const out: [*]align(1) T = @ptrCast(dst.ptr);
    for (g_begin * group_rows..@min(rows, g_end * group_rows)) |row| {
        const group = out + row / group_rows * cols * group_rows;
        const r = row % group_rows;
        for (0..cols) |k| group[k * group_rows + r] = base[row * cols + k];
    }
}

inline fn widen(comptime T: type, v: T) f32 {
    return switch (T) {
        f32 => v,
        f16 => @floatCast(v),
        u16 => @bitCast(@as(u32, v) << 16),
        else => @compileError("not a float weight type"),
    };
}

/// Weight (row, col) of a packed matrix: for tests and one-off reads.
pub fn weightAt(comptime T: type, data: [*]const u8, cols: usize, row: usize, col: usize) f32 {
    const p: [*]align(1) const T = @ptrCast(data);
    return widen(T, p[row / group_rows * cols * group_rows + col * group_rows + row % group_rows]);
}

/// The 16 weights of column k in a group, widened.
inline fn column(comptime T: type, group: [*]align(1) const T, k: usize) F16 {
    const v: @Vector(16, T) = group[k * group_rows ..][0..group_rows].*;
    return switch (T) {
        f32 => v,
        f16 => @floatCast(v),
        u16 => @bitCast(@as(@Vector(16, u32), v) << @splat(16)),
        else => @compileError("not a float weight type"),
    };
}

/// ng consecutive groups from g against tokens first..first + nt of x (tokens, cols):
/// out[i][t] holds the 16 sums of group i for token t.
inline fn tileF32(comptime T: type, comptime ng: usize, comptime nt: usize, g: [*]const u8, group_bytes: usize, cols: usize, x: []const f32, first: usize, comptime stream: bool, prefetcher: *Prefetcher) [ng][nt]F16 {
    var acc: [ng][nt]F16 = .{.{@as(F16, @splat(0))} ** nt} ** ng;
    var groups: [ng][*]align(1) const T = undefined;
    inline for (0..ng) |i| groups[i] = @ptrCast(g + i * group_bytes);
    var xs: [nt][*]const f32 = undefined;
    inline for (0..nt) |t| xs[t] = x[(first + t) * cols ..].ptr;
    // A 64-byte line holds this many columns of a group.
    const per_line = 64 / (group_rows * @sizeOf(T));
    var k: usize = 0;
    while (k < cols) : (k += per_line) {
        prefetcher.step();
        inline for (0..ng) |i| {
            if (stream) @prefetch(@as([*]const u8, @ptrCast(groups[i])) + k * group_rows * @sizeOf(T) + qgemm.stream_ahead, .{ .locality = 3 });
            inline for (0..per_line) |c| {
                const w = column(T, groups[i], k + c);
                inline for (0..nt) |t| acc[i][t] = @mulAdd(F16, w, @splat(xs[t][k + c]), acc[i][t]);
            }
        }
    }
    return acc;
}

/// out[n, r] = w[r] . x[n] in f32 for r in [row_begin, row_end) and every token
/// n < n_tokens; w packed (pack), x (tokens, cols) in f32.
pub fn matmulRows(comptime T: type, out: []f32, out_stride: usize, x: []const f32, n_tokens: usize, data: [*]const u8, cols: usize, row_begin: usize, row_end: usize) void {
    assert(cols % (64 / (group_rows * @sizeOf(T))) == 0);
    const Kernel = struct {
        x: []const f32,
        cols: usize,
        group_bytes: usize,
        data: [*]const u8,

        pub const tokens_per_tile = 8;
        pub const stream_tokens = tokens_per_tile + 1;
        pub const min_groups_per_pass = 2;
        pub const interleaved_groups = 1;
        /// Fewer tokens, more groups at once: enough independent sums either way.
        pub fn groupsAtOnce(comptime nt: usize) usize {
            return if (nt <= 2) 4 / nt else 2;
        }
        comptime {
            assert(groupsAtOnce(1) * group_rows == qgemm.stream_tile_rows);
        }
        pub inline fn tile(kernel: @This(), comptime ng: usize, comptime nt: usize, g: usize, first: usize, prefetcher: *Prefetcher) [ng][nt]F16 {
            return tileF32(T, ng, nt, kernel.data + g * kernel.group_bytes, kernel.group_bytes, kernel.cols, kernel.x, first, nt < 4, prefetcher);
        }
    };
    const gb = groupBytes(T, cols);
    qgemm.runTiles(Kernel, .{ .x = x, .cols = cols, .group_bytes = gb, .data = data }, out, out_stride, n_tokens, data, gb, row_begin, row_end);
}

// ---------------------------------------------------------------- tests

const testing = std.testing;

test "f32 GEMM over packed float weights equals a plain f64 sum, for f32, f16 and bf16" {
    var prng = std.Random.DefaultPrng.init(29);
    const rng = prng.random();
    const cols = 96;
    const rows = 16 * 4 + 5; // four full groups (one tile of four at one token) and a partial one
    const max_tokens = 13; // a tile of eight tokens and one of five
    var x: [max_tokens * cols]f32 = undefined;
    for (&x) |*v| v.* = rng.floatNorm(f32);
    var w32: [rows * cols]f32 = undefined;
    for (&w32) |*v| v.* = rng.floatNorm(f32) * 0.1;
    var w16: [rows * cols]f16 = undefined;
    for (&w16, w32) |*h, v| h.* = @floatCast(v);
    var wb: [rows * cols]u16 = undefined;
    for (&wb, w32) |*h, v| h.* = @truncate(@as(u32, @bitCast(v)) >> 16);
    inline for (.{ f32, f16, u16 }) |T| {
        const w: []const T = if (T == f32) &w32 else if (T == f16) &w16 else &wb;
        var packed_w: [packedBytes(T, rows, cols)]u8 align(64) = undefined;
        pack(T, &packed_w, @ptrCast(w.ptr), rows, cols);
        for (0..rows) |r| for (0..cols) |k| try testing.expectEqual(widen(T, w[r * cols + k]), weightAt(T, &packed_w, cols, r, k));
        for ([_]usize{ 1, 2, 4, 7, 13 }) |n_tokens| {
            const stride = rows + 3;
            var out: [max_tokens * (rows + 3)]f32 = undefined;
            @memset(&out, std.math.nan(f32));
            matmulRows(T, &out, stride, &x, n_tokens, &packed_w, cols, 2, rows);
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
                        const term = @as(f64, widen(T, w[r * cols + k])) * x[n * cols + k];
                        want += term;
                        magnitude += @abs(term);
                    }
                    try testing.expectApproxEqAbs(@as(f32, @floatCast(want)), got, @as(f32, @floatCast(1e-6 * magnitude + 1e-7)));
                }
                try testing.expect(std.math.isNan(out[n * stride + rows]));
            }
        }
    }
}
