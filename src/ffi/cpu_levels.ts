// Which build of the engine suits this CPU. A portable install (an image) builds the
// engine once per CPU level (INFERNEO_CPU=x86_64_v3,x86_64_v4+avx512vnni,...): kernels
// pick their instructions at compile time, and without VNNI a Q4 decode step is about
// 5.6x slower, so the loader takes the richest build whose features this CPU has.
import { readFileSync } from "node:fs";

/** /proc/cpuinfo flags that each Zig CPU model needs (the x86-64 psABI levels). */
const LEVEL_FLAGS: Record<string, string[]> = {
  x86_64: [],
  x86_64_v2: ["sse4_2", "popcnt", "ssse3"],
  x86_64_v3: ["sse4_2", "popcnt", "avx2", "fma", "bmi2", "f16c", "movbe"],
  x86_64_v4: [
    "sse4_2",
    "popcnt",
    "avx2",
    "fma",
    "bmi2",
    "f16c",
    "movbe",
    "avx512f",
    "avx512bw",
    "avx512cd",
    "avx512dq",
    "avx512vl",
  ],
};
/** Zig feature names after "+" and their /proc/cpuinfo names. */
const FEATURE_FLAGS: Record<string, string> = {
  avx512vnni: "avx512_vnni",
  avx512bf16: "avx512_bf16",
  avxvnni: "avx_vnni",
};

/** The CPU flags a level name such as "x86_64_v4+avx512vnni" needs; null for a name not known here. */
export function flagsNeeded(level: string): string[] | null {
  const [model, ...features] = level.split("+");
  const base = LEVEL_FLAGS[model];
  if (base === undefined || features.some((f) => !(f in FEATURE_FLAGS))) return null;
  return [...base, ...features.map((f) => FEATURE_FLAGS[f])];
}

/** The level among `levels` that needs the most flags, all of which `cpu` has; null if none fits. */
export function pickLevel(levels: readonly string[], cpu: ReadonlySet<string>): string | null {
  let best: string | null = null;
  let bestCount = -1;
  for (const level of levels) {
    const needed = flagsNeeded(level);
    if (needed === null || !needed.every((f) => cpu.has(f))) continue;
    if (needed.length > bestCount) [best, bestCount] = [level, needed.length];
  }
  return best;
}

/** This machine's CPU flags (empty where /proc/cpuinfo cannot be read). */
export function cpuFlags(): Set<string> {
  try {
    const line = readFileSync("/proc/cpuinfo", "utf8")
      .split("\n")
      .find((l) => l.startsWith("flags"));
    return new Set(line?.split(":")[1]?.trim().split(/\s+/) ?? []);
  } catch {
    return new Set();
  }
}
