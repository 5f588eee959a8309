//! Integer matrix products for quantized weights against 8-bit activations (llama.cpp's
//! Q8 activations, computed with VNNI's vpdpbusd where the CPU has it): every product
//! with Q8_0, Q4_0, Q4_K and Q6_K weights, from one token to a whole prefill.
//!
//! The weights are repacked once, at load, into 16-row groups. In a group each 32-weight
//! block is a run of 64-byte vectors of "quads": quad k holds row r's weights 4k..4k+3 at
//! bytes 4r..4r+3, as unsigned bytes u with a per-row scale s and offset o such that
//! w = s * u + o (Q4 types keep two quads per vector, in the low and high nibbles, and
//! Q6_K adds two vectors of their top bits, so a packed matrix is as small as the file's,
//! give or take its scales' layout). One vpdpbusd then multiplies 16 rows by four
//! weights of one token (its four activation bytes broadcast), so the 16 outputs of a
//! token land in one vector and nothing needs a horizontal sum, and a group is read as
//! one stream.

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

pub const group_rows = 16;
const vec_bytes = 64; // one zmm: 16 rows x 4 bytes

/// Whether a quantized type is repacked at load for the integer products.
pub fn packs(comptime T: type) bool {
    return T == quant.BlockQ8_0 or T == quant.BlockQ4_0 or T == quant.BlockQ4_K or T == quant.BlockQ6_K;
}

/// 64-byte vectors of weights per 32-weight block: one per quad (Q8_0), one per two quads
/// of nibbles (Q4 types), or, for Q6_K, four of nibbles (the low four bits of each
/// weight) and two of 2-bit fields (the top two bits of quads 0..3, then of quads 4..7).
fn vectorsPerBlock(comptime T: type) usize {
    return switch (T) {
        quant.BlockQ8_0 => 8,
        quant.BlockQ6_K => 6,
        else => 4,
    };
}

/// Bytes of one packed 16-row group of a `cols`-wide matrix: the weight vectors of every
/// block, then the scales (f16 per row and block; Q4_K: 6-bit scale and min per row and
/// block, then f16 d and dmin per row and super-block), rounded up to 64 bytes.
pub fn groupBytes(comptime T: type, cols: usize) usize {
    const blocks = cols / 32;
    const scales = switch (T) {
        // 6-bit scale and min per row and block; f16 d and dmin per row and super-block.
        quant.BlockQ4_K => blocks * 2 * group_rows + cols / 256 * 2 * group_rows * 2,
        // i8 scale per row and 16-weight half block; f16 d per row and super-block.
        quant.BlockQ6_K => blocks * 2 * group_rows + cols / 256 * group_rows * 2,
        else => blocks * group_rows * 2,
    };
    return std.mem.alignForward(usize, blocks * vectorsPerBlock(T) * vec_bytes + scales, vec_bytes);
}

/// Bytes of a (rows, cols) matrix packed.
pub fn packedBytes(comptime T: type, rows: usize, cols: usize) usize {
    return (std.math.divCeil(usize, rows, group_rows) catch unreachable) * groupBytes(T, cols);
}

