#!/usr/bin/env bun
// Inferneo against llama.cpp's own llama-bench (built natively by scripts/build-llama-cpp.sh),
// on the same GGUF files and threads, alternating rounds in one run: prefill of --prompt tokens
// and single-stream decode of --decode tokens after it (after a context of --depth tokens),
// medians and ratios.
//   bun scripts/bench-llama-cpp.ts --model a.gguf[,b.gguf] [--prompt 512] [--decode 64]
//       [--depth 0] [--threads 2] [--rounds 2] [--reps 3] [--fa 0,1]
// llama-bench runs with its default f16 KV cache, once per flash-attention setting; the faster
// one is its figure. With --depth, decode is also set against the roofline: the weights' bytes
// (the file's) and the K/V a step reads at that depth (f16, as both sides keep it) over the read
// bandwidth of the shared probe (membw.c), measured after each of our decode runs.
import { spawnSync } from "node:child_process";
import { existsSync, statSync } from "node:fs";
import { basename, join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { readGguf } from "../src/model/gguf.ts";

const { values } = parseArgs({
  options: {
    model: { type: "string" },
    prompt: { type: "string", default: "512" },
    decode: { type: "string", default: "64" },
    threads: { type: "string", default: "2" },
    rounds: { type: "string", default: "2" },
    fa: { type: "string", default: "0,1" },
    depth: { type: "string", default: "0" },
    reps: { type: "string", default: "3" },
  },
});
const depth = Number(values.depth);
const root = join(import.meta.dir, "..");
const llamaBench = join(root, ".bench", "llama.cpp", "build", "bin", "llama-bench");
if (!values.model || !existsSync(llamaBench)) {
  console.error(
    "usage: bun scripts/bench-llama-cpp.ts --model a.gguf[,b.gguf] (needs scripts/build-llama-cpp.sh first)",
  );
  process.exit(2);
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

/** Ours: `bun run bench`'s summary line, parsed. */
function ours(model: string): { pp: number; tg: number } {
  const r = spawnSync(
    "bun",
    [join(root, "scripts", "bench.ts"), "--model", model, "--prompt-tokens", values.prompt!, "--batch", "1"].concat([
      "--decode-tokens",
      values.decode!,
      "--threads",
      values.threads!,
      "--runs",
      values.reps!,
      "--depth",
      String(Math.max(depth, 8)),
    ]),
    { encoding: "utf8" },
  );
  const out = r.stdout + r.stderr;
  const pp = /prefill \d+ ([\d.]+) tok\/s/.exec(out);
  const tg = /decode x1(?: at depth \d+)? ([\d.]+) tok\/s/.exec(out);
  if (!pp || !tg) throw new Error(`bench.ts said: ${out}`);
  return { pp: Number(pp[1]), tg: Number(tg[1]) };
}

/** llama-bench's JSON rows for one test (prefill: -n 0; decode at a depth: -p 0 -d N). */
function llamaBenchRows(model: string, p: string, n: string, d: number): { avg_ts: number }[] {
  const args = ["-m", model, "-p", p, "-n", n, "-d", String(d), "-t", values.threads!, "-fa", values.fa!];
  const r = spawnSync(llamaBench, args.concat(["-r", values.reps!, "-o", "json"]), {
    encoding: "utf8",
    maxBuffer: 1 << 24,
  });
  return JSON.parse(r.stdout) as { avg_ts: number }[];
}

/** llama.cpp: the faster flash-attention setting for each test. */
function theirs(model: string): { pp: number; tg: number } {
  const best = (rows: { avg_ts: number }[]) => Math.max(...rows.map((x) => x.avg_ts));
  return {
    pp: best(llamaBenchRows(model, values.prompt!, "0", 0)),
    tg: best(llamaBenchRows(model, "0", values.decode!, depth)),
  };
}

/** Bytes a decode step reads: the weights (the file's bytes) and, at `depth`, the f16 K/V of every layer. */
function stepBytes(model: string): number {
  const meta = readGguf(model).metadata;
  const arch = String(meta.get("general.architecture"));
  const num = (key: string) => Number(meta.get(`${arch}.${key}`) ?? NaN);
  const headDim = num("attention.key_length") || num("embedding_length") / num("attention.head_count");
  const kvPerToken = 2 * num("block_count") * num("attention.head_count_kv") * headDim * 2;
  return statSync(model).size + depth * kvPerToken;
}

/** The shared probe's read bandwidth (GB/s) with the same threads, or null where it cannot run. */
function readGBs(): number | null {
  const probe = resolve(root, "..", "shared", "tools", "membw.c");
  const bin = join(root, ".bench", "membw");
  const built =
    existsSync(bin) ||
    (existsSync(probe) && spawnSync("gcc", ["-O3", "-march=native", "-fopenmp", probe, "-o", bin]).status === 0);
  if (!built) return null;
  const r = spawnSync(bin, ["1024", "5"], {
    encoding: "utf8",
    env: { ...process.env, OMP_NUM_THREADS: values.threads },
  });
  const m = /read=([\d.]+) GB\/s/.exec(r.stdout);
  return m ? Number(m[1]) : null;
}

for (const model of values.model.split(",")) {
  const a: { pp: number[]; tg: number[] } = { pp: [], tg: [] };
  const b: { pp: number[]; tg: number[] } = { pp: [], tg: [] };
  const roofline: number[] = []; // our decode over the bandwidth's tok/s, round by round
  for (let round = 0; round < Number(values.rounds); round++) {
    for (const [side, run] of [
      [a, ours],
      [b, theirs],
    ] as const) {
      const x = run(model);
      side.pp.push(x.pp);
      side.tg.push(x.tg);
      const gbs = side === a && depth > 0 ? readGBs() : null;
      if (gbs !== null) roofline.push(x.tg / ((gbs * 1e9) / stepBytes(model)));
    }
  }
  const [opp, otg, lpp, ltg] = [median(a.pp), median(a.tg), median(b.pp), median(b.tg)];
  const roof = roofline.length > 0 ? `, ${(100 * median(roofline)).toFixed(0)}% of the read roofline` : "";
  console.log(
    `${basename(model)}: prefill ${values.prompt} ${opp.toFixed(1)} vs ${lpp.toFixed(1)} tok/s (${(opp / lpp).toFixed(2)}x), ` +
      `decode${depth > 0 ? ` at depth ${depth}` : ""} ${otg.toFixed(1)} vs ${ltg.toFixed(1)} tok/s (${(otg / ltg).toFixed(2)}x)${roof}; ` +
      `rounds ${values.rounds}, threads ${values.threads}, inferneo vs llama-bench`,
  );
}
