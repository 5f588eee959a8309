//! Builds libinferneo (the CPU engine) into zig-out/lib, and runs the engine's unit
//! tests with `zig build test`. The CUDA backend joins here, behind the same ABI,
//! when engine/cuda/ exists and nvcc is on the machine.

const std = @import("std");

pub fn build(b: *std.Build) void {
    // Zig's host detection leaves out LLVM's `evex512` on AVX-512 machines, which caps
    // vectors (and vpdpbusd) at 256 bits; give it back where the CPU has AVX-512.
    var query = b.standardTargetOptionsQueryOnly(.{});
    const detected = b.resolveTargetQuery(query).result;
    if (detected.cpu.arch == .x86_64 and std.Target.x86.featureSetHas(detected.cpu.features, .avx512f))
        query.cpu_features_add.addFeature(@intFromEnum(std.Target.x86.Feature.evex512));
    const target = b.resolveTargetQuery(query);
    const optimize = b.standardOptimizeOption(.{});

    const lib = b.addSharedLibrary(.{
        .name = "inferneo",
        .root_source_file = b.path("engine/src/root.zig"),
        .target = target,
        .optimize = optimize,
        .link_libc = true,
    });
    lib.addIncludePath(b.path("engine/include"));
    lib.root_module.addOptions("build_options", backendOptions(b, "cpu"));
    b.installArtifact(lib);

    const tests = b.addTest(.{
        .root_source_file = b.path("engine/src/root.zig"),
        .target = target,
        .optimize = .Debug,
        .link_libc = true,
    });
    tests.root_module.addOptions("build_options", backendOptions(b, "cpu"));
    const run_tests = b.addRunArtifact(tests);
    const test_step = b.step("test", "Run the engine's unit tests (kernels against naive versions, block pool, sampler, threads)");
    test_step.dependOn(&run_tests.step);

    // One-token products against a plain read of memory, on one thread: see bench_kernels.zig.
    const bench = b.addExecutable(.{
        .name = "bench-kernels",
        .root_source_file = b.path("engine/src/bench_kernels.zig"),
        .target = target,
        .optimize = .ReleaseFast,
    });
    const run_bench = b.addRunArtifact(bench);
    if (b.args) |args| run_bench.addArgs(args);
    const bench_step = b.step("bench-kernels", "Time one-token packed products against a plain read of memory (one thread)");
    bench_step.dependOn(&run_bench.step);
}

/// The options engine/src/engine.zig reads: which backend the library is built with.
fn backendOptions(b: *std.Build, backend: []const u8) *std.Build.Step.Options {
    const options = b.addOptions();
    options.addOption([]const u8, "backend", backend);
    return options;
}
