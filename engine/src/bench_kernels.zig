//! Kernel streaming benchmark: how close one-token products come to reading memory.
//! `zig build bench-kernels [-- threads [type]]` (ReleaseFast; default 1 thread, every type). Alternating in one
//! run, it times a plain vector sum over a buffer (the read bandwidth) and each packed
//! product over a matrix of about the same bytes, each thread on its own half, and prints
//! GB/s, the ratio to the read, and the kernel's rate on a matrix that stays in L2 (what
//! it does when memory is not the limit).

const std = @import("std");
const quant = @import("quant.zig");
const qgemm = @import("qgemm.zig");
const bgemm = @import("bgemm.zig");
const fgemm = @import("fgemm.zig");
const ThreadPool = @import("thread_pool.zig").ThreadPool;
const allocHugePages = @import("weights.zig").allocHugePages;

const target_bytes = 512 * 1024 * 1024;
const cols = 2048;
const reps = 5;

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

const Inputs = struct {
    acts: quant.QuantActs,
    xb: []const u16,
    x: []const f32,
};

/// One thread's share: rows [begin, end) of the product, or its slice of the read.
fn product(comptime T: type, out: []f32, in: Inputs, data: [*]const u8, rows: usize, begin: usize, end: usize) void {
    if (T == u16) {
        bgemm.matmulRows(out, rows, in.xb, 1, data, cols, begin, end);
    } else if (T == f16) {
        fgemm.matmulRows(f16, out, rows, in.x, 1, data, cols, begin, end);
    } else qgemm.matmulRows(T, out, rows, in.acts, 1, data, cols, begin, end);
}

fn readShare(buf: []const u8, sink: *f32) void {
    sink.* = readSum(buf);
}

/// Seconds for `threads` threads to each run `func` on their share.
fn timed(threads: usize, comptime func: anytype, args_of: anytype) !f64 {
    var timer = try std.time.Timer.start();
    var handles: [16]std.Thread = undefined;
    for (1..threads) |t| handles[t] = try std.Thread.spawn(.{}, func, args_of.at(t));
    @call(.auto, func, args_of.at(0));
    for (1..threads) |t| handles[t].join();
    return @as(f64, @floatFromInt(timer.read())) / 1e9;
}

pub fn main() !void {
    const allocator = std.heap.page_allocator;
    var args = std.process.args();
    _ = args.next();
    const threads: usize = if (args.next()) |a| try std.fmt.parseInt(usize, a, 10) else 1;
    const only: ?[]const u8 = args.next(); // one type's name (q4_0, ...): only that one
    var x: [cols]f32 = undefined;
    var prng = std.Random.DefaultPrng.init(1);
    for (&x) |*v| v.* = prng.random().floatNorm(f32);
    var q: [cols]i8 = undefined;
    var scale: [cols / 32]f32 = undefined;
    var sum: [cols / 32]f32 = undefined;
    var sum_lo: [cols / 32]f32 = undefined;
    const acts = quant.QuantActs{ .q = &q, .scale = &scale, .sum = &sum, .sum_lo = &sum_lo };
    acts.quantize(&x, 0, 1, cols);
    var xb: [cols]u16 = undefined;
    bgemm.convertActs(&xb, &x, 0, 1, cols);
    const in = Inputs{ .acts = acts, .xb = &xb, .x = &x };
    var pool: ThreadPool = undefined;
    try pool.init(allocator, threads);
    defer pool.deinit(allocator);

    // Huge pages, as the engine's packed weights have them.
    const plain = try allocHugePages(target_bytes);
    @memset(plain, 1);
    const stdout = std.io.getStdOut().writer();
    var sinks: [16]f32 = .{0} ** 16;
    inline for (.{ .{ "q4_0", quant.BlockQ4_0 }, .{ "q8_0", quant.BlockQ8_0 }, .{ "q4_k", quant.BlockQ4_K }, .{ "q5_k", quant.BlockQ5_K }, .{ "q6_k", quant.BlockQ6_K }, .{ "bf16", u16 }, .{ "f16 (f32 products)", f16 } }) |case| {
        if (only == null or std.mem.eql(u8, only.?, case[0])) try benchType(case[0], case[1], allocator, threads, in, &pool, plain, &sinks, prng.random(), stdout);
    }
}

