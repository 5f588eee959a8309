#!/usr/bin/env bun
// Inferneo against llama.cpp's own llama-bench (built natively by scripts/build-llama-cpp.sh),
// on the same GGUF files and threads, alternating rounds in one run: prefill of --prompt tokens
// and single-stream decode of --decode tokens after it, medians and ratios.
//   bun scripts/bench-llama-cpp.ts --model a.gguf[,b.gguf] [--prompt 512] [--decode 64]
//       [--threads 2] [--rounds 2] [--fa 0,1]
// llama-bench runs with its default f16 KV cache, once per flash-attention setting; the faster
// one is its figure.
import { spawnSync } from "node:child_process";
import { existsSync } from "node:fs";
import { basename, join } from "node:path";
import { parseArgs } from "node:util";

const { values } = parseArgs({
  options: {
    model: { type: "string" },
    prompt: { type: "string", default: "512" },
    decode: { type: "string", default: "64" },
    threads: { type: "string", default: "2" },
    rounds: { type: "string", default: "2" },
    fa: { type: "string", default: "0,1" },
  },
});
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
      "3",
    ]),
    { encoding: "utf8" },
  );
  const out = r.stdout + r.stderr;
  const pp = /prefill \d+ ([\d.]+) tok\/s/.exec(out);
  const tg = /decode x1 ([\d.]+) tok\/s/.exec(out);
  if (!pp || !tg) throw new Error(`bench.ts said: ${out}`);
  return { pp: Number(pp[1]), tg: Number(tg[1]) };
}

/** llama.cpp: llama-bench's JSON, the faster flash-attention setting for each test. */
function theirs(model: string): { pp: number; tg: number } {
  const r = spawnSync(
    llamaBench,
    [
      "-m",
      model,
      "-p",
      values.prompt!,
      "-n",
      values.decode!,
      "-t",
      values.threads!,
      "-fa",
      values.fa!,
      "-r",
      "3",
    ].concat(["-o", "json"]),
    { encoding: "utf8", maxBuffer: 1 << 24 },
  );
  const rows = JSON.parse(r.stdout) as { n_prompt: number; n_gen: number; avg_ts: number }[];
  const best = (pick: (x: { n_prompt: number; n_gen: number }) => boolean) =>
    Math.max(...rows.filter(pick).map((x) => x.avg_ts));
  return { pp: best((x) => x.n_gen === 0), tg: best((x) => x.n_prompt === 0) };
}

for (const model of values.model.split(",")) {
  const a: { pp: number[]; tg: number[] } = { pp: [], tg: [] };
  const b: { pp: number[]; tg: number[] } = { pp: [], tg: [] };
  for (let round = 0; round < Number(values.rounds); round++) {
    for (const [side, run] of [
      [a, ours],
      [b, theirs],
    ] as const) {
      const x = run(model);
      side.pp.push(x.pp);
      side.tg.push(x.tg);
    }
  }
  const [opp, otg, lpp, ltg] = [median(a.pp), median(a.tg), median(b.pp), median(b.tg)];
  console.log(
    `${basename(model)}: prefill ${values.prompt} ${opp.toFixed(1)} vs ${lpp.toFixed(1)} tok/s (${(opp / lpp).toFixed(2)}x), ` +
      `decode ${otg.toFixed(1)} vs ${ltg.toFixed(1)} tok/s (${(otg / ltg).toFixed(2)}x); ` +
      `rounds ${values.rounds}, threads ${values.threads}, inferneo vs llama-bench`,
  );
}