/// Rows [first, first + n) of w (n <= 16) packed into one group at dst; rows past n are zeros.
/// The quads of the Q4 types share bytes: vector j of a block holds quad j in its low
/// nibbles and quad j + 4 in its high ones (Q4_0's own byte order).
fn packGroup(comptime T: type, dst: []u8, base: [*]align(1) const T, units: usize, first: usize, n: usize, cols: usize) void {
    const blocks = cols / 32;
    const vecs = vectorsPerBlock(T);
    @memset(dst, 0);
    const scales = dst[blocks * vecs * vec_bytes ..];
    for (0..n) |r| {
        const row = base + (first + r) * units;
        for (0..blocks) |b| {
            var u: [32]u8 = undefined;
            switch (T) {
                quant.BlockQ8_0 => {
                    const blk = &row[b];
                    for (&u, blk.qs) |*x, q| x.* = @as(u8, @bitCast(q)) ^ 0x80;
                    std.mem.writeInt(u16, scales[2 * (group_rows * b + r) ..][0..2], blk.d, .little);
                },
                quant.BlockQ4_0 => {
                    const blk = &row[b];
                    for (0..16) |i| {
                        u[i] = blk.qs[i] & 0xF;
                        u[i + 16] = blk.qs[i] >> 4;
                    }
                    std.mem.writeInt(u16, scales[2 * (group_rows * b + r) ..][0..2], blk.d, .little);
                },
                quant.BlockQ6_K => {
                    const blk = &row[b / 8];
                    const h = b % 8 / 4; // half of the super-block
                    const k = b % 4; // quarter of the half
                    for (0..32) |l| {
                        const low = blk.ql[64 * h + l + 32 * (k % 2)];
                        const nib = if (k < 2) low & 0xF else low >> 4;
                        const top = (blk.qh[32 * h + l] >> @intCast(2 * k)) & 3;
                        u[l] = nib | top << 4;
                    }
                    scales[group_rows * 2 * b + r] = @bitCast(blk.scales[8 * h + 2 * k]);
                    scales[group_rows * (2 * b + 1) + r] = @bitCast(blk.scales[8 * h + 2 * k + 1]);
                    const dd = scales[2 * group_rows * blocks ..];
                    std.mem.writeInt(u16, dd[2 * (group_rows * (b / 8) + r) ..][0..2], blk.d, .little);
                },
                quant.BlockQ4_K => {
                    const blk = &row[b / 8];
                    const sub = b % 8;
                    for (0..32) |i| {
                        const byte = blk.qs[32 * (sub / 2) + i];
                        u[i] = if (sub % 2 == 0) byte & 0xF else byte >> 4;
                    }
                    const sm = quant.scaleMinK4(sub, &blk.scales);
                    scales[group_rows * b + r] = sm[0];
                    scales[group_rows * (blocks + b) + r] = sm[1];
                    const dd = scales[2 * group_rows * blocks ..];
                    const sb = b / 8;
                    std.mem.writeInt(u16, dd[2 * (2 * group_rows * sb + r) ..][0..2], blk.d, .little);
                    std.mem.writeInt(u16, dd[2 * (2 * group_rows * sb + group_rows + r) ..][0..2], blk.dmin, .little);
                },
                else => @compileError("not packed"),
            }
            for (0..32) |i| {
                const k = i / 4; // quad
                if (vecs == 8) {
                    dst[(vecs * b + k) * vec_bytes + 4 * r + i % 4] = u[i];
                } else {
                    dst[(vecs * b + k % 4) * vec_bytes + 4 * r + i % 4] |= (u[i] & 0xF) << @as(u3, if (k < 4) 0 else 4);
                    if (vecs == 6) dst[(vecs * b + 4 + k / 4) * vec_bytes + 4 * r + i % 4] |= (u[i] >> 4) << @intCast(2 * (k % 4));
                }
            }
        }
    }
}

/// Packs a whole (rows, cols) matrix into dst (packedBytes long).
pub fn pack(comptime T: type, dst: []u8, w_data: [*]const u8, rows: usize, cols: usize) void {
    packGroups(T, dst, w_data, rows, cols, 0, std.math.divCeil(usize, rows, group_rows) catch unreachable);
}

/// Groups [g_begin, g_end) of pack's output (several threads may each take a range).
pub fn packGroups(comptime T: type, dst: []u8, w_data: [*]const u8, rows: usize, cols: usize, g_begin: usize, g_end: usize) void {
    const gb = groupBytes(T, cols);
    assert(dst.len >= packedBytes(T, rows, cols));
    const base: [*]align(1) const T = @ptrCast(w_data);
    const units = cols / quant.unitElems(T);
    for (g_begin..g_end) |g| {
        packGroup(T, dst[g * gb ..][0..gb], base, units, g * group_rows, @min(group_rows, rows - g * group_rows), cols);
    }
}

