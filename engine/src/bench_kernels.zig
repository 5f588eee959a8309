//! Kernel streaming benchmark: how close one-token products come to reading memory.
//! `zig build bench-kernels` (ReleaseFast). On one thread, alternating in one run, it
//! times a plain vector sum over a buffer (the read bandwidth) and each packed product
//! over a matrix of about the same bytes, and prints GB/s and the ratio to the read.

const std = @import("std");
const quant = @import("quant.zig");
const qgemm = @import("qgemm.zig");
const bgemm = @import("bgemm.zig");

const target_bytes = 512 * 1024 * 1024;
const cols = 2048;

fn readSum(buf: []const u8) f32 {
    const V = @Vector(16, f32);
    const floats = std.mem.bytesAsSlice(f32, buf);
    var acc: [4]V = .{@as(V, @splat(0))} ** 4;
    var i: usize = 0;
    while (i + 64 <= floats.len) : (i += 64) {
        inline for (0..4) |k| acc[k] += floats[i + 16 * k ..][0..16].*;
    }
    return @reduce(.Add, acc[0] + acc[1] + acc[2] + acc[3]);
}

fn seconds(timer: *std.time.Timer) f64 {
    return @as(f64, @floatFromInt(timer.lap())) / 1e9;
}

pub fn main() !void {
    const allocator = std.heap.page_allocator;
    const reps = 5;
    var x: [cols]f32 = undefined;
    var prng = std.Random.DefaultPrng.init(1);
    for (&x) |*v| v.* = prng.random().floatNorm(f32);
    var q: [cols]i8 = undefined;
    var scale: [cols / 32]f32 = undefined;
    var sum: [cols / 32]f32 = undefined;
    const acts = quant.QuantActs{ .q = &q, .scale = &scale, .sum = &sum };
    acts.quantize(&x, 0, 1, cols);
    var xb: [cols]u16 = undefined;
    bgemm.convertActs(&xb, &x, 0, 1, cols);

    const plain = try allocator.alloc(u8, target_bytes);
    @memset(plain, 1);
    var out: []f32 = undefined;
    var timer = try std.time.Timer.start();
    const stdout = std.io.getStdOut().writer();
    inline for (.{ .{ "q4_0", quant.BlockQ4_0 }, .{ "q8_0", quant.BlockQ8_0 }, .{ "q4_k", quant.BlockQ4_K }, .{ "bf16", u16 } }) |case| {
        const T = case[1];
        const group_bytes = if (T == u16) bgemm.groupBytes(cols) else qgemm.groupBytes(T, cols);
        const rows = target_bytes / group_bytes * 16;
        const bytes = rows / 16 * group_bytes;
        const packed_w = try allocator.alloc(u8, bytes);
        defer allocator.free(packed_w);
        prng.random().bytes(packed_w);
        out = try allocator.alloc(f32, rows);
        defer allocator.free(out);
        var best_read: f64 = 1e9;
        var best_kernel: f64 = 1e9;
        var sink: f32 = 0;
        for (0..reps) |_| {
            _ = seconds(&timer);
            sink += readSum(plain[0..bytes]);
            best_read = @min(best_read, seconds(&timer));
            if (T == u16) {
                bgemm.matmulRows(out, rows, &xb, 1, packed_w.ptr, cols, 0, rows);
            } else qgemm.matmulRows(T, out, rows, acts, 1, packed_w.ptr, cols, 0, rows);
            best_kernel = @min(best_kernel, seconds(&timer));
            sink += out[rows / 2];
        }
        const gb = @as(f64, @floatFromInt(bytes)) / 1e9;
        try stdout.print("{s}: one token over {d} MB: {d:.1} GB/s; read {d:.1} GB/s; ratio {d:.2} (1 thread, best of {d}){s}\n", .{ case[0], bytes / 1_000_000, gb / best_kernel, gb / best_read, best_read / best_kernel, reps, if (sink == 12345) " " else "" });
    }
}
