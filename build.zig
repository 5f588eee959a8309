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
    b.installArtifact(lib);

    const tests = b.addTest(.{
        .root_source_file = b.path("engine/src/root.zig"),
        .target = target,
        .optimize = .Debug,
        .link_libc = true,
    });
    const run_tests = b.addRunArtifact(tests);
    const test_step = b.step("test", "Run the engine's unit tests (kernels against naive versions, block pool, sampler, threads)");
    test_step.dependOn(&run_tests.step);
}