/// Per-row scale s and offset o of block b in a packed group (w = s * u + o), 16 rows at once.
inline fn blockScales(comptime T: type, scales: [*]const u8, blocks: usize, b: usize) struct { s: F16, o: F16 } {
    switch (T) {
        quant.BlockQ8_0, quant.BlockQ4_0 => {
            const h: @Vector(16, f16) = @bitCast(scales[32 * b ..][0..32].*);
            const d: F16 = @floatCast(h);
            return .{ .s = d, .o = d * @as(F16, @splat(if (T == quant.BlockQ8_0) -128 else -8)) };
        },
        quant.BlockQ4_K => {
            const sc: @Vector(16, u8) = scales[group_rows * b ..][0..16].*;
            const m: @Vector(16, u8) = scales[group_rows * (blocks + b) ..][0..16].*;
            const dd = scales + 2 * group_rows * blocks + 64 * (b / 8);
            const d: F16 = @floatCast(@as(@Vector(16, f16), @bitCast(dd[0..32].*)));
            const dmin: F16 = @floatCast(@as(@Vector(16, f16), @bitCast(dd[32..64].*)));
            // d * sc and dmin * m are exact in f32 (11 + 6 significant bits).
            return .{ .s = d * @as(F16, @floatFromInt(sc)), .o = -(dmin * @as(F16, @floatFromInt(m))) };
        },
        else => @compileError("not packed"),
    }
}

/// Weight (row, col) of a packed matrix: for tests and one-off reads.
pub fn weightAt(comptime T: type, data: [*]const u8, cols: usize, row: usize, col: usize) f32 {
    const blocks = cols / 32;
    const g = data + row / group_rows * groupBytes(T, cols);
    const r = row % group_rows;
    const b = col / 32;
    const scales = g + blocks * vectorsPerBlock(T) * vec_bytes;
    const u: f32 = @floatFromInt(unpackedByte(T, g, b, r, col % 32));
    if (T == quant.BlockQ6_K) {
        const sc: i8 = @bitCast(scales[group_rows * (2 * b + col % 32 / 16) + r]);
        const d: f32 = @floatCast(@as(f16, @bitCast(std.mem.readInt(u16, scales[2 * group_rows * blocks + 2 * (group_rows * (b / 8) + r) ..][0..2], .little))));
        return d * @as(f32, @floatFromInt(sc)) * (u - 32);
    }
    const sc = blockScales(T, scales, blocks, b);
    return sc.s[r] * u + sc.o[r];
}

/// u of weight i of block b, row r, in the packed group at g.
inline fn unpackedByte(comptime T: type, g: [*]const u8, b: usize, r: usize, i: usize) u8 {
    const vecs = vectorsPerBlock(T);
    const k = i / 4; // quad
    if (vecs == 8) return g[(vecs * b + k) * vec_bytes + 4 * r + i % 4];
    const byte = g[(vecs * b + k % 4) * vec_bytes + 4 * r + i % 4];
    const low = if (k < 4) byte & 0xF else byte >> 4;
    if (vecs == 4) return low;
    const top = (g[(vecs * b + 4 + k / 4) * vec_bytes + 4 * r + i % 4] >> @intCast(2 * (k % 4))) & 3;
    return low | top << 4;
}

const F16 = @Vector(16, f32);
const I16 = @Vector(16, i32);

/// Bits 2j..2j+1 of each byte of `tops` moved to bits 4..5 (Q6_K: the top bits of quad j).
inline fn topBits(tops: @Vector(64, u8), comptime j: usize) @Vector(64, u8) {
    const moved = if (j < 2) tops << @splat(4 - 2 * j) else tops >> @splat(2 * j - 4);
    return moved & @as(@Vector(64, u8), @splat(0x30));
}

