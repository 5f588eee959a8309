#!/usr/bin/env bun
// Inferneo against llama.cpp on the same GGUF, the same threads, in the same run,
// alternating: prefill (pp), single-stream decode (tg) and batched decode (--batch
// sequences at once, 4-token prompts; llama.cpp through node-llama-cpp's batched
// evaluation) tok/s and their ratios, plus the memory-bandwidth roofline for decode.
//   bun scripts/bench-peer.ts --model model.gguf [--threads 2] [--prompt-tokens 512] [--decode-tokens 128]
//       [--batch 16 (0: none)] [--runs 3] [--dtype auto|bfloat16]
// llama.cpp comes from the npm package node-llama-cpp@3.21.1 (its prebuilt CPU build),
// installed on first use into .bench/peer (ignored by git), not a project dependency.
import { spawnSync } from "node:child_process";
import { copyFileSync, existsSync, mkdirSync } from "node:fs";
import { availableParallelism, cpus } from "node:os";
import { join, resolve } from "node:path";
import { parseArgs } from "node:util";
import { LLMEngine } from "../src/engine/llm_engine.ts";
import { Role } from "../src/ffi/native.ts";
import { DEFAULT_SAMPLING } from "../src/engine/request.ts";
import { syntheticPrompt } from "./synthetic.ts";

const { values } = parseArgs({
  options: {
    model: { type: "string" },
    threads: { type: "string", default: String(availableParallelism()) },
    "prompt-tokens": { type: "string", default: "512" },
    "decode-tokens": { type: "string", default: "128" },
    runs: { type: "string", default: "3" },
    batch: { type: "string", default: "16" },
    dtype: { type: "string", default: "auto" },
  },
});
if (!values.model?.endsWith(".gguf")) {
  console.error(
    "usage: bun scripts/bench-peer.ts --model model.gguf [--threads N] [--prompt-tokens 512] [--decode-tokens 128] [--runs 3]",
  );
  process.exit(2);
}
const model = resolve(values.model);
const threads = Number(values.threads);
const promptTokens = Number(values["prompt-tokens"]);
const decodeTokens = Number(values["decode-tokens"]);
const runs = Number(values.runs);
const batch = Number(values.batch);
const root = join(import.meta.dir, "..");
const peerDir = join(root, ".bench", "peer");

if (!existsSync(join(peerDir, "node_modules", "node-llama-cpp"))) {
  mkdirSync(peerDir, { recursive: true });
  console.error("installing node-llama-cpp@3.21.1 (CPU build) into .bench/peer ...");
  const r = spawnSync(
    "npm",
    [
      "install",
      "--prefix",
      peerDir,
      "--no-audit",
      "--no-fund",
      "--omit=optional",
      "--ignore-scripts",
      "node-llama-cpp@3.21.1",
      "@node-llama-cpp/linux-x64@3.21.1",
    ],
    { stdio: "inherit" },
  );
  if (r.status !== 0) process.exit(1);
}

// ES modules resolve packages next to the importing file: the runner lives in the scratch folder.
copyFileSync(join(root, "scripts", "peer-llama.mjs"), join(peerDir, "peer-llama.mjs"));

interface Run {
  prefill_tok_s: number;
  decode_tok_s: number;
  batch_tok_s: number; // aggregate over `batch` sequences decoding at once (0: not run)
  tokens: number[]; // the first greedy tokens after BOS
}

function peer(): Run {
  const r = spawnSync(
    "node",
    [
      join(peerDir, "peer-llama.mjs"),
      model,
      String(threads),
      String(promptTokens),
      String(decodeTokens),
      String(batch),
    ],
    { encoding: "utf8", cwd: peerDir },
  );
  const line = r.stdout.trim().split("\n").pop() ?? "";
  if (r.status !== 0 || !line.startsWith("{")) throw new Error(`llama.cpp run failed: ${r.stderr.slice(-2000)}`);
  return JSON.parse(line);
}

