//! Integer matrix products for quantized weights against 8-bit activations: the
//! prefill and batched-decode path for Q8_0, Q4_0 and Q4_K (llama.cpp's Q8
//! activations, computed with VNNI's vpdpbusd where the CPU has it).
//!
//! A pass repacks up to a scratch-full of 16-row groups once, then every token of the
//! step runs over them. In a group, each 32-weight block holds eight 64-byte "quads":
//! quad k has row r's weights 4k..4k+3 at bytes 4r..4r+3, as unsigned bytes u, with
//! per-row scale s and offset o such that w = s * u + o. One vpdpbusd then multiplies
//! 16 rows by four weights of one token (its four activation bytes broadcast), so the
//! 16 outputs of a token land in one vector and nothing needs a horizontal sum.

const std = @import("std");
const builtin = @import("builtin");
const assert = std.debug.assert;
const quant = @import("quant.zig");

pub fn hasX86(comptime feature: std.Target.x86.Feature) bool {
    return builtin.cpu.arch == .x86_64 and std.Target.x86.featureSetHas(builtin.cpu.features, feature);
}

/// vpdpbusd on 256-bit vectors (AVX512-VNNI with VL, or AVX-VNNI); 512-bit ones also need evex512.
pub const has_vnni = (hasX86(.avx512vnni) and hasX86(.avx512vl)) or hasX86(.avxvnni);
const has_vnni512 = hasX86(.avx512vnni) and hasX86(.evex512);

extern fn @"llvm.x86.avx512.vpdpbusd.512"(@Vector(16, i32), @Vector(16, i32), @Vector(16, i32)) @Vector(16, i32);
extern fn @"llvm.x86.avx512.vpdpbusd.256"(@Vector(8, i32), @Vector(8, i32), @Vector(8, i32)) @Vector(8, i32);

/// acc[i] + sum over j < 4 of u[4i + j] * s[4i + j], u unsigned and s signed bytes (vpdpbusd).
pub inline fn dpbusd(comptime n: usize, acc: @Vector(n, i32), u: @Vector(4 * n, u8), s: @Vector(4 * n, i8)) @Vector(n, i32) {
    const I = @Vector(n, i32);
    const ui: I = @bitCast(u);
    const si: I = @bitCast(s);
    if (n == 16 and has_vnni512) return @"llvm.x86.avx512.vpdpbusd.512"(acc, ui, si);
    if (n == 8 and has_vnni) return @"llvm.x86.avx512.vpdpbusd.256"(acc, ui, si);
    if (n == 16 and has_vnni) {
        const lo = @"llvm.x86.avx512.vpdpbusd.256"(halfOf(acc, 0), halfOf(ui, 0), halfOf(si, 0));
        const hi = @"llvm.x86.avx512.vpdpbusd.256"(halfOf(acc, 1), halfOf(ui, 1), halfOf(si, 1));
        return std.simd.join(lo, hi);
    }
    return dpbusdNaive(n, acc, u, s);
}

inline fn halfOf(v: @Vector(16, i32), comptime h: usize) @Vector(8, i32) {
    return @shuffle(i32, v, undefined, lanes(8, 8 * h, 1));
}

/// Shuffle mask start, start + step, ... (n lanes).
pub fn lanes(comptime n: usize, comptime start: usize, comptime step: usize) [n]i32 {
    @setEvalBranchQuota(100_000);
    var mask: [n]i32 = undefined;
    for (&mask, 0..) |*m, i| m.* = @intCast(start + step * i);
    return mask;
}

/// The same sum without VNNI: widen, multiply, add the four products of each lane.
pub fn dpbusdNaive(comptime n: usize, acc: @Vector(n, i32), u: @Vector(4 * n, u8), s: @Vector(4 * n, i8)) @Vector(n, i32) {
    const products = @as(@Vector(4 * n, i32), u) * @as(@Vector(4 * n, i32), s);
    var sum = acc;
    inline for (0..4) |j| sum += @shuffle(i32, products, undefined, lanes(n, j, 4));
    return sum;
}

const group_rows = 16;
const quad_bytes = 4 * group_rows;
const block_packed_bytes = 8 * quad_bytes + 2 * group_rows * @sizeOf(f32); // quads, s, o

/// Bytes of scratch one 16-row group of a `cols`-wide matrix takes.
pub fn groupBytes(cols: usize) usize {
    return cols / 32 * block_packed_bytes;
}