/// Four activation bytes of a token broadcast to every lane.
inline fn broadcast4(p: [*]const i8) @Vector(64, i8) {
    const word: i32 = @bitCast(p[0..4].*);
    return @bitCast(@as(I16, @splat(word)));
}

/// Pulls the next pass's weight rows toward L2 a line at a time while this pass computes,
/// so that they are read from cache, not memory, when their turn comes (a batch of
/// decodes is otherwise memory-bound while it reads a pass, and compute-bound after it).
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

/// ng consecutive packed groups from g (each group_bytes) against tokens first..first + nt:
/// out[i][t] holds the 16 sums of group i for token t. Several groups at once give a
/// decode's token several independent sums and the memory system several streams.
inline fn tileInt(comptime T: type, comptime ng: usize, comptime nt: usize, g: [*]const u8, group_bytes: usize, blocks: usize, acts: quant.QuantActs, cols: usize, first: usize, prefetcher: *Prefetcher) [ng][nt]F16 {
    const vecs = comptime vectorsPerBlock(T);
    const k_quant = T == quant.BlockQ4_K;
    // A streamed Q4 product (a decode's token or few) takes the high nibbles in place, as 16
    // times their value: one AND where a shift would take a second op on the ports vpdpbusd
    // uses, and it is bound by those ports as much as by memory (1B q4_0 decode step, median
    // of 9 alternating rounds: 12.06 -> 11.86 ms). The low sums are scaled to match
    // (|16 * sum| < 2^20: exact). A tile of several tokens computes in L2 and pays more for
    // the combine than it saves (prefill -2%, 16 decodes -5%): it shifts.
    const hi_in_place = vecs == 4 and nt < int_tile_tokens;
    var acc: [ng][nt]F16 = .{.{@as(F16, @splat(0))} ** nt} ** ng;
    // Q4_K: sums over a super-block's eight blocks of sc * (d_x * isum) and of m * (d_x * sum q),
    // scaled by the super-block's d and dmin once at its end.
    var acc_sc: [ng][nt]F16 = .{.{@as(F16, @splat(0))} ** nt} ** ng;
    var acc_m: [ng][nt]F16 = .{.{@as(F16, @splat(0))} ** nt} ** ng;
    var xq: [nt][*]const i8 = undefined;
    var xblock: [nt]usize = undefined;
    inline for (0..nt) |t| {
        xq[t] = acts.q.ptr + (first + t) * cols;
        xblock[t] = (first + t) * (cols / 32);
    }
    for (0..blocks) |b| {
        prefetcher.step();
        var xscale: [nt]F16 = undefined;
        // Q8_0, Q4_0: o / s * (d_x * sum q); Q4_K: d_x * sum q; Q6_K: -32 d_x * sum q over
        // the block's first 16 weights (xoffset) and its last 16 (xoffset_hi).
        var xoffset: [nt]F16 = undefined;
        var xoffset_hi: [nt]F16 = undefined;
        inline for (0..nt) |t| {
            // isum is 16 times the block's sum with the high nibbles in place (a power of two: exact).
            xscale[t] = @splat(acts.scale[xblock[t] + b] * @as(f32, if (hi_in_place) 1.0 / 16.0 else 1.0));
            const bias: f32 = switch (T) {
                quant.BlockQ8_0 => -128,
                quant.BlockQ4_0 => -8,
                quant.BlockQ6_K => -32,
                else => 1,
            };
            if (T == quant.BlockQ6_K) {
                const lo = acts.sum_lo[xblock[t] + b];
                xoffset[t] = @splat(bias * lo);
                xoffset_hi[t] = @splat(bias * (acts.sum[xblock[t] + b] - lo));
            } else xoffset[t] = @splat(bias * acts.sum[xblock[t] + b]);
        }
        inline for (0..ng) |gi| {
            const group = g + gi * group_bytes;
            const wb = group + b * vecs * vec_bytes;
            if (nt < int_tile_tokens) {
                // A decode streams the weights: ask for them well ahead of use, and for the
                // scales, a stream of their own after the group's weights.
                inline for (0..vecs) |line| @prefetch(wb + stream_ahead + line * vec_bytes, .{ .locality = 3 });
                const sc = group + blocks * vecs * vec_bytes;
                const ahead = scale_ahead_blocks;
                switch (T) {
                    quant.BlockQ4_K => {
                        @prefetch(sc + group_rows * (b + ahead), .{ .locality = 3 });
                        @prefetch(sc + group_rows * (blocks + b + ahead), .{ .locality = 3 });
                        if (b % 8 == 0) @prefetch(sc + 2 * group_rows * blocks + 64 * (b / 8 + ahead / 8), .{ .locality = 3 });
                    },
                    quant.BlockQ6_K => {
                        @prefetch(sc + 2 * group_rows * (b + ahead), .{ .locality = 3 });
                        if (b % 8 == 0) @prefetch(sc + 2 * group_rows * blocks + 32 * (b / 8 + ahead / 8), .{ .locality = 3 });
                    },
                    else => @prefetch(sc + 2 * group_rows * (b + ahead), .{ .locality = 3 }),
                }
            }
            var isum: [nt]I16 = .{@as(I16, @splat(0))} ** nt;
            // A second chain of sums (Q6_K: the block's last 16 weights; else every other
            // vector), so that two vpdpbusd chains overlap their latency.
            var isum_hi: [nt]I16 = .{@as(I16, @splat(0))} ** nt;
            if (vecs == 8) {
                inline for (0..8) |k| {
                    const w: @Vector(64, u8) = wb[k * vec_bytes ..][0..vec_bytes].*;
                    inline for (0..nt) |t| {
                        const sum = if (k % 2 == 0) &isum[t] else &isum_hi[t];
                        sum.* = dpbusd(16, sum.*, w, broadcast4(xq[t] + 32 * b + 4 * k));
                    }
                }
            } else if (vecs == 6) {
                const tops_lo: @Vector(64, u8) = wb[4 * vec_bytes ..][0..vec_bytes].*;
                const tops_hi: @Vector(64, u8) = wb[5 * vec_bytes ..][0..vec_bytes].*;
                inline for (0..4) |j| {
                    const v: @Vector(64, u8) = wb[j * vec_bytes ..][0..vec_bytes].*;
                    const lo = (v & @as(@Vector(64, u8), @splat(0xF))) | topBits(tops_lo, j);
                    const hi = (v >> @splat(4)) | topBits(tops_hi, j);
                    inline for (0..nt) |t| {
                        isum[t] = dpbusd(16, isum[t], lo, broadcast4(xq[t] + 32 * b + 4 * j));
                        isum_hi[t] = dpbusd(16, isum_hi[t], hi, broadcast4(xq[t] + 32 * b + 16 + 4 * j));
                    }
                }
            } else {
                inline for (0..4) |j| {
                    const v: @Vector(64, u8) = wb[j * vec_bytes ..][0..vec_bytes].*;
                    const lo = v & @as(@Vector(64, u8), @splat(0x0F));
                    const hi = if (hi_in_place) v & @as(@Vector(64, u8), @splat(0xF0)) else v >> @splat(4);
                    inline for (0..nt) |t| {
                        isum[t] = dpbusd(16, isum[t], lo, broadcast4(xq[t] + 32 * b + 4 * j));
                        isum_hi[t] = dpbusd(16, isum_hi[t], hi, broadcast4(xq[t] + 32 * b + 16 + 4 * j));
                    }
                }
            }
            if (vecs != 6) inline for (0..nt) |t| {
                isum[t] = if (hi_in_place) (isum[t] << @splat(4)) + isum_hi[t] else isum[t] + isum_hi[t];
            };
            const scales = group + blocks * vecs * vec_bytes;
            if (T == quant.BlockQ6_K) {
                // w = d * sc * (u - 32), sc per 16 weights: the super-block's d comes at its end.
                const sc_lo: F16 = @floatFromInt(@as(@Vector(16, i8), @bitCast(scales[group_rows * 2 * b ..][0..16].*)));
                const sc_hi: F16 = @floatFromInt(@as(@Vector(16, i8), @bitCast(scales[group_rows * (2 * b + 1) ..][0..16].*)));
                inline for (0..nt) |t| {
                    const t_lo = @mulAdd(F16, @floatFromInt(isum[t]), xscale[t], xoffset[t]);
                    const t_hi = @mulAdd(F16, @floatFromInt(isum_hi[t]), xscale[t], xoffset_hi[t]);
                    acc_sc[gi][t] = @mulAdd(F16, sc_hi, t_hi, @mulAdd(F16, sc_lo, t_lo, acc_sc[gi][t]));
                }
                if (b % 8 == 7) {
                    const dd = scales + 2 * group_rows * blocks + 32 * (b / 8);
                    const d: F16 = @floatCast(@as(@Vector(16, f16), @bitCast(dd[0..32].*)));
                    inline for (0..nt) |t| {
                        acc[gi][t] = @mulAdd(F16, d, acc_sc[gi][t], acc[gi][t]);
                        acc_sc[gi][t] = @splat(0);
                    }
                }
            } else if (k_quant) {
                const sc: F16 = @floatFromInt(@as(@Vector(16, u8), scales[group_rows * b ..][0..16].*));
                const m: F16 = @floatFromInt(@as(@Vector(16, u8), scales[group_rows * (blocks + b) ..][0..16].*));
                inline for (0..nt) |t| {
                    acc_sc[gi][t] = @mulAdd(F16, @as(F16, @floatFromInt(isum[t])) * xscale[t], sc, acc_sc[gi][t]);
                    acc_m[gi][t] = @mulAdd(F16, xoffset[t], m, acc_m[gi][t]);
                }
                if (b % 8 == 7) {
                    const dd = scales + 2 * group_rows * blocks + 64 * (b / 8);
                    const d: F16 = @floatCast(@as(@Vector(16, f16), @bitCast(dd[0..32].*)));
                    const dmin: F16 = @floatCast(@as(@Vector(16, f16), @bitCast(dd[32..64].*)));
                    inline for (0..nt) |t| {
                        acc[gi][t] = @mulAdd(F16, d, acc_sc[gi][t], acc[gi][t]);
                        acc[gi][t] = @mulAdd(F16, -dmin, acc_m[gi][t], acc[gi][t]);
                        acc_sc[gi][t] = @splat(0);
                        acc_m[gi][t] = @splat(0);
                    }
                }
            } else {
                // w = s * (u + bias), so sum_k w x = s * (d_x * sum(u q) + bias * d_x * sum q).
                const s_row: F16 = @floatCast(@as(@Vector(16, f16), @bitCast(scales[32 * b ..][0..32].*)));
                inline for (0..nt) |t| {
                    acc[gi][t] = @mulAdd(F16, s_row, @mulAdd(F16, @floatFromInt(isum[t]), xscale[t], xoffset[t]), acc[gi][t]);
                }
            }
        }
    }
    return acc;
}

