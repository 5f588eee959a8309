#!/usr/bin/env bun
// Offline single-sequence speed: prefill and decode tokens/s for a model path.
//   bun run bench --model <path> [--prompt-tokens 128] [--decode-tokens 64] [--threads N] [--runs 3]
// Fixed prompt ids (seeded), a warm-up run, then medians. One summary line at the end.
import { availableParallelism, cpus } from "node:os";
import { parseArgs } from "node:util";
import { LLMEngine } from "../src/engine/llm_engine.ts";
import { DEFAULT_SAMPLING } from "../src/engine/request.ts";

const { values } = parseArgs({
  options: {
    model: { type: "string" },
    "prompt-tokens": { type: "string", default: "128" },
    "decode-tokens": { type: "string", default: "64" },
    threads: { type: "string", default: String(availableParallelism()) },
    runs: { type: "string", default: "3" },
  },
});
if (!values.model) {
  console.error("usage: bun run bench --model <hf folder | file.gguf> [--prompt-tokens N] [--decode-tokens N] [--threads N] [--runs N]");
  process.exit(2);
}
const promptTokens = Number(values["prompt-tokens"]);
const decodeTokens = Number(values["decode-tokens"]);
const threads = Number(values.threads);
const runs = Number(values.runs);

const engine = await LLMEngine.create(values.model, {
  threads,
  maxNumSeqs: 1,
  maxNumBatchedTokens: Math.max(promptTokens, 16),
  enablePrefixCaching: false, // every run computes its prompt
});
const vocab = engine.model.spec.config.vocabSize;
let state = 12345;
const prompt = [engine.model.spec.bosTokenId ?? 1];
while (prompt.length < promptTokens) {
  state = (state * 1103515245 + 12345) % 2 ** 31;
  prompt.push(259 + (state % Math.max(1, vocab - 259))); // past the special and byte tokens
}

async function timed(maxTokens: number): Promise<{ firstMs: number; restMs: number; n: number }> {
  const t0 = performance.now();
  let tFirst = 0;
  let n = 0;
  for await (const out of engine.addRequest(prompt, { ...DEFAULT_SAMPLING, temperature: 0, ignoreEos: true, maxTokens, seed: 0 })) {
    if (out.error) throw new Error(out.error);
    if (n === 0 && out.newTokenIds.length > 0) tFirst = performance.now();
    n += out.newTokenIds.length;
  }
  return { firstMs: tFirst - t0, restMs: performance.now() - tFirst, n };
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

await timed(4); // warm-up: page in the weights, spin up the threads
const prefill: number[] = [];
const decode: number[] = [];
for (let r = 0; r < runs; r++) {
  const p = await timed(1);
  prefill.push(promptTokens / (p.firstMs / 1000));
  const d = await timed(decodeTokens);
  decode.push((d.n - 1) / (d.restMs / 1000));
}
const c = engine.model.spec.config;
const cpu = cpus()[0]?.model ?? "unknown CPU";
await engine.shutdown();
console.log(
  `${values.model} (${engine.model.spec.dtype}, ${c.numLayers}x${c.hiddenSize}) on ${cpu}, ${threads} threads: ` +
    `prefill ${promptTokens} tokens ${median(prefill).toFixed(1)} tok/s, decode ${median(decode).toFixed(1)} tok/s (medians of ${runs})`,
);