const F16 = @Vector(16, f32);
const I16 = @Vector(16, i32);

/// One packed group in scratch: `blocks` blocks of quads, then s, then o (16 floats per block each).
const Group = struct {
    quads: [*]u8,
    s: [*]align(1) f32,
    o: [*]align(1) f32,

    fn at(scratch: []u8, index: usize, blocks: usize) Group {
        const base = scratch[index * blocks * block_packed_bytes ..].ptr;
        const quads_len = blocks * 8 * quad_bytes;
        return .{
            .quads = base,
            .s = @ptrCast(base + quads_len),
            .o = @ptrCast(base + quads_len + blocks * group_rows * @sizeOf(f32)),
        };
    }
};

/// Row `row` of a quantized matrix, block `b` (32 weights) as w = s * u + o.
inline fn unpackBlock(comptime T: type, row: [*]align(1) const T, b: usize) struct { u: @Vector(32, u8), s: f32, o: f32 } {
    switch (T) {
        quant.BlockQ8_0 => {
            const blk = &row[b];
            const d = quant.half(blk.d);
            const q: @Vector(32, u8) = @bitCast(@as(@Vector(32, i8), blk.qs));
            return .{ .u = q ^ @as(@Vector(32, u8), @splat(0x80)), .s = d, .o = -128 * d };
        },
        quant.BlockQ4_0 => {
            const blk = &row[b];
            const d = quant.half(blk.d);
            const bytes: @Vector(16, u8) = blk.qs;
            return .{ .u = std.simd.join(bytes & @as(@Vector(16, u8), @splat(0xF)), bytes >> @splat(4)), .s = d, .o = -8 * d };
        },
        quant.BlockQ4_K => {
            const blk = &row[b / 8];
            const sub = b % 8;
            const g = sub / 2;
            const bytes: @Vector(32, u8) = blk.qs[32 * g ..][0..32].*;
            const sm = quant.scaleMinK4(sub, &blk.scales);
            const u = if (sub % 2 == 0) bytes & @as(@Vector(32, u8), @splat(0xF)) else bytes >> @splat(4);
            return .{
                .u = u,
                .s = quant.half(blk.d) * @as(f32, @floatFromInt(sm[0])),
                .o = -quant.half(blk.dmin) * @as(f32, @floatFromInt(sm[1])),
            };
        },
        else => @compileError("no integer GEMM for this type"),
    }
}

/// Rows [first, first + n) of w (n <= 16) into group `g`; rows past n are zeros.
fn pack(comptime T: type, g: Group, base: [*]align(1) const T, units: usize, first: usize, n: usize, blocks: usize) void {
    for (0..group_rows) |r| {
        if (r >= n) {
            for (0..blocks) |b| {
                inline for (0..8) |k| g.quads[(8 * b + k) * quad_bytes + 4 * r ..][0..4].* = .{ 0, 0, 0, 0 };
                g.s[group_rows * b + r] = 0;
                g.o[group_rows * b + r] = 0;
            }
            continue;
        }
        const row = base + (first + r) * units;
        for (0..blocks) |b| {
            const blk = unpackBlock(T, row, b);
            const words: @Vector(8, u32) = @bitCast(blk.u);
            inline for (0..8) |k| {
                const dst: *align(1) u32 = @ptrCast(g.quads + (8 * b + k) * quad_bytes + 4 * r);
                dst.* = words[k];
            }
            g.s[group_rows * b + r] = blk.s;
            g.o[group_rows * b + r] = blk.o;
        }
    }
}

/// Four activation bytes of a token broadcast to every lane.
inline fn broadcast4(p: [*]const i8) @Vector(64, i8) {
    const word: i32 = @bitCast(p[0..4].*);
    return @bitCast(@as(I16, @splat(word)));
}

/// Pulls the next pass's weight rows toward L2 a line at a time while this pass computes,
/// so that packing them reads cache, not memory (a batch of decodes is otherwise as
/// memory-bound in its packing as one decode, and compute-bound after it).
pub const Prefetcher = struct {
    next: usize,
    end: usize,

    pub inline fn step(p: *Prefetcher) void {
        inline for (0..2) |_| {
            if (p.next < p.end) {
                @prefetch(@as([*]const u8, @ptrFromInt(p.next)), .{ .locality = 2 });
                p.next += 64;
            }
        }
    }
};

