// The CUDA backend over the host emulator (zig-out/emu/lib, built with every engine build):
// the CUDA code path, run where there is no GPU.
import { existsSync } from "node:fs";
import { join } from "node:path";

export const EMULATED_CUDA_LIB = join(import.meta.dir, "..", "..", "zig-out", "emu", "lib", "libinferneo_cuda.so");
export const HAVE_EMULATED_CUDA = existsSync(EMULATED_CUDA_LIB);
if (!HAVE_EMULATED_CUDA) console.warn(`skipped: ${EMULATED_CUDA_LIB} is not built (run npm run build:engine)`);

/** Runs `make` with --device cuda meaning the emulated build (an engine keeps the library it opened). */
export async function withEmulatedCuda<T>(make: () => Promise<T> | T): Promise<T> {
  const before = process.env.INFERNEO_CUDA_LIB;
  process.env.INFERNEO_CUDA_LIB = EMULATED_CUDA_LIB;
  try {
    return await make();
  } finally {
    if (before === undefined) delete process.env.INFERNEO_CUDA_LIB;
    else process.env.INFERNEO_CUDA_LIB = before;
  }
}