/// Rows of the tile a one-token product takes in every packed GEMM (this one, bgemm,
/// fgemm: four groups, four streams). A decode splits its rows in multiples of it: a
/// chunk of fewer groups reads them as fewer streams, with fewer lines in flight.
pub const stream_tile_rows = 4 * group_rows;

/// Tokens an integer tile takes; fewer are a decode's token or few, streamed.
const int_tile_tokens = 4;
/// How many blocks ahead a streaming pass prefetches its scales.
const scale_ahead_blocks = 16;
/// How far ahead a streaming pass (a decode's token or few) prefetches its weights.
pub const stream_ahead = 2048;
/// Packed bytes a pass covers while several token tiles run over them (well inside L2).
pub const pass_bytes = 256 * 1024;

/// The loop every packed GEMM (this one, bgemm, fgemm) shares, over the 16-row groups that
/// hold rows [row_begin, row_end): passes of groups that stay in L2, tiles of tokens over
/// each pass, several groups per tile. `K` gives the kernel:
///   tokens_per_tile: the most tokens a tile takes;
///   stream_tokens: below this many tokens there is one pass over every group, streamed;
///   min_groups_per_pass: the fewest groups a pass holds;
///   groupsAtOnce(nt): how many groups a tile of nt tokens takes;
///   tile(k, ng, nt, group, first, prefetcher): the 16 sums of each of ng groups from
///     `group` for tokens first..first + nt.
/// A range that starts or ends inside a group computes the whole group and stores only its
/// own rows.
pub fn runTiles(comptime K: type, k: K, out: []f32, out_stride: usize, n_tokens: usize, data: [*]const u8, group_bytes: usize, row_begin: usize, row_end: usize) void {
    const gb = group_bytes;
    const g_begin = row_begin / group_rows;
    const g_end = std.math.divCeil(usize, row_end, group_rows) catch unreachable;
    const single_pass = n_tokens < K.stream_tokens;
    const groups_per_pass = if (single_pass) g_end - g_begin else @max(K.min_groups_per_pass, pass_bytes / gb);
    var g0 = g_begin;
    while (g0 < g_end) {
        const g1 = @min(g_end, g0 + groups_per_pass);
        var prefetcher = Prefetcher{ .next = @intFromPtr(data + g1 * gb), .end = @intFromPtr(data + @min(g_end, g1 + groups_per_pass) * gb) };
        if (single_pass) prefetcher.end = prefetcher.next; // one pass: streamed
        var first: usize = 0;
        while (first < n_tokens) : (first += K.tokens_per_tile) {
            switch (@min(K.tokens_per_tile, n_tokens - first)) {
                inline 1...K.tokens_per_tile => |nt| {
                    const ng = comptime K.groupsAtOnce(nt);
                    var g = g0;
                    while (g + ng <= g1) : (g += ng) {
                        const sums = k.tile(ng, nt, data + g * gb, first, &prefetcher);
                        inline for (0..ng) |i| storeGroup(nt, sums[i], out, out_stride, first, g + i, row_begin, row_end);
                    }
                    while (g < g1) : (g += 1) {
                        storeGroup(nt, k.tile(1, nt, data + g * gb, first, &prefetcher)[0], out, out_stride, first, g, row_begin, row_end);
                    }
                },
                else => unreachable,
            }
        }
        g0 = g1;
    }
}

