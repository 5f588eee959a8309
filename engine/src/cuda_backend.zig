//! The CUDA backend (in progress).
pub const name = "cuda";
pub const CudaBackend = struct {};
