// scripts/gpu-check's parts that run without a GPU: its kernel checks (numpy references, ctypes
// mirrors of ifn_cuda.h's structs) over the emulated CUDA build, so that the script a lent GPU
// runs is known to work before it gets there.
import { describe, expect, setDefaultTimeout, test } from "bun:test";
import { spawnSync } from "node:child_process";
import { join } from "node:path";
import { EMULATED_CUDA_LIB, HAVE_EMULATED_CUDA } from "./helpers/cuda.ts";

setDefaultTimeout(120_000);

const numpy = spawnSync("python3", ["-c", "import numpy"]).status === 0;
if (!numpy) console.warn("skipped: python3 with numpy is not on this machine (scripts/gpu_check_kernels.py needs it)");

describe.skipIf(!HAVE_EMULATED_CUDA || !numpy)("scripts/gpu_check_kernels.py (emulated, small shapes)", () => {
  test("every kernel check passes against numpy's float64 references", () => {
    const script = join(import.meta.dir, "..", "scripts", "gpu_check_kernels.py");
    const r = spawnSync("python3", [script, "--lib", EMULATED_CUDA_LIB, "--quick", "--seed", "7"], {
      encoding: "utf8",
    });
    const out = r.stdout + r.stderr;
    expect(out).toMatch(/kernels: \d+ passed, 0 failed/);
    expect(Number(/kernels: (\d+) passed/.exec(out)?.[1])).toBeGreaterThan(90);
    expect(r.status).toBe(0);
  });
});