/// out[n, r] = w[r] . x[n] for r in [row_begin, row_end) and every token n < n_tokens,
/// w packed (pack) and x given as 8-bit activations.
pub fn matmulRows(comptime T: type, out: []f32, out_stride: usize, acts: quant.QuantActs, n_tokens: usize, data: [*]const u8, cols: usize, row_begin: usize, row_end: usize) void {
    assert(cols % 32 == 0);
    const Kernel = struct {
        acts: quant.QuantActs,
        cols: usize,
        group_bytes: usize,

        pub const tokens_per_tile = int_tile_tokens;
        pub const stream_tokens = int_tile_tokens;
        pub const min_groups_per_pass = 1;
        /// Fewer tokens, more groups at once: enough independent sums either way.
        pub fn groupsAtOnce(comptime nt: usize) usize {
            return if (nt <= 2) 4 / nt else 1;
        }
        comptime {
            assert(groupsAtOnce(1) * group_rows == stream_tile_rows);
        }
        pub inline fn tile(kernel: @This(), comptime ng: usize, comptime nt: usize, g: [*]const u8, first: usize, prefetcher: *Prefetcher) [ng][nt]F16 {
            return tileInt(T, ng, nt, g, kernel.group_bytes, kernel.cols / 32, kernel.acts, kernel.cols, first, prefetcher);
        }
    };
    const gb = groupBytes(T, cols);
    runTiles(Kernel, .{ .acts = acts, .cols = cols, .group_bytes = gb }, out, out_stride, n_tokens, data, gb, row_begin, row_end);
}