/// One weight type: its streaming rate against a plain read, as pool jobs, and in L2.
fn benchType(comptime name: []const u8, comptime T: type, allocator: std.mem.Allocator, threads: usize, in: Inputs, pool: *ThreadPool, plain: []const u8, sinks: *[16]f32, rng: std.Random, stdout: anytype) !void {
    const group_bytes = if (T == u16) bgemm.groupBytes(cols) else if (T == f16) fgemm.groupBytes(f16, cols) else qgemm.groupBytes(T, cols);
    const groups = target_bytes / group_bytes / qgemm.stripe_groups * qgemm.stripe_groups; // whole stripes
    const rows = groups * 16;
    const bytes = groups * group_bytes;
    const packed_w = try allocHugePages(bytes);
    defer allocator.free(packed_w);
    rng.bytes(packed_w);
    const out = try allocator.alloc(f32, rows);
    defer allocator.free(out);

    const Shares = struct {
        out: []f32,
        in: Inputs,
        data: [*]const u8,
        rows: usize,
        n_groups: usize,
        threads: usize,
        fn at(s: @This(), t: usize) struct { []f32, Inputs, [*]const u8, usize, usize, usize } {
            const per = s.n_groups / s.threads / qgemm.stripe_groups * qgemm.stripe_groups; // whole stripes a thread
            const begin = t * per;
            const end = if (t == s.threads - 1) s.n_groups else begin + per;
            return .{ s.out, s.in, s.data, s.rows, begin * 16, end * 16 };
        }
    };
    const ReadShares = struct {
        plain: []const u8,
        threads: usize,
        sinks: *[16]f32,
        fn at(s: @This(), t: usize) struct { []const u8, *f32 } {
            const per = s.plain.len / s.threads / 64 * 64;
            const end = if (t == s.threads - 1) s.plain.len else (t + 1) * per;
            return .{ s.plain[t * per .. end], &s.sinks[t] };
        }
    };
    const shares = Shares{ .out = out, .in = in, .data = packed_w.ptr, .rows = rows, .n_groups = groups, .threads = threads };
    const func = struct {
        fn run(o: []f32, i: Inputs, d: [*]const u8, r: usize, b: usize, e: usize) void {
            product(T, o, i, d, r, b, e);
        }
    }.run;
    var best_read: f64 = 1e9;
    var best_kernel: f64 = 1e9;
    for (0..reps) |_| {
        best_read = @min(best_read, try timed(threads, readShare, ReadShares{ .plain = plain[0..bytes], .threads = threads, .sinks = sinks }));
        best_kernel = @min(best_kernel, try timed(threads, func, shares));
    }
    // In L2: each thread runs 256 KiB of groups over and over (its own copy of the work).
    const small_groups = 256 * 1024 / group_bytes;
    const small_reps = groups / small_groups / threads;
    var cached: f64 = 1e9;
    for (0..2) |_| {
        var timer = try std.time.Timer.start();
        for (0..small_reps) |_| product(T, out, in, packed_w.ptr, rows, 0, small_groups * 16);
        cached = @min(cached, @as(f64, @floatFromInt(timer.read())) / 1e9);
    }
    // Through the pool, as a decode step runs it: one job per 2048-row matrix (a layer's
    // o-projection), chunked as forward.matmul chunks it.
    const matrix_groups = 2048 / 16;
    const matrices = groups / matrix_groups;
    const Job = struct {
        out: []f32,
        in: Inputs,
        data: [*]const u8,
        fn call(ctx: *const anyopaque, _: usize, begin: usize, end: usize) void {
            const j: *const @This() = @ptrCast(@alignCast(ctx));
            product(T, j.out, j.in, j.data, 2048, begin, end);
        }
    };
    var pooled: f64 = 1e9;
    for (0..reps) |_| {
        var timer = try std.time.Timer.start();
        for (0..matrices) |i| {
            const job = Job{ .out = out, .in = in, .data = packed_w.ptr + i * matrix_groups * group_bytes };
            pool.run(.{ .func = Job.call, .ctx = &job, .n_items = 2048, .grain = std.mem.alignForward(usize, 2048 / (threads * 64), qgemm.stream_tile_rows), .split = .owned });
        }
        pooled = @min(pooled, @as(f64, @floatFromInt(timer.read())) / 1e9);
    }
    const gb_pooled = @as(f64, @floatFromInt(matrices * matrix_groups * group_bytes)) / 1e9;
    const gb = @as(f64, @floatFromInt(bytes)) / 1e9;
    const gb_cached = @as(f64, @floatFromInt(small_reps * small_groups * group_bytes)) / 1e9;
    try stdout.print("{s}: one token over {d} MB, {d} thread(s): {d:.1} GB/s; read {d:.1} GB/s; ratio {d:.2}; 2048-row jobs on the pool {d:.1} GB/s; in L2 {d:.1} GB/s a thread (best of {d}){s}\n", .{ name, bytes / 1_000_000, threads, gb / best_kernel, gb / best_read, best_read / best_kernel, gb_pooled / pooled, gb_cached / cached, reps, if (sinks[0] == 12345 or out[0] == 12345) " " else "" });
}
