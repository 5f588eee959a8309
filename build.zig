//! Builds libinferneo (the CPU engine) into zig-out/lib, and runs the engine's unit
//! tests with `zig build test`. The CUDA backend joins here, behind the same ABI,
//! when engine/cuda/ exists and nvcc is on the machine.

const std = @import("std");

pub fn build(b: *std.Build) void {
    const target = b.standardTargetOptions(.{});
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
