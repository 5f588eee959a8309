//! Builds the engine: libinferneo (the CPU backend) into zig-out/lib; where nvcc is found,
//! libinferneo_cuda (the CUDA backend: the same Zig host side over engine/cuda's kernels)
//! beside it; and, always, the CUDA backend over the host emulator of engine/cuda/emu into
//! zig-out/emu/lib, so that the CUDA code runs in tests on machines without a GPU.
//! `zig build test` runs the engine's unit tests, the CUDA kernels (emulated) among them.
//!
//!   -Dcuda=auto|on|off   the real CUDA build: where nvcc is found (auto; with CI=true a missing
//!                        nvcc fails the build), required, or skipped
//!   -Demulated=false     no emulated CUDA build (an image's builds)
//!   -Dcpu-lib=false      no CPU library for this machine (an image, which has one per CPU level)

const std = @import("std");

const CudaMode = enum { auto, on, off };

pub fn build(b: *std.Build) !void {
    // Zig's host detection leaves out LLVM's `evex512` on AVX-512 machines, which caps
    // vectors (and vpdpbusd) at 256 bits; give it back where the CPU has AVX-512.
    var query = b.standardTargetOptionsQueryOnly(.{});
    const detected = b.resolveTargetQuery(query).result;
    if (detected.cpu.arch == .x86_64 and std.Target.x86.featureSetHas(detected.cpu.features, .avx512f))
        query.cpu_features_add.addFeature(@intFromEnum(std.Target.x86.Feature.evex512));
    const target = b.resolveTargetQuery(query);
    const optimize = b.standardOptimizeOption(.{});
    const cuda_mode = b.option(CudaMode, "cuda", "the CUDA backend: auto (where nvcc is found), on, off") orelse .auto;
    const emulated = b.option(bool, "emulated", "the CUDA backend over the host emulator, into zig-out/emu (default true)") orelse true;
    const cpu_lib = b.option(bool, "cpu-lib", "libinferneo.so for this machine's CPU (default true)") orelse true;
    const kernels = try cudaSources(b);

    const lib = b.addSharedLibrary(.{
        .name = "inferneo",
        .root_source_file = b.path("engine/src/root.zig"),
        .target = target,
        .optimize = optimize,
        .link_libc = true,
    });
    lib.addIncludePath(b.path("engine/include"));
    lib.root_module.addOptions("build_options", backendOptions(b, "cpu"));
    if (cpu_lib) b.installArtifact(lib);

    // The CUDA backend over the emulator: what the tests run where there is no GPU.
    const emu = b.addSharedLibrary(.{
        .name = "inferneo_cuda",
        .root_source_file = b.path("engine/src/root.zig"),
        .target = target,
        .optimize = optimize,
        .link_libc = true,
    });
    emu.root_module.addOptions("build_options", backendOptions(b, "cuda"));
    addEmulatedKernels(b, emu, kernels);
    const install_emu = b.addInstallArtifact(emu, .{ .dest_dir = .{ .override = .{ .custom = "emu/lib" } } });
    if (emulated) b.getInstallStep().dependOn(&install_emu.step);

    if (findNvcc(b, cuda_mode)) |nvcc| {
        b.getInstallStep().dependOn(&addCudaLibrary(b, nvcc, kernels, optimize).step);
    }

    const tests = b.addTest(.{
        .root_source_file = b.path("engine/src/root.zig"),
        .target = target,
        .optimize = .Debug,
        .link_libc = true,
    });
    tests.root_module.addOptions("build_options", backendOptions(b, "cpu"));
    addEmulatedKernels(b, tests, kernels);
    const run_tests = b.addRunArtifact(tests);
    const test_step = b.step("test", "Run the engine's unit tests (kernels against naive versions, the CUDA kernels emulated, block pool, sampler, threads)");
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

    // Decode attention at depth alone: see bench_attention.zig.
    const bench_attn = b.addExecutable(.{
        .name = "bench-attention",
        .root_source_file = b.path("engine/src/bench_attention.zig"),
        .target = target,
        .optimize = .ReleaseFast,
    });
    const run_attn = b.addRunArtifact(bench_attn);
    if (b.args) |args| run_attn.addArgs(args);
    b.step("bench-attention", "Time one decode token's attention over every layer's K/V at a depth").dependOn(&run_attn.step);
}

/// The options engine/src/engine.zig reads: which backend the library is built with.
fn backendOptions(b: *std.Build, backend: []const u8) *std.Build.Step.Options {
    const options = b.addOptions();
    options.addOption([]const u8, "backend", backend);
    return options;
}

/// engine/cuda's kernel files (one op a file), and the headers they share.
const CudaSources = struct { kernels: []const []const u8, headers: []const []const u8 };

fn cudaSources(b: *std.Build) !CudaSources {
    var dir = try b.build_root.handle.openDir("engine/cuda", .{ .iterate = true });
    defer dir.close();
    var kernels = std.ArrayList([]const u8).init(b.allocator);
    var headers = std.ArrayList([]const u8).init(b.allocator);
    var it = dir.iterate();
    while (try it.next()) |entry| {
        if (entry.kind != .file) continue;
        const name = b.dupe(entry.name);
        if (std.mem.endsWith(u8, name, ".cu")) try kernels.append(name);
        if (std.mem.endsWith(u8, name, ".cuh") or std.mem.endsWith(u8, name, ".h")) try headers.append(name);
    }
    std.mem.sort([]const u8, kernels.items, {}, lessThan);
    return .{ .kernels = kernels.items, .headers = headers.items };
}

