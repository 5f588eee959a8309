#!/usr/bin/env bun
// Offline engine speed for a model path, no HTTP:
//   bun run bench --model <path> [--prompt-tokens 128,512] [--batch 1,8,16,32] [--decode-tokens 64]
//       [--depth 8] [--threads N] [--runs 3] [--dtype auto|bfloat16] [--kv-cache-dtype auto|f32|f16]
//       [--no-async-scheduling]
// Prefill tok/s for each prompt length (one sequence), and aggregate decode tok/s with
// 1, 8, ... sequences decoding together, each after a prompt of --depth tokens (decode at
// depth: attention reads that much K/V a step). Fixed prompts, a warm-up, medians. One
// summary line.
import { availableParallelism, cpus } from "node:os";
import { parseArgs } from "node:util";
import { LLMEngine } from "../src/engine/llm_engine.ts";
import { DEFAULT_SAMPLING } from "../src/engine/request.ts";
import { syntheticPrompt } from "./synthetic.ts";

const { values } = parseArgs({
  options: {
    model: { type: "string" },
    "prompt-tokens": { type: "string", default: "128,512" },
    batch: { type: "string", default: "1" },
    "decode-tokens": { type: "string", default: "64" },
    depth: { type: "string", default: "8" },
    threads: { type: "string", default: String(availableParallelism()) },
    runs: { type: "string", default: "3" },
    dtype: { type: "string", default: "auto" },
    "kv-cache-dtype": { type: "string", default: "auto" },
    "no-async-scheduling": { type: "boolean", default: false },
  },
});
if (!values.model) {
  console.error(
    "usage: bun run bench --model <hf folder | file.gguf> [--prompt-tokens 128,512] [--batch 1,8,16,32] [--decode-tokens 64] [--threads N] [--runs N]",
  );
  process.exit(2);
}
const requestedLengths = values["prompt-tokens"]!.split(",").map(Number);
const batches = values.batch!.split(",").map(Number);
const decodeTokens = Number(values["decode-tokens"]);
const depth = Number(values.depth);
const threads = Number(values.threads);
const runs = Number(values.runs);

const engine = await LLMEngine.create(values.model, {
  threads,
  maxNumSeqs: Math.max(...batches),
  maxNumBatchedTokens: Math.max(...requestedLengths, 16),
  enablePrefixCaching: false, // every run computes its prompt
  computeDtype: values.dtype === "bfloat16" || values.dtype === "bf16" ? "bf16" : "f32",
  kvCacheDtype: values["kv-cache-dtype"] as "auto" | "f32" | "f16",
  asyncScheduling: !values["no-async-scheduling"],
});
// A prompt must leave room for the one token it is timed to: at most max_model_len - 1.
const promptLengths = requestedLengths.map((l) => Math.min(l, engine.maxModelLen - 1));
const vocab = engine.model.spec.config.vocabSize;
const prompt = (length: number, salt: number) =>
  syntheticPrompt(length, vocab, 12345 + salt, engine.model.spec.bosTokenId ?? 1);
const greedy = { ...DEFAULT_SAMPLING, temperature: 0, ignoreEos: true, seed: 0 };
const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

async function prefill(length: number): Promise<number> {
  const t0 = performance.now();
  for await (const _ of engine.addRequest(prompt(length, 0), { ...greedy, maxTokens: 1 }));
  return length / ((performance.now() - t0) / 1000);
}

/** Aggregate decode tok/s of `n` sequences, timed from when all have their first token. */
async function decode(n: number): Promise<number> {
  let started = 0;
  let tStart = 0;
  let tokens = 0;
  await Promise.all(
    Array.from({ length: n }, async (_, i) => {
      let first = true;
      const at = Math.min(depth, engine.maxModelLen - decodeTokens - 1);
      for await (const out of engine.addRequest(prompt(at, i + 1), { ...greedy, maxTokens: decodeTokens + 1 })) {
        if (first) {
          first = false;
          if (++started === n) tStart = performance.now();
          continue;
        }
        if (started === n) tokens += out.newTokenIds.length;
      }
    }),
  );
  return tokens / ((performance.now() - tStart) / 1000);
}

await prefill(Math.min(...promptLengths)); // warm-up: page in the weights, spin up the threads
if (depth <= 8) await decode(1);
const parts: string[] = [];
for (const length of promptLengths) {
  const xs = [];
  for (let r = 0; r < runs; r++) xs.push(await prefill(length));
  parts.push(`prefill ${length} ${median(xs).toFixed(1)} tok/s`);
}
for (const n of batches) {
  const xs = [];
  for (let r = 0; r < runs; r++) xs.push(await decode(n));
  parts.push(`decode x${n}${depth > 8 ? ` at depth ${depth}` : ""} ${median(xs).toFixed(1)} tok/s`);
}
const c = engine.model.spec.config;
await engine.shutdown();
console.log(
  `${values.model} (${engine.model.spec.dtype}, ${c.numLayers}x${c.hiddenSize}) on ${cpus()[0]?.model ?? "CPU"}, ${threads} threads, medians of ${runs}: ${parts.join(", ")}`,
);