/// The 16 rows of group g against tokens first..first + nt: out[t] holds the 16 sums of token t.
inline fn tile(comptime nt: usize, g: Group, blocks: usize, acts: quant.QuantActs, cols: usize, first: usize, prefetcher: *Prefetcher) [nt]F16 {
    var acc: [nt]F16 = .{@as(F16, @splat(0))} ** nt;
    var xq: [nt][*]const i8 = undefined;
    var xblock: [nt]usize = undefined;
    inline for (0..nt) |t| {
        xq[t] = acts.q.ptr + (first + t) * cols;
        xblock[t] = (first + t) * (cols / 32);
    }
    for (0..blocks) |b| {
        prefetcher.step();
        var isum: [nt]I16 = .{@as(I16, @splat(0))} ** nt;
        inline for (0..8) |k| {
            const w: @Vector(64, u8) = g.quads[(8 * b + k) * quad_bytes ..][0..64].*;
            inline for (0..nt) |t| isum[t] = dpbusd(16, isum[t], w, broadcast4(xq[t] + 32 * b + 4 * k));
        }
        const s: F16 = g.s[group_rows * b ..][0..group_rows].*;
        const o: F16 = g.o[group_rows * b ..][0..group_rows].*;
        inline for (0..nt) |t| {
            // sum_k w x = sum_k (s u + o) * d q = s * d * sum(u q) + o * (d * sum q)
            const scaled = @as(F16, @floatFromInt(isum[t])) * @as(F16, @splat(acts.scale[xblock[t] + b]));
            acc[t] = @mulAdd(F16, scaled, s, acc[t]);
            acc[t] = @mulAdd(F16, o, @splat(acts.sum[xblock[t] + b]), acc[t]);
        }
    }
    return acc;
}

const tokens_per_tile = 4;

/// out[n, r] = w[r] . x[n] for r in [row_begin, row_end) and every token n < n_tokens,
/// with x given as 8-bit activations. scratch holds at least one packed group (groupBytes).
pub fn matmulRows(comptime T: type, out: []f32, out_stride: usize, acts: quant.QuantActs, n_tokens: usize, w_data: [*]const u8, cols: usize, row_begin: usize, row_end: usize, scratch: []u8) void {
    assert(cols % quant.unitElems(T) == 0);
    const blocks = cols / 32;
    const units = cols / quant.unitElems(T);
    const groups_per_pass = scratch.len / groupBytes(cols);
    assert(groups_per_pass >= 1);
    const base: [*]align(1) const T = @ptrCast(w_data);
    const row_bytes = units * @sizeOf(T);
    var r = row_begin;
    while (r < row_end) {
        const pass_first = r;
        var groups: usize = 0;
        while (groups < groups_per_pass and r < row_end) : (groups += 1) {
            const n = @min(group_rows, row_end - r);
            pack(T, Group.at(scratch, groups, blocks), base, units, r, n, blocks);
            r += n;
        }
        const next_end = @min(row_end, r + groups_per_pass * group_rows);
        var prefetcher = Prefetcher{ .next = @intFromPtr(w_data) + r * row_bytes, .end = @intFromPtr(w_data) + next_end * row_bytes };
        var first: usize = 0;
        while (first < n_tokens) : (first += tokens_per_tile) {
            switch (@min(tokens_per_tile, n_tokens - first)) {
                inline 1...tokens_per_tile => |nt| for (0..groups) |gi| {
                    const sums = tile(nt, Group.at(scratch, gi, blocks), blocks, acts, cols, first, &prefetcher);
                    store(1, nt, .{sums}, out, out_stride, first, pass_first + gi * group_rows, r);
                },
                else => unreachable,
            }
        }
    }
}

/// Group g's 16 sums for token t go to out[first + t, row0 + 16g ..], rows before row_end only.
pub inline fn store(comptime ng: usize, comptime nt: usize, sums: [ng][nt]F16, out: []f32, out_stride: usize, first: usize, row0: usize, row_end: usize) void {
    inline for (0..ng) |g| {
        const rows_at = row0 + g * group_rows;
        const n_rows = @min(group_rows, row_end - rows_at);
        inline for (0..nt) |t| {
            const dst = out[(first + t) * out_stride + rows_at ..];
            if (n_rows == group_rows) {
                dst[0..group_rows].* = sums[g][t];
            } else {
                const v: [group_rows]f32 = sums[g][t];
                @memcpy(dst[0..n_rows], v[0..n_rows]);
            }
        }
    }
}