/// Group g's 16 sums for token t go to out[first + t, 16g ..], rows in [row_begin, row_end) only.
pub inline fn storeGroup(comptime nt: usize, sums: [nt]F16, out: []f32, out_stride: usize, first: usize, g: usize, row_begin: usize, row_end: usize) void {
    const lo = @max(row_begin, g * group_rows);
    const hi = @min(row_end, g * group_rows + group_rows);
    inline for (0..nt) |t| {
        const dst = out[(first + t) * out_stride ..];
        if (hi - lo == group_rows) {
            dst[lo..][0..group_rows].* = sums[t];
        } else {
            const v: [group_rows]f32 = sums[t];
            @memcpy(dst[lo..hi], v[lo - g * group_rows .. hi - g * group_rows]);
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

test "integer GEMM over packed weights equals a plain sum over decoded weights and quantized activations" {
    const Matrix = @import("kernels.zig").Matrix;
    const allocator = testing.allocator;
    var prng = std.Random.DefaultPrng.init(17);
    const rng = prng.random();
    const cols = 512;
    // 61 groups, the last partial: more than one pass of pass_bytes for every type.
    const rows = 16 * 60 + 5;
    const max_tokens = 7; // a full tile of four and a remainder of three
    var x: [max_tokens * cols]f32 = undefined;
    for (&x) |*v| v.* = rng.floatNorm(f32);
    var q: [max_tokens * cols]i8 = undefined;
    var scale: [max_tokens * cols / 32]f32 = undefined;
    var sum: [max_tokens * cols / 32]f32 = undefined;
    var sum_lo: [max_tokens * cols / 32]f32 = undefined;
    const acts = quant.QuantActs{ .q = &q, .scale = &scale, .sum = &sum, .sum_lo = &sum_lo };
    acts.quantize(&x, 0, max_tokens, cols);
    const storage = try allocator.alignedAlloc(u8, 4, rows * (cols / 32) * 34); // Q8_0, the largest
    defer allocator.free(storage);
    const out = try allocator.alloc(f32, max_tokens * (rows + 3));
    defer allocator.free(out);
    inline for (.{ .{ quant.BlockQ8_0, .q8_0 }, .{ quant.BlockQ4_0, .q4_0 }, .{ quant.BlockQ4_K, .q4_k }, .{ quant.BlockQ6_K, .q6_k } }) |case| {
        const T = case[0];
        rng.bytes(storage);
        const blocks: [*]align(1) T = @ptrCast(storage.ptr);
        const units = cols / quant.unitElems(T);
        for (0..rows * units) |bi| {
            blocks[bi].d = @bitCast(@as(f16, @floatCast(rng.float(f32) * 0.01)));
            if (T == quant.BlockQ4_K) blocks[bi].dmin = @bitCast(@as(f16, @floatCast(rng.float(f32) * 0.01)));
        }
        // Q6_K's scales are signed bytes: the random ones include negatives.
        const w = Matrix{ .dtype = case[1], .data = storage.ptr, .rows = rows, .cols = cols };
        try testing.expect(packedBytes(T, rows, cols) > pass_bytes);
        const packed_w = try allocator.alloc(u8, packedBytes(T, rows, cols));
        defer allocator.free(packed_w);
        pack(T, packed_w, storage.ptr, rows, cols);
        // Every row unpacks to its decoded weights, exactly.
        for (0..rows) |r| for (0..cols) |k| try testing.expectEqual(w.get(r, k), weightAt(T, packed_w.ptr, cols, r, k));
        for ([_]usize{ 1, 2, 4, 7 }) |n_tokens| {
            const stride = rows + 3;
            @memset(out, std.math.nan(f32));
            // Rows 2..rows: the row range need not start at a group boundary.
            matmulRows(T, out, stride, acts, n_tokens, packed_w.ptr, cols, 2, rows);
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
