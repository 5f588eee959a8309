//! engine/cuda's C API (ifn_cuda.h) as Zig sees it: the CUDA backend and the kernel tests.
pub const cu = @cImport({
    @cInclude("ifn_cuda.h");
    @cInclude("inferneo.h");
});