// ---------------------------------------------------------------- tests

const testing = std.testing;

test "vpdpbusd equals the widened multiply-add, for every byte sign" {
    var prng = std.Random.DefaultPrng.init(5);
    const rng = prng.random();
    for (0..50) |_| {
        var ub: [64]u8 = undefined;
        var sb: [64]u8 = undefined;
        var ab: [16]i32 = undefined;
        rng.bytes(&ub);
        rng.bytes(&sb);
        for (&ab) |*a| a.* = rng.intRangeAtMost(i32, -1 << 20, 1 << 20);
        const u: @Vector(64, u8) = ub;
        const s: @Vector(64, i8) = @bitCast(sb);
        const acc: I16 = ab;
        var want: [16]i32 = ab;
        for (0..64) |i| want[i / 4] += @as(i32, ub[i]) * @as(i32, @as(i8, @bitCast(sb[i])));
        try testing.expectEqual(want, @as([16]i32, dpbusd(16, acc, u, s)));
        try testing.expectEqual(want, @as([16]i32, dpbusdNaive(16, acc, u, s)));
        const want8: [8]i32 = want[0..8].*;
        const got8 = dpbusd(8, ab[0..8].*, ub[0..32].*, @as(@Vector(32, i8), @bitCast(sb[0..32].*)));
        try testing.expectEqual(want8, @as([8]i32, got8));
    }
}

test "integer GEMM equals a plain sum over decoded weights and quantized activations" {
    const Matrix = @import("kernels.zig").Matrix;
    var prng = std.Random.DefaultPrng.init(17);
    const rng = prng.random();
    const cols = 512;
    const rows = 37; // two full groups and a partial one
    const max_tokens = 7; // a full tile of four and a remainder of three
    var x: [max_tokens * cols]f32 = undefined;
    for (&x) |*v| v.* = rng.floatNorm(f32);
    var q: [max_tokens * cols]i8 = undefined;
    var scale: [max_tokens * cols / 32]f32 = undefined;
    var sum: [max_tokens * cols / 32]f32 = undefined;
    const acts = quant.QuantActs{ .q = &q, .scale = &scale, .sum = &sum };
    acts.quantize(&x, 0, max_tokens, cols);
    var storage: [rows * (cols / 32) * 34]u8 align(4) = undefined;
    var scratch: [2 * groupBytes(cols)]u8 = undefined; // two groups per pass: the third takes a second pass
    inline for (.{ .{ quant.BlockQ8_0, .q8_0 }, .{ quant.BlockQ4_0, .q4_0 }, .{ quant.BlockQ4_K, .q4_k } }) |case| {
        const T = case[0];
        rng.bytes(&storage);
        const blocks: [*]align(1) T = @ptrCast(&storage);
        const units = cols / quant.unitElems(T);
        for (0..rows * units) |bi| {
            blocks[bi].d = @bitCast(@as(f16, @floatCast(rng.float(f32) * 0.01)));
            if (T == quant.BlockQ4_K) blocks[bi].dmin = @bitCast(@as(f16, @floatCast(rng.float(f32) * 0.01)));
        }
        const w = Matrix{ .dtype = case[1], .data = &storage, .rows = rows, .cols = cols };
        for ([_]usize{ 1, 4, 7 }) |n_tokens| {
            const stride = rows + 3;
            var out: [max_tokens * (rows + 3)]f32 = undefined;
            @memset(&out, std.math.nan(f32));
            // Rows 2..37: the row range need not start at a group boundary.
            matmulRows(T, &out, stride, acts, n_tokens, &storage, cols, 2, rows, &scratch);
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
                        const term = @as(f64, w.get(r, k)) * scale[(n * cols + k) / 32] * @as(f64, @floatFromInt(q[n * cols + k]));
                        want += term;
                        magnitude += @abs(term);
                    }
                    try testing.expectApproxEqAbs(@as(f32, @floatCast(want)), got, @as(f32, @floatCast(1e-5 * magnitude + 1e-5)));
                }
                try testing.expect(std.math.isNan(out[n * stride + rows])); // nothing past row_end
            }
        }
    }
}