const engine = await LLMEngine.create(model, {
  threads,
  maxNumSeqs: Math.max(1, batch),
  maxNumBatchedTokens: Math.max(promptTokens, 4 * batch),
  enablePrefixCaching: false,
  computeDtype: values.dtype === "bfloat16" || values.dtype === "bf16" ? "bf16" : "f32",
});
const vocab = engine.model.spec.config.vocabSize;
const prompt = syntheticPrompt(promptTokens, vocab, 12345);
async function ours(): Promise<Run> {
  let t0 = performance.now();
  for await (const _ of engine.addRequest(prompt, { ...DEFAULT_SAMPLING, temperature: 0, maxTokens: 1 }));
  const prefill = promptTokens / ((performance.now() - t0) / 1000);
  let n = 0;
  t0 = 0;
  const tokens: number[] = [];
  for await (const out of engine.addRequest([1], {
    ...DEFAULT_SAMPLING,
    temperature: 0,
    ignoreEos: true,
    maxTokens: decodeTokens,
  })) {
    if (n === 0) t0 = performance.now();
    n += out.newTokenIds.length;
    tokens.push(...out.newTokenIds);
  }
  const decode = (n - 1) / ((performance.now() - t0) / 1000);
  let batchTokS = 0;
  if (batch > 0) {
    // The same as the peer: `batch` 4-token prompts, decodeTokens each, all at once.
    t0 = performance.now();
    let total = 0;
    await Promise.all(
      Array.from({ length: batch }, async (_, i) => {
        for await (const out of engine.addRequest([1, 300 + i, 400 + i, 500 + i], {
          ...DEFAULT_SAMPLING,
          temperature: 0,
          ignoreEos: true,
          maxTokens: decodeTokens,
        }))
          total += out.newTokenIds.length;
      }),
    );
    batchTokS = total / ((performance.now() - t0) / 1000);
  }
  return { prefill_tok_s: prefill, decode_tok_s: decode, batch_tok_s: batchTokS, tokens: tokens.slice(0, 16) };
}

// Memory bandwidth with the same threads: the roofline for a decode step that reads
// every weight once. The shared probe (membw.c, OpenMP) where it and gcc are at hand: its
// read (a sum over 1 GiB) and its copy (memcpy, read and written bytes counted); else a
// single-threaded copy measured here (an underestimate).
function bandwidthGBs(): { gbs: number; copy: number | null; how: string } {
  const probe = resolve(root, "..", "shared", "tools", "membw.c");
  const bin = join(root, ".bench", "membw");
  if (
    existsSync(probe) &&
    (existsSync(bin) || spawnSync("gcc", ["-O3", "-march=native", "-fopenmp", probe, "-o", bin]).status === 0)
  ) {
    // 1 GiB per array: far past the caches, without pushing the loaded models out of memory.
    const r = spawnSync(bin, ["1024", "5"], {
      encoding: "utf8",
      env: { ...process.env, OMP_NUM_THREADS: String(threads) },
    });
    const m = /read=([\d.]+) GB\/s copy\(r\+w\)=([\d.]+) GB\/s/.exec(r.stdout);
    if (m) return { gbs: Number(m[1]), copy: Number(m[2]), how: "membw.c read" };
  }
  return { gbs: copyGBs(), copy: null, how: "single-thread copy" };
}

function copyGBs(): number {
  const bytes = 256 * 1024 * 1024;
  const src = new Float64Array(bytes / 8).fill(1);
  const dst = new Float64Array(bytes / 8);
  const times: number[] = [];
  for (let i = 0; i < 5; i++) {
    const t = performance.now();
    dst.set(src);
    times.push((performance.now() - t) / 1000);
  }
  return (2 * bytes) / Math.min(...times) / 1e9; // read + write
}