fn lessThan(_: void, a: []const u8, c: []const u8) bool {
    return std.mem.lessThan(u8, a, c);
}

/// The kernels as C++ over the emulator (engine/cuda/emu), optimized whatever the step's mode:
/// an emulated kernel is slow enough already. Zig takes a .cu file for CUDA, so each is
/// compiled as a .cpp copy (its includes found through engine/cuda on the include path).
fn addEmulatedKernels(b: *std.Build, step: *std.Build.Step.Compile, sources: CudaSources) void {
    const flags = &[_][]const u8{ "-std=c++17", "-DIFN_EMULATE", "-O2", "-fno-sanitize=undefined" };
    const copies = b.addWriteFiles();
    for (sources.kernels) |file| {
        const cpp = copies.addCopyFile(b.path(b.fmt("engine/cuda/{s}", .{file})), b.fmt("{s}.cpp", .{file}));
        step.addCSourceFile(.{ .file = cpp, .flags = flags });
    }
    step.addCSourceFiles(.{ .root = b.path("engine/cuda"), .files = &.{"emu/emu.cpp"}, .flags = &.{ "-std=c++17", "-O2" } });
    step.addIncludePath(b.path("engine/cuda"));
    step.addIncludePath(b.path("engine/include"));
    step.linkLibCpp();
}

/// nvcc from $NVCC, the PATH or /usr/local/cuda/bin; null (with one warning) where there is
/// none and the mode allows it, a failed build where it does not (-Dcuda=on, or CI=true).
fn findNvcc(b: *std.Build, mode: CudaMode) ?[]const u8 {
    if (mode == .off) return null;
    const env = b.graph.env_map;
    const found: ?[]const u8 = env.get("NVCC") orelse b.findProgram(&.{"nvcc"}, &.{"/usr/local/cuda/bin"}) catch null;
    if (found) |nvcc| return nvcc;
    const required = mode == .on or (env.get("CI") != null and std.mem.eql(u8, env.get("CI").?, "true"));
    if (required) {
        const fail = b.addFail("nvcc is not on this machine, and the CUDA backend is required (-Dcuda=on or CI=true)");
        b.getInstallStep().dependOn(&fail.step);
    } else {
        std.log.warn("nvcc not found: the CUDA backend (zig-out/lib/libinferneo_cuda.so) is not built", .{});
    }
    return null;
}

/// libinferneo_cuda.so: nvcc compiles each kernel file for Hopper (sm_90a), Ampere (sm_80) and
/// compute_90 PTX; the Zig host side is built for a baseline x86-64 (the library travels to
/// GPU machines whose CPU is another one) and linked with the static CUDA runtime.
fn addCudaLibrary(b: *std.Build, nvcc: []const u8, sources: CudaSources, optimize: std.builtin.OptimizeMode) *std.Build.Step.InstallArtifact {
    const lib = b.addSharedLibrary(.{
        .name = "inferneo_cuda",
        .root_source_file = b.path("engine/src/root.zig"),
        .target = b.resolveTargetQuery(.{ .cpu_arch = .x86_64, .os_tag = .linux, .abi = .gnu, .cpu_model = .{ .explicit = &std.Target.x86.cpu.x86_64_v2 } }),
        .optimize = optimize,
        .link_libc = true,
    });
    lib.root_module.addOptions("build_options", backendOptions(b, "cuda"));
    lib.addIncludePath(b.path("engine/cuda"));
    lib.addIncludePath(b.path("engine/include"));
    for (sources.kernels) |file| {
        const run = b.addSystemCommand(&.{ nvcc, "-std=c++17", "-O3", "-Xcompiler", "-fPIC", "-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=compute_90", "-c" });
        run.addFileArg(b.path(b.fmt("engine/cuda/{s}", .{file})));
        run.addArg("-o");
        lib.addObjectFile(run.addOutputFileArg(b.fmt("{s}.o", .{file})));
        for (sources.headers) |h| run.addFileInput(b.path(b.fmt("engine/cuda/{s}", .{h})));
        run.addFileInput(b.path("engine/include/inferneo.h"));
    }
    lib.addLibraryPath(.{ .cwd_relative = cudaLibDir(b, nvcc) });
    lib.linkSystemLibrary2("cudart_static", .{ .preferred_link_mode = .static });
    lib.linkSystemLibrary("rt");
    lib.linkSystemLibrary("dl");
    lib.linkSystemLibrary("pthread");
    lib.linkLibCpp();
    return b.addInstallArtifact(lib, .{});
}

/// Where libcudart_static.a is: under $CUDA_HOME, $CUDA_PATH, nvcc's own folder's parent, or
/// /usr/local/cuda (nvcc on the PATH may be a wrapper script elsewhere).
fn cudaLibDir(b: *std.Build, nvcc: []const u8) []const u8 {
    const env = b.graph.env_map;
    const roots = [_]?[]const u8{ env.get("CUDA_HOME"), env.get("CUDA_PATH"), std.fs.path.dirname(std.fs.path.dirname(nvcc) orelse "/") orelse "/", "/usr/local/cuda" };
    for (roots) |root| {
        const dir = b.pathJoin(&.{ root orelse continue, "lib64" });
        std.fs.cwd().access(b.pathJoin(&.{ dir, "libcudart_static.a" }), .{}) catch continue;
        return dir;
    }
    return "/usr/local/cuda/lib64";
}