await ours(); // warm-up both
peer();
const a: Run[] = [];
const b: Run[] = [];
// The bandwidth is probed in every round too: on a shared machine it moves from minute to
// minute, and the roofline should be the one of the moment the decode ran.
const probes: { gbs: number; copy: number | null; how: string }[] = [];
for (let r = 0; r < runs; r++) {
  b.push(peer());
  a.push(await ours());
  probes.push(bandwidthGBs());
}
await engine.shutdown();
const med = (xs: number[]) => [...xs].sort((x, y) => x - y)[Math.floor(xs.length / 2)];
const us = {
  pp: med(a.map((x) => x.prefill_tok_s)),
  tg: med(a.map((x) => x.decode_tok_s)),
  batch: med(a.map((x) => x.batch_tok_s)),
};
const them = {
  pp: med(b.map((x) => x.prefill_tok_s)),
  tg: med(b.map((x) => x.decode_tok_s)),
  batch: med(b.map((x) => x.batch_tok_s)),
};
// Greedy agreement after BOS: a check that both read the same weights the same way
// (llama.cpp quantizes activations and keeps an f16 KV cache, so a near-tie may differ).
let agree = 0;
while (agree < 16 && a[0].tokens[agree] === b[0].tokens[agree]) agree++;
// A decode step reads every matrix once, but only one row of the embedding table.
const spec = engine.model.spec;
const weightBytes = spec.tensors
  .filter((t) => t.role !== Role.TOKEN_EMBD || spec.config.tieWordEmbeddings)
  .reduce((n, t) => n + t.sizeBytes, 0);
const bw = med(probes.map((p) => p.gbs));
const how = `${probes[0].how}, median of ${probes.length}: ${probes.map((p) => p.gbs.toFixed(1)).join(", ")}`;
const roofline = (bw * 1e9) / weightBytes;
const copies = probes.flatMap((p) => (p.copy === null ? [] : [p.copy]));
const copyRoofline = copies.length > 0 ? (med(copies) * 1e9) / weightBytes : null;
// Each round's decode against the probe taken right after it: the bandwidth moves from
// minute to minute, and a round's pair shares its minute (the median of these fractions).
const paired = (gbsOf: (p: (typeof probes)[number]) => number | null) => {
  const f = a.flatMap((run, i) => {
    const g = gbsOf(probes[i]);
    return g === null ? [] : [(100 * run.decode_tok_s * weightBytes) / (g * 1e9)];
  });
  return f.length > 0 ? `${med(f).toFixed(0)}% (${f.map((x) => x.toFixed(0)).join(", ")})` : "n/a";
};
console.log(
  `${values.model} on ${cpus()[0]?.model ?? "CPU"}, ${threads} threads, medians of ${runs}: ` +
    `pp${promptTokens} inferneo ${us.pp.toFixed(1)} vs llama.cpp ${them.pp.toFixed(1)} tok/s (${(us.pp / them.pp).toFixed(2)}x); ` +
    `tg${decodeTokens} inferneo ${us.tg.toFixed(1)} vs llama.cpp ${them.tg.toFixed(1)} tok/s (${(us.tg / them.tg).toFixed(2)}x); ` +
    (batch > 0
      ? `batched x${batch} inferneo ${us.batch.toFixed(1)} vs llama.cpp ${them.batch.toFixed(1)} tok/s (${(us.batch / them.batch).toFixed(2)}x); `
      : "") +
    `bandwidth ${bw.toFixed(1)} GB/s (${how}), ${(weightBytes / 1e6).toFixed(0)} MB read per token, decode roofline ${roofline.toFixed(1)} tok/s (inferneo at ${((100 * us.tg) / roofline).toFixed(0)}%); ` +
    (copyRoofline !== null
      ? `on the copy bandwidth (median ${med(copies).toFixed(1)} GB/s: ${copies.map((c) => c.toFixed(1)).join(", ")}) ${copyRoofline.toFixed(1)} tok/s (inferneo at ${((100 * us.tg) / copyRoofline).toFixed(0)}%); `
      : "") +
    `round by round, decode over the roofline of the probe after it: read ${paired((p) => p.gbs)}, copy ${paired((p) => p.copy)}; ` +
    `greedy tokens agree for the first ${agree} of 16`,
);
